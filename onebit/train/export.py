"""Export a trained model: HF BitNet packed (autobitlinear) + tokenizer + GGUF, or the full-precision twin.

Ternary weights are ``weight_quant`` of the latent weights, the very function the forward uses; each
matrix's scale is the effective scale 1/s = mean|W| (autobitlinear). The full-precision twin is written as
a plain float HF folder (no ``quantization_config``: transformers runs it dense). ``onebit.load`` refuses a
non-ternary checkpoint, so that folder is evaluated with torch: ``load_float`` here, used by
``1bit ppl FOLDER FILE --backend torch`` and by the trainer's own evaluation.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig, from_hf_config
from ..errors import FormatError, UnsupportedError
from ..tokenizer import Tokenizer
from ..weights.hf import hf_config_dict, write_hf
from ..weights.packing import TernaryWeight
from .model import CausalLM, is_linear, weight_quant

log = logging.getLogger(__name__)


def engine_weights(model: CausalLM) -> dict[str, TernaryWeight | np.ndarray]:
    """HF-named weights as the engine reads them: TernaryWeight linears (if ternary), float32 elsewhere."""
    out: dict[str, TernaryWeight | np.ndarray] = {}
    for name, p in model.state_dict().items():
        p = p.detach().float().cpu()
        if model.ternary and is_linear(name):
            t, scale = weight_quant(p)
            out[name] = TernaryWeight.from_ternary(t.to(torch.int8).numpy(), scale.numpy())
        else:
            out[name] = p.numpy()
    return out


def export_config(model: CausalLM, tok: Tokenizer) -> ModelConfig:
    cfg = copy.deepcopy(model.config)
    cfg.bos_token_id = tok.bos_token_id
    cfg.eos_token_id = list(tok.eos_token_ids)
    return cfg


def default_gguf_type(cfg: ModelConfig) -> str | None:
    """i2_s for BitNet (exact fp32 scale, what bitnet.cpp reads), tq2_0 for LLaMA; None if shapes do not fit."""
    ttype, block = ("i2_s", 128) if cfg.arch == "bitnet" else ("tq2_0", 256)
    ins = (cfg.hidden_size, cfg.q_size, cfg.intermediate_size)
    return ttype if all(n % block == 0 for n in ins) else None


def export_ternary(model: CausalLM, tok: Tokenizer, folder: str | os.PathLike, gguf_path: str | None = None,
                   ttype: str | None = "auto") -> dict[str, str]:
    """Write the HF BitNet packed checkpoint (or TriLM fp16 for llama) with its tokenizer, and a GGUF."""
    from ..weights.gguf import save_gguf_model

    cfg, weights = export_config(model, tok), engine_weights(model)
    write_hf(str(folder), cfg, weights, linear_class="autobitlinear")
    tok.save(folder)
    paths = {"hf": str(folder)}
    if gguf_path:
        ttype = default_gguf_type(cfg) if ttype == "auto" else ttype
        if ttype is None:
            log.warning("no GGUF written: the linears' input sizes are not multiples of 128/256")
        else:
            save_gguf_model(gguf_path, cfg, weights, tok.to_gguf_metadata(vocab_size=cfg.vocab_size), ttype)
            paths["gguf"] = str(gguf_path)
    return paths


def export_float(model: CausalLM, tok: Tokenizer, folder: str | os.PathLike) -> dict[str, str]:
    """The full-precision twin as a float32 HF folder (BitNetForCausalLM run dense, or LlamaForCausalLM)."""
    from ..weights.safetensors_io import write_safetensors

    cfg = export_config(model, tok)
    os.makedirs(folder, exist_ok=True)
    tensors = {n: p.detach().float().cpu().numpy() for n, p in model.state_dict().items()}
    write_safetensors(os.path.join(folder, "model.safetensors"), tensors)
    d = hf_config_dict(cfg)
    d.pop("quantization_config", None)
    d["torch_dtype"] = "float32"
    Path(folder, "config.json").write_text(json.dumps(d, indent=2))
    tok.save(folder)
    return {"hf": str(folder)}


def load_float(folder: str | os.PathLike, ternary: bool | None = None, dropout: float = 0.0) -> CausalLM:
    """A torch model from a float HF folder (plain, or a BitNet ``online`` master) on the CPU.

    ``ternary`` None: quantized iff the folder is a BitNet online master. Packed checkpoints are refused:
    their latent weights are gone (load those with ``onebit.load``).
    """
    from safetensors.torch import load_file

    raw = json.loads(Path(folder, "config.json").read_text())
    qc = raw.get("quantization_config")
    if qc and qc.get("quantization_mode") != "online":
        raise UnsupportedError(f"{folder}: a packed ternary checkpoint has no latent weights; use onebit.load")
    cfg = from_hf_config(raw)
    if cfg.arch == "bitnet":
        cfg.act_bits = 8
    model = CausalLM(cfg, ternary=bool(qc) if ternary is None else ternary, dropout=dropout)
    path = Path(folder, "model.safetensors")
    if not path.exists():
        raise FormatError(f"{folder}: no model.safetensors (sharded float checkpoints are not read here)")
    sd = {k: v.float() for k, v in load_file(str(path)).items() if "rotary_emb" not in k}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise FormatError(f"{folder}: tensors missing {missing[:3]} / unexpected {unexpected[:3]}")
    return model


__all__ = ["engine_weights", "export_ternary", "export_float", "load_float", "default_gguf_type"]
