"""Registers, spills and instruction mix of the cuda backend's decode-step GEMVs, without a GPU.

Compiles ``_tgemv_kernel`` as the fused decode step launches it for one token (bitnet-2b4t shapes by default: the
q/k/v, o, gate/up and down projections) for a chosen compute capability with Triton's own ptxas, then reads the
cubin with the cuobjdump and nvdisasm that Triton's NVIDIA backend ships. A kernel whose whole-tile dot product
holds too many registers spills (``stack`` > 0) and fits fewer programs per SM: this is how the slot loop of
``kernels.SLOT_UNROLL`` was found (8 slots unrolled: 247-255 registers, 1-2 KB of stack in gate/up and down).

    python benchmarks/gpu_registers.py [--model bitnet-2b4t] [--arch 90] [--unroll 1,2,8] [--warps 4,8]

Needs triton (``pip install -e ".[gpu]"``); no GPU and no CUDA driver.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# argument types of _tgemv_kernel's pointers (the rest are int32 but for the two epsilons)
PTR_TYPES = {"x_ptr": "*fp32", "sx_ptr": "*fp32", "nw_ptr": "*fp32", "w_ptr": "*i32", "sc_ptr": "*fp32",
             "out_ptr": "*fp32", "scq_ptr": "*i8", "scf_ptr": "*fp32", "ss_ptr": "*fp32", "q_out_ptr": "*fp32",
             "cos_ptr": "*fp32", "sin_ptr": "*fp32", "pos_ptr": "*i32", "base_ptr": "*i64", "maxlen_ptr": "*i32",
             "nx_nw_ptr": "*fp32", "nx_q_ptr": "*i8", "nx_s_ptr": "*fp32", "cnt_ptr": "*i32"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bitnet-2b4t", help="synthetic shapes (`1bit synth` names)")
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default: 90, Hopper)")
    p.add_argument("--unroll", default=None, help="slots per loop pass to compare (default: kernels.SLOT_UNROLL)")
    p.add_argument("--warps", default=None, help="warps per program to compare (default: what the step launches)")
    return p.parse_args(argv)


def gemvs(cfg) -> list[dict]:
    """The decode step's four ternary GEMVs at one token, as backend.DecodeStep.body launches them."""
    from onebit.kernels.triton import kernels as K

    h, inter, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d
    return [dict(name="qkv", n=qkv_rows, k=h, pair=d // 2, epi=K.EPI_QKV, head_dim=d),
            dict(name="o", n=h, k=h, epi=K.EPI_RESIDUAL, nxt=K.FOLD_NORM),
            dict(name="gate_up", n=2 * inter, k=h, xq=K.FOLD_NORM, epi=K.EPI_GLU),
            dict(name="down", n=h, k=inter, epi=K.EPI_RESIDUAL)]


def compile_gemv(spec: dict, arch: int, unroll: int, warps: int | None) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from onebit.kernels.triton import kernels as K

    xq = spec.get("xq", False)
    lay = K.TernaryLayout(spec["n"], spec["k"], 1, spec.get("pair"))
    const, launched = K.gemv_constexprs(lay, xq=xq, norm=not xq, quant=not xq, epi=spec["epi"], act=K.ACT_RELU2,
                                        head_dim=spec.get("head_dim", 2), kv_f32=True,
                                        early=spec["epi"] == K.EPI_QKV, next_norm=spec.get("nxt", False))
    const.update(SU=unroll, GDC=arch >= 90)
    warps = warps or launched
    fn = K._tgemv_kernel
    names = fn.arg_names
    sig = {a: "constexpr" if a in const else PTR_TYPES.get(a, "fp32" if a in ("eps", "nx_eps") else "i32")
           for a in names}
    # pointers 16-byte aligned, as torch's allocations are and as a launch specializes them (vectorized loads)
    aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names) if sig[a].startswith("*")}
    src = ASTSource(fn, sig, constexprs={(names.index(a),): v for a, v in const.items()}, attrs=aligned)
    cap = K.gemv_regs(lay, 1, "cuda")  # the launch's register cap, if any (kernels.GEMV_WIDE_MAXNREG)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, **cap})
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", cubin], capture_output=True, text=True,
                              check=True).stdout
    ops = re.findall(r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", sass, re.M)
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    return dict(name=spec["name"], programs=lay.tiles, words=lay.kwt, tile_words=const["KWP"], warps=warps,
                unroll=unroll, cap=cap.get("maxnreg"),
                regs=regs, stack=int(re.search(r"STACK:(\d+)", usage).group(1)), sass=len(ops),
                mix=collections.Counter(ops).most_common(8),
                per_sm=min(64 // warps, 65536 // (warps * 32 * (-(-regs // 8) * 8))))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("gpu_registers: needs triton (pip install -e \".[gpu]\")", file=sys.stderr)
        return 2
    from onebit.kernels.triton import kernels as K
    from onebit.synth import synth_config

    cfg = synth_config(args.model)
    unrolls = [int(u) for u in args.unroll.split(",")] if args.unroll else [K.SLOT_UNROLL]
    warps = [int(w) for w in args.warps.split(",")] if args.warps else [None]
    print(f"{args.model}, sm_{args.arch}: registers per thread, stack bytes (spills), programs per SM by registers")
    print(f"{'gemv':8s} {'programs':>8s} {'words':>5s} {'tile':>5s} {'warps':>5s} {'slots':>5s} {'regs':>4s} "
          f"{'stack':>5s} {'per SM':>6s} {'SASS':>5s}  most frequent instructions")
    for spec in gemvs(cfg):
        for u in unrolls:
            for w in warps:
                r = compile_gemv(spec, args.arch, u, w)
                mix = " ".join(f"{o}:{c}" for o, c in r["mix"])
                print(f"{r['name']:8s} {r['programs']:8d} {r['words']:5d} {r['tile_words']:5d} {r['warps']:5d} "
                      f"{r['unroll']:5d} {r['regs']:4d} {r['stack']:5d} {r['per_sm']:6d} {r['sass']:5d}  {mix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
