"""A/B of the cuda backend's decode step: variants of the Triton kernels' module constants, timed in one process.

The model is loaded once. For each variant the constants are set, the backend's decode steps are dropped (their
graphs captured again, on the variant's kernels), and microseconds per CUDA-graph replay are timed (best of 5 x
--replays) with every sequence at each context. Variants alternate round by round, so a drift of the card's clocks
lands on all of them alike. A variant is ``name:CONST=value,CONST=value``; variants are separated by ``;`` and the
first is the reference of the ratio column (an empty one, ``cur:``, is the code as it stands).

    python benchmarks/gpu_ab.py --variants "cur:;blk8:ATTN_BLOCK=8" [--ctx 64,1024] [--batch 1] [--rounds 2]

Constants that size buffers or fix the weights' layout at load time cannot change after it (see FIXED). Needs a
GPU; ``gpu_step.py`` shows where one variant's step goes, kernel by kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # decode_graph

from decode_graph import DecodeGraph, add_step_args, gpu_missing  # noqa: E402

# read when the weights are packed or the process's buffers are made: a variant cannot change them
FIXED = ("PAIR_TILE", "GEMV_MAX_TOKENS", "SCRATCH_K", "FEW_WS_INTS", "FEW_COUNTERS")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--variants", required=True, help='"name:CONST=value,...;name2:..." (the first is the reference)')
    add_step_args(p, ctx="64", replays=100)
    p.add_argument("--rounds", type=int, default=2, help="times each variant is timed, alternating (default: 2)")
    p.add_argument("--json", default=None, help="also write every timing to this file")
    return p.parse_args(argv)


def parse_variants(spec: str) -> list[tuple[str, dict[str, str]]]:
    """'a:X=1,Y=2;b:' -> [('a', {'X': '1', 'Y': '2'}), ('b', {})]; ValueError on a malformed spec."""
    out, seen = [], set()
    for part in (p.strip() for p in spec.split(";")):
        if not part:
            continue
        name, colon, sets = part.partition(":")
        name = name.strip()
        if not colon or not name:
            raise ValueError(f"variant {part!r}: want name:CONST=value,... (name: alone for the code as it is)")
        if name in seen:
            raise ValueError(f"variant name {name!r} given twice")
        seen.add(name)
        consts = {}
        for item in (s.strip() for s in sets.split(",")):
            if not item:
                continue
            key, eq, value = item.partition("=")
            if not eq or not key.strip() or not value.strip():
                raise ValueError(f"variant {name!r}: {item!r} is not CONST=value")
            consts[key.strip()] = value.strip()
        out.append((name, consts))
    if not out:
        raise ValueError("no variants given")
    return out


def typed(module, variants: list[tuple[str, dict[str, str]]]) -> list[tuple[str, dict]]:
    """Each variant's values converted to the type of the module constant they replace; ValueError on an unknown
    or load-time constant, or a value of the wrong kind."""
    out = []
    for name, consts in variants:
        conv = {}
        for key, value in consts.items():
            if key in FIXED:
                raise ValueError(f"{key} is fixed once the weights are loaded: a variant cannot change it")
            if not key.isupper() or not hasattr(module, key):
                raise ValueError(f"variant {name!r}: the kernels have no constant {key}")
            cur = getattr(module, key)
            try:
                if isinstance(cur, bool):
                    if value not in ("0", "1", "True", "False"):
                        raise ValueError(value)
                    conv[key] = value in ("1", "True")
                elif isinstance(cur, float):
                    conv[key] = float(value)
                elif isinstance(cur, int) or cur is None:
                    conv[key] = None if value == "None" else int(value)
                else:
                    raise ValueError(value)
            except ValueError:
                raise ValueError(f"variant {name!r}: {key}={value} does not fit {key}'s type "
                                 f"({type(cur).__name__})") from None
        out.append((name, conv))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        variants = parse_variants(args.variants)
        ctxs = sorted({int(c) for c in args.ctx.split(",") if c.strip()})
    except ValueError as e:
        print(f"gpu_ab: {e}", file=sys.stderr)
        return 2
    if not ctxs or ctxs[0] < 1 or not 1 <= args.batch <= 64 or args.rounds < 1 or args.replays < 1:
        print("gpu_ab: --ctx wants positive contexts, --batch 1-64, --rounds and --replays at least 1", file=sys.stderr)
        return 2
    try:
        from onebit.kernels.triton import kernels as K
        variants = typed(K, variants)  # checked before the GPU is: a typo fails here too
    except ImportError:
        K = None
    except ValueError as e:
        print(f"gpu_ab: {e}", file=sys.stderr)
        return 2
    why = gpu_missing() or (None if K else "needs triton")
    if why:
        print(f"gpu_ab: {why}", file=sys.stderr)
        return 2
    import torch

    dg = DecodeGraph(args.model, args.lm_head, args.batch, ctxs[-1])
    base = {k: getattr(K, k) for _, consts in variants for k in consts}
    print(f"{torch.cuda.get_device_name()}, {dg.path}, lm_head {args.lm_head}, {args.batch} sequence(s) a step")
    rows = []
    try:
        for ctx in ctxs:
            dg.fill(ctx)
            times: dict[str, list[float]] = {name: [] for name, _ in variants}
            for _ in range(args.rounds):
                for name, consts in variants:
                    for k, v in base.items():
                        setattr(K, k, v)
                    for k, v in consts.items():
                        setattr(K, k, v)
                    dg.backend._steps.clear()  # the next step is built, compiled and captured on this variant
                    graph = dg.capture(ctx)
                    if graph is None:
                        print("gpu_ab: the decode step was not captured as a graph", file=sys.stderr)
                        return 1
                    best = min(dg.time(graph, args.replays))
                    times[name].append(best)
                    rows.append({"ctx": ctx, "variant": name, "us": best})
            ref = statistics.median(times[variants[0][0]])
            print(f"context {ctx}: median us a step (each round: best of 5 x {args.replays} replays); the first "
                  f"variant's median / this one's (above 1: faster); each round's")
            for name, consts in variants:
                med = statistics.median(times[name])
                sets = ",".join(f"{k}={v}" for k, v in consts.items()) or "(as it is)"
                rounds = " ".join(f"{t:.1f}" for t in times[name])
                print(f"  {name:12s} {med:9.1f}  {ref / med:5.3f}x  {rounds}  {sets}")
    finally:
        for k, v in base.items():
            setattr(K, k, v)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "model": dg.path, "batch": args.batch,
                       "variants": {n: c for n, c in variants}, "timings": rows}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
