"""The embedded default model: shipped in the package, loaded by name, used when no model is given, writes English."""

from __future__ import annotations

import os
import re

import pytest

import onebit
from onebit.cli import main
from onebit.eval.ppl import text_perplexity
from onebit.loader import DEFAULT_GGUF

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_TEXT = os.path.join(ROOT, "data", "eval", "austen_persuasion.txt")
PROMPT = "It is a truth universally acknowledged"


@pytest.fixture(scope="module")
def model():
    return onebit.load("default", backend="cpu")


@pytest.fixture(scope="module")
def persuasion_words():
    with open(EVAL_TEXT, encoding="utf-8") as f:
        return set(re.findall(r"[a-z]+", f.read().lower()))


def english_share(text: str, words: set[str]) -> tuple[float, list[str]]:
    """Share of the text's words that occur in the held-out novel (random tokens give a few percent)."""
    found = re.findall(r"[A-Za-z]+", text)
    return sum(w.lower() in words for w in found) / max(len(found), 1), found


def test_default_is_the_shipped_ternary_model(model):
    assert os.path.getsize(DEFAULT_GGUF) <= 16 * 10**6
    cfg = model.config
    assert (cfg.arch, cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == ("bitnet", 512, 8, 8192)
    assert cfg.max_position_embeddings >= 512
    assert model.info.format.startswith("gguf")
    assert model.tokenizer is not None and model.tokenizer.decode(model.tokenizer.encode(PROMPT), skip_special_tokens=True) == PROMPT


def test_default_writes_english(model, persuasion_words):
    text = "".join(model.generate(PROMPT, max_tokens=48, temperature=0.0))
    share, found = english_share(text, persuasion_words)
    assert len(found) >= 15, text
    assert share >= 0.9, (share, text)


def test_held_out_perplexity_on_a_slice(model):
    """The first 20 kB of Persuasion (the README's full-text figure is 54.4; the whole text takes minutes here).
    A uniform guess over the 8192-token vocabulary would score 8192."""
    with open(EVAL_TEXT, encoding="utf-8") as f:
        text = f.read()[:20_000]
    r = text_perplexity(model, text, ctx=512, stride=256)
    assert r.tokens > 4000
    assert 20 < r.ppl < 90, r.ppl
    assert r.bits_per_byte < 2.0


def test_run_without_a_model_uses_the_default(capsys, persuasion_words):
    assert main(["run", "-p", PROMPT, "-n", "32", "--temperature", "0", "--backend", "cpu"]) in (0, None)
    out = capsys.readouterr().out
    assert out.startswith(PROMPT)
    share, found = english_share(out[len(PROMPT):], persuasion_words)
    assert len(found) >= 10 and share >= 0.9, out


def test_missing_default_file_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr("onebit.loader.DEFAULT_GGUF", str(tmp_path / "gone.gguf"))
    with pytest.raises(onebit.FormatError, match="default model is missing"):
        onebit.load("default")
