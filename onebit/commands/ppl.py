"""`1bit ppl`: perplexity and bits per byte of a text under a model (HF strided sliding windows)."""

from __future__ import annotations

import json
import os
import sys

from .common import add_kv_dtype_argument


def add_arguments(p) -> None:
    p.add_argument("model", help="HF folder, .gguf file or built-in name")
    p.add_argument("file", help="UTF-8 text file to score")
    p.add_argument("--ctx", type=int, default=None, help="window length in tokens (default: the model's, at most 2048)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: ctx/2)")
    p.add_argument("--backend", default="auto", choices=["auto", "cuda", "cpu", "numpy", "torch"],
                   help="engine backend; torch runs a float HF folder (e.g. a full-precision twin) in PyTorch")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--batch", type=int, default=4, help="windows per forward step")
    add_kv_dtype_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def main(args) -> int:
    from tqdm import tqdm

    with open(args.file, encoding="utf-8") as f:
        text = f.read()
    if not text:
        raise ValueError(f"{args.file} is empty")
    bar = tqdm(unit="tok", desc="scoring", file=sys.stderr, disable=None, dynamic_ncols=True)

    def progress(n: int, total: int) -> None:
        bar.total = total
        bar.update(n)

    try:
        if args.backend == "torch":
            result, backend = _torch_ppl(args, text, progress), "torch"
        else:
            result, backend = _engine_ppl(args, text, progress)
    finally:
        bar.close()
    d = {"model": args.model, "file": args.file, "backend": backend, **result.to_dict()}
    if args.json:
        print(json.dumps(d))
    else:
        print(format_result(d))
    return 0


def _engine_ppl(args, text: str, progress):
    import onebit
    from ..eval.ppl import text_perplexity

    model = onebit.load(args.model, backend=args.backend, threads=args.threads, kv_dtype=args.kv_dtype)
    return text_perplexity(model, text, args.ctx, args.stride, args.batch, progress), model.backend.name


def _torch_ppl(args, text: str, progress):
    try:
        import torch
    except ImportError:
        from ..errors import UnsupportedError

        raise UnsupportedError("--backend torch needs PyTorch: pip install 'onebit[train]'") from None

    from ..eval.ppl import default_ctx, perplexity
    from ..tokenizer import Tokenizer
    from ..train.export import load_float
    from ..train.loop import torch_scorer

    if not os.path.isdir(args.model):
        raise ValueError("--backend torch needs a float HF folder (such as a full-precision twin from 1bit train)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_float(args.model).to(device).eval()
    ids = Tokenizer.from_dir(args.model).encode(text)
    ctx = args.ctx or default_ctx(model.config.max_position_embeddings)
    with torch.no_grad():
        return perplexity(torch_scorer(model, device), ids, len(text.encode("utf-8")), ctx, args.stride,
                          args.batch, progress)


def format_result(d: dict) -> str:
    rows = [
        ("model", f"{d['model']} ({d['backend']})"),
        ("text", f"{d['file']} ({d['bytes']:,} bytes, {d['text_tokens']:,} tokens)"),
        ("scored", f"{d['tokens']:,} tokens in {d['windows']} windows (ctx {d['ctx']}, stride {d['stride']})"),
        ("ppl", f"{d['ppl']:.4f}"),
        ("nll/token", f"{d['nll_per_token']:.5f} nats"),
        ("bits/byte", f"{d['bits_per_byte']:.5f}"),
        ("speed", f"{d['tokens_per_s']:,.1f} tokens/s ({d['seconds']:.1f} s)"),
    ]
    return "\n".join(f"{k:<10} {v}" for k, v in rows)
