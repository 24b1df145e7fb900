"""The ternary QAT trainer on a tiny slice of the corpus: quantizer math, data, loss, reproducibility, resume,
and exports whose logits in the engine equal the trainer's own."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import onebit  # noqa: E402
from onebit.train import TrainArgs  # noqa: E402
from onebit.train import data as D  # noqa: E402
from onebit.train.loop import Trainer, load_checkpoint, lr_at, plan_steps, train  # noqa: E402
from onebit.train.model import BitLinear, act_quant, weight_quant  # noqa: E402
from onebit.weights.packing import absmean_ternarize  # noqa: E402

CORPUS = Path(__file__).parents[2] / "shared/data/corpus"
SLICES = {"austen/austen_emma.txt": 24_000, "shakespeare/hamlet.txt": 16_000, "kjv/kjv_bible.txt": 16_000}
EVAL_TOKENS = 200

# tiny shapes: linears' inputs are multiples of 128, so the bitnet model also exports as I2_S GGUF
TINY = dict(hidden=128, layers=2, heads=4, kv_heads=2, ffn=256, ctx=32, vocab=384, batch=8, lr=4e-3, warmup=4,
            eval_tokens=EVAL_TOKENS, progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A few tens of KB of three works, plus the held-out file (which training must skip)."""
    if not CORPUS.is_dir():
        pytest.skip(f"corpus not found at {CORPUS}")
    root = tmp_path_factory.mktemp("corpus")
    for rel, n in SLICES.items():
        src = CORPUS / rel
        if not src.exists():
            pytest.skip(f"corpus file {rel} missing")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(src.read_text(encoding="utf-8")[:n], encoding="utf-8")
    held = CORPUS / "austen" / D.HELD_OUT
    (root / "austen" / D.HELD_OUT).write_text(held.read_text(encoding="utf-8")[2000:6000], encoding="utf-8")
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two busy cores run these tiny models far faster on one torch thread than on two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(corpus: Path, out: Path, **kw) -> dict:
    return train(TrainArgs(**{"data": str(corpus), "out": str(out), "steps": 24, **TINY, **kw}))


@pytest.fixture(scope="module")
def bitnet_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("bitnet")
    return out, run(corpus, out, dropout=0.1, eval_every=8)


# --- quantizers and schedule -------------------------------------------------------------------------

def test_weight_quant_is_absmean_ternarize():
    w = torch.randn(48, 80) * 0.03
    t, scale = weight_quant(w)
    t_np, scale_np = absmean_ternarize(w.numpy())
    assert np.array_equal(t.numpy().astype(np.int8), t_np)
    assert scale.item() == pytest.approx(float(scale_np), rel=1e-6)


def test_act_quant_rounds_half_to_even_and_ste_passes_gradients():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5]])  # max 127: scale exactly 1
    assert act_quant(x).tolist() == [[127.0, 0.0, 2.0, 2.0, -0.0, -2.0]]
    layer = BitLinear(6, 3, act_bits=8)
    x = torch.randn(4, 6, requires_grad=True)
    layer(x).sum().backward()
    t, scale = weight_quant(layer.weight)
    assert torch.allclose(x.grad, (t * scale).sum(0).expand(4, 6))  # STE: d/dx through the quantized weight
    assert torch.allclose(layer.weight.grad, act_quant(x.detach()).sum(0)[None].expand(3, 6))


def test_lr_schedule_and_time_plan():
    assert lr_at(0, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 10, 100, 0.1) == pytest.approx(0.55)
    assert lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    # 100 s budget, 10 s gone, 5 evals of 2 s: 80 s left at 0.1 s a step (2% margin)
    assert plan_steps(100, 10, 25, 0.1, 2, 5) == 25 + 784


# --- data ----------------------------------------------------------------------------------------------

def test_corpus_tokenizer_and_windows(corpus):
    files = D.corpus_files(corpus)
    assert D.HELD_OUT not in [f.name for f in files] and len(files) == 3
    texts = D.read_texts(files)
    tok = D.train_tokenizer(texts, 384)
    assert [tok.token_to_id(t) for t in D.SPECIAL_TOKENS] == [0, 1, 2, 3] and tok.vocab_size == 384
    sample = "It is a truth universally acknowledged,\n\nthat a single man. Ünïcode ✓"
    ids = tok.encode(sample)
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == sample
    meta = tok.to_gguf_metadata(vocab_size=384)
    assert meta["tokenizer.ggml.pre"] == "gpt-2"
    assert onebit.tokenizer.Tokenizer.from_gguf(meta).encode(texts[0][:3000]) == tok.encode(texts[0][:3000])
    assert "<|im_start|>user\nhi<|im_end|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}])
    # cutting before a newline that follows a non-space never changes the ids
    pieces = D.split_for_encoding(texts[0], size=500)
    assert len(pieces) > 10 and "".join(pieces) == texts[0]
    whole = tok.backend.encode(texts[0], add_special_tokens=False).ids
    assert [i for p in pieces for i in tok.backend.encode(p, add_special_tokens=False).ids] == whole
    stream = D.encode_documents(tok, texts)
    assert stream[0] == tok.bos_token_id and (stream == tok.eos_token_id).sum() == 3
    w = D.TokenWindows(stream, 16, seed=3)
    x, y = w.batch(7, 4)
    assert np.array_equal(x[:, 1:], y[:, :-1]) and np.array_equal(w.batch(7, 4)[0], x)
    assert not np.array_equal(w.batch(8, 4)[0], x)


# --- training --------------------------------------------------------------------------------------------

def test_loss_decreases(bitnet_run):
    out, summary = bitnet_run
    losses = load_checkpoint(out / "checkpoint.pt")["history"]["loss"]
    assert len(losses) == 24
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.5, losses
    evals = summary["eval_history"]
    assert len(evals) == 3 and evals[-1]["ppl"] < evals[0]["ppl"]
    assert summary["eval"]["tokens"] == EVAL_TOKENS - 1 and summary["eval"]["ppl"] == pytest.approx(evals[-1]["ppl"],
                                                                                                     rel=1e-3)


def test_seeded_runs_are_identical_and_resume_is_exact(corpus, bitnet_run, tmp_path):
    out, _ = bitnet_run
    ref = load_checkpoint(out / "checkpoint.pt")
    again = run(corpus, tmp_path / "again", dropout=0.1, eval_every=8, stop_after=13)
    assert again["stopped_at"] == 13
    train(TrainArgs(resume=str(tmp_path / "again" / "checkpoint.pt"), progress=False))
    resumed = load_checkpoint(tmp_path / "again" / "checkpoint.pt")
    assert resumed["step"] == ref["step"] == 24
    assert resumed["history"] == ref["history"]
    for name, p in ref["model"].items():
        assert torch.equal(p, resumed["model"][name]), name


def test_minutes_budget_sizes_the_schedule(corpus, tmp_path):
    """--minutes: 25 timed steps, then a total that fills the budget; the cosine ends at that total."""
    summary = run(corpus, tmp_path, steps=0, minutes=0.08, hidden=64, layers=1, heads=2, kv_heads=2, ffn=128,
                  batch=2, ctx=16)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["total"] == state["step"] == summary["steps"] > 25
    assert len(state["history"]["loss"]) == summary["steps"] and summary["eval"]["tokens"] == EVAL_TOKENS - 1


def trainer_logits(out: Path, ids: list[int]) -> np.ndarray:
    """The trainer's own eval-mode logits, from its final checkpoint."""
    state = load_checkpoint(out / "checkpoint.pt")
    t = Trainer(TrainArgs(**{**state["args"], "resume": None, "out": str(out)}), state)
    t.model.eval()
    with torch.no_grad():
        return t.model(torch.tensor([ids]))[0].numpy()


def assert_close(got: np.ndarray, ref: np.ndarray, bar: float, agree: float) -> None:
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    same = (got.argmax(1) == ref.argmax(1)).mean()
    assert rel <= bar, f"max|diff| = {rel:.3g} x max|logit|"
    assert same >= agree, f"argmax agrees at {same:.0%}"


def held_out_ids(model, corpus: Path, n: int = 32) -> list[int]:
    text = (corpus / "austen" / D.HELD_OUT).read_text(encoding="utf-8")
    return model.tokenizer.encode(text[:600])[:n]


def test_bitnet_export_matches_trainer_in_the_engine(corpus, bitnet_run):
    out, summary = bitnet_run
    assert set(summary["exported"]) == {"hf", "gguf"}
    hf = onebit.load(str(out / "model"), backend="numpy")
    assert hf.info.format == "hf-bitnet-offline-autobitlinear" and hf.config.act_bits == 8
    ids = held_out_ids(hf, corpus)
    ref = trainer_logits(out, ids)
    got = hf.logits(ids)
    assert_close(got, ref, 3e-2, 0.95)
    gguf = onebit.load(str(out / "model.gguf"), backend="numpy")
    assert gguf.tokenizer.encode("Anne Elliot") == hf.tokenizer.encode("Anne Elliot")
    assert_close(gguf.logits(ids), got, 3e-2, 0.95)
    assert_close(gguf.logits(ids), ref, 3e-2, 0.95)


def test_llama_export_matches_trainer_in_the_engine(corpus, tmp_path):
    summary = run(corpus, tmp_path, arch="llama", kv_heads=4, steps=8, eval_every=8)
    assert summary["kind"] == "ternary" and summary["arch"] == "llama"
    m = onebit.load(str(tmp_path / "model"), backend="numpy")
    assert m.info.format == "hf-trilm" and m.config.act_bits is None
    ids = held_out_ids(m, corpus)
    assert_close(m.logits(ids), trainer_logits(tmp_path, ids), 5e-3, 0.97)  # fp16 file, no int8 rounding


@pytest.mark.parametrize("arch", ["bitnet", "llama"])
def test_fp_twin_exports_a_float_model_transformers_reads(corpus, tmp_path, arch):
    """The full-precision twin: a float HF folder whose transformers logits equal the trainer's; `1bit ppl
    --backend torch` reproduces the trainer's held-out perplexity."""
    from hf_oracle import oracle_logits

    from onebit.cli import main

    held = tmp_path / "held.txt"
    held.write_text((corpus / "austen" / D.HELD_OUT).read_text(encoding="utf-8")[:800], encoding="utf-8")
    summary = run(corpus, tmp_path, arch=arch, fp=True, steps=6, eval_every=6, eval_tokens=0, eval_file=str(held))
    assert summary["kind"] == "full-precision" and set(summary["exported"]) == {"hf"}
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    assert "quantization_config" not in cfg
    with pytest.raises(onebit.NotTernaryError):
        onebit.load(str(tmp_path / "model"), backend="numpy")
    tok = onebit.tokenizer.Tokenizer.from_dir(tmp_path / "model")
    ids = tok.encode((corpus / "austen" / D.HELD_OUT).read_text(encoding="utf-8")[:500])[:32]
    ref = trainer_logits(tmp_path, ids)
    assert_close(oracle_logits(str(tmp_path / "model"), ids), ref, 1e-4, 1.0)
    # the harness' torch path on the exported folder gives the trainer's number
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["ppl", str(tmp_path / "model"), str(held), "--backend", "torch", "--ctx", "32", "--json"]) == 0
    d = json.loads(buf.getvalue())
    assert d["tokens"] == summary["eval"]["tokens"] == len(tok.encode(held.read_text(encoding="utf-8"))) - 1
    assert d["ppl"] == pytest.approx(summary["eval"]["ppl"], rel=1e-5)
    assert d["bits_per_byte"] == pytest.approx(summary["eval"]["bits_per_byte"], rel=1e-5)
    # QAT from the full-precision checkpoint: its shape and tokenizer, its weights as the latent weights
    qat = run(corpus, tmp_path / "qat", init=str(tmp_path / "model"), steps=2, eval_tokens=40, eval_file=str(held),
              arch=arch, hidden=999)
    assert qat["kind"] == "ternary" and qat["parameters"] == summary["parameters"]
    m = onebit.load(str(tmp_path / "qat" / "model"), backend="numpy")
    assert m.tokenizer.encode("Anne") == tok.encode("Anne")


def test_cli_train_prints_a_summary(corpus, tmp_path, capsys):
    from onebit.cli import main

    args = ["train", "--data", str(corpus), "--out", str(tmp_path), "--hidden", "64", "--layers", "1", "--heads",
            "2", "--ffn", "128", "--ctx", "16", "--vocab", "300", "--batch", "2", "--steps", "2", "--warmup", "1",
            "--eval-tokens", "40", "--no-progress", "--json"]
    assert main(args) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["steps"] == 2 and d["eval"]["tokens"] == 39 and d["kind"] == "ternary"
    assert (tmp_path / "model" / "tokenizer.json").exists() and (tmp_path / "eval.json").exists()
    shutil.rmtree(tmp_path / "model")
