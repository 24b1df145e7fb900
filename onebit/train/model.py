"""Torch models for ternary QAT: BitNet b1.58 and LLaMA (TriLM) with BitLinear, the math the engine runs.

Parameter names are the HF names (``model.layers.{i}.self_attn.q_proj.weight`` ...), so a state dict
exports without a name table. ``ternary=False`` builds the full-precision twin of the same shape.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --- quantizers (float32, as in FORMATS.md §1) ------------------------------------------------------

def weight_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor absmean: ``s = 1 / mean|W|.clamp(1e-5)``, ``T = round(W s).clamp(-1, 1)``.

    Returns (T as float32 in {-1, 0, 1}, the effective scale 1/s as a float32 scalar tensor).
    """
    w = w.float()
    s = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * s).round().clamp(-1, 1), 1.0 / s


def act_quant(x: torch.Tensor) -> torch.Tensor:
    """Per-token int8 absmax, dequantized: ``round_half_even(x s).clamp(-128, 127) / s``, ``s = 127/max|x|``."""
    x = x.float()
    s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * s).round().clamp(-128, 127) / s


class BitLinear(nn.Linear):
    """A linear layer with latent full-precision weights, ternarized (and int8 inputs) in the forward.

    The straight-through estimator passes gradients to the latent weight and input unchanged.
    """

    def __init__(self, in_features: int, out_features: int, act_bits: int | None, ternary: bool = True):
        super().__init__(in_features, out_features, bias=False)
        self.act_bits, self.ternary = act_bits, ternary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.ternary:
            t, scale = weight_quant(w)
            w = w + (t * scale - w).detach()
            if self.act_bits:
                x = x + (act_quant(x) - x).detach()
        return F.linear(x, w)


class RMSNorm(nn.Module):
    """Computed in float32: ``x * rsqrt(mean(x^2) + eps) * w``."""

    def __init__(self, n: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(n: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin float32 [n, D] for rotate-half RoPE (frequencies in float32, as transformers computes them)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D): x * cos + rotate_half(x) * sin, pairing i with i + D/2."""
    d = x.shape[-1] // 2
    rot = torch.cat([-x[..., d:], x[..., :d]], dim=-1)
    return x * cos + rot * sin


# --- blocks -----------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Causal GQA attention; BitNet adds ``attn_sub_norm`` before ``o_proj``."""

    def __init__(self, cfg: ModelConfig, ternary: bool):
        super().__init__()
        h, bits = cfg.hidden_size, cfg.act_bits
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = BitLinear(h, cfg.q_size, bits, ternary)
        self.k_proj = BitLinear(h, cfg.kv_size, bits, ternary)
        self.v_proj = BitLinear(h, cfg.kv_size, bits, ternary)
        self.o_proj = BitLinear(cfg.q_size, h, bits, ternary)
        if cfg.arch == "bitnet":
            self.attn_sub_norm = RMSNorm(cfg.q_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        if self.n_kv != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)  # (B, Hq, T, D)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        a = a.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # (B, T, Hq*D)
        if hasattr(self, "attn_sub_norm"):
            a = self.attn_sub_norm(a)
        return self.o_proj(a)


class MLP(nn.Module):
    """BitNet: ``down(ffn_sub_norm(relu(gate)^2 * up))``; LLaMA: ``down(silu(gate) * up)``."""

    def __init__(self, cfg: ModelConfig, ternary: bool):
        super().__init__()
        h, f, bits = cfg.hidden_size, cfg.intermediate_size, cfg.act_bits
        self.gate_proj = BitLinear(h, f, bits, ternary)
        self.up_proj = BitLinear(h, f, bits, ternary)
        self.down_proj = BitLinear(f, h, bits, ternary)
        self.relu2 = cfg.hidden_act == "relu2"
        if cfg.arch == "bitnet":
            self.ffn_sub_norm = RMSNorm(f, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x)
        m = (F.relu(g).square() if self.relu2 else F.silu(g)) * self.up_proj(x)  # (B, T, intermediate)
        if hasattr(self, "ffn_sub_norm"):
            m = self.ffn_sub_norm(m)
        return self.down_proj(m)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ternary: bool, dropout: float):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, ternary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, ternary)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x), cos, sin)
        x = x + F.dropout(a, self.dropout, self.training)
        m = self.mlp(self.post_attention_layernorm(x))
        return x + F.dropout(m, self.dropout, self.training)


class Backbone(nn.Module):
    """HF's ``model.``: embedding, layers, final norm."""

    def __init__(self, cfg: ModelConfig, ternary: bool, dropout: float):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, ternary, dropout) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """ids (B, T) -> logits (B, T, vocab). ``ternary=False``: the full-precision twin (no quantizers)."""

    def __init__(self, cfg: ModelConfig, ternary: bool = True, dropout: float = 0.0):
        super().__init__()
        self.config, self.ternary = cfg, ternary
        self.model = Backbone(cfg, ternary, dropout)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.max_position_embeddings, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.dropout = dropout
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """GPT-2 init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 layers); norms 1."""
        out_std = std / (2 * self.config.num_hidden_layers) ** 0.5
        for name, p in self.named_parameters():
            if p.ndim == 1:
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, 0.0, out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        if t > self.cos.shape[0]:
            raise ValueError(f"{t} tokens > the model's {self.cos.shape[0]} positions")
        cos, sin = self.cos[:t], self.sin[:t]
        x = F.dropout(self.model.embed_tokens(ids), self.dropout, self.training)  # (B, T, hidden)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        x = self.model.norm(x)
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, head)

    def num_parameters(self) -> dict[str, int]:
        """Counts: linear (ternary when quantized) and other (embedding, head, norms) parameters."""
        lin = sum(p.numel() for n, p in self.named_parameters() if is_linear(n))
        return {"linear": lin, "other": sum(p.numel() for p in self.parameters()) - lin}


def is_linear(name: str) -> bool:
    """True for the names of the ternary linears (``...q_proj.weight`` ...)."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in LINEAR_NAMES


__all__ = ["CausalLM", "BitLinear", "RMSNorm", "weight_quant", "act_quant", "is_linear", "LINEAR_NAMES"]
