"""The perplexity harness: HF's strided windows, exact token counts, bits per byte, and agreement with
transformers' own ``labels=`` loss on a tiny TriLM model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import onebit
from onebit.cli import main
from onebit.eval.ppl import Window, bits_per_byte, logits_scorer, perplexity, text_perplexity, windows
from onebit.tokenizer import byte_level_tokenizer

TEXT = ("Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own amusement, never took up "
        "any book but the Baronetage; there he found occupation for an idle hour, and consolation in a distressed "
        "one. — «Persuasion», 1818.")


def test_windows_follow_hf_strided_convention():
    assert windows(10, 4, 2) == [Window(0, 4, 1), Window(2, 6, 4), Window(4, 8, 6), Window(6, 10, 8)]
    assert sum(w.scored for w in windows(10, 4, 2)) == 9  # every token but the first, once
    # stride == ctx: each later window's first token has no context and goes unscored
    assert windows(10, 4, 4) == [Window(0, 4, 1), Window(4, 8, 5), Window(8, 10, 9)]
    assert windows(3, 8, 4) == [Window(0, 3, 1)]
    for n, ctx, stride in [(1000, 64, 17), (65, 64, 32), (64, 64, 1)]:
        ws = windows(n, ctx, stride)
        scored = [p for w in ws for p in range(w.first, w.end)]
        assert scored == list(range(1, n)), (n, ctx, stride)
        assert all(w.end - w.begin <= ctx and w.first > w.begin for w in ws)
    with pytest.raises(ValueError):
        windows(10, 4, 5)


def test_uniform_model_gives_vocab_ppl_and_hand_bits_per_byte():
    vocab = 16

    def uniform(blocks):
        return [np.zeros((len(b), vocab), dtype=np.float32) for b in blocks]

    ids = np.arange(50) % vocab
    r = perplexity(logits_scorer(uniform), ids, n_bytes=100, ctx=8, stride=4, batch=3)
    assert r.tokens == 49 and r.ppl == pytest.approx(16.0, rel=1e-12)
    # 49 tokens x 4 bits over 100 bytes
    assert r.bits_per_byte == pytest.approx(49 * 4 / 100, rel=1e-12)
    assert bits_per_byte(math.log(2) * 12, 6) == pytest.approx(2.0)


@pytest.fixture(scope="module")
def trilm(tmp_path_factory):
    import hf_oracle as H

    folder = tmp_path_factory.mktemp("trilm")
    H.write_trilm(str(folder), H.llama_config(), seed=5, head_gain=3.0)
    byte_level_tokenizer().save(folder)
    return folder


def transformers_ppl(folder, ids: list[int], ctx: int, stride: int) -> tuple[float, int]:
    """HF's documented strided-perplexity loop, token-weighted: (mean NLL, scored tokens)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    enc = torch.tensor([ids])
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, enc.size(1), stride):
        end = min(begin + ctx, enc.size(1))
        trg_len = end - prev_end
        x = enc[:, begin:end]
        y = x.clone()
        y[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(x, labels=y).loss
        n = int((y[:, 1:] != -100).sum())  # the tokens in transformers' mean: labels left after its shift
        total += float(loss) * n
        count += n
        prev_end = end
        if end == enc.size(1):
            break
    return total / count, count


@pytest.mark.parametrize("ctx,stride", [(64, 16), (48, 48)])
def test_harness_equals_transformers(trilm, ctx, stride):
    model = onebit.load(str(trilm), backend="numpy")
    ids = model.tokenizer.encode(TEXT)
    assert ids[0] == model.tokenizer.bos_token_id and len(ids) > 3 * ctx
    r = text_perplexity(model, TEXT, ctx=ctx, stride=stride, batch=3)
    ref_nll, ref_count = transformers_ppl(trilm, ids, ctx, stride)
    assert r.tokens == ref_count
    assert abs(r.ppl - math.exp(ref_nll)) / math.exp(ref_nll) <= 1e-4
    assert r.bits_per_byte == pytest.approx(ref_nll * ref_count / math.log(2) / len(TEXT.encode("utf-8")), rel=1e-4)


def test_cli_json_and_backends(trilm, tmp_path, capsys):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    results = {}
    for backend in [b for b in ("numpy", "cpu") if b in onebit.kernels.available_backends()]:
        assert main(["ppl", str(trilm), str(path), "--ctx", "64", "--stride", "32", "--backend", backend,
                     "--json"]) == 0
        results[backend] = d = json.loads(capsys.readouterr().out)
        assert {"ppl", "bits_per_byte", "tokens", "tokens_per_s", "ctx", "stride"} <= set(d)
        assert d["tokens"] == len(TEXT.encode("utf-8"))  # bytes + BOS, all but the first scored
        assert d["bytes"] == len(TEXT.encode("utf-8")) and d["ctx"] == 64 and d["stride"] == 32
        assert d["bits_per_byte"] == pytest.approx(d["nll_per_token"] * d["tokens"] / math.log(2) / d["bytes"])
    ref = results["numpy"]["ppl"]
    for backend, d in results.items():
        assert d["ppl"] == pytest.approx(ref, rel=1e-3), backend
    assert main(["ppl", str(trilm), str(path), "--ctx", "64", "--backend", "numpy"]) == 0
    text = capsys.readouterr().out
    assert "bits/byte" in text and "ppl" in text
