"""Tests for onebit.tokenizer against transformers: HF folders, GGUF vocabs, chat templates, streaming."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from onebit.errors import TokenizerError
from onebit.tokenizer import LLAMA3_REGEX, StreamingDetokenizer, Tokenizer, flatten_content

transformers = pytest.importorskip("transformers")
from transformers import PreTrainedTokenizerFast  # noqa: E402

SEED = random.randrange(2**32)  # fresh inputs each run; the seed is in every failure message

CORPUS = """\
The quick brown fox jumps over the lazy dog. It's 2024, and we've got 3.14159 reasons to smile!
Ternary weights take values in {-1, 0, +1}; a 1.58-bit model stores log2(3) bits per weight.
def forward(self, x):\n    return self.w @ x + self.b  # (tokens, hidden)
Le café est très chaud, mais la crème brûlée était déjà froide. Où est la bibliothèque ?
Größere Übungen für Äpfel und Öl: straße, schön, müde. ¿Dónde está el niño? Señor Muñoz.
Ελληνικά: καλημέρα κόσμε. Русский текст: привет, мир! Как дела? Українська мова: їжак.
日本語のテキストをトークン化します。東京は大きな都市です。漢字とひらがなとカタカナ。
中文分词测试：今天天气很好，我们去公园散步吧。机器学习模型需要大量的数据。
한국어 문장도 포함합니다. 안녕하세요, 세계!
Emoji: 😀 😃 😄 🎉🎉 🚀 ✨ 👩‍💻 🇫🇷 ❤️ 🦙 — and symbols like ∑ ∫ √ ≈ ≠ ≤ ≥ € £ ¥.
  Indented line with\ttabs\tand   multiple   spaces.\n\nNew paragraph after blank lines.
"I can't", she said, "won't" and "shan't" aren't the same; y'all'd've known.
URLs: https://example.com/path?q=1&r=two#frag and emails: someone@example.org.
Numbers: 0 1 12 123 1234 12345 123456 -7 +8 9.99 1e-5 0xFF 0b1010.
"""

SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|im_start|>", "<|im_end|>",
]
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Year: " + date_string + "\\n" }}
{%- if tools is not none %}
    {{- "Tools:\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('Only user and assistant roles are supported, got ' + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Newlines after block tags and indented tags: the output depends on trim_blocks / lstrip_blocks.
CHATML_TEMPLATE = """{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are helpful.<|im_end|>
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""

PARTS_TEMPLATE = """{% for message in messages %}<|im_start|>{{ message['role'] }}
{% if message['content'] is string %}{{ message['content'] }}{% else %}
{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% elif part['type'] == 'image' %}<image>{% endif %}{% endfor %}
{% endif %}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


# ---- builders ---------------------------------------------------------------------------------------------


def train_byte_level(llama3_split: bool = False) -> Backend:
    """A byte-level BPE trained on CORPUS; multi-byte characters end up split across tokens."""
    backend = Backend(models.BPE(ignore_merges=llama3_split))
    if llama3_split:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS.splitlines() * 3, trainer)
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    return backend


def save_hf(folder, backend: Backend, **kwargs) -> PreTrainedTokenizerFast:
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, **kwargs)
    hf.save_pretrained(folder)
    return hf


def spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """A GGUF-style SentencePiece vocab: <unk> <s> </s>, 256 <0xNN> bytes, then pieces by falling score."""
    trainer_model = Backend(models.BPE(unk_token="<unk>"))
    trainer_model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>"], show_progress=False)
    trainer_model.train_from_iterator(CORPUS.splitlines() * 3, trainer)
    learned = json.loads(trainer_model.to_str())["model"]
    chars = [t for t in learned["vocab"] if len(t) == 1]
    merged = ["".join(m) if isinstance(m, list) else m.replace(" ", "") for m in learned["merges"]]
    pieces = list(dict.fromkeys(merged + chars))
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def random_text(rng: random.Random, n: int = 40) -> str:
    """Corpus snippets mixed with code points the tokenizers have never seen (byte fallback, odd splits)."""
    pools = [
        lambda: CORPUS[(i := rng.randrange(len(CORPUS))): i + rng.randrange(1, 12)],
        lambda: chr(rng.randrange(0x20, 0x7F)),
        lambda: chr(rng.randrange(0xA0, 0x250)),
        lambda: chr(rng.randrange(0x4E00, 0x9FFF)),
        lambda: chr(rng.randrange(0x1F300, 0x1FAFF)),
        lambda: rng.choice([" ", "  ", "\n", "\t", "\n\n", " \n"]),
        lambda: chr(rng.randrange(0x300, 0x36F)),  # combining marks
    ]
    return "".join(rng.choice(pools)() for _ in range(rng.randrange(1, n)))


@pytest.fixture(scope="module")
def byte_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("byte_level")
    hf = save_hf(folder, train_byte_level(), chat_template=LLAMA3_TEMPLATE)
    return folder, hf


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama3")
    hf = save_hf(folder, train_byte_level(llama3_split=True), chat_template=LLAMA3_TEMPLATE)
    return folder, hf


def spm_meta_tokenizer() -> tuple[Tokenizer, dict]:
    tokens, scores, types = spm_vocab()
    meta = {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    return Tokenizer.from_gguf(meta), meta


@pytest.fixture(scope="module")
def spm_tok():
    return spm_meta_tokenizer()


# ---- HF folders -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["byte_dir", "llama3_dir"])
def test_encode_decode_match_transformers(which, request):
    folder, hf = request.getfixturevalue(which)
    tok = Tokenizer.from_dir(folder)
    rng = random.Random(SEED)
    assert tok.bos_token == BOS and tok.bos_token_id == 0 and tok.add_bos_token
    for _ in range(150):
        text = random_text(rng)
        ids = tok.encode(text)
        assert ids == hf.encode(text), (SEED, text)
        assert tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False), (SEED, text)
        ids = ids + [4] + tok.encode(random_text(rng), add_special_tokens=False)  # 4 = <|eot_id|>
        assert tok.decode(ids) == hf.decode(ids) == BOS + hf.decode(ids[1:]), (SEED, text)
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), (SEED, text)
    assert tok.id_to_token(tok.token_to_id("Ġthe")) == "Ġthe" and tok.token_to_str(tok.token_to_id("Ġthe")) == " the"


def test_vocabulary_accessors(byte_dir):
    tok = Tokenizer.from_dir(byte_dir[0])
    assert tok.vocab_size == 700
    assert tok.special_token_ids == set(range(len(SPECIALS)))
    assert tok.id_to_token(4) == "<|eot_id|>" and tok.token_to_id("<|eot_id|>") == 4
    assert tok.token_to_str(tok.encode(" café", add_special_tokens=False)[0]).startswith(" ")
    assert tok.eos_token == EOS
    assert tok.eos_token_ids == [1, 4]  # EOS, and <|eot_id|> because the chat template ends turns with it


def test_bos_is_never_doubled(byte_dir, tmp_path):
    tok = Tokenizer.from_dir(byte_dir[0])
    assert tok.encode(BOS + "hi")[:2] == [0, tok.encode("hi", add_special_tokens=False)[0]]
    assert tok.encode(BOS + BOS + "hi")[:3] == [0, 0, tok.encode("hi", add_special_tokens=False)[0]]
    # Same when BOS comes from tokenizer_config's add_bos_token instead of the post-processor.
    backend = train_byte_level()
    backend.post_processor = None
    save_hf(tmp_path, backend, add_bos_token=True)
    tok = Tokenizer.from_dir(tmp_path)
    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert tok.encode("hi") == hf.encode("hi") and tok.encode("hi")[0] == 0
    assert tok.encode(BOS + "hi") == tok.encode("hi")


def test_add_bos_false_in_config_overrides_post_processor(tmp_path):
    save_hf(tmp_path, train_byte_level(), add_bos_token=False)
    tok = Tokenizer.from_dir(tmp_path)
    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert tok.encode("hello") == hf.encode("hello") and 0 not in tok.encode("hello")
    assert not tok.add_bos_token


def test_config_fallbacks(tmp_path):
    train_byte_level().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": {"__type": "AddedToken", "content": "<|eot_id|>", "special": True},
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
    }))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<|im_end|>"}}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [4, 1]}))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 2}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.bos_token == BOS and tok.eos_token == "<|eot_id|>"
    assert tok.special_tokens["pad_token"] == "<|im_end|>"
    assert tok.eos_token_ids == [4, 1, 2]
    assert tok.chat_template == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert Tokenizer.from_dir(tmp_path).chat_template == "J"


# ---- chat templates ---------------------------------------------------------------------------------------


def random_chat(rng: random.Random, system: bool) -> list[dict]:
    turns = [{"role": "system", "content": random_text(rng, 10)}] if system else []
    for i in range(rng.randrange(1, 5)):
        turns.append({"role": "user" if i % 2 == 0 else "assistant", "content": random_text(rng, 20)})
    return turns


@pytest.mark.parametrize("template", [LLAMA3_TEMPLATE, CHATML_TEMPLATE], ids=["llama3", "chatml"])
def test_chat_template_matches_transformers(template, tmp_path):
    hf = save_hf(tmp_path, train_byte_level(), chat_template=template)
    tok = Tokenizer.from_dir(tmp_path)
    rng = random.Random(SEED)
    tools = [{"name": "météo", "parameters": {"ville": "string", "unités": ["°C", "°F"]}}]
    for _ in range(20):
        chat = random_chat(rng, system=rng.random() < 0.5)
        for gen in (True, False):
            expected = hf.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            assert tok.apply_chat_template(chat, add_generation_prompt=gen) == expected, SEED
        ids = hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert tok.apply_chat_template(chat, tokenize=True) == ids, SEED
        assert ids.count(0) == (1 if template == LLAMA3_TEMPLATE else 0)  # the template's BOS, once
    with_tools = hf.apply_chat_template(chat, tools=tools, add_generation_prompt=True, tokenize=False)
    assert tok.apply_chat_template(chat, tools=tools) == with_tools
    if template == LLAMA3_TEMPLATE:
        assert '"unités": [\n' in with_tools and "°C" in with_tools  # tojson: indent, no ASCII escaping


def test_chat_template_raise_exception(tmp_path):
    hf = save_hf(tmp_path, train_byte_level(), chat_template=LLAMA3_TEMPLATE)
    tok = Tokenizer.from_dir(tmp_path)
    chat = [{"role": "tool", "content": "42"}]
    with pytest.raises(Exception, match="got tool"):
        hf.apply_chat_template(chat, tokenize=False)
    with pytest.raises(TokenizerError, match="Only user and assistant roles are supported, got tool"):
        tok.apply_chat_template(chat)


def test_chat_template_content_parts(tmp_path):
    hf = save_hf(tmp_path, train_byte_level(), chat_template=PARTS_TEMPLATE)
    tok = Tokenizer.from_dir(tmp_path)
    chat = [
        {"role": "user", "content": [{"type": "text", "text": "Décris "}, {"type": "image"},
                                     {"type": "text", "text": "ça 🚀"}]},
        {"role": "assistant", "content": "Un chat.", "tool_calls": None},
    ]
    expected = hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert tok.apply_chat_template(chat) == expected
    assert "Décris <image>ça 🚀" in expected
    flat = flatten_content(chat)
    assert flat[0]["content"] == "Décris \nça 🚀" and flat[1]["content"] == "Un chat."
    assert chat[0]["content"][0]["text"] == "Décris "  # the input is not modified


def test_chat_template_errors_and_fallback(tmp_path, caplog):
    backend = train_byte_level()
    tok = Tokenizer(backend, special_tokens={"bos_token": BOS}, chat_template="{% if %}")
    with pytest.raises(TokenizerError, match="does not compile"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    tok = Tokenizer(backend, special_tokens={"bos_token": BOS})
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    with caplog.at_level("WARNING"):
        text = tok.apply_chat_template(chat)
    assert text == "<|system|>\nBe brief.\n<|user|>\nhi\n<|assistant|>\n"
    assert "no chat template" in caplog.text
    assert tok.apply_chat_template(chat, add_generation_prompt=False).endswith("<|user|>\nhi\n")


def test_generation_block_renders_its_body(tmp_path):
    template = "{% for m in messages %}{% generation %}[{{ m['content'] }}]{% endgeneration %}{% endfor %}"
    hf = save_hf(tmp_path, train_byte_level(), chat_template=template)
    chat = [{"role": "assistant", "content": "ok"}]
    assert Tokenizer.from_dir(tmp_path).apply_chat_template(chat) == hf.apply_chat_template(chat, tokenize=False)


# ---- GGUF -------------------------------------------------------------------------------------------------


def test_gguf_keys_are_ggufs():
    gguf = pytest.importorskip("gguf")
    from onebit import tokenizer as t

    keys = gguf.Keys.Tokenizer
    assert (t.MODEL, t.PRE, t.TOKENS, t.TOKEN_TYPE, t.MERGES, t.SCORES) == (
        keys.MODEL, keys.PRE, keys.LIST, keys.TOKEN_TYPE, keys.MERGES, keys.SCORES)
    assert (t.BOS_ID, t.EOS_ID, t.EOT_ID, t.EOM_ID, t.UNK_ID, t.PAD_ID) == (
        keys.BOS_ID, keys.EOS_ID, keys.EOT_ID, keys.EOM_ID, keys.UNK_ID, keys.PAD_ID)
    assert (t.ADD_BOS, t.ADD_EOS, t.ADD_PREFIX, t.CHAT_TEMPLATE) == (
        keys.ADD_BOS, keys.ADD_EOS, keys.ADD_PREFIX, keys.CHAT_TEMPLATE)
    assert (t.NORMAL, t.UNKNOWN, t.CONTROL, t.USER_DEFINED, t.UNUSED, t.BYTE) == tuple(gguf.TokenType)


@pytest.mark.parametrize("which, pre", [("byte_dir", "gpt-2"), ("llama3_dir", "llama-bpe")])
def test_gguf_round_trip(which, pre, request):
    tok = Tokenizer.from_dir(request.getfixturevalue(which)[0])
    tok.backend.add_tokens([AddedToken("<user word>", special=False, normalized=False)])
    meta = tok.to_gguf_metadata(vocab_size=712)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == pre
    assert len(meta["tokenizer.ggml.tokens"]) == len(meta["tokenizer.ggml.token_type"]) == 712
    assert meta["tokenizer.ggml.token_type"][:7] == [3] * 7 and meta["tokenizer.ggml.token_type"][700] == 4
    assert meta["tokenizer.ggml.tokens"][711] == "[PAD711]" and meta["tokenizer.ggml.token_type"][711] == 5
    assert all(isinstance(m, str) and m.count(" ") == 1 for m in meta["tokenizer.ggml.merges"])
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (0, 1)
    assert meta["tokenizer.ggml.eot_token_id"] == 4 and meta["tokenizer.chat_template"] == LLAMA3_TEMPLATE

    back = Tokenizer.from_gguf(meta)
    assert (back.bos_token, back.eos_token, back.eos_token_ids) == (BOS, EOS, [1, 4])
    assert back.special_token_ids == tok.special_token_ids and back.chat_template == tok.chat_template
    rng = random.Random(SEED)
    for _ in range(150):
        text = random_text(rng) + rng.choice(["", "<|eot_id|>", "<user word> x"])
        ids = tok.encode(text)
        assert back.encode(text) == ids, (SEED, text)
        assert back.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False), SEED
        assert back.decode(ids) == tok.decode(ids), (SEED, text)
        assert back.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True), SEED


def test_gguf_writes_only_byte_level_bpe(spm_tok):
    word_level = Backend(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(TokenizerError, match="cannot write a WordLevel tokenizer to GGUF"):
        Tokenizer(word_level).to_gguf_metadata()
    with pytest.raises(TokenizerError, match="cannot write a non-byte-level BPE tokenizer to GGUF"):
        spm_tok[0].to_gguf_metadata()
    digits = train_byte_level()
    digits.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(), pre_tokenizers.ByteLevel()])
    with pytest.raises(TokenizerError, match="pre-tokenizer"):
        Tokenizer(digits).to_gguf_metadata()


def test_gguf_sentencepiece_round_trip(spm_tok):
    tok, meta = spm_tok
    assert tok.add_bos_token and tok.bos_token == "<s>" and tok.eos_token_ids == [2]
    assert tok.special_token_ids == {0, 1, 2}
    rng = random.Random(SEED)
    for _ in range(150):
        text = random_text(rng)
        ids = tok.encode(text)
        assert ids[0] == 1 and 1 not in ids[1:], (SEED, text)
        assert tok.decode(ids, skip_special_tokens=True) == text, (SEED, text)
        assert tok.decode(ids[1:]) == text, (SEED, text)
    assert tok.encode("ok 𝔘", add_special_tokens=False)[-4:] == [3 + b for b in "𝔘".encode()]  # byte fallback
    assert tok.decode(tok.encode("Hello world")) == "<s> Hello world"  # as HF's Llama decoder


def test_gguf_sentencepiece_matches_transformers_merges(spm_tok):
    from transformers.tokenization_utils_base import generate_merges

    tok, meta = spm_tok
    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    normal = {t: i for i, t in enumerate(tokens) if meta["tokenizer.ggml.token_type"][i] == 1}
    merges = generate_merges(normal, {t: scores[i] for t, i in normal.items()})
    reference = Backend(models.BPE({t: i for i, t in enumerate(tokens)}, merges, unk_token="<unk>",
                                   fuse_unk=True, byte_fallback=True))
    reference.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    rng = random.Random(SEED)
    for _ in range(150):
        text = random_text(rng)
        assert tok.encode(text, add_special_tokens=False) == reference.encode(text).ids, (SEED, text)


def test_from_gguf_errors():
    with pytest.raises(TokenizerError, match="'bert' is not supported"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(TokenizerError, match="no tokenizer.ggml.tokens"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(TokenizerError, match="token_type has 1 entries for 2 tokens"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"],
                             "tokenizer.ggml.token_type": [1]})


def write_vocab_only_gguf(path, meta: dict) -> None:
    """A GGUF with tokenizer metadata, minimal llama hyper-parameters and no tensors (llama.cpp vocab_only)."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128), w.add_embedding_length(64), w.add_block_count(1), w.add_feed_forward_length(128)
    w.add_head_count(4), w.add_head_count_kv(4), w.add_layer_norm_rms_eps(1e-5)
    writers = {"tokenizer.ggml.model": w.add_tokenizer_model, "tokenizer.ggml.pre": w.add_tokenizer_pre,
               "tokenizer.ggml.tokens": w.add_token_list, "tokenizer.ggml.token_type": w.add_token_types,
               "tokenizer.ggml.merges": w.add_token_merges, "tokenizer.ggml.scores": w.add_token_scores}
    for key, value in meta.items():
        if key in writers:
            writers[key](value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_string(key, value)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


@pytest.mark.parametrize("kind", ["byte_level", "llama3", "spm"])
def test_llama_cpp_tokenizes_like_us(kind, byte_dir, llama3_dir, spm_tok, tmp_path):
    """llama.cpp reads our GGUF metadata (and the `.pre` we chose) and splits text exactly as we do."""
    llama_cpp = pytest.importorskip("llama_cpp")
    if kind == "spm":
        tok, meta = spm_tok
    else:
        tok = Tokenizer.from_dir((byte_dir if kind == "byte_level" else llama3_dir)[0])
        meta = tok.to_gguf_metadata()
    write_vocab_only_gguf(tmp_path / "vocab.gguf", meta)
    llm = llama_cpp.Llama(str(tmp_path / "vocab.gguf"), vocab_only=True, verbose=False)
    rng = random.Random(SEED)
    for _ in range(100):
        text = random_text(rng) + rng.choice(["", "<|eot_id|>hi"])
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok.encode(text), (SEED, text)


# ---- streaming --------------------------------------------------------------------------------------------


def stream(tok: Tokenizer, ids: list[int], skip: bool) -> tuple[list[str], str, StreamingDetokenizer]:
    det = tok.detokenizer(skip_special_tokens=skip)
    pieces = [det.add(i) for i in ids]
    return pieces, det.flush(), det


@pytest.mark.parametrize("kind", ["byte_level", "llama3", "spm"])
def test_streaming_detokenizer_matches_decode(kind, byte_dir, llama3_dir, spm_tok):
    tok = spm_tok[0] if kind == "spm" else Tokenizer.from_dir((byte_dir if kind == "byte_level" else llama3_dir)[0])
    eot = tok.eos_token_ids[-1]
    rng = random.Random(SEED)
    split_chars = 0
    for _ in range(60):
        ids = tok.encode(random_text(rng, 60))
        ids += [eot] + tok.encode(random_text(rng, 20), add_special_tokens=False)
        for skip in (False, True):
            pieces, tail, det = stream(tok, ids, skip)
            assert not any("\ufffd" in p for p in pieces), (SEED, pieces)
            assert tail == ""
            assert "".join(pieces) == det.text == tok.decode(ids, skip_special_tokens=skip), SEED
        split_chars += sum(1 for i in ids if "\ufffd" in tok.token_to_str(i))
    assert split_chars > 20  # the random texts really did cut characters across tokens


def test_streaming_detokenizer_flushes_invalid_bytes(byte_dir, spm_tok):
    for tok, lone in ((Tokenizer.from_dir(byte_dir[0]), None), (spm_tok[0], 3 + 0xE4)):
        euro = tok.encode("€", add_special_tokens=False)
        lone = lone if lone is not None else tok.token_to_id(tok.id_to_token(euro[0])[:1])
        ids = tok.encode("ok ", add_special_tokens=False) + [lone]
        det = tok.detokenizer()
        pieces = [det.add(i) for i in ids]
        assert "".join(pieces) == "ok "
        assert det.flush() == "\ufffd" and det.text == tok.decode(ids) == "ok \ufffd"


def test_streaming_decodes_a_window_not_the_history(byte_dir):
    tok = Tokenizer.from_dir(byte_dir[0])
    longest = 0
    decode = tok.decode

    def spy(ids, skip_special_tokens=False):
        nonlocal longest
        longest = max(longest, len(ids))
        return decode(ids, skip_special_tokens)

    tok.decode = spy
    rng = random.Random(SEED)
    ids = tok.encode("".join(random_text(rng, 60) for _ in range(100)), add_special_tokens=False)
    pieces, tail, _ = stream(tok, ids, skip=False)
    assert len(ids) > 500 and longest <= 16  # context + pending: a few tokens, however long the stream
    assert "".join(pieces) + tail == decode(ids)


# ---- errors -----------------------------------------------------------------------------------------------


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match=f"no tokenizer.json in {tmp_path}"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json"])
def test_corrupt_json_names_the_file(name, tmp_path):
    train_byte_level().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / name).write_text('{"model": ')
    with pytest.raises(TokenizerError, match=name):
        Tokenizer.from_dir(tmp_path)


def test_unbuildable_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Nope"}}')
    with pytest.raises(TokenizerError, match="cannot build"):
        Tokenizer.from_dir(tmp_path)


def test_token_bytes_of_partial_characters():
    from onebit.tokenizer import byte_level_tokenizer

    tok = byte_level_tokenizer()
    ids = tok.encode("é€", add_special_tokens=False)  # one byte token per UTF-8 byte
    assert b"".join(tok.token_bytes(i) for i in ids) == "é€".encode()
    assert tok.token_bytes(tok.bos_token_id) is None  # a special token has no raw bytes
