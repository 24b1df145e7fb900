"""The canonical packed layout and HF BitNet's output-axis packing."""

import numpy as np
import pytest

from onebit.errors import NotTernaryError
from onebit.weights.hf import pack_hf_bitnet, unpack_hf_bitnet
from onebit.weights.packing import TernaryWeight, absmean_ternarize, detect_shard_scales, pack_rows, unpack_rows


def test_formats_md_example():
    rows = np.array([-1, 0, 1, 1, 0, -1, 1, 0])[:, None]
    assert pack_hf_bitnet(rows).reshape(-1).tolist() == [0b10011000, 0b01001001]
    assert np.array_equal(unpack_hf_bitnet(pack_hf_bitnet(rows)), rows)


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (8, 257), (37, 1029)])
def test_round_trips_on_odd_shapes(shape):
    rng = np.random.default_rng()
    t = rng.integers(-1, 2, shape).astype(np.int8)
    assert np.array_equal(unpack_rows(pack_rows(t), shape[1]), t)
    packed = pack_rows(t)
    if shape[1] % 4:  # padding codes are 1 (zero)
        assert ((packed[:, -1] >> (2 * (shape[1] % 4))) == int("01" * (4 - shape[1] % 4), 2)).all()
    if shape[0] % 4 == 0:
        assert np.array_equal(unpack_hf_bitnet(pack_hf_bitnet(t)), t)


def test_canonical_bit_order():
    t = np.array([[1, -1, 0, 1, -1]])
    assert pack_rows(t).tolist() == [[0b10_01_00_10, 0b01_01_01_00]]


def test_absmean_matches_transformers_weightquant():
    import torch
    from transformers.integrations.bitnet import WeightQuant

    w = np.random.default_rng().standard_normal((33, 70)).astype(np.float32)
    t, s = absmean_ternarize(w)
    ref = WeightQuant.forward(None, torch.from_numpy(w)).numpy()
    assert np.abs(t.astype(np.float32) * s - ref).max() <= 1e-6 * np.abs(ref).max()  # 1/(1/m) vs m: an ulp


@pytest.mark.parametrize("axis,k", [(0, 1), (0, 3), (1, 2), (1, 6)])
def test_detect_shard_scales_exact(axis, k):
    rng = np.random.default_rng()
    shape = (12, 18)
    t = rng.integers(-1, 2, shape)
    scales = ((rng.permutation(900)[:k] + 100) / 1024).astype(np.float16)  # distinct (equal ones merge), exact
    s = np.repeat(scales, shape[axis] // k)
    s = s[:, None] if axis == 0 else s[None, :]
    w = (t * s).astype(np.float16)
    tw = detect_shard_scales(w)
    assert np.array_equal(tw.dense(), w.astype(np.float32))
    assert tw.scales.size == k


def test_detect_rejects_non_ternary():
    w = np.random.default_rng().standard_normal((8, 8)).astype(np.float16)
    with pytest.raises(NotTernaryError):
        detect_shard_scales(w)


def test_scale_grid_validation():
    with pytest.raises(ValueError):
        TernaryWeight.from_ternary(np.zeros((6, 8), np.int8), np.ones((4, 1), np.float32))


def test_concat_rows_keeps_each_matrix_exact():
    from onebit.weights.packing import concat_rows

    rng = np.random.default_rng()
    ws = [TernaryWeight.from_ternary(rng.integers(-1, 2, (o, 40)), np.float32(rng.uniform(0.1, 1)))
          for o in (12, 4, 4)]
    fused = concat_rows(ws)
    assert np.array_equal(fused.dense(), np.concatenate([w.dense() for w in ws]))
    same = [TernaryWeight.from_ternary(rng.integers(-1, 2, (8, 40)), s) for s in (0.5, 0.25)]
    assert concat_rows(same).scales.shape == (2, 1)  # equal heights: one row block per matrix
    odd = TernaryWeight.from_ternary(rng.integers(-1, 2, (8, 40)), np.ones((1, 2), np.float32))
    assert concat_rows([ws[0], odd]) is None  # different column grids cannot share one matmul
