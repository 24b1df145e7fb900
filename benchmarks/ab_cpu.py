"""A/B of cpu-kernel builds in one process: each variant's extension loaded side by side, taking turns every round.

On a shared VM whose bandwidth moves by 10-30% within minutes, two builds timed in separate runs differ by more
than most kernel changes do. Here every variant is compiled once (``CFLAGS`` per variant, e.g. ``-DOB_PF=2048``),
all are loaded into one process, and each round times every variant in turn (the order reversed every other
round); the report is each variant's median and the quartiles of its per-round ratio to the first. It also says
whether each variant's outputs equal the first's, bit for bit.

    python benchmarks/ab_cpu.py base= pf2k=-DOB_PF=2048 --what gemv --rounds 20
    python benchmarks/ab_cpu.py base= other= --what step --model ~/.cache/onebit/synth/bitnet-2b4t

``--what``: ``gemv`` (every ternary linear of one token, through the extension), ``head`` (the lm_head at one
token) or ``step`` (a whole decode step at ``--ctx`` tokens of context). ``NAME=`` with no flags is the
package's own build. Needs the C compiler the package builds with; writes only below a temporary folder.
"""

from __future__ import annotations

import argparse
import glob
import importlib.machinery
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import onebit  # noqa: E402
import onebit.kernels.cpu as cpu  # noqa: E402

MODULE = "onebit.kernels.cpu._ext"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("variants", nargs="+", metavar="NAME=CFLAGS", help="builds to compare; the first is the base")
    p.add_argument("--what", choices=["gemv", "head", "step"], default="gemv", help="what to time (default: gemv)")
    p.add_argument("--model", default=None,
                   help="model path or name (default: the synthetic bitnet-2b4t in ~/.cache/onebit/synth)")
    p.add_argument("--threads", type=int, default=2, help="threads per variant's context (default: 2)")
    p.add_argument("--lm-head", default="f16", choices=["f16", "int8"], help="lm_head precision (default: f16)")
    p.add_argument("--ctx", type=int, default=64, help="step: tokens of context (default: 64)")
    p.add_argument("--rounds", type=int, default=16, help="timed rounds (default: 16; one more warms up)")
    p.add_argument("--reps", type=int, default=2, help="calls per variant per round (default: 2)")
    args = p.parse_args(argv)
    for v in args.variants:
        if "=" not in v or not v.split("=", 1)[0]:
            p.error(f"variant {v!r}: expected NAME=CFLAGS (NAME= for the default build)")
    if len({v.split('=', 1)[0] for v in args.variants}) != len(args.variants):
        p.error("variant names must differ")
    return args


def build(flags: str, out: str) -> str:
    """Compile the extension with CFLAGS=flags into out; -> the .so's path."""
    env = dict(os.environ, CFLAGS=flags)
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", out, "--build-temp",
           os.path.join(out, "tmp"), "--force"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    found = glob.glob(os.path.join(out, "onebit", "kernels", "cpu", "_ext*.so"))
    if r.returncode != 0 or not found:
        raise SystemExit(f"build with CFLAGS={flags!r} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return found[0]


def load_ext(path: str):
    """The extension at path as a module object of its own (several builds can be loaded side by side)."""
    loader = importlib.machinery.ExtensionFileLoader(MODULE, path)
    mod = importlib.util.module_from_spec(importlib.util.spec_from_loader(MODULE, loader))
    loader.exec_module(mod)
    return mod


def workload(what: str, model, ctx: int):
    """-> fn(ext, c) that runs the timed work once on extension ext with its context c, returning its output."""
    from onebit.eval.bench import ternary_linears

    net, be = model.net, model.backend
    rng = np.random.default_rng(0)
    if what == "gemv":
        lins = [lin.w for lin in ternary_linears(net)]
        xs = {w.in_features: rng.standard_normal((1, w.in_features), dtype=np.float32) for w in lins}
        ys = [np.empty((1, w.out_features), np.float32) for w in lins]

        def run(ext, c):
            for w, y in zip(lins, ys):
                ext.ternary(c, xs[w.in_features], 1, w.data, w.out_features, w.in_features, w.col_groups,
                            w.row_scales, y, 1, None, None, 0.0, None, 0)
            return np.concatenate([y.ravel() for y in ys])
        return run
    x = rng.standard_normal((1, net.config.hidden_size), dtype=np.float32)
    if what == "head":
        return lambda ext, c: be.dense_matmul(x, net.lm_head)
    cache = net.make_cache(ctx + 2)
    ids = rng.integers(0, net.config.vocab_size, ctx + 1).tolist()
    net.forward_batch([(ids[:ctx], cache)], last_only=True)

    def step(ext, c):
        cache.trim(ctx)
        return net.forward_batch([([ids[ctx]], cache)], last_only=True)[0]
    return step


def compare(mods: list, names: list[str], model, what: str, ctx: int, rounds: int, reps: int,
            threads: int) -> list[dict]:
    """Times every variant in turn for rounds (+1 untimed) -> per variant {name, median_ms, ratio quartiles, same}."""
    be = model.backend
    ctxs = [m.new_ctx(be.isa, threads) for m in mods]
    run = workload(what, model, ctx)
    times = {n: [] for n in names}
    outs = {}
    saved = cpu._ext, be._ctx
    try:
        for r in range(rounds + 1):
            order = range(len(mods)) if r % 2 == 0 else reversed(range(len(mods)))
            for v in order:
                cpu._ext, be._ctx = mods[v], ctxs[v]  # the backend's ops call the module-level extension
                time.sleep(0.002)  # the previous variant's pool stops spinning
                outs[names[v]] = np.array(run(mods[v], ctxs[v]), copy=True)
                t0 = time.perf_counter()
                for _ in range(reps):
                    run(mods[v], ctxs[v])
                if r:
                    times[names[v]].append((time.perf_counter() - t0) / reps * 1e3)
    finally:
        cpu._ext, be._ctx = saved
    out = []
    for n in names:
        ratios = [b / a for a, b in zip(times[names[0]], times[n])]
        q1, q2, q3 = np.quantile(ratios, [0.25, 0.5, 0.75])
        out.append({"name": n, "median_ms": statistics.median(times[n]), "ratio_q1": q1, "ratio": q2,
                    "ratio_q3": q3, "same": bool(np.array_equal(outs[n], outs[names[0]]))})
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    path = args.model
    if path is None:
        from onebit.eval.bench import synth_models

        path = synth_models("bitnet-2b4t", log=lambda s: print(s, flush=True))["hf"]
    names = [v.split("=", 1)[0] for v in args.variants]
    with tempfile.TemporaryDirectory(prefix="onebit-ab-") as tmp:
        mods = []
        for v in args.variants:
            name, flags = v.split("=", 1)
            print(f"building {name} (CFLAGS={flags!r})", flush=True)
            mods.append(load_ext(build(flags, os.path.join(tmp, name))))
        model = onebit.load(path, backend="cpu", threads=args.threads, lm_head=args.lm_head, tokenizer=False)
        print(f"{args.what}: {args.rounds} rounds, {args.reps} calls per variant per round, "
              f"{args.threads} threads, isa {model.backend.isa}", flush=True)
        res = compare(mods, names, model, args.what, args.ctx, args.rounds, args.reps, args.threads)
    for d in res:
        print(f"{d['name']:12s} median {d['median_ms']:8.3f} ms   ratio to {names[0]}: {d['ratio']:.4f} "
              f"(quartiles {d['ratio_q1']:.4f} - {d['ratio_q3']:.4f})   same outputs: {'yes' if d['same'] else 'NO'}")


if __name__ == "__main__":
    main()
