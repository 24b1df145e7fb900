"""`1bit convert`: write any supported model as a GGUF file (TQ2_0, TQ1_0 or I2_S linears)."""

from __future__ import annotations

import os


def add_arguments(p) -> None:
    p.add_argument("src", help="HF folder, .gguf file or built-in name")
    p.add_argument("dst", help="output .gguf path")
    p.add_argument("--type", dest="ttype", default="tq2_0", choices=["tq2_0", "tq1_0", "i2_s"],
                   help="ternary tensor type")
    p.add_argument("--ternarize", action="store_true", help="absmean-ternarize a full-precision LLaMA checkpoint")
    p.add_argument("--force", action="store_true", help="overwrite DST if it exists")


def main(args) -> int:
    from tqdm import tqdm

    from ..loader import read_checkpoint
    from ..weights.gguf import save_gguf_model

    if os.path.exists(args.dst) and not args.force:
        raise ValueError(f"{args.dst} exists (use --force to overwrite)")
    cfg, weights, _, tok = read_checkpoint(args.src, ternarize=args.ternarize)
    meta = tok.to_gguf_metadata(vocab_size=cfg.vocab_size) if tok is not None else {}
    bar = tqdm(total=len(weights), unit="tensor", desc=f"writing {os.path.basename(args.dst)}")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        save_gguf_model(args.dst, cfg, weights, meta, args.ttype, progress=progress)
    finally:
        bar.close()
    print(f"wrote {args.dst} ({os.path.getsize(args.dst) / 1e6:.1f} MB, {args.ttype})")
    return 0
