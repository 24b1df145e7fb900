"""LLaMA with ternary linears (TriLM): SwiGLU, MHA or GQA, 16-bit activations unless act_bits is set."""

from __future__ import annotations

from ..config import ModelConfig
from .base import CausalLM, FusedTernaryLinear, RMSNorm, TernaryLinear, WeightSource, causal_attention, last_rows


class LlamaLayer:
    def __init__(self, cfg: ModelConfig, backend, w: WeightSource, i: int):
        p, h, bits, eps = f"model.layers.{i}.", cfg.hidden_size, cfg.act_bits, cfg.rms_norm_eps
        self.cfg, self.backend = cfg, backend

        def lin(name, out, inp):
            return TernaryLinear(backend, w.ternary(p + name + ".weight", (out, inp)), bits)

        def fused(names_shapes):
            return FusedTernaryLinear(backend, [w.ternary(p + n + ".weight", s) for n, s in names_shapes], bits)

        self.input_layernorm = RMSNorm(backend, w.get(p + "input_layernorm.weight", (h,)), eps)
        self.qkv_proj = fused([("self_attn.q_proj", (cfg.q_size, h)), ("self_attn.k_proj", (cfg.kv_size, h)),
                               ("self_attn.v_proj", (cfg.kv_size, h))])
        self.o_proj = lin("self_attn.o_proj", h, cfg.q_size)
        self.post_attention_layernorm = RMSNorm(backend, w.get(p + "post_attention_layernorm.weight", (h,)), eps)
        self.gate_up_proj = fused([("mlp.gate_proj", (cfg.intermediate_size, h)),
                                   ("mlp.up_proj", (cfg.intermediate_size, h))])
        self.down_proj = lin("mlp.down_proj", h, cfg.intermediate_size)

    def __call__(self, x, segments, i, last_only: bool = False):
        # each line is one backend call where the backend fuses norm -> linear -> residual / glu
        a = causal_attention(self.backend, self.cfg, i, *self.qkv_proj(x, norm=self.input_layernorm), segments,
                             last_only)
        if last_only:
            x = x[last_rows(segments)]
        x = self.o_proj(a, residual=x)  # x + o_proj(a)
        m = self.gate_up_proj.glu(x, "silu", norm=self.post_attention_layernorm)  # (T, intermediate)
        return self.down_proj(m, residual=x)


class LlamaModel(CausalLM):
    layer_class = LlamaLayer
