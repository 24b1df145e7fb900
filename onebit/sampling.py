"""Next-token sampling: logit bias, penalties, temperature, top-k / top-p / min-p, seeded RNG."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .config import SamplingParams

__all__ = ["Sampler", "make_sampler", "log_softmax", "greedy_tokens"]

_TOP_P_FIRST = 256  # candidates sorted first for top-p; grown 8x until the nucleus ends inside them


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log(softmax(x)) over the last axis in float64; -inf entries stay -inf."""
    x = np.asarray(x, dtype=np.float64)
    shifted = x - np.max(x, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def greedy_tokens(logits: np.ndarray) -> np.ndarray:
    """Logits [..., vocab] -> int64 [...]: the token a temperature-0 sampler without bias or penalties picks
    (argmax, lowest id on ties, NaN counted as -inf); a row without a finite maximum raises ValueError."""
    x = np.asarray(logits)
    rows = x.reshape(-1, x.shape[-1])
    idx = np.argmax(rows, axis=-1)
    if not (rows[np.arange(rows.shape[0]), idx] > -np.inf).all():  # a NaN (argmax stops at the first) or -inf
        rows = np.where(np.isnan(rows), -np.inf, rows)
        if (rows.max(axis=-1) == -np.inf).any():
            raise ValueError("logits have no finite maximum; cannot pick a token")
        idx = np.argmax(rows, axis=-1)
    return idx.astype(np.int64).reshape(x.shape[:-1])


def make_sampler(params: SamplingParams) -> "Sampler":
    """The sampler for ``params``: ``sampler(logits, history, generated) -> token id``."""
    return Sampler(params)


class Sampler:
    """Picks one token from a vector of logits, in this order:

    1. ``logit_bias`` is added.
    2. repetition penalty (HF): each distinct token in ``history`` (prompt + generated) has a positive logit
       divided by the penalty and a negative one multiplied by it.
    3. presence / frequency penalties (OpenAI), over ``generated`` only:
       ``logit -= presence * (count > 0) + frequency * count``.
    4. temperature 0: argmax, lowest id on ties; the RNG is not advanced.
       Otherwise divide by temperature, then top-k, top-p, min-p, each keeping the same tokens as the
       transformers warper of that name applied in that order, and draw from the renormalised
       distribution with the sampler's own ``Generator(PCG64(seed))`` (seed None: fresh entropy).

    ``process_logits`` returns steps 1-3 (the distribution the server reports logprobs of); ``candidates``
    returns the tokens step 4 may draw from. The same seed and the same logits give the same tokens.
    """

    def __init__(self, params: SamplingParams) -> None:
        params.validate()
        self.params = params
        seed = None if params.seed is None else int(params.seed) % 2**64
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self._bias_ids = np.array(list(params.logit_bias.keys()), dtype=np.int64)
        self._bias = np.array(list(params.logit_bias.values()), dtype=np.float64)

    @property
    def greedy(self) -> bool:
        """Temperature 0 without bias or penalties: the token is ``greedy_tokens(logits)``, which a backend may
        compute where the logits are (``CausalLM.decode_greedy``)."""
        p = self.params
        return (p.temperature == 0 and not self._bias_ids.size and p.repetition_penalty == 1
                and not p.presence_penalty and not p.frequency_penalty)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = (), generated: Sequence[int] = ()) -> int:
        x = self.process_logits(logits, history, generated)
        if self.params.temperature == 0:
            return int(np.argmax(x))
        ids, z = self.candidates(x)
        cdf = np.cumsum(np.exp(z - z.max()))
        i = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        return int(ids[min(i, ids.size - 1)])

    def process_logits(self, logits: np.ndarray, history: Sequence[int] = (),
                       generated: Sequence[int] = ()) -> np.ndarray:
        """Logits (vocab,) after bias and penalties, as a new float64 array."""
        x = np.array(logits, dtype=np.float64)  # (vocab,)
        if x.ndim != 1:
            raise ValueError(f"logits must be one vector of shape (vocab,), got shape {x.shape}")
        p, vocab = self.params, x.shape[0]
        if self._bias_ids.size:
            if self._bias_ids.max() >= vocab:
                raise ValueError(f"logit_bias token id {int(self._bias_ids.max())} is outside the vocabulary "
                                 f"of {vocab} tokens")
            x[self._bias_ids] += self._bias
        if p.repetition_penalty != 1 and len(history):
            ids, _ = _counts(history, vocab)
            seen = x[ids]
            with np.errstate(over="ignore"):  # overflow is handled below
                x[ids] = np.where(seen < 0, seen * p.repetition_penalty, seen / p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and len(generated):
            ids, counts = _counts(generated, vocab)
            x[ids] -= p.presence_penalty + p.frequency_penalty * counts
        # extreme (valid) penalties can overflow: +inf keeps its rank as the largest finite value
        x = np.nan_to_num(x, nan=-np.inf, posinf=np.finfo(x.dtype).max, neginf=-np.inf)
        top = x.max()
        if not np.isfinite(top):
            raise ValueError(f"logits have no finite maximum ({top}); cannot pick a token")
        return x

    def candidates(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids ascending, logits / temperature) of the tokens left by top-k, top-p and min-p.

        At temperature 0 the only candidate is the argmax, with its logit unscaled."""
        p = self.params
        if p.temperature == 0:
            i = np.argmax(x)
            return np.array([i]), np.asarray(x, dtype=np.float64)[[i]]
        x = np.asarray(x, dtype=np.float64)
        with np.errstate(over="ignore"):
            z = x / p.temperature
        if not np.isfinite(z.max()):  # a tiny temperature overflowed: shift first (softmax does not care)
            with np.errstate(over="ignore"):
                z = (x - x.max()) / p.temperature
        ids = np.arange(z.size)
        if 0 < p.top_k < z.size:
            keep = _top_k(z, p.top_k)
            ids, z = ids[keep], z[keep]
        if p.top_p < 1:
            keep = _top_p(z, p.top_p)
            ids, z = ids[keep], z[keep]
        if p.min_p > 0:
            keep = np.flatnonzero(np.exp(z - z.max()) >= p.min_p)  # prob / max prob >= min_p
            ids, z = ids[keep], z[keep]
        return ids, z


def _counts(tokens: Sequence[int], vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct token ids inside the vocabulary and how often each occurs."""
    ids, counts = np.unique(np.asarray(tokens, dtype=np.int64), return_counts=True)
    inside = (ids >= 0) & (ids < vocab)
    return ids[inside], counts[inside]


def _top_k(z: np.ndarray, k: int) -> np.ndarray:
    """Indices (ascending) of logits >= the k-th largest: ties at the cut are kept, as in HF."""
    kth = np.partition(z, z.size - k)[z.size - k]
    return np.flatnonzero(z >= kth)


def _top_p(z: np.ndarray, top_p: float) -> np.ndarray:
    """Indices (ascending) of the nucleus: tokens whose higher-ranked tokens hold < top_p of the mass.

    This is HF's rule (drop a token when the ascending cumulative probability up to it is <= 1 - top_p).
    Only the c most probable tokens are sorted, c growing until the nucleus ends inside them.
    """
    w = np.exp(z - z.max())
    prob = w / w.sum()
    n = prob.size
    c = min(n, _TOP_P_FIRST)
    while True:
        if c < n:
            top = np.argpartition(-prob, c - 1)[:c]
            order = top[np.argsort(-prob[top], kind="stable")]  # (c,) most probable first
        else:
            order = np.argsort(-prob, kind="stable")
        above = np.concatenate(([0.0], np.cumsum(prob[order])[:-1]))  # mass ranked strictly above
        keep = above < top_p
        if not keep.all() or c == n:
            return np.sort(order[keep])
        c = min(n, c * 8)
