"""BitNet b1.58 (HF ``BitNetForCausalLM``): sub-norms, gated ReLU^2, int8 activations, ternary linears."""

from __future__ import annotations

from ..config import ModelConfig
from .base import CausalLM, FusedTernaryLinear, RMSNorm, TernaryLinear, WeightSource, causal_attention, last_rows


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

    def __call__(self, x, segments, i, last_only: bool = False):
        # each line is one backend call where the backend fuses norm -> linear -> residual / glu
        a = causal_attention(self.backend, self.cfg, i, *self.qkv_proj(x, norm=self.input_layernorm), segments,
                             last_only)
        if last_only:
            x = x[last_rows(segments)]
        x = self.o_proj(a, norm=self.attn_sub_norm, residual=x)  # x + o_proj(attn_sub_norm(a))
        m = self.gate_up_proj.glu(x, "relu2", norm=self.post_attention_layernorm)  # (T, intermediate)
        return self.down_proj(m, norm=self.ffn_sub_norm, residual=x)


class BitNetModel(CausalLM):
    layer_class = BitNetLayer
