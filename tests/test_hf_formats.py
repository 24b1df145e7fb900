"""HF checkpoints (BitNet packed and master, TriLM) against transformers itself, at every position."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import hf_oracle as H
import onebit
from onebit.errors import FormatError, NotTernaryError, UnsupportedError

PROMPT, DECODE = 24, 16


def run_prefill_then_decode(model, ids):
    """Logits for a 24-token prefill and 16 single-token decode steps through the KV cache."""
    cache = model.make_cache(64)
    blocks = [model.net.forward(ids[:PROMPT], cache)]
    blocks += [model.net.forward(ids[i:i + 1], cache) for i in range(PROMPT, PROMPT + DECODE)]
    return np.concatenate(blocks)


def compare(folder, bar, vocab=300, **load_kw):
    ids = np.random.default_rng().integers(0, vocab, PROMPT + DECODE)
    model = onebit.load(folder, backend="numpy", tokenizer=False, **load_kw)
    got = run_prefill_then_decode(model, ids)
    ref = H.oracle_logits(folder, ids)
    assert got.shape == ref.shape == (PROMPT + DECODE, vocab)
    err = np.abs(got - ref).max()
    rel = err / np.abs(ref).max()
    assert rel <= bar, f"max|diff| = {rel:.3g} x max|logit|"
    # the argmax is defined where the reference's top two are further apart than twice the engines' difference:
    # there it must agree (a near-tie elsewhere may go either way; random tiny models have a few)
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * err
    assert clear.mean() >= 0.5, f"only {clear.mean():.0%} of positions have a clear argmax"
    wrong = np.flatnonzero((got.argmax(1) != ref.argmax(1)) & clear)
    assert wrong.size == 0, f"argmax differs at clearly decided positions {wrong.tolist()}"
    return rel


@pytest.mark.parametrize("linear_class", ["autobitlinear", "bitlinear"])
@pytest.mark.parametrize("shape", [
    dict(),  # GQA 4/2, tied
    dict(num_key_value_heads=4, tie_word_embeddings=False, hidden_size=96, intermediate_size=160),  # MHA, untied
    dict(num_attention_heads=6, num_key_value_heads=1, hidden_size=48, head_dim=8, num_hidden_layers=3),
])
def test_bitnet_packed_matches_transformers(tmp_path, linear_class, shape):
    H.write_bitnet_packed(str(tmp_path), H.bitnet_config(**shape), linear_class,
                          seed=int(np.random.default_rng().integers(1 << 30)))
    compare(str(tmp_path), 3e-2)


def test_bitnet_packed_sharded_and_old_rope_spelling(tmp_path):
    H.write_bitnet_packed(str(tmp_path), H.bitnet_config(rope_theta=500000.0), "autobitlinear",
                          shard=True, rope_spelling="theta")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert "rope_theta" in json.loads((tmp_path / "config.json").read_text())
    compare(str(tmp_path), 3e-2)
    assert onebit.load(str(tmp_path), backend="numpy", tokenizer=False).config.rope_theta == 500000.0


def test_bitnet_master_online(tmp_path):
    H.write_bitnet_master(str(tmp_path), H.bitnet_config(tie_word_embeddings=False))
    compare(str(tmp_path), 3e-2)


@pytest.mark.parametrize("shards,kv", [(1, 4), (2, 4), (3, 2)])
def test_trilm_matches_transformers(tmp_path, shards, kv):
    cfg = H.llama_config(num_key_value_heads=kv, hidden_size=96, intermediate_size=192, num_attention_heads=4)
    H.write_trilm(str(tmp_path), cfg, shards=shards, seed=int(np.random.default_rng().integers(1 << 30)))
    compare(str(tmp_path), 1e-4)
    from onebit.weights.hf import read_hf

    _, weights = read_hf(str(tmp_path))
    q = weights["model.layers.0.self_attn.q_proj.weight"].scales
    o = weights["model.layers.0.self_attn.o_proj.weight"].scales
    assert q.shape == (shards, 1) and o.shape == (1, shards)  # row blocks for q, column blocks for o


def test_trilm_keeps_scales_exactly(tmp_path):
    H.write_trilm(str(tmp_path), H.llama_config(), shards=2)
    from safetensors.numpy import load_file

    raw = load_file(str(tmp_path / "model.safetensors"))
    m = onebit.load(str(tmp_path), backend="numpy", tokenizer=False)
    from onebit.weights.hf import read_hf

    _, weights = read_hf(str(tmp_path))
    for name, w in weights.items():
        if H.is_linear(name):
            assert np.array_equal(w.dense(), raw[name].astype(np.float32)), name
    assert m.config.act_bits is None


def test_trilm_int8_activation_option(tmp_path):
    H.write_trilm(str(tmp_path), H.llama_config())
    m16 = onebit.load(str(tmp_path), backend="numpy", tokenizer=False)
    m8 = onebit.load(str(tmp_path), backend="numpy", tokenizer=False, act_bits=8)
    ids = np.random.default_rng().integers(0, 300, 12)
    a, b = m16.logits(ids), m8.logits(ids)
    assert m8.config.act_bits == 8 and not np.array_equal(a, b)
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()  # an approximation, close but not equal


def test_plain_llama_is_refused_unless_ternarized(tmp_path, caplog):
    H.write_trilm(str(tmp_path), H.llama_config(), ternary=False)
    with pytest.raises(NotTernaryError, match="--ternarize"):
        onebit.load(str(tmp_path), backend="numpy", tokenizer=False)
    with caplog.at_level("WARNING"):
        m = onebit.load(str(tmp_path), backend="numpy", tokenizer=False, ternarize=True)
    assert "quality" in caplog.text
    t = m.net.layers[0].o_proj.w.t
    assert set(np.unique(t)) <= {-1, 0, 1} and m.config.arch == "llama"


def test_layer_level_bitlinear_is_far_tighter():
    """One ternary linear with the same inputs: transformers' BitLinear / AutoBitLinear vs ours."""
    import torch
    from transformers.integrations.bitnet import AutoBitLinear, BitLinear, pack_weights

    rng = np.random.default_rng()
    out_f, in_f = 64, 200
    t = rng.integers(-1, 2, (out_f, in_f)).astype(np.int8)
    x = rng.standard_normal((7, in_f)).astype(np.float32) * 3
    ws = np.float32(0.037)
    ours = onebit.kernels.numpy_ref.NumpyBackend()
    w = ours.prepare_ternary(onebit.weights.packing.TernaryWeight.from_ternary(t, ws))
    y = ours.ternary_matmul(x, w, 8)

    auto = AutoBitLinear(in_f, out_f, bias=False, dtype=torch.float32)
    auto.weight.data = torch.from_numpy(t.astype(np.float32))
    auto.weight_scale.data = torch.tensor([ws])
    bit = BitLinear(in_f, out_f, bias=False, dtype=torch.float32)
    bit.weight.data = pack_weights(torch.from_numpy(t.copy()))
    bit.weight_scale.data = torch.tensor([1 / ws], dtype=torch.float32)
    with torch.no_grad():
        for ref in (auto(torch.from_numpy(x)).numpy(), bit(torch.from_numpy(x)).numpy()):
            assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


def test_bad_checkpoints_give_clear_errors(tmp_path):
    H.write_bitnet_packed(str(tmp_path), H.bitnet_config(), "autobitlinear")
    st = tmp_path / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="truncated"):
        onebit.load(str(tmp_path), backend="numpy", tokenizer=False)
    st.write_bytes(b"\x00" * 4)
    with pytest.raises(FormatError, match="safetensors"):
        onebit.load(str(tmp_path), backend="numpy", tokenizer=False)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(FormatError, match="config.json"):
        onebit.load(str(tmp_path), backend="numpy", tokenizer=False)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(UnsupportedError, match="mamba"):
        onebit.load(str(tmp_path), backend="numpy", tokenizer=False)
    with pytest.raises(FormatError, match="no such file"):
        onebit.load(str(tmp_path / "nope"), backend="numpy")


def test_missing_shard_is_named(tmp_path):
    H.write_bitnet_packed(str(tmp_path), H.bitnet_config(), "autobitlinear", shard=True)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FormatError, match="model-00002-of-00002"):
        onebit.load(str(tmp_path), backend="numpy", tokenizer=False)
