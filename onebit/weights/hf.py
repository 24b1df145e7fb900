"""Hugging Face checkpoints: BitNet packed / bf16 master, TriLM (LLaMA, ternary x shard scales), plain LLaMA."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np

from ..config import ModelConfig, from_hf_config
from ..errors import FormatError, NotTernaryError, UnsupportedError
from .packing import TernaryWeight, absmean_ternarize, detect_shard_scales
from .safetensors_io import SafetensorsFile

log = logging.getLogger(__name__)

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# --- HF BitNet packing: 4 output rows per byte, along the OUTPUT axis -------------------------------

def unpack_hf_bitnet(packed: np.ndarray) -> np.ndarray:
    """uint8 [out/4, in] -> int8 ternary [out, in]: byte [r, c] holds rows r + k*out/4 at bits 2k."""
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[:, None, None]
    codes = (np.asarray(packed, dtype=np.uint8)[None] >> shifts) & 3  # (4, out/4, in)
    return codes.reshape(-1, packed.shape[1]).astype(np.int8) - 1


def pack_hf_bitnet(t: np.ndarray) -> np.ndarray:
    """int ternary [out, in] (out % 4 == 0) -> uint8 [out/4, in], the layout transformers writes."""
    out = t.shape[0]
    if out % 4:
        raise ValueError(f"HF BitNet packing needs out_features % 4 == 0, got {out}")
    codes = (np.asarray(t, dtype=np.int16) + 1).astype(np.uint8).reshape(4, out // 4, -1)
    return (codes[0] | (codes[1] << 2) | (codes[2] << 4) | (codes[3] << 6)).astype(np.uint8)


# --- reading ---------------------------------------------------------------------------------------

def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise FormatError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return d


class CheckpointTensors:
    """All tensors of a (possibly sharded) safetensors checkpoint, by name."""

    def __init__(self, folder: str):
        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        if os.path.exists(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise FormatError(f"{index}: no weight_map")
            files = {f: SafetensorsFile(os.path.join(folder, f)) for f in sorted(set(weight_map.values()))
                     if _exists(os.path.join(folder, f), index)}
            self.where = {name: files[f] for name, f in weight_map.items()}
        elif os.path.exists(single):
            f = SafetensorsFile(single)
            self.where = {name: f for name in f.keys()}
        elif any(os.path.exists(os.path.join(folder, n)) for n in ("pytorch_model.bin", "model.pt")):
            raise UnsupportedError(f"{folder}: PyTorch pickle checkpoints are not read (unsafe); "
                                   "convert to safetensors first")
        else:
            raise FormatError(f"{folder}: no model.safetensors or model.safetensors.index.json")

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise FormatError(f"missing tensor {name!r}")
        return self.where[name].get(name)

    def dtype(self, name: str) -> str:
        return self.where[name].dtype(name)


def _exists(path: str, index: str) -> bool:
    if not os.path.exists(path):
        raise FormatError(f"{index}: names shard {os.path.basename(path)}, which is missing")
    return True


def read_hf(folder: str, ternarize: bool = False) -> tuple[ModelConfig, dict[str, Any]]:
    """Read an HF checkpoint folder into (config, weights) with TernaryWeight linears."""
    raw = read_json(os.path.join(folder, "config.json"))
    cfg = from_hf_config(raw)
    qc = raw.get("quantization_config") or None
    tensors = CheckpointTensors(folder)
    weights: dict[str, Any] = {}
    for name in list(tensors.where):
        if name.endswith(".weight_scale") or "rotary_emb" in name:
            continue
        base = name[:-len(".weight")] if name.endswith(".weight") else None
        if base and base.split("layers.")[-1].split(".", 1)[-1] in LINEARS:
            weights[name] = _read_linear(tensors, base, cfg, qc, ternarize, folder)
        else:
            weights[name] = np.asarray(tensors.get(name), dtype=np.float32)
    if qc is None and cfg.arch == "bitnet":
        cfg.act_bits = None  # transformers runs a BitNet with no quantization_config as a dense float model
    if not cfg.tie_word_embeddings and "lm_head.weight" not in weights:
        raise FormatError(f"{folder}: tie_word_embeddings is false but there is no lm_head.weight")
    return cfg, weights


def _read_linear(tensors: CheckpointTensors, base: str, cfg: ModelConfig, qc: dict | None,
                 ternarize: bool, folder: str) -> TernaryWeight:
    name = base + ".weight"
    if qc is not None:
        return _read_bitnet_linear(tensors, base, qc, folder)
    w = tensors.get(name)
    try:
        return detect_shard_scales(w)
    except NotTernaryError:
        if not ternarize:
            raise NotTernaryError(
                f"{folder}: {name} is not ternary (not ternary x per-shard scales); this is a full-precision "
                "model. Pass --ternarize (ternarize=True) to quantize it with absmean, at a loss of quality"
            ) from None
    _warn_ternarize(folder)
    t, s = absmean_ternarize(w)
    return TernaryWeight.from_ternary(t, s)


def _read_bitnet_linear(tensors: CheckpointTensors, base: str, qc: dict, folder: str) -> TernaryWeight:
    if qc.get("quant_method") != "bitnet":
        raise UnsupportedError(f"{folder}: quant_method {qc.get('quant_method')!r} is not supported (only bitnet)")
    if qc.get("use_rms_norm"):
        raise UnsupportedError(f"{folder}: quantization_config.use_rms_norm=true is not supported")
    name = base + ".weight"
    w = tensors.get(name)
    if qc.get("quantization_mode", "offline") == "online":
        t, s = absmean_ternarize(w)
        return TernaryWeight.from_ternary(t, s)
    if w.dtype != np.uint8:
        raise FormatError(f"{folder}: {name} should be packed uint8 for an offline BitNet checkpoint, got {w.dtype}")
    if base + ".weight_scale" not in tensors:
        raise FormatError(f"{folder}: missing tensor {base + '.weight_scale'!r}")
    ws = np.asarray(tensors.get(base + ".weight_scale"), dtype=np.float32).reshape(-1)
    if ws.size != 1:
        raise FormatError(f"{folder}: {base}.weight_scale should hold one value, has {ws.size}")
    t = unpack_hf_bitnet(w)
    if (t > 1).any():
        raise FormatError(f"{folder}: {name} holds the unused 2-bit code 3: not a BitNet packed tensor")
    if qc.get("linear_class", "bitlinear") == "autobitlinear":
        scale = ws[0]
    else:  # bitlinear divides by the stored scale
        scale = np.float32(1.0 / np.float64(ws[0]))
    return TernaryWeight.from_ternary(t, scale)


_warned: set[str] = set()


def _warn_ternarize(folder: str) -> None:
    if folder not in _warned:
        _warned.add(folder)
        log.warning("%s: ternarizing a full-precision model with absmean per tensor: expect a large quality drop",
                    folder)


# --- writing ---------------------------------------------------------------------------------------

def write_hf(folder: str, cfg: ModelConfig, weights: dict[str, Any], linear_class: str = "autobitlinear",
             max_shard_bytes: int | None = None) -> None:
    """Write an HF checkpoint the way its producer does.

    bitnet: ``BitNetForCausalLM`` packed offline (uint8 [out/4, in] + weight_scale (1,), bf16 elsewhere);
    llama: TriLM-style unpacked fp16 (ternary x scale). ``max_shard_bytes`` splits into shards with an index.
    Only one scale per matrix can be written in the BitNet packed format.
    """
    os.makedirs(folder, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    bf16: set[str] = set()
    for name, w in weights.items():
        if isinstance(w, TernaryWeight) and cfg.arch == "bitnet":
            s = w.uniform_scale()
            if s is None:
                raise UnsupportedError(f"{name}: the BitNet packed format holds one scale per matrix")
            base = name[:-len(".weight")]
            tensors[name] = pack_hf_bitnet(w.ternary())
            ws = np.float32(s) if linear_class == "autobitlinear" else np.float32(1.0 / np.float64(s))
            tensors[base + ".weight_scale"] = np.array([ws], dtype=np.float32)
            bf16.add(base + ".weight_scale")
        elif isinstance(w, TernaryWeight):
            tensors[name] = w.dense().astype(np.float16)
        else:
            tensors[name] = np.asarray(w, dtype=np.float32)
            if cfg.arch == "bitnet":
                bf16.add(name)
            else:
                tensors[name] = tensors[name].astype(np.float16)
    _write_shards(folder, tensors, bf16, max_shard_bytes)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config_dict(cfg, linear_class), f, indent=2)


def _write_shards(folder: str, tensors: dict[str, np.ndarray], bf16: set[str], max_shard_bytes: int | None):
    from .safetensors_io import write_safetensors

    if not max_shard_bytes:
        write_safetensors(os.path.join(folder, "model.safetensors"), tensors, bf16=bf16)
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in tensors.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(folder, fname), shard, bf16=bf16 & set(shard))
        weight_map.update({n: fname for n in shard})
    total = sum(a.nbytes for a in tensors.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def hf_config_dict(cfg: ModelConfig, linear_class: str = "autobitlinear") -> dict[str, Any]:
    """config.json contents for BitNetForCausalLM (packed, offline) or LlamaForCausalLM."""
    d: dict[str, Any] = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id[0] if len(cfg.eos_token_id) == 1 else (cfg.eos_token_id or None),
    }
    if cfg.arch == "bitnet":
        d.update(model_type="bitnet", architectures=["BitNetForCausalLM"], hidden_act="relu2",
                 quantization_config={"quant_method": "bitnet", "linear_class": linear_class,
                                      "quantization_mode": "offline", "modules_to_not_convert": None,
                                      "use_rms_norm": False, "rms_norm_eps": 1e-6})
    else:
        d.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                 attention_bias=False, mlp_bias=False)
    return d
