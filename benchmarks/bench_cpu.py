"""CPU benchmark on BitNet b1.58 2B-4T shapes: onebit vs llama.cpp (TQ2_0), alternating, in one run.

Writes the synthetic model (HF packed for us, llama-arch TQ2_0 GGUF with an F16 embedding for llama.cpp) once
to ~/.cache/onebit/synth/, measures the read bandwidth, then decode / prefill / GEMV / peak RSS at each thread
count and lm_head. Results: benchmarks/results/cpu-<date>.json (every run) and cpu-latest.md (the table).
See benchmarks/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from onebit.eval.bench import Plan, benchmark  # noqa: E402

QUICK = dict(ctx="64,256", prefill="32,128", tokens=8, repeats=2)
FULL = dict(ctx="64,1024", prefill="128,512", tokens=32, repeats=3)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"smaller run (same shapes): {QUICK}")
    p.add_argument("--backend", default="cpu", help="our backend (default: cpu)")
    p.add_argument("--threads", default="1,2", help="thread counts (default: 1,2)")
    p.add_argument("--lm-head", default="f16,int8", help="our lm_head precisions (default: f16,int8)")
    p.add_argument("--kv-dtype", choices=["auto", "f32", "f16"], default="auto",
                   help="our KV cache precision (default: auto, f16 for these BitNet shapes)")
    p.add_argument("--ctx", default=None, help=f"decode contexts (default: {FULL['ctx']})")
    p.add_argument("--prefill", default=None, help=f"prefill lengths (default: {FULL['prefill']})")
    p.add_argument("--tokens", type=int, default=None, help=f"decode steps per run (default: {FULL['tokens']})")
    p.add_argument("--repeats", type=int, default=None, help=f"runs per figure (default: {FULL['repeats']})")
    p.add_argument("--bandwidth-gib", type=float, default=1.0, help="read-bandwidth buffer (default: 1 GiB)")
    p.add_argument("--wait-idle", type=float, default=120.0, metavar="SECONDS",
                   help="first wait up to this long for other processes to leave the CPU (default: 120)")
    p.add_argument("--no-peer", action="store_true", help="skip llama.cpp")
    p.add_argument("--fresh", action="store_true", help="rewrite the cached synthetic model files")
    p.add_argument("--models", default=None, help="folder for the synthetic models (default: ~/.cache/onebit/synth)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="results folder")
    return p.parse_args(argv)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def write_results(report, out_dir: str, command: str) -> tuple[str, str]:
    """cpu-<date>.json (a second run the same day gets the time appended) and cpu-latest.md."""
    os.makedirs(out_dir, exist_ok=True)
    day = time.strftime("%Y-%m-%d")
    json_path = os.path.join(out_dir, f"cpu-{day}.json")
    if os.path.exists(json_path):
        json_path = os.path.join(out_dir, f"cpu-{day}-{time.strftime('%H%M%S')}.json")
    with open(json_path, "w") as f:
        f.write(report.to_json())
    md_path = os.path.join(out_dir, "cpu-latest.md")
    with open(md_path, "w") as f:
        f.write(f"# CPU benchmark, {report.started}\n\n`{command}` ({report.seconds / 60:.1f} min; every run in "
                f"`{os.path.relpath(json_path, ROOT)}`)\n\n{report.markdown()}")
    return json_path, md_path


def _log(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    size = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in (QUICK if args.quick else FULL).items()}
    plan = Plan(ctx=_ints(size["ctx"]), prefill=_ints(size["prefill"]), tokens=size["tokens"],
                repeats=size["repeats"])
    report = benchmark(None, backend=args.backend, threads=_ints(args.threads),
                       lm_heads=tuple(args.lm_head.split(",")), plan=plan, peer=None if args.no_peer else "llama.cpp",
                       bandwidth_bytes=int(args.bandwidth_gib * (1 << 30)), synth_dir=args.models, fresh=args.fresh,
                       require_tq2=True, wait_idle=args.wait_idle, log=_log, kv_dtype=args.kv_dtype)
    command = "python benchmarks/bench_cpu.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    json_path, md_path = write_results(report, args.out, command.strip())
    print(report.markdown())
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
