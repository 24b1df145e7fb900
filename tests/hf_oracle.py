"""Tiny HF checkpoints written the way their producers write them, and transformers as the oracle."""

from __future__ import annotations

import json
import os

import numpy as np

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # transformers' BitNet ops are torch.compile'd; eager math is the same
import torch  # noqa: E402

torch.set_num_threads(2)


def bitnet_config(**kw):
    from transformers import BitNetConfig

    d = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True,
             hidden_act="relu2", bos_token_id=1, eos_token_id=2)
    d.update(kw)
    return BitNetConfig(**d)


def llama_config(**kw):
    from transformers import LlamaConfig

    d = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
             hidden_act="silu", bos_token_id=1, eos_token_id=2)
    d.update(kw)
    return LlamaConfig(**d)


def _randomize(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embed" in name else 0.5 / p.shape[1] ** 0.5))


LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LINEAR_SUFFIXES


def write_bitnet_packed(folder: str, cfg, linear_class: str, seed: int = 0, shard: bool = False,
                        rope_spelling: str = "parameters") -> None:
    """A BitNet checkpoint packed offline, as Microsoft's converter writes 2B-4T: uint8 [out/4, in] packed
    with transformers' ``pack_weights`` and a (1,) weight_scale (mean|W| for autobitlinear, 1/mean|W| for
    bitlinear), bf16 elsewhere."""
    from safetensors.torch import save_file
    from transformers import BitNetForCausalLM
    from transformers.integrations.bitnet import pack_weights

    model = BitNetForCausalLM(cfg)
    _randomize(model, seed)
    sd = {}
    for name, p in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        if is_linear(name):
            w = p.float()
            mean = w.abs().mean().clamp(min=1e-5)
            t = (w / mean).round().clamp(-1, 1)
            sd[name] = pack_weights(t.clone().to(torch.int8))
            scale = mean if linear_class == "autobitlinear" else 1.0 / mean
            sd[name[: -len("weight")] + "weight_scale"] = scale.reshape(1).to(torch.bfloat16)
        else:
            sd[name] = p.detach().to(torch.bfloat16).contiguous()
    _save(folder, sd, save_file, shard)
    d = cfg.to_dict()
    d["quantization_config"] = {"quant_method": "bitnet", "linear_class": linear_class,
                                "quantization_mode": "offline", "use_rms_norm": False, "rms_norm_eps": 1e-6,
                                "modules_to_not_convert": None}
    d["architectures"] = ["BitNetForCausalLM"]
    _respell_rope(d, rope_spelling)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(d, f, indent=2)


def write_bitnet_master(folder: str, cfg, seed: int = 0) -> None:
    """The -bf16 master checkpoint: full-precision weights, quantization_mode online (autobitlinear)."""
    from transformers import BitNetForCausalLM

    model = BitNetForCausalLM(cfg)
    _randomize(model, seed)
    model.save_pretrained(folder)
    with open(os.path.join(folder, "config.json")) as f:
        d = json.load(f)
    d["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                "quantization_mode": "online", "use_rms_norm": False, "rms_norm_eps": 1e-6}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(d, f, indent=2)


def write_trilm(folder: str, cfg, shards: int = 1, axis_by_name=None, seed: int = 0,
                ternary: bool = True, head_gain: float = 1.0) -> None:
    """TriLM unpacked: LlamaForCausalLM in fp16 whose linears are ternary x one scale per shard
    (output-row blocks for q/k/v/gate/up, input-column blocks for o/down, unless axis_by_name says)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(cfg)
    _randomize(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ternary and is_linear(name):
                kind = name.split(".")[-2]
                axis = (axis_by_name or {}).get(kind, 1 if kind in ("o_proj", "down_proj") else 0)
                t = torch.randint(-1, 2, p.shape, generator=g).float()
                scales = (0.5 + torch.rand(shards, generator=g)) / p.shape[1] ** 0.5
                s = scales.repeat_interleave(p.shape[axis] // shards)
                s = s[:, None] if axis == 0 else s[None, :]
                p.copy_((t * s.half().float()).half().float())
            elif name == "lm_head.weight":
                p.mul_(head_gain)  # sharper logits: fewer near-ties for tests against approximate peers
    model.half().save_pretrained(folder)


def _save(folder, sd, save_file, shard):
    os.makedirs(folder, exist_ok=True)
    if not shard:
        save_file(sd, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(sd)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: sd[n] for n in part}, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def _respell_rope(d: dict, spelling: str) -> None:
    theta = (d.get("rope_parameters") or {}).get("rope_theta", d.get("rope_theta", 10000.0))
    d.pop("rope_theta", None)
    d.pop("rope_parameters", None)
    if spelling == "parameters":
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    else:
        d["rope_theta"] = theta


def oracle_logits(folder: str, ids) -> np.ndarray:
    """float32 logits [T, vocab] from transformers for one full forward over ids."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    with torch.no_grad():  # quantized models refuse .float(); cast their buffers and params by hand
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point() and t.dtype != torch.float32:
                t.data = t.data.float()
    with torch.no_grad():
        out = model(torch.tensor([list(ids)]), use_cache=False)
    return out.logits[0].float().numpy()
