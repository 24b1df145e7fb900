"""The cuda backend's fused decode step, kernel by kernel: microseconds per CUDA-graph replay at several contexts,
and where one replay's time goes (each kernel's end minus the previous kernel's end, summed per kernel and its
place in the layer), on one sequence of the synthetic bitnet-2b4t (or a model folder you name), or on --batch
sequences, each with the same context (the decode step of their batch bucket; its kernels are then named by their
index in the layer).

    python benchmarks/gpu_step.py [--model PATH] [--ctx 64,1024] [--batch 1] [--lm-head int8] [--replays 200]

Inside a graph the kernels run back to back (programmatic dependent launch: each starts while its producer
runs), so a kernel's share is the time from its producer's end to its own: its chain cost, what a step would
lose without it. Not a throughput benchmark (``bench_gpu.py`` is): the host is out of the loop here. Needs a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # decode_graph

from decode_graph import DecodeGraph, add_step_args, gpu_missing  # noqa: E402

# the decode step's kernels per layer, in launch order, for one sequence (backend.DecodeStep.body); at contexts of
# at most kernels.ATTN_SHORT_MAX positions there is no merge
LAYER = ("q/k/v gemv", "attention", "merge", "o gemv", "gate/up gemv", "down gemv")
LAYER_SHORT = tuple(k for k in LAYER if k != "merge")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    add_step_args(p, ctx="64,1024", replays=200)
    p.add_argument("--profiled", type=int, default=20, help="replays under the profiler (default: 20)")
    return p.parse_args(argv)


def chain_times(events: list, replays: int, layers: int, roles: bool = True) -> list[tuple[str, int, float]]:
    """[(kernel, calls per replay, us per replay)] from the device events of ``replays`` back-to-back replays
    (start-ordered dicts with ``name`` and ``end`` in us), dearest first. The layers' kernels, between the first
    (the embedding) and the last one to three (the lm_head, with the final norm where it is a kernel of its own),
    are named by their place in the layer: with ``roles`` (one sequence) by LAYER's or LAYER_SHORT's names where
    the count per layer is theirs, else by kernel name and index. The first quarter of the replays is left out
    (warm-up); a replay's first kernel has no predecessor in it and is not counted."""
    n = len(events) // replays
    if n < 2 or n * replays != len(events):
        raise ValueError(f"{len(events)} kernel events do not split into {replays} replays")
    tails = [t for t in (1, 2, 3) if layers and n - 1 - t >= layers and (n - 1 - t) % layers == 0]
    per = (n - 1 - tails[0]) // layers if tails else 0
    names = {len(LAYER): LAYER, len(LAYER_SHORT): LAYER_SHORT}.get(per) if roles else None

    def key(j: int, name: str) -> str:
        if not per or not 1 <= j <= per * layers:
            return name
        return names[(j - 1) % per] if names else f"{name} #{(j - 1) % per}"

    tot: dict[str, float] = {}
    calls: dict[str, int] = {}
    for j in range(1, n):
        k = key(j, events[j]["name"])
        calls[k] = calls.get(k, 0) + 1
    skip = replays // 4
    for r in range(skip, replays):
        rep = events[r * n:(r + 1) * n]
        for j in range(1, n):
            k = key(j, rep[j]["name"])
            tot[k] = tot.get(k, 0.0) + rep[j]["end"] - rep[j - 1]["end"]
    return sorted(((k, calls[k], v / (replays - skip)) for k, v in tot.items()), key=lambda t: -t[2])


def main(argv=None) -> int:
    args = parse_args(argv)
    ctxs = sorted({int(c) for c in args.ctx.split(",") if c.strip()})
    if not ctxs or ctxs[0] < 1:
        print("gpu_step: --ctx wants positive context lengths, e.g. 64,1024", file=sys.stderr)
        return 2
    if not 1 <= args.batch <= 64:
        print("gpu_step: --batch wants 1 to 64 sequences (the largest decode graph's batch)", file=sys.stderr)
        return 2
    if args.replays < 1 or args.profiled < 1:
        print("gpu_step: --replays and --profiled want at least 1", file=sys.stderr)
        return 2
    why = gpu_missing()
    if why:
        print(f"gpu_step: {why}", file=sys.stderr)
        return 2
    import torch
    from torch.profiler import ProfilerActivity, profile

    dg = DecodeGraph(args.model, args.lm_head, args.batch, ctxs[-1])
    print(f"{torch.cuda.get_device_name()}, {dg.path}, lm_head {args.lm_head}, {args.batch} sequence(s) a step")
    for ctx in ctxs:
        dg.fill(ctx)
        g = dg.capture(ctx)
        if g is None:
            print("gpu_step: the decode step was not captured as a graph", file=sys.stderr)
            return 1
        times = dg.time(g, args.replays)
        print(f"context {ctx}: {min(times):.1f} us a step (best of 5 x {args.replays} replays; "
              f"median {sorted(times)[2]:.1f}), {args.batch * 1e6 / min(times):.0f} tokens/s")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.profiled):
                g.replay()
            torch.cuda.synchronize()
        evs = [{"name": e.name, "end": e.time_range.end}
               for e in sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                               key=lambda e: e.time_range.start)]
        rows = chain_times(evs, args.profiled, dg.net.config.num_hidden_layers, roles=args.batch == 1)
        print(f"  {'kernel':34s} {'calls':>5s} {'us/step':>8s} {'us/call':>8s}")
        for name, calls, us in rows:
            print(f"  {name[:34]:34s} {calls:5d} {us:8.1f} {us / max(1, calls):8.2f}")
        print(f"  {'sum':34s} {sum(c for _, c, _ in rows):5d} {sum(u for _, _, u in rows):8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
