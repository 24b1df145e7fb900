"""Synthetic models: random ternary weights with real shapes, deterministic from a seed."""

from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .weights.packing import TernaryWeight

# name -> ModelConfig fields. bitnet-2b4t: exactly BitNet b1.58 2B-4T's shapes (FORMATS.md section 1).
SPECS: dict[str, dict] = {
    "bitnet-2b4t": dict(arch="bitnet", vocab_size=128256, hidden_size=2560, intermediate_size=6912,
                        num_hidden_layers=30, num_attention_heads=20, num_key_value_heads=5, head_dim=128,
                        rope_theta=500000.0, max_position_embeddings=4096, tie_word_embeddings=True,
                        bos_token_id=128000, eos_token_id=[128001, 128009]),
    "tiny-random": dict(arch="bitnet", vocab_size=260, hidden_size=256, intermediate_size=512,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=256,
                        eos_token_id=[257]),
}


def random_weights(cfg: ModelConfig, seed: int = 0) -> dict:
    """Ternary linears (about 1/3 zeros, one absmean-like scale each), N(0, 2/sqrt(hidden)) embedding rows
    (tied logits then have a spread of about 2, so sampling has choices), norms near 1. Float32."""
    rng = np.random.default_rng(seed)
    h, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    shapes = {"self_attn.q_proj": (cfg.q_size, h), "self_attn.k_proj": (cfg.kv_size, h),
              "self_attn.v_proj": (cfg.kv_size, h), "self_attn.o_proj": (h, cfg.q_size),
              "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
    embed = _bf16_round(rng.standard_normal((cfg.vocab_size, h), dtype=np.float32) * np.float32(2 / np.sqrt(h)))
    w: dict = {"model.embed_tokens.weight": embed}
    for i in range(L):
        p = f"model.layers.{i}."
        for name, shape in shapes.items():
            t = rng.integers(-1, 2, size=shape, dtype=np.int8)
            scale = np.float32(rng.uniform(0.5, 1.5) / np.sqrt(shape[1]))
            w[p + name + ".weight"] = TernaryWeight.from_ternary(t, scale)
        w[p + "input_layernorm.weight"] = _norm(rng, h)
        w[p + "post_attention_layernorm.weight"] = _norm(rng, h)
        if cfg.arch == "bitnet":
            w[p + "self_attn.attn_sub_norm.weight"] = _norm(rng, cfg.q_size)
            w[p + "mlp.ffn_sub_norm.weight"] = _norm(rng, f)
    w["model.norm.weight"] = _norm(rng, h)
    if not cfg.tie_word_embeddings:
        w["lm_head.weight"] = _bf16_round(rng.standard_normal((cfg.vocab_size, h), dtype=np.float32)
                                          / np.float32(np.sqrt(h)))
    return w


def _bf16_round(x: np.ndarray) -> np.ndarray:
    """Round to bfloat16 values (as a real checkpoint stores them), kept as float32."""
    from .weights.safetensors_io import bf16_bits

    return (bf16_bits(x).astype(np.uint32) << 16).view(np.float32)


def _norm(rng, n: int) -> np.ndarray:
    return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)


def synth_config(name: str, **overrides) -> ModelConfig:
    if name not in SPECS:
        raise ValueError(f"unknown synthetic model {name!r} (known: {', '.join(SPECS)})")
    return ModelConfig.from_dict({**SPECS[name], **overrides})


def builtin_model(name: str):
    """(config, weights, info, tokenizer) for a built-in synthetic model with a byte-level tokenizer."""
    from .model import ModelInfo
    from .tokenizer import byte_level_tokenizer

    cfg = synth_config(name)
    tok = byte_level_tokenizer()
    return cfg, random_weights(cfg, seed=0), ModelInfo(name, "synthetic", {"seed": 0}), tok
