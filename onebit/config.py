"""Model configuration (from HF config.json or GGUF metadata) and sampling parameters."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import UnsupportedError

ARCHITECTURES = ("bitnet", "llama")


@dataclass
class ModelConfig:
    """The shapes and math switches a model needs. Built by ``from_dict``, which ignores unknown keys.

    ``arch`` picks the model file: "bitnet" (sub-norms, gated ReLU^2, int8 activations) or "llama"
    (SwiGLU, TriLM). ``act_bits`` is 8 for per-token int8 absmax activations before every ternary
    linear, or None for 16-bit activations (TriLM's training math).
    """

    arch: str = "bitnet"
    vocab_size: int = 32000
    hidden_size: int = 2560
    intermediate_size: int = 6912
    num_hidden_layers: int = 30
    num_attention_heads: int = 20
    num_key_value_heads: int = 5
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True
    hidden_act: str = "relu2"
    act_bits: int | None = 8
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise UnsupportedError(f"unknown architecture {self.arch!r} (supported: {', '.join(ARCHITECTURES)})")
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not self.num_key_value_heads:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedError(
                f"{self.num_attention_heads} attention heads do not divide into {self.num_key_value_heads} KV heads")
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.eos_token_id = [int(e) for e in (self.eos_token_id or [])]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim


def from_hf_config(cfg: dict[str, Any]) -> ModelConfig:
    """Translate an HF ``config.json`` (BitNet or LLaMA) into a ModelConfig."""
    model_type = cfg.get("model_type")
    if model_type == "bitnet":
        arch, act, bits = "bitnet", cfg.get("hidden_act", "relu2"), 8
    elif model_type == "llama":
        arch, act, bits = "llama", cfg.get("hidden_act", "silu"), None
    else:
        raise UnsupportedError(f"unknown model_type {model_type!r} (supported: bitnet, llama)")
    if act not in ("relu2", "silu"):
        raise UnsupportedError(f"unsupported hidden_act {act!r}")
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise UnsupportedError(f"unsupported rope scaling {rope_type!r} (only the default RoPE is implemented)")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise UnsupportedError(f"{key}=true is not supported (ternary models have no biases)")
    d = dict(cfg, arch=arch, hidden_act=act, act_bits=bits, rope_theta=float(theta))
    d["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", arch == "bitnet"))
    d["head_dim"] = cfg.get("head_dim") or 0
    return ModelConfig.from_dict(d)


@dataclass
class SamplingParams:
    """How to pick the next token. temperature 0 is greedy. Penalties follow OpenAI (presence, frequency)
    and HF (repetition) semantics; ``logit_bias`` maps token id -> added logit."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value is out of range or of the wrong type."""
        import math
        from numbers import Integral, Real

        def number(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            return float(v)

        if not number("temperature") >= 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < number("top_p") <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, Integral) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0 <= number("min_p") <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not number("repetition_penalty") > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= number(name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not isinstance(self.logit_bias, dict):
            raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(self.logit_bias).__name__}")
        for k, v in self.logit_bias.items():
            if isinstance(k, bool) or not isinstance(k, Integral) or k < 0:
                raise ValueError(f"logit_bias keys must be token ids (ints >= 0), got {k!r}")
            if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v):
                raise ValueError(f"logit_bias[{k}] must be a finite number, got {v!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, Integral)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
