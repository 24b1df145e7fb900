"""`1bit bench`: decode/prefill speed, GEMV bandwidth and peak memory, against the roofline and llama.cpp."""

from __future__ import annotations

import argparse
import sys

from .common import add_kv_dtype_argument

EPILOG = """\
Without MODEL, the BitNet b1.58 2B-4T shapes (random ternary weights, fixed seed) are written once to
~/.cache/onebit/synth/ and measured. Every configuration runs in its own process (peak RSS is per
configuration); with --peer, the peer runs alternately with ours in the same run, on the same token ids.

Columns: decode@C = tok/s of single-token steps after C tokens of context; vs PEER = ours / peer (same
threads, medians); of roofline = tok/s / (all-threads read bandwidth / bytes read per token); prefill N =
tok/s of an N-token prompt from an empty cache; GEMV = one token through every ternary linear.

examples:
  1bit bench                                   # 2B-4T shapes, threads 1 and all cores, f16 and int8 head
  1bit bench --peer llama.cpp --json out.json  # with llama.cpp (TQ2_0 GGUF written alongside)
  1bit bench tiny-random --backend numpy --ctx 16 --prefill 16 --tokens 4 --repeats 1
"""


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _heads(text: str) -> tuple[str, ...]:
    heads = tuple(v.strip() for v in text.split(",") if v.strip())
    if not heads or set(heads) - {"f16", "int8"}:
        raise argparse.ArgumentTypeError(f"expected f16 and/or int8, got {text!r}")
    return heads


def add_arguments(p) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("model", nargs="?", default=None,
                   help="HF folder, .gguf file or built-in name (default: synthetic bitnet-2b4t shapes)")
    p.add_argument("--backend", default="auto", choices=["auto", "cuda", "cpu", "numpy"],
                   help="our backend (default: auto)")
    p.add_argument("--threads", type=_ints, default=None, help="thread counts, e.g. 1,2 (default: 1 and all cores)")
    p.add_argument("--lm-head", type=_heads, default=("f16", "int8"), help="lm_head precisions (default: f16,int8)")
    add_kv_dtype_argument(p)
    p.add_argument("--ctx", type=_ints, default=(64, 1024), help="decode contexts (default: 64,1024)")
    p.add_argument("--prefill", type=_ints, default=(128, 512), help="prefill lengths (default: 128,512)")
    p.add_argument("--tokens", type=int, default=32, help="decode steps timed per run (default: 32)")
    p.add_argument("--repeats", type=int, default=3, help="runs per figure; the median is reported (default: 3)")
    p.add_argument("--peer", choices=["llama.cpp"], default=None, help="also run this engine, alternating with ours")
    p.add_argument("--peer-model", default=None,
                   help="GGUF for the peer (default: MODEL if a .gguf, or the synthetic one)")
    p.add_argument("--no-gemv", action="store_true", help="skip the ternary GEMV sweep")
    p.add_argument("--bandwidth-gib", type=float, default=1.0, help="buffer for the read-bandwidth sum; 0 skips it")
    p.add_argument("--seed", type=int, default=0, help="synthetic weights and token ids (default: 0)")
    p.add_argument("--fresh", action="store_true", help="rewrite the cached synthetic model")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to this long for other processes to leave the CPU (default: 0)")
    p.add_argument("--json", dest="json_out", default=None, help="write every run, the machine and versions here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")


def main(args) -> int:
    from ..eval.bench import Plan, benchmark

    if args.tokens < 1 or args.repeats < 1:
        raise ValueError("--tokens and --repeats must be at least 1")
    plan = Plan(ctx=args.ctx, prefill=args.prefill, tokens=args.tokens, repeats=args.repeats,
                gemv=not args.no_gemv, seed=args.seed)
    log = None if args.quiet else (lambda s: print(f"bench: {s}", file=sys.stderr, flush=True))
    report = benchmark(args.model, backend=args.backend, threads=args.threads, lm_heads=args.lm_head, plan=plan,
                       peer=args.peer, peer_model=args.peer_model, bandwidth_bytes=int(args.bandwidth_gib * (1 << 30)),
                       fresh=args.fresh, wait_idle=args.wait_idle, log=log, kv_dtype=args.kv_dtype)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(report.to_json())
    sys.stdout.write(report.markdown())
    return 0
