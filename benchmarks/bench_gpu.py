"""GPU benchmark on BitNet b1.58 2B-4T shapes: onebit's cuda backend against the card's roofline, HF transformers'
BitNetForCausalLM on the same checkpoint, and a dense bf16 model of the same shapes, in one run on one GPU.

Writes the synthetic model (HF packed, random ternary weights, seed 0) once to ~/.cache/onebit/synth/ with
``1bit synth``, then runs each section in its own child process: a CUDA error or a failed torch.compile cannot
take the other sections down, each engine's peak GPU memory is its own, and a section that overruns its share of
the time budget is stopped (what it measured so far is kept). Results: benchmarks/results/gpu-<date>.json (every
run) and gpu-latest.md (the tables, naming the card). See benchmarks/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from onebit.eval.bench import (  # noqa: E402
    BytesPerToken, decode_context, lm_head_bytes, model_bytes_per_token, roofline_tok_s, synth_models,
)

SECTIONS = ("bandwidth", "ours-int8", "ours-f16", "splitkv", "dense", "hf-bitnet")  # run in this order
ALIASES = {"ours": ("ours-int8", "ours-f16"), "hf": ("hf-bitnet",), "peers": ("hf-bitnet", "dense"),
           "all": SECTIONS}
NEEDS_BANDWIDTH = {"ours-int8", "ours-f16", "hf-bitnet", "dense"}  # their roofline figures need it
# seconds per section: (hard cap, what the budget keeps back for it while earlier sections run). Ours first; the
# dense model's compile (the ratio everyone asks for) before HF BitNet, whose compile is tried in what is left.
TIMES = {"bandwidth": (60, 15), "ours-int8": (180, 50), "ours-f16": (150, 40), "splitkv": (90, 15),
         "dense": (210, 100), "hf-bitnet": (240, 80)}
COMPILE_MODES = ("reduce-overhead", "max-autotune-no-cudagraphs")
MIN_COMPILE_S = 75  # a compile attempt is not started with less than this left in its section's time

FULL = dict(ctx=(64, 1024, 4096), tokens=32, repeats=3, warm=4, prefill=512, batches=(16, 64), batch_ctx=64,
            peer_ctx=64, splitkv_ctx=2048, splitkv_layers=30, splitkv_inner=20, splitkv_repeats=10,
            bandwidth_mib=1024, bandwidth_repeats=10, budget=450, hf_bitnet_compile=True, dense_compile=True)
QUICK = FULL | dict(ctx=(64, 1024), bandwidth_repeats=5, budget=360, hf_bitnet_compile=False)
TINY = FULL | dict(ctx=(16, 128), tokens=8, repeats=2, warm=2, prefill=64, batches=(4, 8), batch_ctx=16,
                   peer_ctx=16, splitkv_ctx=256, splitkv_layers=2, splitkv_inner=5, splitkv_repeats=3,
                   bandwidth_mib=64, bandwidth_repeats=3, budget=900)


# ---- options ---------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--quick", action="store_true",
                   help="shorter run (same shapes): no 4096 context, no torch.compile of HF BitNet, ~6 min")
    p.add_argument("--tiny", action="store_true",
                   help="tiny-random shapes on whatever device exists (CPU: our cpu backend, HF eager on CPU, no "
                        "compile): tests the script's plumbing, not speed")
    p.add_argument("--only", default=None, metavar="SECTIONS",
                   help=f"comma-separated subset of {', '.join(SECTIONS)} (aliases: ours, hf, peers, all); "
                        "bandwidth is added whenever a decode section runs (its roofline needs it)")
    p.add_argument("--backend", default=None, help="our backend (default: cuda; cpu with --tiny on a machine "
                                                   "without a GPU)")
    p.add_argument("--ctx", default=None, help=f"our batch-1 decode contexts (default: {_csv(FULL['ctx'])}; "
                                               f"--quick: {_csv(QUICK['ctx'])})")
    p.add_argument("--tokens", type=int, default=None, help=f"decode steps per run (default: {FULL['tokens']})")
    p.add_argument("--repeats", type=int, default=None, help=f"runs per figure (default: {FULL['repeats']})")
    p.add_argument("--roofline", choices=("read", "copy", "copy-read"), default="read",
                   help="bandwidth the roofline divides by: read = a read-only sum over the buffer (default), "
                        "copy = copy_ counting read+write bytes, copy-read = copy_ counting read bytes only")
    p.add_argument("--compile-modes", default=",".join(COMPILE_MODES),
                   help=f"torch.compile modes to try in order for the HF static-cache loops "
                        f"(default: {','.join(COMPILE_MODES)}; 'default' is also accepted)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help=f"whole-run time budget, synthetic model writing included (default: {FULL['budget']:.0f}; "
                        f"--quick: {QUICK['budget']:.0f}); sections get what is left, in order")
    p.add_argument("--models", default=None, help="folder for the synthetic model (default: ~/.cache/onebit/synth)")
    p.add_argument("--fresh", action="store_true", help="rewrite the cached synthetic model")
    p.add_argument("--no-isolate", action="store_true",
                   help="run the sections in this process, no time limits (debugging; one CUDA error ends all)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="results folder")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _csv(xs) -> str:
    return ",".join(str(x) for x in xs)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def pick_sections(only: str | None) -> list[str]:
    if not only:
        return list(SECTIONS)
    chosen: set[str] = set()
    for name in (s.strip() for s in only.split(",") if s.strip()):
        if name in ALIASES:
            chosen.update(ALIASES[name])
        elif name in SECTIONS:
            chosen.add(name)
        else:
            raise SystemExit(f"--only: unknown section {name!r} (known: {', '.join(SECTIONS)}; "
                             f"aliases: {', '.join(ALIASES)})")
    if chosen & NEEDS_BANDWIDTH:
        chosen.add("bandwidth")
    return [s for s in SECTIONS if s in chosen]


def _log(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


# ---- the child process: one section -----------------------------------------------------------------------

class Section:
    """A section's state inside its child: the spec, the result dict (saved after every measurement, so a
    child stopped for time still reports what it measured), and its deadline."""

    def __init__(self, name: str, spec: dict, path: str | None):
        self.name, self.spec, self.path = name, spec, path
        self.t0 = time.perf_counter()
        limit = spec.get("time_limit")
        self.deadline = self.t0 + limit if limit else None
        self.res: dict = {"section": name, "errors": [], "notes": []}
        self.torch = None
        self.dev = spec["device"]

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.perf_counter()

    def stage(self, what: str) -> None:
        self.res["stage"] = what
        _log(f"{self.name}: {what}")
        self.save()

    def error(self, what: str, exc: BaseException) -> None:
        msg = f"{what}: {type(exc).__name__}: {str(exc).strip()[:800]}"
        self.res["errors"].append(msg)
        self.res.setdefault("tracebacks", []).append(traceback.format_exc()[-4000:])
        _log(f"{self.name}: {msg}")
        self.save()

    def save(self) -> None:
        self.res["seconds"] = time.perf_counter() - self.t0
        if not self.path:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.res, f, indent=1, default=str)
        os.replace(tmp, self.path)

    # -- torch helpers

    def init_torch(self):
        import torch

        self.torch = torch
        info = {"kind": self.dev}
        if self.dev == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("torch sees no CUDA device")
            torch.cuda.set_device(0)
            p = torch.cuda.get_device_properties(0)
            info.update(name=torch.cuda.get_device_name(0), total_memory_bytes=p.total_memory,
                        sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                        visible_gpus=torch.cuda.device_count(), cuda=torch.version.cuda)
            torch.cuda.reset_peak_memory_stats()
        else:
            from onebit.eval.bench import cpu_model

            info.update(name=f"CPU ({cpu_model()})")
        self.res["device"] = info
        return torch

    def sync(self) -> None:
        if self.dev == "cuda":
            self.torch.cuda.synchronize()

    def wall(self, fn) -> float:
        """Seconds for fn(), bracketed by device synchronization."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def event_times(self, fn, repeats: int, warm: int = 2) -> list[float]:
        """Seconds per fn() call: CUDA events on a GPU, synchronized wall time on a CPU."""
        for _ in range(warm):
            fn()
        self.sync()
        if self.dev != "cuda":
            return [self.wall(fn) for _ in range(repeats)]
        torch, out = self.torch, []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        return out

    def memory(self) -> dict:
        if self.torch is not None and self.dev == "cuda":
            t = self.torch.cuda
            return {"max_allocated_bytes": t.max_memory_allocated(), "max_reserved_bytes": t.max_memory_reserved(),
                    "allocated_bytes": t.memory_allocated()}
        from onebit.eval.bench import memory_usage

        return memory_usage()


def _rates(tokens: int, seconds: list[float]) -> dict:
    rates = [tokens / s for s in seconds]
    return {"median_tok_s": statistics.median(rates), "runs_tok_s": rates, "runs_s": seconds, "tokens": tokens}


def run_child(name: str, spec: dict, path: str | None) -> dict:
    sec = Section(name, spec, path)
    try:
        sec.init_torch()
        if sec.dev == "cuda":
            _log(f"{name}: on {sec.res['device']['name']}")
        SECTION_FUNCS[name](sec)
    except Exception as e:  # reported; the parent goes on with the next section
        sec.error("section failed", e)
    finally:
        try:
            sec.res["memory"] = sec.memory()
        except Exception as e:
            sec.res["memory"] = {"error": str(e)}
        sec.res.pop("stage", None)
        sec.res["finished"] = True
        sec.save()
    return sec.res


# ---- section: bandwidth -----------------------------------------------------------------------------------

def sec_bandwidth(sec: Section) -> None:
    """Device-to-device copy_ of one buffer into another (read + write counted, and read side only), and a
    read-only sum over the same buffer."""
    torch, n = sec.torch, sec.spec["bandwidth_bytes"]
    reps = sec.spec["bandwidth_repeats"]
    sec.stage(f"allocating 2 x {n / 2**30:.2f} GiB")
    a = torch.ones(n, dtype=torch.uint8, device=sec.dev)
    b = torch.empty_like(a)
    f = a.view(torch.float32)
    copy = sec.event_times(lambda: b.copy_(a), reps)
    read = sec.event_times(lambda: torch.sum(f), reps)
    med, best = statistics.median(copy), min(copy)
    sec.res["buffer_bytes"] = n
    sec.res["copy"] = {"what": "b.copy_(a), read + write bytes counted (2 x buffer)", "gb_s": 2 * n / med / 1e9,
                       "best_gb_s": 2 * n / best / 1e9, "runs_s": copy}
    sec.res["copy_read_side"] = {"what": "the same copy_, read bytes only (1 x buffer)", "gb_s": n / med / 1e9,
                                 "best_gb_s": n / best / 1e9}
    sec.res["read"] = {"what": "torch.sum over the buffer (as float32): read-only, 1 x buffer",
                       "gb_s": n / statistics.median(read) / 1e9, "best_gb_s": n / min(read) / 1e9, "runs_s": read}
    _log(f"bandwidth: copy {sec.res['copy']['gb_s']:.0f} GB/s (read+write), read-only sum "
         f"{sec.res['read']['gb_s']:.0f} GB/s")


# ---- sections: ours ---------------------------------------------------------------------------------------

def _config_bytes(cfg, lm_head: str, kv_per_position: float | None) -> BytesPerToken:
    """Bytes per decode token from the config alone (when the model's tensors cannot be inspected)."""
    h, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    ternary = L * (h * q + 2 * h * kv + q * h + 3 * h * f) * 2 // 8
    if kv_per_position is None:
        kv_per_position = L * 2 * kv * 2  # float16 K and V
    return BytesPerToken(ternary, lm_head_bytes(cfg.vocab_size, h, lm_head), kv_per_position)


def _kv_per_position(cache) -> float | None:
    try:
        return cache.nbytes() / cache.max_len
    except Exception:
        return None


def sec_ours(sec: Section, lm_head: str, batched: bool) -> None:
    import numpy as np

    import onebit

    s = sec.spec
    sec.res["lm_head"], sec.res["backend"] = lm_head, s["backend"]
    sec.stage(f"loading {s['model']} on backend {s['backend']!r}, lm_head {lm_head}")
    t0 = time.perf_counter()
    try:
        m = onebit.load(s["model"], backend=s["backend"], lm_head=lm_head, tokenizer=False)
    except Exception as e:
        raise RuntimeError(f"onebit.load(backend={s['backend']!r}, lm_head={lm_head!r}) failed (is the "
                           f"{s['backend']} backend importable here?): {type(e).__name__}: {e}") from e
    sec.res["load_seconds"] = time.perf_counter() - t0
    sec.res["memory_after_load"] = sec.memory()
    net, cfg = m.net, m.config
    be = m.backend
    sec.res["backend_info"] = {"name": getattr(be, "name", type(be).__name__), "repr": repr(be)[:300]}
    tokens, warm, reps = s["tokens"], min(s["warm"], s["tokens"]), s["repeats"]
    ctxs = sorted(s["ctx"], reverse=True)
    prefill = s["prefill"]
    max_len = max([*ctxs, prefill, 1]) + tokens
    limit = cfg.max_position_embeddings
    try:
        cache = net.make_cache(max_len)
    except Exception as e:  # a backend may refuse caches past the model's window: time the last steps inside it
        if max_len <= limit:
            raise
        sec.res["notes"].append(f"make_cache({max_len}) failed ({type(e).__name__}: {e}); decode contexts "
                                f"above {limit - tokens} time the {tokens} steps that end at position {limit}")
        max_len = limit
        cache = net.make_cache(max_len)
    ids = np.random.default_rng(s["seed"]).integers(0, cfg.vocab_size, max_len).tolist()

    cfg_bytes = _config_bytes(cfg, lm_head, _kv_per_position(cache))
    try:
        bpt, how = model_bytes_per_token(net, cache, lm_head), "the model's tensors"
        if bpt.ternary <= 0 or bpt.lm_head <= 0:
            raise ValueError(f"found {bpt.ternary} ternary bytes, {bpt.lm_head} lm_head bytes")
    except Exception as e:
        bpt, how = cfg_bytes, f"the config ({type(e).__name__}: {e})"
    sec.res["bytes_per_token"] = {**bpt.__dict__, "from": how}
    kv = next((getattr(cache, n) for n in ("k", "kv", "data") if getattr(cache, n, None) is not None), None)
    sec.res["kv_dtype"] = str(getattr(kv, "dtype", None))
    sec.save()

    state = {"valid": 0}  # the cache holds the K/V of ids[:valid]

    def forward(chunk: list[int]) -> None:
        for i in range(0, len(chunk), 512):
            net.forward_batch([(chunk[i:i + 512], cache)], last_only=True)

    def extend(n: int) -> None:
        if state["valid"] < n:
            cache.trim(state["valid"])
            forward(ids[state["valid"]:n])
        cache.trim(n)
        state["valid"] = n

    def steps(ctx: int, k: int, how: str = "chain") -> None:
        """k greedy decode steps from ctx, each step's argmax fed back: "chain" as generate() runs them
        (greedy_decode: the argmax picked on the device, one step queued ahead of the host), "step" one
        decode_greedy call per token (the argmax on the device, the host waits for each token before it queues
        the next step, as the dense baselines do), "logits" with each step's logits brought to the host (what a
        sampler with a temperature needs) and the argmax taken there."""
        t = ids[ctx]
        if how == "chain":
            n = sum(1 for _ in net.greedy_decode(t, cache, max_steps=k))
            if n != k:
                raise RuntimeError(f"greedy_decode gave {n} of {k} tokens")
        elif how == "step":
            for _ in range(k):
                t = int(net.decode_greedy([([t], cache)])[0])
        else:
            for _ in range(k):
                t = int(net.forward_batch([([t], cache)], last_only=True)[0][-1].argmax())
        state["valid"] = ctx  # past ctx the cache holds the steps' tokens

    # prefill: from an empty cache, in chunks of 512, logits of the last token only
    try:
        sec.stage(f"prefill {prefill}")

        def run_prefill():
            cache.trim(0)
            forward(ids[:prefill])
            state["valid"] = prefill

        sec.wall(run_prefill)  # warm-up
        runs = [sec.wall(run_prefill) for _ in range(reps)]
        sec.res[f"prefill@{prefill}"] = _rates(prefill, runs)
        _log(f"{sec.name}: prefill {prefill}: {sec.res[f'prefill@{prefill}']['median_tok_s']:.0f} tok/s")
    except Exception as e:
        sec.error(f"prefill {prefill}", e)
        state["valid"] = 0
        cache.trim(0)

    # batch-1 decode from the longest context down: each fill extends or trims what the cache holds
    def decode_at(ctx: int, how: str = "chain") -> dict:
        sec.stage(f"decode@{ctx} (filling the context)")
        extend(ctx)
        sec.stage(f"decode@{ctx} ({how})")
        steps(ctx, warm, how)  # warm-up: kernels compiled, the decode graph captured at this length
        runs = []
        for _ in range(reps):
            cache.trim(ctx)
            runs.append(sec.wall(lambda: steps(ctx, tokens, how)))
        d = _rates(tokens, runs)
        d["context"], d["mean_context"] = ctx, decode_context(ctx, tokens)
        d["bytes_per_token"] = bpt.at(d["mean_context"])
        return d

    for asked in ctxs:  # the figure stays under the asked context; "context" says where it was timed
        ctx = min(asked, max_len - tokens)
        try:
            try:
                d = decode_at(ctx)
            except Exception as e:
                if ctx + tokens <= limit:
                    raise
                sec.res["notes"].append(f"decode@{ctx} failed past the model's {limit}-token window "
                                        f"({type(e).__name__}: {str(e)[:200]}); retried inside it")
                state["valid"] = 0
                ctx = limit - tokens
                d = decode_at(ctx)
            if ctx != asked:
                sec.res["notes"].append(f"decode@{asked}: timed after {ctx} tokens (the {tokens} steps end at "
                                        f"position {ctx + tokens}, the model's window)")
            sec.res[f"decode@{asked}"] = d
            _log(f"{sec.name}: decode@{ctx}: {d['median_tok_s']:.1f} tok/s")
        except Exception as e:
            sec.error(f"decode@{ctx}", e)
        sec.save()
    for how in ("step", "logits") if s["peer_ctx"] in ctxs and s["peer_ctx"] + tokens <= max_len else ():
        try:  # the same steps with the host waiting for every token
            d = decode_at(s["peer_ctx"], how)
            sec.res[f"{how}_decode@{s['peer_ctx']}"] = d
            _log(f"{sec.name}: decode@{s['peer_ctx']} ({how}): {d['median_tok_s']:.1f} tok/s")
        except Exception as e:
            sec.error(f"decode@{s['peer_ctx']} ({how})", e)
        sec.save()

    # batched decode: B sequences, each with its own cache of batch_ctx tokens, one token each per step
    for bsz in (s.get("batches") or ()) if batched else ():
        caches = None
        try:
            bctx = s["batch_ctx"]
            sec.stage(f"batch {bsz} decode@{bctx} (filling {bsz} caches)")
            caches = [net.make_cache(bctx + tokens) for _ in range(bsz)]
            bids = np.random.default_rng(s["seed"] + 1).integers(0, cfg.vocab_size, (bsz, bctx + tokens)).tolist()
            for g in range(0, bsz, 16):
                net.forward_batch([(bids[i][:bctx], caches[i]) for i in range(g, min(bsz, g + 16))], last_only=True)

            def bsteps(k: int) -> None:  # greedy, as batch-1 decode
                toks = [bids[i][bctx] for i in range(bsz)]
                for _ in range(k):
                    toks = net.decode_greedy([([toks[i]], caches[i]) for i in range(bsz)]).tolist()

            def trim_all() -> None:
                for c in caches:
                    c.trim(bctx)

            sec.stage(f"batch {bsz} decode@{bctx}")
            bsteps(warm)
            runs = []
            for _ in range(reps):
                trim_all()
                runs.append(sec.wall(lambda: bsteps(tokens)))
            d = _rates(bsz * tokens, runs)
            d.update(batch=bsz, context=bctx, mean_context=decode_context(bctx, tokens),
                     per_sequence_tok_s=d["median_tok_s"] / bsz)
            d["bytes_per_step"] = bpt.ternary + bpt.lm_head + bpt.kv_per_position * d["mean_context"] * bsz
            sec.res[f"batch{bsz}@{bctx}"] = d
            _log(f"{sec.name}: batch {bsz}: {d['median_tok_s']:.0f} tok/s aggregate")
        except Exception as e:
            sec.error(f"batch {bsz} decode", e)
        finally:
            caches = None  # noqa: F841 (frees the caches before the next batch size)
            gc.collect()
            if sec.dev == "cuda":
                sec.torch.cuda.empty_cache()
        sec.save()


# ---- section: split-KV attention --------------------------------------------------------------------------

def sec_splitkv(sec: Section) -> None:
    """decode_attention with num_splits=None (automatic split-KV) against num_splits=1 (one block per sequence
    and kv head); skipped without a GPU or without the triton module."""
    if sec.dev != "cuda":
        sec.res["skipped"] = "split-KV needs a GPU (the triton decode_attention kernel)"
        return
    try:
        from onebit.kernels.triton.kernels import decode_attention
    except Exception as e:  # ImportError, or triton failing to initialise
        sec.res["skipped"] = ("onebit.kernels.triton.kernels.decode_attention is not importable: "
                              f"{type(e).__name__}: {e}")
        return
    splitkv_measure(sec, decode_attention)


def splitkv_measure(sec: Section, decode_attention) -> None:
    """B=1, the model's head counts, ``splitkv_layers`` distinct caches of exactly ``splitkv_ctx`` positions (one
    per layer, as in a decode step). Three timings per variant, in this order (a failure in a later one cannot
    spoil an earlier one):
    - kernels: the device time of the non-aten kernels (the triton attention and merge kernels) under
      torch.profiler, per call: what the kernels cost inside the backend's captured decode step;
    - launch loop: CUDA events around ``splitkv_inner`` passes of plain calls: the stand-alone function end to
      end (its own set-up, host syncs and Python launch overhead included);
    - CUDA graph: the same passes captured and replayed (only if the function can be captured).
    The headline figure is the first that ran."""
    s, torch, dev = sec.spec, sec.torch, sec.dev
    hq, hkv, d, ctx, layers = s["heads"], s["kv_heads"], s["head_dim"], s["splitkv_ctx"], s["splitkv_layers"]
    sec.res.update(batch=1, q_heads=hq, kv_heads=hkv, head_dim=d, context=ctx, layers=layers)
    g = torch.Generator(device=dev).manual_seed(0)
    qs = [torch.randn(1, hq, d, device=dev, generator=g) for _ in range(layers)]
    ks = [torch.randn(1, ctx, hkv, d, device=dev, generator=g).half() for _ in range(layers)]
    vs = [torch.randn(1, ctx, hkv, d, device=dev, generator=g).half() for _ in range(layers)]
    lengths = torch.tensor([ctx], dtype=torch.int32, device=dev)
    kv_bytes = 2 * ctx * hkv * d * 2  # K and V read at float16 per call
    variants = {"one_block": 1, "split_auto": None}

    try:  # agreement, and against a float32 reference
        sec.stage("checking outputs")
        out = {key: decode_attention(qs[0], ks[0], vs[0], lengths, num_splits=ns) for key, ns in variants.items()}
        k = ks[0][0, :ctx].float().repeat_interleave(hq // hkv, dim=1)  # [ctx, hq, d]
        v = vs[0][0, :ctx].float().repeat_interleave(hq // hkv, dim=1)
        att = torch.softmax(torch.einsum("hd,thd->ht", qs[0][0].float(), k) / d ** 0.5, dim=-1)
        ref = torch.einsum("ht,thd->hd", att, v)
        sec.res["max_abs_err_vs_reference"] = {key: float((o[0].float() - ref).abs().max()) for key, o in out.items()}
        sec.res["max_abs_diff_split_vs_one_block"] = float((out["split_auto"] - out["one_block"]).abs().max())
    except Exception as e:
        sec.error("checking outputs", e)

    inner, calls = s["splitkv_inner"], s["splitkv_inner"] * layers

    def one_pass(ns):
        for i in range(layers):
            decode_attention(qs[i], ks[i], vs[i], lengths, num_splits=ns)

    for key, ns in variants.items():
        try:
            sec.stage(f"timing num_splits={ns}: launch loop")
            one_pass(ns)
            loop = sec.event_times(lambda: [one_pass(ns) for _ in range(inner)], s["splitkv_repeats"])
            sec.res[key] = {"num_splits": ns, "loop_us_per_call": statistics.median(loop) / calls * 1e6}
        except Exception as e:
            sec.error(f"num_splits={ns}: launch loop", e)
    for key, ns in variants.items():
        if key not in sec.res:
            continue
        try:
            sec.stage(f"timing num_splits={ns}: kernels under torch.profiler")
            sec.res[key].update(_profiled_kernels(sec, lambda: one_pass(ns), inner, layers, s["splitkv_repeats"]))
        except Exception as e:
            sec.error(f"num_splits={ns}: torch.profiler", e)
    for key, ns in variants.items():
        if key not in sec.res or sec.dev != "cuda":
            continue
        try:
            sec.stage(f"timing num_splits={ns}: CUDA graph")
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                one_pass(ns)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(inner):
                    one_pass(ns)
            t = sec.event_times(graph.replay, s["splitkv_repeats"])
            sec.res[key]["graph_us_per_call"] = statistics.median(t) / calls * 1e6
        except Exception as e:  # the stand-alone function syncs with the host: it need not be capturable
            sec.res["notes"].append(f"num_splits={ns}: not timed as a CUDA graph ({type(e).__name__}: "
                                    f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})")
            try:
                torch.cuda.synchronize()
            except Exception:
                pass
    methods = (("kernel_us_per_call", "kernels only (torch.profiler device time)"),
               ("graph_us_per_call", "CUDA graph replay (GPU time, set-up copies included)"),
               ("loop_us_per_call", "launch loop (stand-alone function end to end)"))
    a, b = sec.res.get("one_block"), sec.res.get("split_auto")
    for key, r in (("one_block", a), ("split_auto", b)):
        if not r:
            continue
        field, what = next((f, w) for f, w in methods if all(f in x for x in (a, b) if x))
        r["us_per_call"], r["method"] = r[field], what
        r["kv_gb_s"] = kv_bytes / (r["us_per_call"] * 1e-6) / 1e9
        _log(f"splitkv: {key}: {r['us_per_call']:.2f} us/call ({what})")
    if a and b:
        sec.res["speedup"] = a["us_per_call"] / b["us_per_call"]
        for f, _ in methods:
            if f in a and f in b:
                sec.res[f"speedup_{f.replace('_us_per_call', '')}"] = a[f] / b[f]
    sec.save()


def _profiled_kernels(sec: Section, one_pass, passes: int, per_pass: int, repeats: int) -> dict:
    """Device time per call of the kernels that are not aten's (memcpy, stack, fill...), under torch.profiler:
    the median over (up to 5) profiles of ``passes`` passes of ``per_pass`` calls, and each kernel's share."""
    from torch.profiler import ProfilerActivity, profile

    calls = passes * per_pass
    one_pass()
    sec.sync()
    totals, names = [], {}
    for _ in range(max(1, min(repeats, 5))):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(passes):
                one_pass()
            sec.sync()
        total = 0.0
        for ev in prof.key_averages():
            us = getattr(ev, "device_time_total", None)
            if us is None:
                us = getattr(ev, "cuda_time_total", 0.0)
            name = ev.key
            if not us or _is_aten_kernel(name):
                continue
            total += us
            names[name] = names.get(name, 0.0) + us
        totals.append(total)
    if not any(totals):
        raise RuntimeError("the profiler saw no non-aten kernel")
    n = len(totals)
    return {"kernel_us_per_call": statistics.median(totals) / calls,
            "kernels": {k: v / (n * calls) for k, v in sorted(names.items(), key=lambda kv: -kv[1])}}


def _is_aten_kernel(name: str) -> bool:
    low = name.lower()
    return (name.startswith("void ") or "at::" in name or "memcpy" in low or "memset" in low
            or name.startswith("cuda") or name.startswith("aten::") or "elementwise" in low)


# ---- sections: HF transformers peers ----------------------------------------------------------------------

def _unique_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, each storage once (a tied embedding counts once: its
    table is read in full by the lm_head every step)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.device, t.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _hf_bytes(model) -> dict:
    """Every weight once (bf16; HF BitNet's offline-packed linears are unpacked to bf16 at load) and a bf16 KV."""
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return {"weights": _unique_bytes(model), "lm_head": 0,
            "kv_per_position": c.num_hidden_layers * 2 * c.num_key_value_heads * hd * 2,
            "from": "unique parameter + buffer bytes (tied embedding once, read by the lm_head), bf16 KV"}


def _hf_prompt(sec: Section, vocab: int):
    import numpy as np

    s = sec.spec
    ids = np.random.default_rng(s["seed"]).integers(0, vocab, s["peer_ctx"]).tolist()
    return sec.torch.tensor([ids], device=sec.dev)


def _cache_kw(model) -> str:
    """The forward's KV-cache argument: ``cache`` in transformers >= 5.2x, ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _out_cache(out):
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


def hf_eager_decode(sec: Section, model, prompt) -> dict:
    """A greedy loop with DynamicCache (past_key_values): prefill the prompt, then one token per step, the host
    reading each token (as any generate loop does). The first run is a short warm-up."""
    torch, s = sec.torch, sec.spec
    runs, kw = [], _cache_kw(model)
    with torch.no_grad():  # as the compiled loop (transformers' own compiled BitNet ops then compile once)
        for r in range(s["repeats"] + 1):
            out = model(input_ids=prompt, use_cache=True)
            past, tok = _out_cache(out), out.logits[:, -1:].argmax(-1)
            n = s["tokens"] if r else min(s["tokens"], s["warm"])

            def loop():
                nonlocal past, tok
                for _ in range(n):
                    o = model(input_ids=tok, use_cache=True, **{kw: past})
                    past, tok = _out_cache(o), o.logits[:, -1:].argmax(-1)
                    int(tok)

            dt = sec.wall(loop)
            if r:
                runs.append(dt)
    return _rates(s["tokens"], runs)


def hf_compiled_decode(sec: Section, model, prompt, mode: str) -> dict:
    """The same greedy loop with a StaticCache and the one-token step under torch.compile(mode, fullgraph);
    the prefill runs eagerly. Warm-up calls compile and (reduce-overhead) record the CUDA graph."""
    torch, s = sec.torch, sec.spec
    from transformers import StaticCache

    ctx, n, kw = prompt.shape[1], s["tokens"], _cache_kw(model)
    cache = StaticCache(config=model.config, max_cache_len=ctx + n + 8)

    def step(tok, pos):
        logits = model(input_ids=tok, cache_position=pos, use_cache=True, return_dict=False, **{kw: cache})[0]
        return logits[:, -1:].argmax(-1)

    fn = torch.compile(step, mode=None if mode == "default" else mode, fullgraph=True)
    positions = [torch.tensor([ctx + i], device=sec.dev) for i in range(n)]
    mark = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)

    def prefill():
        cache.reset()
        out = model(input_ids=prompt, cache_position=torch.arange(ctx, device=sec.dev), use_cache=True,
                    **{kw: cache})
        return out.logits[:, -1:].argmax(-1)

    def loop(k: int) -> None:
        tok = prefill()
        sec.sync()
        state["t0"] = time.perf_counter()
        for i in range(k):
            if mark:
                mark()
            tok = fn(tok.clone(), positions[i])
            int(tok)
        sec.sync()
        state["dt"] = time.perf_counter() - state["t0"]

    state: dict = {}
    with torch.no_grad():
        t0 = time.perf_counter()
        loop(min(n, max(3, s["warm"])))  # compiles, then records the graph
        compile_s = time.perf_counter() - t0
        runs = []
        for _ in range(s["repeats"]):
            loop(n)
            runs.append(state["dt"])
    return {**_rates(n, runs), "compile_and_warmup_seconds": compile_s}


def _hf_decode_all(sec: Section, model, prompt, compile_ok: bool, label: str) -> None:
    """Eager DynamicCache loop, then static cache + torch.compile through the modes in turn until one runs."""
    s = sec.spec
    try:
        sec.stage(f"{label}: eager decode@{s['peer_ctx']}")
        d = hf_eager_decode(sec, model, prompt)
        d.update(context=s["peer_ctx"], mean_context=decode_context(s["peer_ctx"], s["tokens"]),
                 how="eager, DynamicCache")
        sec.res[f"eager_decode@{s['peer_ctx']}"] = d
        _log(f"{sec.name}: eager decode@{s['peer_ctx']}: {d['median_tok_s']:.1f} tok/s")
    except Exception as e:
        sec.error("eager decode", e)
    sec.res["memory_after_eager"] = sec.memory()
    sec.save()
    if not compile_ok:
        return
    attempts = sec.res.setdefault("compile_attempts", [])
    for mode in s["compile_modes"]:
        if sec.left() < MIN_COMPILE_S:
            attempts.append({"mode": mode, "skipped": f"only {sec.left():.0f} s left in this section's time"})
            sec.res["notes"].append(f"torch.compile mode {mode!r} not tried: out of time")
            break
        try:
            sec.stage(f"{label}: StaticCache + torch.compile(mode={mode!r}, fullgraph=True)")
            d = hf_compiled_decode(sec, model, prompt, mode)
            d.update(context=s["peer_ctx"], mean_context=decode_context(s["peer_ctx"], s["tokens"]), mode=mode,
                     how=f"StaticCache + torch.compile(mode={mode!r})")
            attempts.append({"mode": mode, "ok": True})
            sec.res[f"compiled_decode@{s['peer_ctx']}"] = d
            _log(f"{sec.name}: compiled ({mode}) decode@{s['peer_ctx']}: {d['median_tok_s']:.1f} tok/s "
                 f"(compile + warm-up {d['compile_and_warmup_seconds']:.0f} s)")
            break
        except Exception as e:
            attempts.append({"mode": mode, "error": f"{type(e).__name__}: {str(e).strip()[:500]}"})
            sec.error(f"torch.compile mode {mode!r}", e)
            try:
                sec.torch._dynamo.reset()
            except Exception:
                pass
    sec.save()


def sec_hf_bitnet(sec: Section) -> None:
    """transformers' BitNetForCausalLM from the same packed checkpoint, bf16, on the device."""
    torch, s = sec.torch, sec.spec
    sec.stage("importing transformers")
    from transformers import AutoModelForCausalLM
    import transformers

    sec.res["transformers"] = transformers.__version__
    sec.stage(f"loading {s['model']} with AutoModelForCausalLM (bf16)")
    kw = {"device_map": sec.dev} if sec.dev == "cuda" else {}
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(s["model"], dtype=torch.bfloat16, **kw).eval()
    if sec.dev != "cuda":
        model = model.to(sec.dev)
    sec.res["load_seconds"] = time.perf_counter() - t0
    qc = getattr(model.config, "quantization_config", None)
    qc = qc.to_dict() if hasattr(qc, "to_dict") else (qc or {})
    sec.res["model_class"] = type(model).__name__
    sec.res["linear_class"] = qc.get("linear_class")
    sec.res["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    sec.res["bytes_per_token"] = _hf_bytes(model)
    sec.res["memory_after_load"] = sec.memory()
    sec.save()
    compile_ok = s["hf_bitnet_compile"] and sec.dev == "cuda"
    if not compile_ok:
        sec.res["notes"].append("static cache + torch.compile not tried: " +
                                ("no GPU" if sec.dev != "cuda" else "--quick"))
    _hf_decode_all(sec, model, _hf_prompt(sec, model.config.vocab_size), compile_ok, "HF BitNet")


def sec_dense(sec: Section) -> None:
    """A dense bf16 LlamaForCausalLM with the same hidden / layers / heads / MLP / vocab, random weights."""
    torch, s = sec.torch, sec.spec
    sec.stage("importing transformers")
    from transformers import LlamaConfig, LlamaForCausalLM
    import transformers

    sec.res["transformers"] = transformers.__version__
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"],
                      max_position_embeddings=s["max_position"], tie_word_embeddings=True, hidden_act="silu",
                      bos_token_id=0, eos_token_id=1, pad_token_id=None)
    sec.stage("building the dense bf16 model (random weights)")
    t0 = time.perf_counter()
    torch.manual_seed(s["seed"])
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(sec.dev):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model = model.to(device=sec.dev, dtype=torch.bfloat16).eval()
    sec.res["load_seconds"] = time.perf_counter() - t0
    sec.res["model_class"] = type(model).__name__
    sec.res["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    sec.res["bytes_per_token"] = _hf_bytes(model)
    sec.res["memory_after_load"] = sec.memory()
    sec.save()
    compile_ok = s["dense_compile"] and sec.dev == "cuda"
    if not compile_ok:
        sec.res["notes"].append("static cache + torch.compile not tried: no GPU")
    _hf_decode_all(sec, model, _hf_prompt(sec, cfg.vocab_size), compile_ok, "dense bf16")


SECTION_FUNCS = {"bandwidth": sec_bandwidth, "ours-int8": lambda s: sec_ours(s, "int8", batched=True),
                 "ours-f16": lambda s: sec_ours(s, "f16", batched=False), "splitkv": sec_splitkv, "hf-bitnet": sec_hf_bitnet,
                 "dense": sec_dense}


# ---- the parent: model, plan, children, budget ------------------------------------------------------------

def build_spec(args, tiny: bool, device: str) -> dict:
    size = TINY if tiny else QUICK if args.quick else FULL
    spec = dict(size)
    if args.ctx:
        spec["ctx"] = _ints(args.ctx)
    spec["ctx"] = tuple(sorted(set(spec["ctx"]) | {spec["peer_ctx"]}))  # the ratio to the peers needs it
    if args.tokens:
        spec["tokens"] = args.tokens
    if args.repeats:
        spec["repeats"] = args.repeats
    if args.budget:
        spec["budget"] = args.budget
    spec["compile_modes"] = [m.strip() for m in args.compile_modes.split(",") if m.strip()]
    spec["bandwidth_bytes"] = int(spec.pop("bandwidth_mib")) << 20
    spec["device"] = device
    spec["seed"] = 0
    return spec


def model_shapes(name: str) -> dict:
    from onebit.synth import synth_config

    c = synth_config(name)
    return dict(vocab=c.vocab_size, hidden=c.hidden_size, intermediate=c.intermediate_size,
                layers=c.num_hidden_layers, heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
                head_dim=c.head_dim, max_position=c.max_position_embeddings)


def detect_device(tiny: bool) -> tuple[str, str | None]:
    """("cuda" or "cpu", a note). Asks torch in a child, so this process never initialises CUDA."""
    code = "import torch; print(int(torch.cuda.is_available()), torch.cuda.device_count())"
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        ok, count = (int(v) for v in r.stdout.split())
    except Exception as e:
        return "cpu", f"could not ask torch for a GPU: {e}"
    if ok:
        note = None if count == 1 else f"{count} GPUs visible; every section uses GPU 0 (set CUDA_VISIBLE_DEVICES)"
        return "cuda", note
    if tiny:
        return "cpu", "no GPU: running on the CPU (--tiny)"
    return "cpu", "no GPU visible to torch"


def run_section(name: str, spec: dict, time_limit: float | None, isolate: bool, tmp: str) -> dict:
    spec = dict(spec, time_limit=time_limit)
    if not isolate:
        return run_child(name, spec, None)
    spec_path = os.path.join(tmp, f"{name}.spec.json")
    out_path = os.path.join(tmp, f"{name}.result.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--spec", spec_path]
    tail: collections.deque[str] = collections.deque(maxlen=25)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)

    def pump():
        for line in proc.stdout:
            tail.append(line.rstrip())
            sys.stderr.write(line)
        sys.stderr.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=None if time_limit is None else time_limit + 20)  # the child watches its own time too
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: it and its compile workers
        except ProcessLookupError:
            pass
        proc.wait()
    reader.join(timeout=10)
    res = {"section": name, "errors": [], "notes": []}
    if os.path.exists(out_path):
        with open(out_path) as f:
            res = json.load(f)
    if timed_out:
        res["errors"].append(f"stopped after {time_limit + 20:.0f} s (its share of the time budget) during: "
                             f"{res.get('stage', '?')}")
    elif proc.returncode != 0 or not res.get("finished"):
        res["errors"].append(f"child exited with status {proc.returncode} during {res.get('stage', '?')}: "
                             + " | ".join(tail)[-1500:])
    res["child_returncode"] = proc.returncode
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        with open(args.spec) as f:
            spec = json.load(f)
        res = run_child(args.child, spec, args.spec.replace(".spec.json", ".result.json"))
        return 0 if res.get("finished") else 1
    return run_parent(args, argv)


def run_parent(args, argv) -> int:
    t_start, started = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    sections = pick_sections(args.only)
    device, device_note = detect_device(args.tiny)
    if device != "cuda":
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # no compile on a CPU (transformers' BitNet ops too)
    if device != "cuda" and not args.tiny:
        print("bench_gpu.py: no GPU visible to torch; use --tiny to test the plumbing on a CPU", file=sys.stderr)
        return 2
    backend = args.backend or ("cuda" if device == "cuda" else "cpu")
    spec = build_spec(args, args.tiny, device)
    name = "tiny-random" if args.tiny else "bitnet-2b4t"
    spec.update(model_shapes(name), backend=backend)
    notes = [n for n in (device_note,) if n]
    report = {"kind": "gpu", "started": started, "command": command_line(argv), "argv": list(sys.argv),
              "settings": {k: v for k, v in spec.items() if k != "model"}, "sections_requested": sections,
              "versions": versions(), "machine": machine(), "notes": notes, "sections": {}}

    deadline = t_start + spec["budget"]
    try:
        made = synth_models(name, args.models, fresh=args.fresh, seed=0, log=_log)
    except Exception as e:
        report["sections"]["model"] = {"errors": [f"could not write the synthetic model: {e}"]}
        print(f"could not write the synthetic model: {e}", file=sys.stderr)
        return finish(report, args, t_start)
    spec["model"] = made["hf"]
    report["model"] = {"name": f"{name} shapes (synthetic, seed 0)", "path": made["hf"], "written": made["written"],
                       **model_shapes(name)}
    with tempfile.TemporaryDirectory(prefix="bench_gpu-") as tmp:
        for i, sec in enumerate(sections):
            cap, _ = TIMES[sec]
            later = sum(TIMES[s][1] for s in sections[i + 1:])
            left = deadline - time.perf_counter()
            limit = min(cap, left - later)
            if args.no_isolate:
                limit = None
            elif limit < 10:
                report["sections"][sec] = {"section": sec, "skipped": f"out of time budget ({spec['budget']:.0f} s; "
                                                                      "raise --budget)", "errors": [], "notes": []}
                _log(f"{sec}: skipped, out of time budget")
                continue
            _log(f"== {sec}" + (f" (up to {limit:.0f} s)" if limit else ""))
            report["sections"][sec] = run_section(sec, spec, limit, not args.no_isolate, tmp)
            _save_partial(report, args, t_start)
    return finish(report, args, t_start)


def finish(report: dict, args, t_start: float) -> int:
    report["seconds"] = time.perf_counter() - t_start
    report["summary"] = summarize(report, args.roofline)
    json_path, md_path = write_results(report, args.out, args.tiny)
    print(markdown(report))
    print(f"wrote {json_path} and {md_path}")
    return 0


def _save_partial(report: dict, args, t_start: float) -> None:
    """After each section, the JSON so far (a run stopped from outside keeps what it measured)."""
    try:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"gpu{'-tiny' if args.tiny else ''}-partial.json.tmp")
        with open(path, "w") as f:
            json.dump(dict(report, seconds=time.perf_counter() - t_start), f, indent=1, default=str)
    except OSError:
        pass


def command_line(argv) -> str:
    return ("python benchmarks/bench_gpu.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()


def versions() -> dict:
    import importlib.metadata as md
    import platform

    from onebit import __version__

    out = {"python": platform.python_version(), "onebit": __version__}
    for dist in ("torch", "triton", "transformers", "accelerate", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def machine() -> dict:
    from onebit.eval.bench import machine_info

    m = machine_info()
    return {k: m.get(k) for k in ("cpu", "cores", "usable_cores", "memory_bytes", "platform")}


# ---- the summary and the tables ---------------------------------------------------------------------------

def _sec(report: dict, name: str) -> dict:
    return report["sections"].get(name) or {}


def roofline_bandwidth(report: dict, basis: str) -> tuple[float | None, str]:
    """(GB/s, what it is): the best pass of the chosen measurement."""
    bw = _sec(report, "bandwidth")
    key, what = {"read": ("read", "read-only sum (bytes read)"),
                 "copy": ("copy", "copy_ counting read + write bytes"),
                 "copy-read": ("copy_read_side", "copy_ counting read bytes only")}[basis]
    d = bw.get(key)
    return (d["best_gb_s"], what) if d else (None, what)


def card_name(report: dict) -> str:
    names = []
    for res in report["sections"].values():
        n = (res.get("device") or {}).get("name")
        if n and n not in names:
            names.append(n)
    return " / ".join(names) if names else "unknown device"


def card_details(report: dict) -> str:
    for res in report["sections"].values():
        d = res.get("device") or {}
        if d.get("kind") == "cuda":
            return (f"{d.get('total_memory_bytes', 0) / 2**30:.0f} GiB, {d.get('sm_count')} SMs, compute capability "
                    f"{d.get('capability')}, CUDA {d.get('cuda')}")
    return ""


def summarize(report: dict, basis: str) -> dict:
    """Figures the tables print, with rooflines and ratios: computed once, stored in the JSON."""
    bw, bw_what = roofline_bandwidth(report, basis)
    s = report["settings"]
    out = {"card": card_name(report), "card_details": card_details(report), "roofline_basis": basis, "roofline_bandwidth_what": bw_what,
           "roofline_gb_s": bw, "engines": [], "ratios": [], "batched": [], "splitkv": None}
    for head in ("f16", "int8"):
        res = _sec(report, f"ours-{head}")
        if not res:
            continue
        bpt = BytesPerToken(**{k: res["bytes_per_token"][k] for k in ("ternary", "lm_head", "kv_per_position")}) \
            if res.get("bytes_per_token") else None
        row = {"engine": f"1bit {s['backend']}", "lm_head": head, "section": f"ours-{head}", "decode": {},
               "memory": res.get("memory"), "load_seconds": res.get("load_seconds"),
               "errors": res.get("errors", []), "skipped": res.get("skipped")}
        for ctx in s["ctx"]:
            d = res.get(f"decode@{ctx}")
            if d:
                row["decode"][ctx] = _with_roofline(d, bw)
        p = res.get(f"prefill@{s['prefill']}")
        row["prefill"] = p["median_tok_s"] if p else None
        for how in ("step", "logits"):
            d = res.get(f"{how}_decode@{s['peer_ctx']}")
            row[f"{how}_decode"] = _with_roofline(d, bw) if d else None
        row["bytes_per_token"] = {"weights": bpt.ternary, "lm_head": bpt.lm_head,
                                  "kv_per_position": bpt.kv_per_position} if bpt else None
        out["engines"].append(row)
        for bsz in s.get("batches") or ():
            d = res.get(f"batch{bsz}@{s['batch_ctx']}")
            if d:
                roof = roofline_tok_s(bw, d["bytes_per_step"]) * bsz if bw else None
                out["batched"].append({"lm_head": head, "batch": bsz, "context": s["batch_ctx"],
                                       "aggregate_tok_s": d["median_tok_s"], "per_sequence_tok_s":
                                       d["per_sequence_tok_s"], "roofline_tok_s": roof,
                                       "of_roofline": d["median_tok_s"] / roof if roof else None})
    peers = [("hf-bitnet", "HF BitNetForCausalLM"), ("dense", "dense bf16 LlamaForCausalLM")]
    for sec_name, label in peers:
        res = _sec(report, sec_name)
        if not res:
            continue
        bpt = res.get("bytes_per_token")
        for kind in ("eager", "compiled"):
            d = res.get(f"{kind}_decode@{s['peer_ctx']}")
            if not d and kind == "compiled" and not res.get("compile_attempts"):
                continue
            attempts = res.get("compile_attempts", []) if kind == "compiled" else []
            failed = [a["mode"] for a in attempts if a.get("error")]
            if d:
                how = d["how"] + (f" (fell back: {', '.join(failed)} failed)" if failed else "")
            else:
                how = "StaticCache + torch.compile did not run: " + "; ".join(
                    f"{a['mode']}: {str(a.get('error') or a.get('skipped'))[:120]}" for a in attempts)
            if d and bpt:
                d = dict(d, bytes_per_token=bpt["weights"] + bpt["kv_per_position"] * d["mean_context"])
            extra = f", {res['linear_class']}" if res.get("linear_class") else ""
            row = {"engine": f"{label} (bf16{extra})", "how": how, "section": sec_name, "lm_head": "bf16",
                   "decode": {s["peer_ctx"]: _with_roofline(d, bw)} if d else {}, "prefill": None,
                   "memory": res.get("memory"), "load_seconds": res.get("load_seconds"),
                   "errors": res.get("errors", []) if kind == "eager" else [], "skipped": res.get("skipped"),
                   "bytes_per_token": {k: bpt[k] for k in ("weights", "lm_head", "kv_per_position")} if bpt else None}
            out["engines"].append(row)
    ours = next((e for e in out["engines"] if e["section"] == "ours-int8"), None)
    ours_d = (ours or {}).get("decode", {}).get(s["peer_ctx"])
    for e in out["engines"]:
        if e["section"].startswith("ours") or not e["decode"]:
            continue
        theirs = e["decode"][s["peer_ctx"]]["median_tok_s"]
        out["ratios"].append({"versus": f"{e['engine']}, {e['how']}", "context": s["peer_ctx"],
                              "ours_tok_s": ours_d["median_tok_s"] if ours_d else None, "theirs_tok_s": theirs,
                              "ratio": ours_d["median_tok_s"] / theirs if ours_d and theirs else None})
    sk = _sec(report, "splitkv")
    if sk:
        out["splitkv"] = {k: sk.get(k) for k in ("speedup", "speedup_kernel", "speedup_graph", "speedup_loop",
                                                 "one_block", "split_auto", "context", "skipped",
                                                 "max_abs_err_vs_reference", "max_abs_diff_split_vs_one_block")}
    return out


def _with_roofline(d: dict, bw: float | None) -> dict:
    d = dict(d)
    if bw and d.get("bytes_per_token"):
        d["roofline_tok_s"] = roofline_tok_s(bw, d["bytes_per_token"])
        d["of_roofline"] = d["median_tok_s"] / d["roofline_tok_s"]
        d["effective_gb_s"] = d["median_tok_s"] * d["bytes_per_token"] / 1e9
    return d


def _num(x) -> str:
    if x is None:
        return "—"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def _bytes(n) -> str:
    if n is None:
        return "—"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= 0.1 * scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _mem(m) -> str:
    if not m:
        return "—"
    if "max_allocated_bytes" in m:
        return f"{m['max_allocated_bytes'] / 1e9:.2f} GB"
    if m.get("peak_rss_bytes"):
        return f"{m['peak_rss_bytes'] / 1e9:.2f} GB"
    return "—"


def _cell(text: str) -> str:
    return " ".join(str(text).replace("|", "/").split())


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(_cell(c) for c in r) + " |" for r in rows)]


def markdown(report: dict) -> str:
    sm, s = report["summary"], report["settings"]
    card, v = sm["card"], report["versions"]
    model = (report.get("model") or {}).get("name", "model")
    bw, what = sm["roofline_gb_s"], sm["roofline_bandwidth_what"]
    details = f" ({sm['card_details']})" if sm.get("card_details") else ""
    lines = [f"**{model}** on **{card}**{details}; torch {v.get('torch')}, triton {v.get('triton')}, transformers "
             f"{v.get('transformers')}. Decode: greedy, {s['tokens']} steps timed after the context is filled, "
             f"each step's argmax picked on the device and brought to the host (ours: `greedy_decode`, as "
             f"`generate` runs it, one step queued ahead of the host; the peers: argmax of their logits, the host "
             f"waiting for each token); medians of {s['repeats']} runs after a warm-up. Roofline = "
             f"{_num(bw) + ' GB/s' if bw else 'not measured'} ({what}, best pass) / bytes per token.", ""]
    # bandwidth
    b = _sec(report, "bandwidth")
    if b.get("copy"):
        lines += [f"Memory bandwidth on {card}, {b['buffer_bytes'] / 2**30:.2f} GiB buffer:", ""]
        rows = [[b[k]["what"], _num(b[k]["gb_s"]), _num(b[k]["best_gb_s"]),
                 "yes" if roofline_key(sm) == k else ""]
                for k in ("copy", "copy_read_side", "read")]
        lines += _table(["measurement", "GB/s (median)", "GB/s (best)", "roofline basis"], rows) + [""]
    # batch-1 decode
    ctxs = sorted(set(s["ctx"]) | {s["peer_ctx"]})
    head = ["engine", "lm_head"]
    for c in ctxs:
        head += [f"decode@{c} tok/s", "of roofline"]
    head += [f"prefill {s['prefill']} tok/s",
             "peak GPU memory (torch max allocated)" if s["device"] == "cuda" else "peak RSS"]
    rows = []
    for e in sm["engines"]:
        label = e["engine"] + (f", {e['how']}" if e.get("how") else "")
        row = [label, e["lm_head"]]
        for c in ctxs:
            d = e["decode"].get(c) or e["decode"].get(str(c))
            row += [_num(d["median_tok_s"]) if d else "—", _pct(d.get("of_roofline")) if d else "—"]
        row += [_num(e.get("prefill")), _mem(e.get("memory"))]
        rows.append(row)
    if rows:
        lines += [f"Batch-1 decode and prefill on {card}:", ""] + _table(head, rows) + [""]
    for e in sm["engines"]:
        for how, with_ in (("step", "the host waiting for each token before it queues the next step "
                                    "(`decode_greedy` per token, as the dense baselines run)"),
                           ("logits", "each step's logits brought to the host (`forward_batch`: what a sampler "
                                      "with a temperature needs)")):
            d = e.get(f"{how}_decode")
            if d:
                lines += [f"{e['engine']}, {e['lm_head']} head, with {with_}: decode@{s['peer_ctx']} "
                          f"{_num(d['median_tok_s'])} tok/s ({_pct(d.get('of_roofline'))} of the roofline).", ""]
    if sm["ratios"]:
        lines += [f"Our int8-head decode@{s['peer_ctx']} against each peer, same run, {card}:", ""]
        lines += _table(["versus", "ours tok/s", "theirs tok/s", "ours / theirs"],
                        [[r["versus"], _num(r["ours_tok_s"]), _num(r["theirs_tok_s"]),
                          "—" if r["ratio"] is None else f"{r['ratio']:.2f}x"] for r in sm["ratios"]]) + [""]
    if sm["batched"]:
        lines += [f"Batched decode on {card}, each sequence its own cache of {s['batch_ctx']} tokens:", ""]
        lines += _table(["lm_head", "batch", "aggregate tok/s", "per sequence tok/s", "of roofline"],
                        [[r["lm_head"], str(r["batch"]), _num(r["aggregate_tok_s"]), _num(r["per_sequence_tok_s"]),
                          _pct(r["of_roofline"])] for r in sm["batched"]]) + [""]
    # bytes per token
    brows, seen = [], set()
    for e in sm["engines"]:
        bpt = e.get("bytes_per_token")
        key = (e["engine"], e["lm_head"])
        if not bpt or key in seen:
            continue
        seen.add(key)
        bt = BytesPerToken(bpt["weights"], bpt["lm_head"], bpt["kv_per_position"])
        row = [e["engine"], e["lm_head"], _bytes(bt.ternary), _bytes(bt.lm_head) if bt.lm_head else "(in weights)",
               _bytes(bt.kv_per_position)]
        for c in ctxs:
            total = bt.at(decode_context(c, s["tokens"]))
            row += [_bytes(total), _num(roofline_tok_s(bw, total)) if bw else "—"]
        brows.append(row)
    if brows:
        head = ["engine", "lm_head", "weights", "lm_head bytes", "KV per position"]
        for c in ctxs:
            head += [f"bytes/token @{c}", f"roofline @{c} tok/s"]
        lines += [f"Bytes read per decode token and the roofline on {card} ({_num(bw)} GB/s, {what}):", ""]
        lines += _table(head, brows) + [""]
    sk = sm.get("splitkv")
    if sk and not sk.get("skipped") and (sk.get("one_block") or sk.get("split_auto")):
        res = _sec(report, "splitkv")
        lines += [f"Split-KV decode attention on {card}: B=1, {res.get('q_heads')} q heads / {res.get('kv_heads')} "
                  f"kv heads, head_dim {res.get('head_dim')}, {sk['context']} tokens of context, "
                  f"{res.get('layers')} distinct caches (one per layer):", ""]
        rows = []

        def us(r, f):
            return "—" if r.get(f) is None else f"{r[f]:.2f}"

        for key, label in (("one_block", "num_splits=1 (one block per sequence, kv head)"),
                           ("split_auto", "num_splits=None (automatic split-KV)")):
            r = sk.get(key)
            if r:
                rows.append([label, us(r, "us_per_call"), _num(r["kv_gb_s"]), r["method"],
                             us(r, "kernel_us_per_call"), us(r, "graph_us_per_call"), us(r, "loop_us_per_call")])
        lines += _table(["kernel", "µs per call", "KV GB/s", "timed as", "µs: kernels only (profiler)",
                         "µs: CUDA graph", "µs: launch loop"], rows)
        if sk.get("speedup"):
            others = ", ".join(f"{what} {sk[k]:.2f}x" for k, what in (("speedup_kernel", "kernels only"),
                                                                      ("speedup_graph", "CUDA graph"),
                                                                      ("speedup_loop", "launch loop"))
                               if sk.get(k))
            errs = ", ".join(f"{k} {v:.2g}" for k, v in (sk.get("max_abs_err_vs_reference") or {}).items())
            lines += ["", f"Split-KV speedup over one block per head: **{sk['speedup']:.2f}x** ({others}); "
                          f"max |error| against a float32 reference: {errs or '—'}."]
        lines += [""]
    # errors, skips, notes
    problems = []
    for name, res in report["sections"].items():
        if res.get("skipped"):
            problems.append(f"- {name}: skipped: {res['skipped']}")
        for err in res.get("errors", []):
            problems.append(f"- {name}: {err}")
        for note in res.get("notes", []):
            problems.append(f"- {name}: {note}")
    problems += [f"- {n}" for n in report.get("notes", [])]
    if problems:
        lines += ["Errors, skips and notes:", "", *problems, ""]
    return "\n".join(lines)


def roofline_key(sm: dict) -> str:
    return {"read": "read", "copy": "copy", "copy-read": "copy_read_side"}[sm["roofline_basis"]]


def write_results(report: dict, out_dir: str, tiny: bool) -> tuple[str, str]:
    """gpu-<date>.json (a second run the same day gets the time appended) and gpu-latest.md; --tiny writes
    gpu-tiny-* so a plumbing test never replaces real results."""
    os.makedirs(out_dir, exist_ok=True)
    stem = "gpu-tiny" if tiny else "gpu"
    day = time.strftime("%Y-%m-%d")
    json_path = os.path.join(out_dir, f"{stem}-{day}.json")
    if os.path.exists(json_path):
        json_path = os.path.join(out_dir, f"{stem}-{day}-{time.strftime('%H%M%S')}.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1, default=str)
    md_path = os.path.join(out_dir, f"{stem}-latest.md")
    rel = os.path.relpath(json_path, ROOT)
    with open(md_path, "w") as f:
        f.write(f"# GPU benchmark, {report['started']}\n\n`{report['command']}` ({report['seconds'] / 60:.1f} min; "
                f"every run in `{rel}`)\n\n{markdown(report)}")
    partial = os.path.join(out_dir, f"{stem}-partial.json.tmp")
    if os.path.exists(partial):
        os.remove(partial)
    return json_path, md_path


if __name__ == "__main__":
    sys.exit(main())
