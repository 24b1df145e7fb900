"""Tokenizers for ternary LLMs: a HF tokenizer folder or a GGUF vocab in; ids, text and chat prompts out."""

from __future__ import annotations

import functools
import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend

from onebit.errors import TokenizerError

__all__ = ["Tokenizer", "StreamingDetokenizer", "flatten_content", "byte_level_tokenizer"]

log = logging.getLogger(__name__)

# GGUF metadata keys (the same strings as gguf.Keys.Tokenizer; spelled out so this file needs no gguf import).
MODEL = "tokenizer.ggml.model"
PRE = "tokenizer.ggml.pre"
TOKENS = "tokenizer.ggml.tokens"
TOKEN_TYPE = "tokenizer.ggml.token_type"
MERGES = "tokenizer.ggml.merges"
SCORES = "tokenizer.ggml.scores"
BOS_ID = "tokenizer.ggml.bos_token_id"
EOS_ID = "tokenizer.ggml.eos_token_id"
EOT_ID = "tokenizer.ggml.eot_token_id"
EOM_ID = "tokenizer.ggml.eom_token_id"
UNK_ID = "tokenizer.ggml.unknown_token_id"
PAD_ID = "tokenizer.ggml.padding_token_id"
ADD_BOS = "tokenizer.ggml.add_bos_token"
ADD_EOS = "tokenizer.ggml.add_eos_token"
ADD_PREFIX = "tokenizer.ggml.add_space_prefix"
CHAT_TEMPLATE = "tokenizer.chat_template"

# GGUF token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The special-token names HF hands to chat templates (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Split regexes of the pre-tokenizers llama.cpp knows by name (src/llama-vocab.cpp, llm_tokenizer_bpe).
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `.pre` names that select each regex in llama.cpp; the first of each is what we write.
_LLAMA3_PRES = ("llama-bpe", "llama3", "llama-v3", "falcon3", "dbrx", "smaug-bpe")
_QWEN2_PRES = ("qwen2", "stablelm2")
# llama.cpp sets ignore_merges (a word already in the vocab is one token) for these, as LLaMA-3's tokenizer.json does.
_IGNORE_MERGES_PRES = ("llama-bpe", "llama3", "llama-v3", "falcon3")

# End-of-turn markers that stop generation when the chat template uses them (llama.cpp's end-of-generation list).
_EOT_MARKERS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


class Tokenizer:
    """Encode, decode and chat-format for one model.

    Wraps a `tokenizers.Tokenizer` plus what lives beside it: special-token strings, the ids that end
    generation, whether encoding prepends BOS, and the chat template. Build it with `from_dir` (a HF
    checkpoint folder) or `from_gguf` (GGUF metadata); the constructor is for tests and converters.
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        special_tokens: Mapping[str, str] | None = None,
        eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
    ):
        """`add_bos`/`add_eos` None means "as the backend's post-processor does"; a bool overrides it (HF v5)."""
        self.backend = backend
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if isinstance(v, str)}
        self.chat_template = chat_template
        self._add_bos = add_bos
        self._add_eos = add_eos
        self._extra_eos = [int(i) for i in eos_token_ids]
        self._warned_no_template = False

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json and its companions (tokenizer_config, chat_template.jinja, generation_config...)."""
        folder = Path(path)
        spec_path = folder / "tokenizer.json"
        if not spec_path.is_file():
            raise TokenizerError(f"no tokenizer.json in {folder}")
        try:
            backend = _Backend.from_file(str(spec_path))
        except Exception as e:  # the Rust side raises plain Exception
            _read_json(spec_path)  # says "not valid JSON" where that is the reason
            raise TokenizerError(f"{spec_path}: cannot build a tokenizer from it ({e})") from None
        config = _read_json(folder / "tokenizer_config.json") or {}
        token_map = _read_json(folder / "special_tokens_map.json") or {}
        generation = _read_json(folder / "generation_config.json") or {}
        model_config = _read_json(folder / "config.json") or {}

        special = {}
        for name in SPECIAL_NAMES:
            text = _token_text(config.get(name)) or _token_text(token_map.get(name))
            if text:
                special[name] = text
        for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id")):
            ids = _id_list(generation.get(key)) or _id_list(model_config.get(key))
            if name not in special and ids and backend.id_to_token(ids[0]) is not None:
                special[name] = backend.id_to_token(ids[0])
        return cls(
            backend,
            special_tokens=special,
            eos_token_ids=_id_list(generation.get("eos_token_id")) + _id_list(model_config.get("eos_token_id")),
            chat_template=_chat_template_in(folder, config),
            add_bos=_bool_or_none(config.get("add_bos_token")),
            add_eos=_bool_or_none(config.get("add_eos_token")),
        )

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (special tokens, BOS rule, chat template)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = dict(self.special_tokens)
        if self._add_bos is not None:
            config["add_bos_token"] = self._add_bos
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        if self._extra_eos:
            (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": self._extra_eos}))

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF metadata (strings, numbers, lists; NumPy arrays are turned into lists)."""
        metadata = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in metadata.items()}
        kind = metadata.get(MODEL)
        tokens = metadata.get(TOKENS)
        if not tokens:
            raise TokenizerError(f"the GGUF metadata has no {TOKENS}: cannot build a tokenizer")
        types = list(metadata.get(TOKEN_TYPE) or [NORMAL] * len(tokens))
        if len(types) != len(tokens):
            raise TokenizerError(f"GGUF {TOKEN_TYPE} has {len(types)} entries for {len(tokens)} tokens")
        if kind == "gpt2":
            backend, add_bos = _byte_level_from_gguf(metadata, tokens), metadata.get(PRE) in _LLAMA3_PRES
        elif kind == "llama":
            backend, add_bos = _sentencepiece_from_gguf(metadata, tokens, types), True
        else:
            raise TokenizerError(f"GGUF tokenizer model {kind!r} is not supported (expected 'gpt2' or 'llama')")
        # Control and unknown tokens are special (skippable); user-defined ones are plain added words.
        backend.add_tokens(
            [AddedToken(t, special=ty in (CONTROL, UNKNOWN), normalized=False) for t, ty in zip(tokens, types)
             if ty in (CONTROL, USER_DEFINED, UNKNOWN)]
        )
        special = {}
        for name, key in (("bos_token", BOS_ID), ("eos_token", EOS_ID), ("unk_token", UNK_ID), ("pad_token", PAD_ID)):
            token_id = metadata.get(key)
            if isinstance(token_id, int) and 0 <= token_id < len(tokens):
                special[name] = tokens[token_id]
        return cls(
            backend,
            special_tokens=special,
            eos_token_ids=[metadata[k] for k in (EOT_ID, EOM_ID) if isinstance(metadata.get(k), int)],
            chat_template=metadata.get(CHAT_TEMPLATE),
            add_bos=bool(metadata.get(ADD_BOS, add_bos)),
            add_eos=bool(metadata.get(ADD_EOS, False)),
        )

    def to_gguf_metadata(self, vocab_size: int | None = None) -> dict[str, Any]:
        """GGUF tokenizer metadata for a byte-level BPE tokenizer (the inverse of `from_gguf`).

        `vocab_size` pads the token list with unused `[PADn]` entries up to the embedding's row count,
        which llama.cpp requires to match.
        """
        spec = json.loads(self.backend.to_str())
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
            kind = "a non-byte-level BPE" if model.get("type") == "BPE" else f"a {model.get('type')}"
            raise TokenizerError(f"cannot write {kind} tokenizer to GGUF: only byte-level BPE is supported")
        tokens, types = self._gguf_vocab(vocab_size)
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        meta: dict[str, Any] = {
            MODEL: "gpt2",
            PRE: _gguf_pre_name(spec),
            TOKENS: tokens,
            TOKEN_TYPE: types,
            MERGES: merges,
            ADD_BOS: self.add_bos_token,
        }
        for key, token_id in ((BOS_ID, self.bos_token_id), (EOS_ID, self.eos_token_id)):
            if token_id is not None:
                meta[key] = token_id
        for name, key in (("unk_token", UNK_ID), ("pad_token", PAD_ID)):
            token_id = self.token_to_id(self.special_tokens.get(name))
            if token_id is not None:
                meta[key] = token_id
        extra = [i for i in self.eos_token_ids if i != self.eos_token_id]
        if extra:
            meta[EOT_ID] = extra[0]
        if self.add_eos_token:
            meta[ADD_EOS] = True
        if self.chat_template:
            meta[CHAT_TEMPLATE] = self.chat_template
        return meta

    def _gguf_vocab(self, vocab_size: int | None) -> tuple[list[str], list[int]]:
        vocab = self.backend.get_vocab(with_added_tokens=True)
        n = max(max(vocab.values()) + 1, vocab_size or 0)
        tokens, types = [f"[PAD{i}]" for i in range(n)], [UNUSED] * n
        for text, i in vocab.items():
            tokens[i], types[i] = text, NORMAL
        for i, added in self.backend.get_added_tokens_decoder().items():
            tokens[i], types[i] = added.content, CONTROL if added.special else USER_DEFINED
        return tokens, types

    # ---- vocabulary ---------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The raw vocabulary entry (byte-level or `▁` form), or None for an unknown id."""
        return self.backend.id_to_token(int(token_id))

    def token_bytes(self, token_id: int) -> bytes | None:
        """The raw bytes of a byte-level BPE token or a SentencePiece ``<0xNN>`` byte token; None for others
        (what logprobs report for a token that is only part of a UTF-8 character)."""
        raw = self.id_to_token(token_id) or ""
        if token_id in self.special_token_ids:
            return None
        if len(raw) == 6 and raw.startswith("<0x") and raw.endswith(">"):
            return bytes([int(raw[3:5], 16)])
        if raw and all(ch in _BYTE_ORDER for ch in raw):
            return bytes(_BYTE_ORDER[ch] for ch in raw)
        return None

    def token_to_str(self, token_id: int) -> str:
        """The text one token decodes to on its own (special tokens included)."""
        return self.decode([token_id])

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @functools.cached_property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation: EOS, generation_config / GGUF end-of-turn ids, and the end-of-turn
        markers (`<|eot_id|>`, `<|im_end|>`, ...) that are special tokens and appear in the chat template."""
        ids = [self.eos_token_id, *self._extra_eos]
        template = self.chat_template or ""
        ids += [i for m in _EOT_MARKERS if m in template and (i := self.token_to_id(m)) in self.special_token_ids]
        return list(dict.fromkeys(i for i in ids if i is not None))

    @functools.cached_property
    def special_token_ids(self) -> set[int]:
        return {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    @property
    def add_bos_token(self) -> bool:
        """Whether `encode(text)` starts with BOS."""
        bos = self.bos_token_id
        if self._add_bos is not None or bos is None:
            return bool(self._add_bos) and bos is not None
        return self._post_processor_adds()[0] == bos

    @property
    def add_eos_token(self) -> bool:
        """Whether `encode(text)` ends with EOS."""
        eos = self.eos_token_id
        if self._add_eos is not None or eos is None:
            return bool(self._add_eos) and eos is not None
        return self._post_processor_adds()[1] == eos

    def _post_processor_adds(self) -> tuple[int | None, int | None]:
        """The ids the backend's post-processor puts before and after a text (None where it adds none)."""
        plain = self.backend.encode("a", add_special_tokens=False).ids
        full = self.backend.encode("a", add_special_tokens=True).ids
        at = full.index(plain[0]) if plain and plain[0] in full else 0
        return (full[at - 1] if at > 0 else None), (full[at + len(plain)] if at + len(plain) < len(full) else None)

    # ---- text <-> ids -------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, BOS (and EOS) as the tokenizer's config says.

        A text that already starts with the BOS string does not get a second BOS.
        """
        if self._add_bos is None and self._add_eos is None:
            ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        else:
            ids = self.backend.encode(text, add_special_tokens=False).ids
            if add_special_tokens and self.add_bos_token:
                ids.insert(0, self.bos_token_id)
            if add_special_tokens and self.add_eos_token:
                ids.append(self.eos_token_id)
        bos = self.bos_token_id
        if add_special_tokens and bos is not None and ids[:2] == [bos, bos] and text.startswith(self.bos_token):
            del ids[0]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def detokenizer(self, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        return StreamingDetokenizer(self, skip_special_tokens=skip_special_tokens)

    # ---- chat ---------------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **extra: Any,
    ) -> str | list[int]:
        """Render `messages` the way transformers' `apply_chat_template` does; ids if `tokenize`.

        The template sees `messages`, `add_generation_prompt`, the special-token strings (`bos_token`,
        `eos_token`, ...), `tools=None`, `documents=None` and `**extra`. Keys whose value is None are dropped
        from messages, as HF does. Content given as a list of parts reaches the template unchanged; call
        `flatten_content` first for templates that expect strings. Without a template the prompt is
        `<|role|>\\ncontent\\n` per message, then `<|assistant|>\\n`, and a warning is logged once.
        Token ids are encoded without adding BOS: the rendered template carries its own special tokens.
        """
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        if self.chat_template is None:
            if not self._warned_no_template:
                log.warning("the tokenizer has no chat template; using the plain <|role|> fallback format")
                self._warned_no_template = True
            text = _fallback_prompt(messages, add_generation_prompt)
        else:
            text = self._render(messages, add_generation_prompt, extra)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _render(self, messages: list[dict], add_generation_prompt: bool, extra: dict[str, Any]) -> str:
        import jinja2

        template = _compile_template(self.chat_template)
        context = {**self.special_tokens, "tools": None, "documents": None, **extra}
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template failed: {e}") from None


class StreamingDetokenizer:
    """Turns token ids, one at a time, into text pieces that never cut a character in half.

    Only a short window is decoded, never the history (prefix-offset / read-offset): the ids of the last
    emitted piece are decoded again as context, so that leading-space stripping (Metaspace, Strip) and byte
    merging see what a full decode sees, followed by the pending ids. A piece is released once the window
    decodes longer than its context and does not end in U+FFFD (an unfinished UTF-8 sequence). The pieces
    concatenate to `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._decode = functools.partial(tokenizer.decode, skip_special_tokens=skip_special_tokens)
        self._ids: list[int] = []
        self._read = 0  # ids[:read] are the context (already emitted), ids[read:] are pending
        self._context = ""  # decode(ids[:read])
        self._pieces: list[str] = []

    def add(self, token_id: int) -> str:
        """Append one id; return the newly completed text ("" while a character is unfinished)."""
        self._ids.append(int(token_id))
        window = self._decode(self._ids)
        if len(window) <= len(self._context) or window.endswith("\ufffd"):
            return ""
        return self._emit(window)

    def flush(self) -> str:
        """Return whatever is pending, with U+FFFD for bytes that never formed a character."""
        window = self._decode(self._ids)
        return self._emit(window) if len(window) > len(self._context) else ""

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._pieces)

    def _emit(self, window: str) -> str:
        piece = window[len(self._context):]
        self._pieces.append(piece)
        # The pending ids become the next window's context; older ids are no longer needed.
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._context = self._decode(self._ids)
        return piece


def flatten_content(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of `messages` whose list-of-parts content is joined into one string (text parts, by newlines)."""
    return [{**m, "content": _content_text(m["content"])} if "content" in m else dict(m) for m in messages]


# ---- helpers: files ---------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    """The parsed file, None if it does not exist; TokenizerError naming it if it is not valid JSON."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None


def _chat_template_in(folder: Path, config: Mapping[str, Any]) -> str | None:
    # transformers 5 writes chat_template.jinja; older checkpoints keep it in tokenizer_config.json.
    jinja_path = folder / "chat_template.jinja"
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None:
        template = (_read_json(folder / "chat_template.json") or {}).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def _token_text(value: Any) -> str | None:
    """A special token given as a string or as an AddedToken dict ({"content": ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _id_list(value: Any) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _bool_or_none(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


# ---- helpers: GGUF ----------------------------------------------------------------------------------------


def _first_ids(tokens: Sequence[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)  # a repeated entry keeps its first id
    return vocab


def _byte_level_from_gguf(metadata: Mapping[str, Any], tokens: Sequence[str]) -> _Backend:
    """GPT-2-style byte-level BPE; the `.pre` name picks the split regex as llama.cpp does."""
    merges = []
    for merge in metadata.get(MERGES) or []:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise TokenizerError(f"GGUF merge {merge!r} is not two tokens separated by a space")
        merges.append((left, right))
    pre = metadata.get(PRE)
    backend = _Backend(models.BPE(_first_ids(tokens), merges, ignore_merges=pre in _IGNORE_MERGES_PRES))
    regex = LLAMA3_REGEX if pre in _LLAMA3_PRES else QWEN2_REGEX if pre in _QWEN2_PRES else None
    if regex is None:
        if pre not in (None, "", "default", "gpt-2"):
            log.info("GGUF pre-tokenizer %r: using GPT-2 byte-level splitting", pre)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre in _QWEN2_PRES:
        backend.normalizer = normalizers.NFC()  # as Qwen2's tokenizer.json
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_from_gguf(metadata: Mapping[str, Any], tokens: Sequence[str], types: Sequence[int]) -> _Backend:
    """SentencePiece-style BPE with byte fallback, as transformers' LlamaConverter builds it (legacy form)."""
    scores = metadata.get(SCORES) or [0.0] * len(tokens)
    if len(scores) != len(tokens):
        raise TokenizerError(f"GGUF {SCORES} has {len(scores)} entries for {len(tokens)} tokens")
    unk = next((t for t, ty in zip(tokens, types) if ty == UNKNOWN), None)
    model = models.BPE(
        _first_ids(tokens), _sentencepiece_merges(tokens, scores, types), unk_token=unk, fuse_unk=True,
        byte_fallback=True,
    )
    backend = _Backend(model)
    # SentencePiece's dummy prefix goes before every text segment, also after a special token, and even when
    # the text starts with a space (llama.cpp does the same; a Metaspace pre-tokenizer would lose that space).
    add_prefix = bool(metadata.get(ADD_PREFIX, True))
    steps = [normalizers.Prepend("▁")] if add_prefix else []
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_prefix else []))
    return backend


def _sentencepiece_merges(
    tokens: Sequence[str], scores: Sequence[float], types: Sequence[int] | None = None
) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocab (transformers' SentencePieceExtractor).

    Every split of a normal piece into two normal pieces is a merge, ranked by the whole piece's score
    (higher first, then longer left half); otherwise vocab order, splits of a piece ordered by the halves' ids.
    """
    vocab = {t: i for t, i in _first_ids(tokens).items() if types is None or types[i] == NORMAL}
    found: list[tuple[float, str, str]] = []
    for piece, i in vocab.items():
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        found.extend((scores[i], left, right) for left, right in splits)
    found.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)  # stable, as transformers sorts
    return [(left, right) for _, left, right in found]


def _gguf_pre_name(spec: Mapping[str, Any]) -> str:
    """The llama.cpp `tokenizer.ggml.pre` whose splitting equals this tokenizer.json's pre-tokenizer.

    llama.cpp (src/llama-vocab.cpp): "gpt-2" splits with exactly the GPT-2 regex of a plain ByteLevel
    pre-tokenizer (use_regex=True), while "default" adds punctuation and digit splits and so does not match;
    "llama-bpe" is the LLaMA-3 Split regex, "qwen2" Qwen2's. An NFC normalizer is let through (llama.cpp
    does not apply it; it changes only text that is not already NFC).
    """
    pre = spec.get("pre_tokenizer") or {}
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        kind = normalizer.get("type")
        raise TokenizerError(f"cannot write this tokenizer to GGUF: llama.cpp has no {kind} normalizer")
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    if _is_byte_level(pre, use_regex=True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Split" and _is_byte_level(steps[1], use_regex=False):
        split = steps[0]
        regex = (split.get("pattern") or {}).get("Regex")
        if split.get("behavior") == "Isolated" and not split.get("invert"):
            if regex == LLAMA3_REGEX:
                return _LLAMA3_PRES[0]
            if regex == QWEN2_REGEX:
                return _QWEN2_PRES[0]
    raise TokenizerError(
        "cannot write this tokenizer to GGUF: its pre-tokenizer matches none that llama.cpp knows by name"
        " (plain ByteLevel, the LLaMA-3 split or the Qwen2 split)"
    )


def _is_byte_level(step: Mapping[str, Any], use_regex: bool) -> bool:
    return (
        step.get("type") == "ByteLevel"
        and not step.get("add_prefix_space", False)
        and step.get("use_regex", True) == use_regex
    )


# ---- helpers: chat templates ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _compile_template(source: str):
    """Compile with the environment transformers uses (chat_template_utils._compile_jinja_template)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` (HF marks assistant text with it) renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat template does not compile: {e}") from None


def _raise_exception(message: str):
    raise TokenizerError(f"chat template: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Unlike jinja's own tojson, no HTML escaping, and the json.dumps options templates use.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _content_text(content: Any) -> str:
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    return "" if content is None else str(content)


def _fallback_prompt(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
    turns = [f"<|{m.get('role', 'user')}|>\n{_content_text(m.get('content'))}\n" for m in messages]
    return "".join(turns) + ("<|assistant|>\n" if add_generation_prompt else "")


BYTE_LEVEL_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_level_tokenizer() -> Tokenizer:
    """256 byte tokens (GPT-2 byte-level alphabet, no merges) + 4 specials (ids 256-259), ChatML template.

    What built-in synthetic models use: every string encodes, so the whole text path works without a
    trained vocabulary.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: _BYTE_ORDER[c])
    vocab = {c: i for i, c in enumerate(byte_chars)}
    backend = _Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BYTE_LEVEL_SPECIALS])
    bos, eos, _, end = BYTE_LEVEL_SPECIALS
    return Tokenizer(backend, special_tokens={"bos_token": bos, "eos_token": eos},
                     eos_token_ids=[259], chat_template=CHATML_TEMPLATE, add_bos=True)


def _gpt2_byte_order() -> dict[str, int]:
    """GPT-2's byte -> printable character map, inverted to character -> byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


_BYTE_ORDER = _gpt2_byte_order()
