"""`load()`: find the format of a path, read it, build the model on a backend."""

from __future__ import annotations

import os

from .errors import FormatError
from .kernels import get_backend
from .model import Model, ModelInfo

BUILTIN = ("tiny-random",)


def load(path: str, backend: str = "auto", *, ternarize: bool = False, act_bits: int | None | str = "auto",
         tokenizer: bool | str = True, threads: int | None = None, lm_head: str = "f16") -> Model:
    """Load a model from an HF folder, a GGUF file or a built-in name.

    - ``backend``: "auto" (fastest available), "cuda", "cpu" or "numpy".
    - ``ternarize``: quantize a full-precision LLaMA checkpoint with absmean (quality drops).
    - ``act_bits``: "auto" keeps the format's math (8 for BitNet, None for TriLM); 8 or None overrides.
    - ``tokenizer``: True loads the model's own (an error if missing), False skips it, a path loads that folder.
    - ``threads``: CPU threads (default: all cores); ``lm_head``: "f16" (exact) or "int8" (per-row, half the bytes).
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
    be = get_backend(backend, **options)
    from .models import build_model

    net = build_model(cfg, weights, be, origin=path)
    return Model(cfg, net, tok, be, info)


def read_checkpoint(path: str, ternarize: bool = False, tokenizer: bool | str = True):
    """(config, weights, info, tokenizer) from any supported path, without building a model."""
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


__all__ = ["load", "read_checkpoint"]
