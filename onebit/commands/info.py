"""`1bit info`: what a model is, how it is stored, and what it costs to run."""

from __future__ import annotations

import json


def add_arguments(p) -> None:
    p.add_argument("model", help="HF folder, .gguf file or built-in name")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def describe(path: str) -> dict:
    from ..loader import read_checkpoint
    from ..weights.packing import TernaryWeight

    cfg, weights, info, tok = read_checkpoint(path, tokenizer=True)
    ternary = [w for w in weights.values() if isinstance(w, TernaryWeight)]
    n_ternary = sum(w.out_features * w.in_features for w in ternary)
    n_float = sum(int(w.size) for w in weights.values() if not isinstance(w, TernaryWeight))
    grids = sorted({f"{w.scales.shape[0]}x{w.scales.shape[1]}" for w in ternary})
    return {
        "path": path, "format": info.format, "architecture": cfg.arch,
        "parameters": n_ternary + n_float, "ternary_parameters": n_ternary, "float_parameters": n_float,
        "bits_per_ternary_weight": 2.0, "scale_grids": grids,
        "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
        "context_length": cfg.max_position_embeddings, "rope_theta": cfg.rope_theta,
        "tied_embeddings": cfg.tie_word_embeddings,
        "activations": "int8 per token" if cfg.act_bits == 8 else "16-bit",
        "ternary_bytes_at_2_bits": n_ternary // 4,
        "tokenizer": None if tok is None else {
            "vocab_size": tok.vocab_size, "bos": tok.bos_token, "eos_ids": list(tok.eos_token_ids),
            "chat_template": tok.chat_template is not None},
        **info.details,
    }


def main(args) -> int:
    d = describe(args.model)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    width = max(len(k) for k in d)
    for k, v in d.items():
        if isinstance(v, int) and not isinstance(v, bool) and v >= 10000:
            v = f"{v:,}"
        print(f"{k:<{width}}  {v}")
    return 0
