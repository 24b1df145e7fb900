"""The benchmark harness (onebit.eval.bench, `1bit bench`): runs end to end on a tiny model and reports every
field; the roofline arithmetic matches a hand computation. Nothing here is timed."""

import json
import types

import numpy as np
import pytest

from benchmark_script import benchmark_script
from onebit.eval import bench
from onebit.eval.bench import BytesPerToken, Plan

TINY_PLAN = Plan(ctx=(16, 32), prefill=(8, 16), tokens=4, repeats=2)
SMALL_BUFFER = 32 << 20


def test_roofline_by_hand_on_2b4t_shapes():
    # 210 ternary linears: 30 x (2560*2560*2 + 640*2560*2 + 6912*2560*3) = 2,084,044,800 weights at 2 bits
    ternary = 30 * (2560 * 2560 * 2 + 640 * 2560 * 2 + 6912 * 2560 * 3)
    assert ternary == 2_084_044_800
    head_f16 = bench.lm_head_bytes(128256, 2560, "f16")
    head_i8 = bench.lm_head_bytes(128256, 2560, "int8")
    assert head_f16 == 656_670_720 and head_i8 == 328_335_360 + 4 * 128256
    kv = 30 * 2 * 5 * 128 * 4  # f32 K and V per position: 153,600 bytes
    b = BytesPerToken(ternary * 2 // 8, head_f16, kv)
    ctx = bench.decode_context(64, 32)  # steps attend over 65 .. 96 positions: mean 80.5
    assert ctx == 80.5
    assert b.at(ctx) == 521_011_200 + 656_670_720 + 153_600 * 80.5 == 1_190_046_720
    assert bench.roofline_tok_s(25.0, b.at(ctx)) == pytest.approx(25e9 / 1_190_046_720)
    assert bench.roofline_tok_s(25.0, b.at(ctx)) == pytest.approx(21.0076, abs=1e-4)


def test_bytes_per_token_from_the_model_tensors():
    import onebit

    for head, head_bytes in (("f16", 260 * 256 * 2), ("int8", 260 * 256 + 4 * 260)):
        model = onebit.load("tiny-random", backend="numpy", lm_head=head, tokenizer=False)
        cache = model.make_cache(100)
        b = bench.model_bytes_per_token(model.net, cache, head)
        # 2 layers x (q 256x256, k 128x256, v 128x256, o 256x256, gate/up 512x256, down 256x512)
        assert b.ternary == 2 * (65536 * 2 + 32768 * 2 + 131072 * 3) // 4
        assert b.lm_head == head_bytes
        assert b.kv_per_position == 2 * 2 * 2 * 64 * 2  # layers x (K, V) x kv_heads x head_dim x float16 (auto)
        assert len(bench.ternary_linears(model.net)) == 2 * 4  # q/k/v fused, o, gate/up fused, down
    model = onebit.load("tiny-random", backend="numpy", kv_dtype="f32", tokenizer=False)
    assert bench.model_bytes_per_token(model.net, model.make_cache(100), "f16").kv_per_position == 2 * 2 * 2 * 64 * 4


def test_engine_cache_bookkeeping_matches_a_fresh_prefill():
    """Decodes reuse the cache the previous operation left; it must equal a prefill of the same token ids."""
    eng = bench.OnebitEngine("tiny-random", threads=1, max_len=TINY_PLAN.max_len, backend="numpy", kv_dtype="f32")
    ids = TINY_PLAN.token_ids(260)
    eng.set_ids(ids)
    eng.prefill(16)
    out = eng.decode(32, 4)  # extends 16 -> 32 untimed, then 4 timed steps
    assert out["tokens"] == 4 and out["seconds"] > 0 and eng.cache.length == 36
    eng.decode(16, 4)  # trims back to 16
    assert eng.cache.length == 20
    ref = bench.OnebitEngine("tiny-random", threads=1, max_len=TINY_PLAN.max_len, backend="numpy", kv_dtype="f32")
    ref.set_ids(ids)
    ref.prefill(20)
    np.testing.assert_allclose(eng.cache.k[:, :20], ref.cache.k[:, :20], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(eng.cache.v[:, :20], ref.cache.v[:, :20], rtol=1e-4, atol=1e-5)


def test_read_bandwidth_is_positive():
    b = bench.read_bandwidth(2, SMALL_BUFFER, repeats=2)
    assert 0 < b.gb_s <= b.best and len(b.runs) == 2 and b.threads == 2 and b.method in ("c", "numpy")
    assert 0 < b.bytes <= SMALL_BUFFER
    if b.method == "c":  # each run is the faster of the two read patterns
        assert set(b.by_streams) == set(bench.BANDWIDTH_STREAMS) and max(b.by_streams.values()) == b.best


def _check_report(d: dict, n_configs: int, plan: Plan):
    assert set(d) >= {"plan", "configs", "bandwidth", "machine", "versions", "models", "started", "seconds",
                      "summary", "roofline_bandwidth_gb_s"}
    assert set(d["machine"]) >= {"cpu", "cores", "usable_cores", "flags", "memory_bytes"}
    assert set(d["versions"]) >= {"python", "onebit", "numpy", "llama_cpp_python", "gguf"}
    assert d["roofline_bandwidth_gb_s"] > 0
    assert len(d["configs"]) == len(d["summary"]) == n_configs
    ops = [f"{op}@{size}" for op, size in Plan(**{**d["plan"]}).schedule()]
    for cfg, s in zip(d["configs"], d["summary"]):
        assert cfg["error"] is None and cfg["memory"]["peak_rss_bytes"] > 0
        assert set(cfg["info"]["bytes_per_token"]) == {"ternary", "lm_head", "kv_per_position"}
        assert all(r["seconds"] > 0 and r["tok_s"] > 0 for r in cfg["runs"])
        for op in ops:
            if op == "gemv@0":
                if cfg["spec"]["engine"] == "onebit":
                    g = s["metrics"]["gemv"]
                    assert g["median_gb_s"] > 0 and g["of_bandwidth"] > 0 and len(g["runs_gb_s"]) == plan.repeats
                continue
            m = s["metrics"][op]
            assert m["median_tok_s"] > 0 and len(m["runs_tok_s"]) == plan.repeats
            if op.startswith("decode"):
                bpt = BytesPerToken(**cfg["info"]["bytes_per_token"])
                ctx = bench.decode_context(int(op.split("@")[1]), plan.tokens)
                assert m["bytes_per_token"] == pytest.approx(bpt.at(ctx))
                assert m["roofline_tok_s"] == pytest.approx(d["roofline_bandwidth_gb_s"] * 1e9 / bpt.at(ctx))
                assert m["of_roofline"] == pytest.approx(m["median_tok_s"] / m["roofline_tok_s"])


def test_bench_command_end_to_end_numpy(tmp_path, capsys):
    from onebit.cli import main

    out = tmp_path / "bench.json"
    argv = ["bench", "tiny-random", "--backend", "numpy", "--threads", "1", "--ctx", "16,32", "--prefill", "8,16",
            "--tokens", "4", "--repeats", "2", "--bandwidth-gib", str(SMALL_BUFFER / (1 << 30)), "--json", str(out),
            "-q"]
    assert main(argv) == 0
    d = json.loads(out.read_text())
    _check_report(d, 2, TINY_PLAN)
    assert [c["spec"]["lm_head"] for c in d["configs"]] == ["f16", "int8"]
    table = capsys.readouterr().out
    lines = [line for line in table.splitlines() if line.startswith("| onebit numpy")]
    assert len(lines) == 2 + 2  # main table + bytes-per-token table
    header = next(line for line in table.splitlines() if line.startswith("| engine | threads"))
    for col in ("decode@16 tok/s", "decode@32 tok/s", "of roofline", "prefill 8 tok/s", "prefill 16 tok/s",
                "GEMV GB/s", "RSS peak / end"):
        assert col in header
    assert "vs " not in header and "nan" not in table
    assert all(line.count("|") == header.count("|") for line in lines[:2])


def test_bench_with_llama_cpp_alternating(tmp_path):
    pytest.importorskip("llama_cpp")
    gguf = str(tmp_path / "tiny-llama.gguf")
    bench.write_llama_gguf("tiny-random", gguf)
    plan = Plan(ctx=(16,), prefill=(8,), tokens=3, repeats=2)
    report = bench.benchmark("tiny-random", backend="numpy", threads=(1,), lm_heads=("f16",), plan=plan,
                             peer="llama.cpp", peer_model=gguf, bandwidth_bytes=SMALL_BUFFER, require_tq2=True)
    d = json.loads(report.to_json())
    _check_report(d, 2, plan)
    assert [c["spec"]["engine"] for c in d["configs"]] == ["onebit", "llama.cpp"]
    g = d["models"]["peer_gguf"]
    assert g["linear_types"] == ["TQ2_0"] and g["token_embd_type"] == "F16" and g["output_type"] is None
    ours, peer = d["summary"]
    assert ours["metrics"]["decode@16"]["vs_peer"] > 0 and "vs_peer" not in peer["metrics"]["decode@16"]
    assert "gemv" not in peer["metrics"]
    # alternation: ours, peer, peer, ours (who goes first rotates), for prefill then decode; then ours' GEMV
    runs = sorted(((r["seq"], c["spec"]["engine"], r["op"]) for c in d["configs"] for r in c["runs"]))
    engines = [e for _, e, op in runs if op != "gemv"]
    assert engines == ["onebit", "llama.cpp", "llama.cpp", "onebit"] * 2
    assert [op for _, _, op in runs] == ["prefill"] * 4 + ["decode"] * 4 + ["gemv"] * 2
    assert "| llama.cpp | 1 | f16 |" in report.markdown() and "vs llama.cpp" in report.markdown()


def test_peer_gguf_check_rejects_other_types():
    good = {"path": "x.gguf", "linear_types": ["TQ2_0"], "linears": 7, "token_embd_type": "F16", "output_type": None}
    bench.check_tq2_gguf(good)
    with pytest.raises(bench.BenchError):
        bench.check_tq2_gguf({**good, "linear_types": ["TQ1_0"]})
    with pytest.raises(bench.BenchError):
        bench.check_tq2_gguf({**good, "token_embd_type": "Q8_0"})


def test_synth_models_written_once(tmp_path):
    first = bench.synth_models("tiny-random", str(tmp_path), gguf=True)
    assert (tmp_path / "tiny-random" / "config.json").exists() and first["gguf"].endswith(".gguf")
    assert bench.inspect_gguf(first["gguf"])["arch"] == "llama"
    assert len(first["written"]) == 2
    assert bench.synth_models("tiny-random", str(tmp_path), gguf=True)["written"] == []


def test_gpu_registers_reports_the_decode_gemvs_without_spills(capsys):
    """benchmarks/gpu_registers.py compiles the decode step's GEMVs for sm_90 here (Triton's ptxas; no GPU): four
    rows, and at the default slot loop none spills more than a few bytes (8 slots unrolled spilled 1-2 KB) but
    the one its register cap holds to fewer (down: a few hundred bytes, measured faster)."""
    pytest.importorskip("triton")
    mod = benchmark_script("gpu_registers")
    from onebit.synth import synth_config

    rows = [mod.compile_gemv(g, 90, 2, None) for g in mod.gemvs(synth_config("bitnet-2b4t"))]
    assert [r["name"] for r in rows] == ["qkv", "o", "gate_up", "down"]
    assert [r["cap"] is not None for r in rows] == [False, False, False, True]
    for r in rows:
        assert 0 < r["regs"] <= (r["cap"] or 255) and r["stack"] <= (256 if r["cap"] else 64) and r["per_sm"] >= 1, r
    assert mod.main(["--unroll", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 6 and "gate_up" in out


def test_gpu_step_chain_times_by_hand():
    """benchmarks/gpu_step.py's per-kernel chain times: each kernel's end minus its predecessor's, per replay,
    named by the kernel's place in the layer (embedding, 2 layers of the six decode kernels, the final norm and
    the lm_head, as the int8 head runs them; five kernels a layer at a short context; indices for a batch)."""
    mod = benchmark_script("gpu_step")
    names = ["embed"] + ["tgemv", "attn", "merge", "tgemv", "tgemv", "tgemv"] * 2 + ["norm", "gemm"]
    rng = np.random.default_rng()
    replays, events, want = 8, [], {}
    for r in range(replays):
        t = 1000.0 * r
        gaps = rng.uniform(1, 9, len(names))
        for j, (name, gap) in enumerate(zip(names, gaps)):
            t += gap
            events.append({"name": name, "end": t})
            if j and r >= replays // 4:  # the first quarter is warm-up
                key = names[j] if j > 12 else mod.LAYER[(j - 1) % 6]
                want[key] = want.get(key, 0.0) + gap / (replays - replays // 4)
    rows = mod.chain_times(events, replays, 2)
    assert {k: (c, pytest.approx(v)) for k, c, v in rows} == {
        k: (1 if k in ("norm", "gemm") else 2, pytest.approx(v)) for k, v in want.items()}
    assert [v for _, _, v in rows] == sorted((v for _, _, v in rows), reverse=True)
    short = [dict(e, end=e["end"] + 5) for e in events[:14]]  # only the lm_head after the layers
    assert {k for k, _, _ in mod.chain_times(events[:14] + short, 2, 2)} == set(mod.LAYER) | {"norm"}
    odd = mod.chain_times(events[:9] * 2, 2, 10)  # 9 kernels cannot hold 10 layers: plain names
    assert {k for k, _, _ in odd} == {"tgemv", "attn", "merge"}
    assert {k for k, _, _ in mod.chain_times(events[:14] + short, 2, 2, roles=False)} == {
        "tgemv #0", "attn #1", "merge #2", "tgemv #3", "tgemv #4", "tgemv #5", "norm"}  # batched: indices
    five = ["embed"] + ["tgemv", "attn_short", "tgemv", "tgemv", "tgemv"] * 2 + ["norm", "gemm"]
    ends = [{"name": k, "end": float(i)} for i, k in enumerate(five)] * 2  # a short context: no merge kernel
    assert {k for k, _, _ in mod.chain_times(ends, 2, 2)} == set(mod.LAYER_SHORT) | {"norm", "gemm"}
    with pytest.raises(ValueError, match="do not split"):
        mod.chain_times(events[:-1], replays, 2)


def test_gpu_step_says_what_it_needs():
    mod = benchmark_script("gpu_step")
    assert mod.main(["--ctx", "0"]) == 2
    assert mod.main(["--profiled", "0"]) == 2
    assert mod.main(["--batch", "0"]) == 2 and mod.main(["--batch", "65"]) == 2
    try:
        import torch
    except ImportError:
        assert mod.main(["--ctx", "64"]) == 2
        return
    if not torch.cuda.is_available():
        assert mod.main(["--ctx", "64"]) == 2


def test_gpu_ab_reads_variants_and_refuses_what_it_cannot_change():
    """benchmarks/gpu_ab.py: variants parse into (name, {CONST: value}); values take the type of the constant they
    replace; unknown constants, load-time ones, wrong kinds and malformed specs are refused before any GPU work."""
    mod = benchmark_script("gpu_ab")
    assert mod.parse_variants(" cur: ; b:ATTN_BLOCK=8, FLAG = 0 ;") == [("cur", {}), ("b", {"ATTN_BLOCK": "8",
                                                                                           "FLAG": "0"})]
    for bad in ("nocolon", ":ATTN_BLOCK=8", "a:ATTN_BLOCK", "a:ATTN_BLOCK=", "a:;a:", " ; "):
        with pytest.raises(ValueError):
            mod.parse_variants(bad)
    consts = types.SimpleNamespace(ATTN_BLOCK=16, FLAG=True, RATE=1.5, CAP=None, PAIR_TILE=16)
    got = mod.typed(consts, [("a", {"ATTN_BLOCK": "8", "FLAG": "0", "RATE": "2", "CAP": "96"}), ("b", {"CAP": "None"})])
    assert got == [("a", {"ATTN_BLOCK": 8, "FLAG": False, "RATE": 2.0, "CAP": 96}), ("b", {"CAP": None})]
    assert type(got[0][1]["ATTN_BLOCK"]) is int and type(got[0][1]["FLAG"]) is bool
    for bad, match in (({"ATTN_BLOCK": "x"}, "does not fit"), ({"FLAG": "2"}, "does not fit"),
                       ({"NOPE": "1"}, "no constant NOPE"), ({"PAIR_TILE": "8"}, "fixed once the weights")):
        with pytest.raises(ValueError, match=match):
            mod.typed(consts, [("a", bad)])
    assert mod.main(["--variants", "nocolon"]) == 2
    assert mod.main(["--variants", "cur:", "--batch", "65"]) == 2
    assert mod.main(["--variants", "cur:", "--ctx", "0"]) == 2
    try:
        import torch  # noqa: F401
        import triton  # noqa: F401
    except ImportError:
        assert mod.main(["--variants", "cur:"]) == 2
        return
    assert mod.main(["--variants", "cur:;x:NOT_A_CONSTANT=1"]) == 2
    if not torch.cuda.is_available():
        assert mod.main(["--variants", "cur:;b:ATTN_BLOCK=8"]) == 2


def test_ab_cpu_times_builds_side_by_side_and_restores_the_backend():
    """benchmarks/ab_cpu.py: two loaded copies of the package's own build, each with its context, take turns on
    every workload; their outputs agree bit for bit, each gets a time per round, and the backend's extension
    and context are put back afterwards. (Compiling variants is left to the script: too slow for the suite.)"""
    import glob
    import os

    import onebit
    import onebit.kernels.cpu as cpu

    ab = benchmark_script("ab_cpu")
    so = glob.glob(os.path.join(os.path.dirname(cpu.__file__), "_ext*.so"))
    if not so:
        pytest.skip("the cpu extension is not built in place here")
    mods = [ab.load_ext(so[0]), ab.load_ext(so[0])]
    model = onebit.load("tiny-random", backend="cpu", threads=2, tokenizer=False)
    ext, ctx = cpu._ext, model.backend._ctx
    for what in ("gemv", "head", "step"):
        res = ab.compare(mods, ["a", "b"], model, what, 8, rounds=2, reps=1, threads=2)
        assert [d["name"] for d in res] == ["a", "b"] and all(d["same"] for d in res), (what, res)
        assert res[0]["ratio"] == 1.0 and all(d["median_ms"] > 0 for d in res)
    assert cpu._ext is ext and model.backend._ctx is ctx
    with pytest.raises(SystemExit):
        ab.parse_args(["base", "--what", "gemv"])  # not NAME=CFLAGS
    with pytest.raises(SystemExit):
        ab.parse_args(["a=", "a=-O1"])  # names must differ
    assert ab.parse_args(["base=", "pf=-DOB_PF=2048"]).variants == ["base=", "pf=-DOB_PF=2048"]
