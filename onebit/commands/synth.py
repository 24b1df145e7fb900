"""`1bit synth`: a random ternary model with real shapes, deterministic from a seed, as HF packed or GGUF."""

from __future__ import annotations

import os


def add_arguments(p) -> None:
    from ..synth import SPECS

    p.add_argument("name", choices=sorted(SPECS), help="which shapes")
    p.add_argument("out", help="output folder (HF packed) or .gguf file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--type", dest="ttype", default="tq2_0", choices=["tq2_0", "tq1_0", "i2_s"],
                   help="ternary tensor type when OUT ends in .gguf")
    p.add_argument("--arch", choices=["bitnet", "llama"], default=None,
                   help="override the architecture (llama: SwiGLU, what llama.cpp runs as-is)")


def main(args) -> int:
    from ..synth import random_weights, synth_config
    from ..tokenizer import byte_level_tokenizer

    overrides = {"arch": args.arch} if args.arch else {}
    if args.arch == "llama":
        overrides.update(act_bits=None, hidden_act="silu")
    cfg = synth_config(args.name, **overrides)
    weights = random_weights(cfg, seed=args.seed)
    tok = byte_level_tokenizer()
    if args.out.endswith(".gguf"):
        from ..weights.gguf import save_gguf_model

        save_gguf_model(args.out, cfg, weights, tok.to_gguf_metadata(vocab_size=cfg.vocab_size), args.ttype)
    else:
        from ..weights.hf import write_hf

        write_hf(args.out, cfg, weights)
        tok.save(args.out)
    size = _size(args.out)
    print(f"wrote {args.name} (seed {args.seed}) to {args.out}: {size / 1e6:.1f} MB")
    return 0


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
