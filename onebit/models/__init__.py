"""The architecture table: config.arch -> model class."""

from __future__ import annotations

from ..config import ModelConfig
from ..errors import UnsupportedError
from .base import CausalLM, WeightSource
from .bitnet import BitNetModel
from .llama import LlamaModel

ARCHITECTURES: dict[str, type[CausalLM]] = {
    "bitnet": BitNetModel,
    "llama": LlamaModel,
}


def build_model(cfg: ModelConfig, weights: dict, backend, origin: str = "model") -> CausalLM:
    if cfg.arch not in ARCHITECTURES:
        raise UnsupportedError(f"{origin}: unknown architecture {cfg.arch!r}")
    return ARCHITECTURES[cfg.arch](cfg, WeightSource(weights, origin), backend)
