"""onebit: local inference and serving for ternary (1.58-bit) language models."""

from __future__ import annotations

from .config import ModelConfig, SamplingParams
from .errors import FormatError, NotTernaryError, OneBitError, TokenizerError, UnsupportedError
from .loader import load
from .model import Model

__version__ = "0.1.0"

__all__ = [
    "load", "Model", "ModelConfig", "SamplingParams",
    "OneBitError", "FormatError", "UnsupportedError", "TokenizerError", "NotTernaryError",
    "__version__",
]
