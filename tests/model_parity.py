"""Whole-model parity helpers shared by the backend tests (cpu, cuda): small odd-shaped configs, the bars, a
prompt + greedy decode fed to two models through their caches, and batched-vs-alone greedy decoding."""

from __future__ import annotations

import numpy as np

from onebit.config import ModelConfig
from onebit.synth import random_weights

# odd sizes on purpose: in_features 333 (intermediate) and 192 are not multiples of 256; GQA 3:1
SMALL = dict(vocab_size=261, hidden_size=192, intermediate_size=333, num_hidden_layers=2,
             num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=256, rope_theta=10000.0)
CONFIGS = {
    "bitnet-int8": ModelConfig.from_dict(dict(SMALL, arch="bitnet", hidden_act="relu2", act_bits=8)),
    "llama-f32act": ModelConfig.from_dict(dict(SMALL, arch="llama", hidden_act="silu", act_bits=None,
                                               tie_word_embeddings=False, num_key_value_heads=3)),
}
BOUND = {"bitnet-int8": 3e-2, "llama-f32act": 1e-4}


def bf16(w: np.ndarray) -> np.ndarray:
    return (np.asarray(w, np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)


def sixteen_bit_weights(cfg, seed: int) -> dict:
    """Random weights with the embedding and lm_head rounded to bf16, like real checkpoints."""
    w = random_weights(cfg, seed=seed)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in w:
            w[name] = bf16(w[name])
    return w


def fresh_seed() -> int:
    return int(np.random.default_rng().integers(1 << 30))


def run(model, tokens, n_prompt):
    """Prompt, then one token per step through the cache (teacher-forced) -> logits [len(tokens), vocab]."""
    cache = model.make_cache(64)
    out = [model.forward(tokens[:n_prompt], cache)]
    for t in tokens[n_prompt:]:
        out.append(model.forward(np.array([t]), cache))
    assert cache.length == len(tokens)
    return np.concatenate(out)


def prompt_and_decode(ref, fast):
    """A fresh 11-token prompt and 16 greedy steps chosen by the reference, fed to both models through their
    caches -> (max|diff| / max|logit|, argmax agreement per position, reference logits, fast logits)."""
    cfg = ref.config
    r = np.random.default_rng()
    prompt = r.integers(0, cfg.vocab_size, 11)
    cache = ref.make_cache(64)
    tokens = list(prompt)
    logits = ref.forward(prompt, cache)
    for _ in range(16):
        tokens.append(int(logits[-1].argmax()))
        logits = ref.forward(np.array(tokens[-1:]), cache)
    tokens = np.array(tokens)
    want, got = run(ref, tokens, 11), run(fast, tokens, 11)
    return np.abs(got - want).max() / np.abs(want).max(), got.argmax(-1) == want.argmax(-1), want, got


def greedy_batched_and_alone(model, prompts, steps: int):
    """Greedy tokens of each prompt decoded alone and all together (ragged batched prefill, then one token per
    sequence per step) -> (batched, alone, the batched caches)."""

    def greedy_alone(p):
        cache = model.make_cache(64)
        tok = int(model.forward(p, cache)[-1].argmax())
        out = [tok]
        for _ in range(steps - 1):
            tok = int(model.forward(np.array([tok]), cache)[-1].argmax())
            out.append(tok)
        return out

    alone = [greedy_alone(p) for p in prompts]
    caches = [model.make_cache(64) for _ in prompts]
    logits = model.forward_batch(list(zip(prompts, caches)), last_only=True)
    toks = [int(l[-1].argmax()) for l in logits]
    batched = [[t] for t in toks]
    for _ in range(steps - 1):
        logits = model.forward_batch([(np.array([t]), c) for t, c in zip(toks, caches)])
        toks = [int(l[-1].argmax()) for l in logits]
        for seq, t in zip(batched, toks):
            seq.append(t)
    return batched, alone, caches


def assert_int8_head_moves_logits_within_rounding(a: np.ndarray, b: np.ndarray, x: np.ndarray, head: np.ndarray):
    """Logits a (16-bit lm_head) and b (per-row int8 lm_head against per-token int8 rows) of head inputs x [T, k]:
    every logit moves by at most what rounding the head's rows and x's rows to int8 can move it. With
    x = q_x s_x + e_x and w = q_w s_w + e_w (|e_x| <= s_x / 2, |e_w| <= s_w / 2):
    |x.w - q_x.q_w s_x s_w| <= s_x / 2 sum|w| + s_w / 2 sum|x| + k s_x s_w / 4 (measured: up to ~0.2 of it)."""
    np.testing.assert_allclose(x @ head.T, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())  # x is the head's input
    sx = np.abs(x).max(1, keepdims=True) / 127
    sw = np.abs(head).max(1) / 127
    bound = sx / 2 * np.abs(head).sum(1) + sw / 2 * np.abs(x).sum(1, keepdims=True) + x.shape[1] * sx * sw / 4
    err = np.abs(a - b)
    assert (err <= bound * (1 + 1e-3) + 1e-5).all(), f"a logit moved by {(err / bound).max():.3f} x its bound"
    assert err.max() > 0  # the int8 head ran: rounding moves some logit
