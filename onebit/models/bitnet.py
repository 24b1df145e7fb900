"""BitNet b1.58 (HF ``BitNetForCausalLM``): sub-norms, gated ReLU^2, int8 activations, ternary linears."""

from __future__ import annotations

from ..config import ModelConfig
from .base import CausalLM, FusedTernaryLinear, RMSNorm, TernaryLinear, WeightSource, causal_attention


class BitNetLayer:
    def __init__(self, cfg: ModelConfig, backend, w: WeightSource, i: int):
        p, h, bits, eps = f"model.layers.{i}.", cfg.hidden_size, cfg.act_bits, cfg.rms_norm_eps
        self.cfg, self.backend = cfg, backend

        def lin(name, out, inp):
            return TernaryLinear(backend, w.ternary(p + name + ".weight", (out, inp)), bits)

        def fused(names_shapes):
            return FusedTernaryLinear(backend, [w.ternary(p + n + ".weight", s) for n, s in names_shapes], bits)

        def norm(name, n):
            return RMSNorm(backend, w.get(p + name + ".weight", (n,)), eps)

        self.input_layernorm = norm("input_layernorm", h)
        self.qkv_proj = fused([("self_attn.q_proj", (cfg.q_size, h)), ("self_attn.k_proj", (cfg.kv_size, h)),
                               ("self_attn.v_proj", (cfg.kv_size, h))])
        self.attn_sub_norm = norm("self_attn.attn_sub_norm", cfg.q_size)
        self.o_proj = lin("self_attn.o_proj", h, cfg.q_size)
        self.post_attention_layernorm = norm("post_attention_layernorm", h)
        self.gate_up_proj = fused([("mlp.gate_proj", (cfg.intermediate_size, h)),
                                   ("mlp.up_proj", (cfg.intermediate_size, h))])
        self.ffn_sub_norm = norm("mlp.ffn_sub_norm", cfg.intermediate_size)
        self.down_proj = lin("mlp.down_proj", h, cfg.intermediate_size)

    def __call__(self, x, segments, i):
        b = self.backend
        h = self.input_layernorm(x)  # (T, hidden)
        a = causal_attention(b, self.cfg, i, *self.qkv_proj(h), segments)
        x = b.add(x, self.o_proj(self.attn_sub_norm(a)))
        h = self.post_attention_layernorm(x)
        m = b.glu(*self.gate_up_proj(h), "relu2")  # (T, intermediate)
        return b.add(x, self.down_proj(self.ffn_sub_norm(m)))


class BitNetModel(CausalLM):
    layer_class = BitNetLayer
