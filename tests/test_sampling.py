"""Sampler against transformers' logits processors, hand formulas and empirical draws."""

from __future__ import annotations

import numpy as np
import pytest

from onebit.config import SamplingParams
from onebit.sampling import Sampler, greedy_tokens, log_softmax, make_sampler

torch = pytest.importorskip("torch")
hf = pytest.importorskip("transformers")

RNG = np.random.default_rng()  # fresh inputs on every run


def random_logits(vocab: int, rng: np.random.Generator = RNG) -> np.ndarray:
    scale = rng.choice([0.3, 1.0, 3.0, 8.0])  # flat to peaked
    return (rng.standard_normal(vocab) * scale).astype(np.float32)


def hf_kept(warpers, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kept ids, processed scores at them) from transformers warpers applied in order, in float64."""
    scores = torch.from_numpy(logits.astype(np.float64))[None]
    ids = torch.zeros((1, 1), dtype=torch.long)
    for w in warpers:
        scores = w(ids, scores)
    out = scores[0].numpy()
    kept = np.flatnonzero(np.isfinite(out))
    return kept, out[kept]


def our_kept(params: SamplingParams, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = make_sampler(params)
    return s.candidates(s.process_logits(logits))


# ---- filters: the kept set equals transformers' ----

@pytest.mark.parametrize("trial", range(40))
def test_filters_match_transformers(trial):
    vocab = int(RNG.choice([2, 7, 100, 1000, 5000]))
    logits = random_logits(vocab)
    t = float(RNG.uniform(0.2, 2.0))
    k = int(RNG.integers(1, vocab + 2))
    top_p = float(RNG.uniform(0.05, 0.999))
    min_p = float(RNG.uniform(0.0, 0.5))
    cases = [
        (dict(temperature=t), [hf.TemperatureLogitsWarper(t)]),
        (dict(top_k=k), [hf.TopKLogitsWarper(k)]),
        (dict(top_p=top_p), [hf.TopPLogitsWarper(top_p)]),
        (dict(min_p=min_p), [hf.MinPLogitsWarper(min_p)]),
        (dict(temperature=t, top_k=k, top_p=top_p, min_p=min_p),
         [hf.TemperatureLogitsWarper(t), hf.TopKLogitsWarper(k), hf.TopPLogitsWarper(top_p),
          hf.MinPLogitsWarper(min_p)]),
    ]
    for kwargs, warpers in cases:
        ids, z = our_kept(SamplingParams(**kwargs), logits)
        want_ids, want_z = hf_kept(warpers, logits)
        np.testing.assert_array_equal(ids, want_ids, err_msg=str(kwargs))
        np.testing.assert_allclose(z, want_z, rtol=1e-12, err_msg=str(kwargs))


def test_top_p_wide_nucleus_full_vocab():
    # flat logits over a LLaMA-3-sized vocabulary: the nucleus outgrows the first partial sort
    logits = (RNG.standard_normal(128256) * 0.5).astype(np.float32)
    for top_p in (0.3, 0.9, 0.999):
        ids, _ = our_kept(SamplingParams(top_p=top_p), logits)
        want, _ = hf_kept([hf.TopPLogitsWarper(top_p)], logits)
        assert ids.size > 256
        np.testing.assert_array_equal(ids, want)


def test_top_k_keeps_ties_like_transformers():
    logits = RNG.integers(-3, 4, size=200).astype(np.float32)  # many exact ties
    for k in (1, 5, 50, 199):
        ids, _ = our_kept(SamplingParams(top_k=k), logits)
        want, _ = hf_kept([hf.TopKLogitsWarper(k)], logits)
        np.testing.assert_array_equal(ids, want)


# ---- penalties and bias ----

@pytest.mark.parametrize("trial", range(10))
def test_repetition_penalty_matches_transformers(trial):
    vocab = int(RNG.integers(5, 3000))
    logits = random_logits(vocab)
    history = RNG.integers(0, vocab, size=int(RNG.integers(1, 60))).tolist()
    history += history[: len(history) // 2]  # repeats count once
    penalty = float(RNG.uniform(0.3, 3.0))
    got = make_sampler(SamplingParams(repetition_penalty=penalty)).process_logits(logits, history)
    want = hf.RepetitionPenaltyLogitsProcessor(penalty)(
        torch.tensor([history]), torch.from_numpy(logits.astype(np.float64))[None])[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("trial", range(10))
def test_presence_frequency_penalties_by_hand(trial):
    vocab = int(RNG.integers(5, 500))
    logits = random_logits(vocab)
    prompt = RNG.integers(0, vocab, size=20).tolist()
    generated = RNG.integers(0, vocab, size=int(RNG.integers(0, 40))).tolist()
    presence, frequency = (float(v) for v in RNG.uniform(-2, 2, size=2))
    got = make_sampler(SamplingParams(presence_penalty=presence, frequency_penalty=frequency)).process_logits(
        logits, prompt + generated, generated)
    want = logits.astype(np.float64)
    for tok in set(generated):
        n = generated.count(tok)
        want[tok] -= presence * (n > 0) + frequency * n
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_process_logits_order_and_no_mutation():
    logits = np.array([2.0, -1.0, 0.5, 3.0], dtype=np.float32)
    before = logits.copy()
    p = SamplingParams(logit_bias={1: 3.0}, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    got = make_sampler(p).process_logits(logits, history=[0, 1, 1, 2], generated=[1, 1])
    # bias first (token 1: -1 + 3 = 2), then repetition (/2 for positive), then presence + 2 * frequency
    np.testing.assert_allclose(got, [1.0, 2.0 / 2 - 0.5 - 0.5, 0.25, 3.0])
    np.testing.assert_array_equal(logits, before)


def test_logit_bias_forces_and_forbids():
    logits = random_logits(50)
    top = int(np.argmax(logits))
    forced = make_sampler(SamplingParams(temperature=1.0, logit_bias={7: 100.0}, seed=1))
    assert {forced(logits) for _ in range(300)} == {7}
    forbid = make_sampler(SamplingParams(temperature=0.0, logit_bias={top: -100.0}))
    assert forbid(logits) != top
    peaked = np.zeros(3, dtype=np.float32)
    no_zero = make_sampler(SamplingParams(logit_bias={0: -100.0}, seed=2))
    assert 0 not in {no_zero(peaked) for _ in range(1000)}


def test_logit_bias_outside_vocab_is_an_error():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        make_sampler(SamplingParams(logit_bias={10: 1.0}))(np.zeros(10, dtype=np.float32))


# ---- greedy and seeds ----

def test_greedy_is_argmax_ignores_seed_and_keeps_rng():
    for _ in range(20):
        logits = random_logits(int(RNG.integers(2, 2000)))
        a = make_sampler(SamplingParams(temperature=0, seed=1, top_k=3, top_p=0.5))
        b = make_sampler(SamplingParams(temperature=0, seed=2))
        state = a.rng.bit_generator.state
        assert a(logits) == b(logits) == int(np.argmax(logits))
        assert a.rng.bit_generator.state == state
    ties = np.array([0.0, 5.0, 1.0, 5.0, 5.0], dtype=np.float32)
    assert make_sampler(SamplingParams(temperature=0))(ties) == 1


def test_greedy_tokens_pick_what_the_greedy_sampler_picks():
    """greedy_tokens (what a backend may compute where the logits are) = the temperature-0 sampler, on fresh
    logits with ties, NaN (as -inf) and +inf, row by row; no finite maximum is the same error."""
    s = make_sampler(SamplingParams(temperature=0))

    def awkward(vocab):
        x = random_logits(vocab)
        x[RNG.integers(0, x.size, 3)] = x.max()  # ties at the top
        if RNG.random() < 0.3:
            x[RNG.integers(0, x.size, 2)] = np.nan
        if RNG.random() < 0.2:
            x[RNG.integers(0, x.size, 2)] = np.inf
        return x

    for _ in range(30):
        x = awkward(int(RNG.integers(2, 3000)))
        assert greedy_tokens(x) == s(x)
    batch = np.stack([awkward(300) for _ in range(16)])
    np.testing.assert_array_equal(greedy_tokens(batch), [s(r) for r in batch])
    for bad in (np.full(300, -np.inf, dtype=np.float32), np.full(300, np.nan, dtype=np.float32)):
        with pytest.raises(ValueError, match="finite"):
            s(bad)
        with pytest.raises(ValueError, match="finite"):
            greedy_tokens(np.stack([batch[0], bad]))


def test_sampler_is_greedy_only_without_bias_penalties_or_temperature():
    assert make_sampler(SamplingParams(temperature=0, top_k=5, seed=3)).greedy
    for kw in (dict(temperature=0.7), dict(logit_bias={3: 1.0}), dict(repetition_penalty=1.1),
               dict(presence_penalty=0.5), dict(frequency_penalty=-0.5)):
        assert not make_sampler(SamplingParams(**{"temperature": 0, **kw})).greedy, kw


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    steps = [random_logits(300) * 0.2 for _ in range(200)]
    seed = int(RNG.integers(0, 2**63))
    params = dict(temperature=0.9, top_k=100, top_p=0.95, min_p=0.01)

    def run(s):
        sampler = make_sampler(SamplingParams(seed=s, **params))
        return [sampler(x) for x in steps]

    first = run(seed)
    assert run(seed) == first
    assert run(seed + 1) != first
    assert run(None) != run(None)


def test_negative_seed_is_accepted():
    a, b = (make_sampler(SamplingParams(seed=-1)) for _ in range(2))
    x = random_logits(100)
    assert [a(x) for _ in range(50)] == [b(x) for _ in range(50)]


# ---- the draws follow the distribution ----

def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson statistic and degrees of freedom, pooling bins expected below 5 draws."""
    n = counts.sum()
    expected = probs * n
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(((obs - exp) ** 2 / exp).sum()), obs.size - 1


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("filters", [{}, dict(top_k=12, top_p=0.9, min_p=0.02)])
def test_empirical_distribution(filters):
    draws, t = 20000, 0.5
    logits = (np.linspace(-2.0, 2.0, 30) + RNG.standard_normal(30) * 0.3).astype(np.float32)
    sampler = make_sampler(SamplingParams(temperature=t, **filters))
    ids, z = sampler.candidates(logits.astype(np.float64))
    probs = np.zeros(30)
    probs[ids] = softmax(z)
    if filters:
        assert 1 < ids.size < 30
    counts = np.bincount([sampler(logits) for _ in range(draws)], minlength=30)
    assert counts[probs == 0].sum() == 0
    stat, dof = chi_square(counts[probs > 0], probs[probs > 0])
    # mean dof, sd sqrt(2 dof): dof + 10 sd is a p-value far below 1e-9 for a correct sampler
    limit = dof + 10 * np.sqrt(2 * dof)
    assert stat < limit
    # and the test has power: the untempered distribution would fail it by far
    wrong = softmax(logits.astype(np.float64)[ids])
    assert chi_square(counts[ids], wrong)[0] > 5 * limit


# ---- helpers and validation ----

def test_log_softmax_matches_torch():
    x = random_logits(1000)
    x[3] = -np.inf
    want = torch.log_softmax(torch.from_numpy(x.astype(np.float64)), -1).numpy()
    np.testing.assert_allclose(log_softmax(x), want, rtol=1e-12)
    assert np.isneginf(log_softmax(x)[3])


def test_all_masked_logits_are_an_error():
    with pytest.raises(ValueError, match="finite"):
        make_sampler(SamplingParams())(np.full(5, -np.inf, dtype=np.float32))


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(min_p=-0.01), "min_p"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(presence_penalty=-2.01), "presence_penalty"),
    (dict(frequency_penalty=3.0), "frequency_penalty"),
    (dict(frequency_penalty=-2.5), "frequency_penalty"),
    (dict(logit_bias={"5": 1.0}), "logit_bias"),
    (dict(logit_bias={1.0: 1.0}), "logit_bias"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logit_bias={1: float("nan")}), "logit_bias"),
    (dict(seed="42"), "seed"),
])
def test_validation_errors(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_validate_catches_later_mutation_and_edges_are_valid():
    SamplingParams(temperature=0, top_p=1.0, top_k=0, min_p=1.0, repetition_penalty=0.01,
                   presence_penalty=-2, frequency_penalty=2, logit_bias={0: -100, 5: 3.5}, seed=0)
    p = SamplingParams()
    p.top_p = 0.0
    with pytest.raises(ValueError, match="top_p"):
        p.validate()
    with pytest.raises(ValueError, match="top_p"):
        Sampler(p)


def test_greedy_candidates_is_the_argmax():
    x = random_logits(100)
    ids, z = make_sampler(SamplingParams(temperature=0)).candidates(x)
    assert ids.tolist() == [int(np.argmax(x))] and z[0] == x.max()


def test_extreme_valid_penalties_and_temperatures_still_pick_a_token():
    """A tiny repetition penalty or temperature overflows float64 unless handled: never an error."""
    rng = np.random.default_rng()
    logits = rng.standard_normal(50).astype(np.float32) * 5
    history = list(rng.integers(0, 50, 10))
    for params in (SamplingParams(temperature=1e-300, seed=1), SamplingParams(repetition_penalty=1e-320, seed=1),
                   SamplingParams(temperature=1e-300, repetition_penalty=1e-320, seed=1)):
        token = make_sampler(params)(logits, history, [])
        assert 0 <= token < 50
    greedy = make_sampler(SamplingParams(temperature=1e-300, seed=3))(logits, [], [])
    assert greedy == int(np.argmax(logits))  # a vanishing temperature is greedy
