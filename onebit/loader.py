"""`load()`: find the format of a path, read it, build the model on a backend."""

from __future__ import annotations

import os

from .errors import FormatError
from .kernels import get_backend
from .model import Model, ModelInfo

BUILTIN = ("default", "tiny-random")
# The embedded default model: a 31.5M-parameter ternary BitNet trained by scripts/train_default.sh (README).
DEFAULT_GGUF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "default.gguf")


def load(path: str, backend: str = "auto", *, ternarize: bool = False, act_bits: int | None | str = "auto",
         tokenizer: bool | str = True, threads: int | None = None, lm_head: str = "f16",
         kv_dtype: str = "auto") -> Model:
    """Load a model from an HF folder, a GGUF file or a built-in name.

    - ``backend``: "auto" (fastest available), "cuda", "cpu" or "numpy".
    - ``ternarize``: quantize a full-precision LLaMA checkpoint with absmean (quality drops).
    - ``act_bits``: "auto" keeps the format's math (8 for BitNet, None for TriLM); 8 or None overrides.
    - ``tokenizer``: True loads the model's own (an error if missing), False skips it, a path loads that folder.
    - ``threads``: CPU threads (default: all cores); ``lm_head``: "f16" (exact) or "int8" (per-row, half the bytes).
    - ``kv_dtype``: KV cache precision, "f32", "f16" (half the bytes) or "auto" (``resolve_kv_dtype``).
    """
    path = os.fspath(path)
    cfg, weights, info, tok = read_checkpoint(path, ternarize, tokenizer)
    if act_bits != "auto":
        if act_bits not in (None, 8):
            raise ValueError(f"act_bits must be 8 or None, got {act_bits!r}")
        cfg.act_bits = act_bits
    options = {"threads": threads} if threads else {}
    if lm_head != "f16":
        options["lm_head"] = lm_head
    options.update(kv_dtype_option(backend, kv_dtype, cfg))
    be = get_backend(backend, **options)
    from .models import build_model

    net = build_model(cfg, weights, be, origin=path)
    return Model(cfg, net, tok, be, info)


def resolve_kv_dtype(kv_dtype: str, cfg) -> str:
    """"f32" or "f16" for a model config. "auto" is f16 when the model quantizes its activations to int8
    (``act_bits == 8``: BitNet), else f32.

    Why: float16 rounds each stored key and value by up to 2**-11 relative. With int8 activations that sits far
    below the per-token quantization step (max|x| / 127) that every linear already applies, and llama.cpp and
    bitnet.cpp keep f16 caches for these models; with 16-bit activations it would be the largest error in the
    model. Measured (tests/test_cpu_model.py models, cpu backend vs the numpy fp32 reference, prompt + 16 decode
    steps): int8 activations, max|logit diff| / max|logit| median 1.8e-2 (f32 cache: 4e-7, or ~1e-2 when an int8
    rounding flips), against the bar of 3e-2; 16-bit activations, 3e-4 (f32 cache: 6e-7), 3x over the bar of 1e-4.
    """
    if kv_dtype == "auto":
        return "f16" if cfg.act_bits == 8 else "f32"
    if kv_dtype not in ("f32", "f16"):
        raise ValueError(f"kv_dtype must be 'auto', 'f32' or 'f16', got {kv_dtype!r}")
    return kv_dtype


def kv_dtype_option(backend: str, kv_dtype: str, cfg) -> dict:
    """The backend option for ``kv_dtype``: {} for f32 (every backend's default); "auto" asks only backends that
    take a ``kv_dtype`` option for f16, an explicit "f16" asks any backend (which refuses if it cannot)."""
    from .kernels import backend_options

    kv = resolve_kv_dtype(kv_dtype, cfg)
    if kv == "f32" or (kv_dtype == "auto" and "kv_dtype" not in backend_options(backend)):
        return {}
    return {"kv_dtype": kv}


def read_checkpoint(path: str, ternarize: bool = False, tokenizer: bool | str = True):
    """(config, weights, info, tokenizer) from any supported path, without building a model."""
    if path == "default":
        if not os.path.isfile(DEFAULT_GGUF):
            raise FormatError(f"the embedded default model is missing from this install ({DEFAULT_GGUF}); "
                              "reinstall 1bit or name a model file")
        return read_checkpoint(DEFAULT_GGUF, ternarize, tokenizer)
    if path in BUILTIN:
        from .synth import builtin_model

        return builtin_model(path)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
            if len(ggufs) == 1:
                return read_checkpoint(os.path.join(path, ggufs[0]), ternarize, tokenizer)
            raise FormatError(f"{path}: no config.json (not an HF checkpoint) and no single .gguf file inside")
        return _read_hf(path, ternarize, tokenizer)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return _read_gguf(path, tokenizer)
        raise FormatError(f"{path}: not a GGUF file (magic {magic!r}) and not a model folder")
    names = ", ".join(BUILTIN)
    raise FormatError(f"{path}: no such file or folder (built-in models: {names})")


def _read_hf(path: str, ternarize: bool, tokenizer):
    from .weights.hf import read_hf

    cfg, weights = read_hf(path, ternarize=ternarize)
    tok = _tokenizer_from_dir(path if tokenizer is True else tokenizer) if tokenizer else None
    _fill_special_ids(cfg, tok)
    fmt = _hf_format_name(path, cfg)
    return cfg, weights, ModelInfo(path, fmt, {}), tok


def _hf_format_name(path: str, cfg) -> str:
    from .weights.hf import read_json

    qc = read_json(os.path.join(path, "config.json")).get("quantization_config") or {}
    if cfg.arch == "bitnet" and qc:
        return f"hf-bitnet-{qc.get('quantization_mode', 'offline')}-{qc.get('linear_class', 'bitlinear')}"
    return "hf-trilm" if cfg.arch == "llama" else "hf-bitnet-dense"


def _read_gguf(path: str, tokenizer):
    from .weights.gguf import load_gguf_model

    cfg, weights, metadata = load_gguf_model(path)
    tok = None
    if tokenizer is True:
        from .tokenizer import Tokenizer

        tok = Tokenizer.from_gguf(metadata)
    elif tokenizer:
        tok = _tokenizer_from_dir(tokenizer)
    _fill_special_ids(cfg, tok)
    return cfg, weights, ModelInfo(path, "gguf", {}), tok


def _tokenizer_from_dir(folder: str):
    from .tokenizer import Tokenizer

    return Tokenizer.from_dir(folder)


def _fill_special_ids(cfg, tok) -> None:
    if tok is None:
        return
    if cfg.bos_token_id is None:
        cfg.bos_token_id = tok.bos_token_id
    if not cfg.eos_token_id:
        cfg.eos_token_id = list(tok.eos_token_ids)


__all__ = ["load", "read_checkpoint", "resolve_kv_dtype"]
