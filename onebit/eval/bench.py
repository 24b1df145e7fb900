"""Speed benchmarks: decode and prefill tok/s, ternary GEMV GB/s and peak RSS, against the roofline and peers.

Every engine configuration runs in its own worker process (so its peak RSS is its own). The parent sends the
same operation to each worker in turn (ours, peer, ours, ...), all fed the same token ids, and keeps every
individual run; figures are medians. Nothing here asserts a speed: tests only check the harness.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import OneBitError


class BenchError(OneBitError):
    """A benchmark could not run (a worker failed, a model is missing, a peer is not installed)."""


# ---- bytes per decode token and the roofline -------------------------------------------------------------

@dataclass
class BytesPerToken:
    """What one decode step reads: the ternary linears, the lm_head, and the KV cache per position attended."""

    ternary: int
    lm_head: int
    kv_per_position: float

    def at(self, context: float) -> float:
        return self.ternary + self.lm_head + self.kv_per_position * context


def decode_context(ctx: int, tokens: int) -> float:
    """Mean positions attended over while timing ``tokens`` decode steps after ``ctx`` cached ones
    (step i reads ctx + i + 1 positions, its own included)."""
    return ctx + (tokens + 1) / 2


def roofline_tok_s(bandwidth_gb_s: float, bytes_per_token: float) -> float:
    """The decode speed no engine can beat: every byte a token needs, read once at the machine's bandwidth."""
    return bandwidth_gb_s * 1e9 / bytes_per_token


def lm_head_bytes(rows: int, cols: int, lm_head: str) -> int:
    """f16: 2 bytes per element; int8: 1 byte per element plus a float32 scale per row."""
    if lm_head == "int8":
        return rows * cols + 4 * rows
    return 2 * rows * cols


def ternary_linears(net) -> list:
    """Every ``TernaryLinear`` of a model's layers, in layer order."""
    from ..models.base import TernaryLinear

    found, seen, todo = [], set(), list(net.layers)
    while todo:
        obj = todo.pop(0)
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        for v in vars(obj).values():
            if isinstance(v, TernaryLinear):
                found.append(v)
            elif hasattr(v, "__dict__") and type(v).__module__.startswith("onebit.models"):
                todo.append(v)
    return found


def model_bytes_per_token(net, cache, lm_head: str) -> BytesPerToken:
    """From the model's own tensors: ternary elements at 2 bits, the lm_head at ``lm_head`` precision, and the
    backend's KV cache bytes per position (``cache.nbytes() / cache.max_len``)."""
    n = sum(lin.in_features * lin.out_features for lin in ternary_linears(net))
    rows, cols = net.lm_head.shape
    return BytesPerToken(n * 2 // 8, lm_head_bytes(rows, cols, lm_head), cache.nbytes() / cache.max_len)


# ---- the machine's read bandwidth ------------------------------------------------------------------------

_MEMBW_C = r"""
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>
typedef uint64_t v4 __attribute__((vector_size(32)));
typedef struct { const v4 *p; size_t n; int streams; uint64_t sum; } job;

/* Sums n 32-byte vectors as `streams` equal slices read side by side, 256 bytes of each in turn: several streams
 * per core keep more reads in flight than one (the hardware prefetcher follows each). */
static void *sum_job(void *arg) {
    job *j = arg;
    v4 acc[8] = {{0}};
    size_t per = j->n / (size_t)j->streams / 8 * 8;
    for (size_t i = 0; i < per; i += 8)
        for (int s = 0; s < j->streams; s++) {
            const v4 *q = j->p + (size_t)s * per + i;
            acc[s] += ((q[0] + q[1]) + (q[2] + q[3])) + ((q[4] + q[5]) + (q[6] + q[7]));
        }
    v4 t = {0};
    for (int s = 0; s < 8; s++) t += acc[s];
    j->sum = t[0] + t[1] + t[2] + t[3];
    return NULL;
}

/* Seconds for `threads` threads to sum their slices of n 32-byte vectors (buf 32-byte aligned), each thread
 * reading its slice as `streams` (1-8) streams. Reads per thread: n / threads / streams / 8 * 8 * streams. */
double read_seconds(const void *buf, size_t n, int threads, int streams, uint64_t *sink) {
    pthread_t tid[256];
    job jobs[256];
    struct timespec t0, t1;
    size_t per = n / (size_t)threads;
    uint64_t s = 0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int t = 0; t < threads; t++) {
        jobs[t] = (job){(const v4 *)buf + (size_t)t * per, per, streams, 0};
        pthread_create(&tid[t], NULL, sum_job, &jobs[t]);
    }
    for (int t = 0; t < threads; t++) { pthread_join(tid[t], NULL); s += jobs[t].sum; }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    *sink += s;
    return (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
}
"""

# Streams per thread the probe reads with: one, and several side by side (on the Xeon VM the benchmarks ran on,
# 4 streams per thread read 5-10% faster than one at 2 threads; the ternary GEMV reads 2 per thread).
BANDWIDTH_STREAMS = (1, 4)


@dataclass
class Bandwidth:
    """Read bandwidth: ``threads`` threads summing disjoint slices of one ``bytes``-long buffer."""

    threads: int
    gb_s: float  # median of the runs, 1e9 bytes per second
    best: float  # the fastest run: the ceiling (other processes only ever slow a run down)
    runs: list[float]
    bytes: int
    method: str  # "c" (compiled at run time with the system cc) or "numpy" (no compiler found)
    when: str = ""  # "start", or after which thread group it was re-measured
    by_streams: dict[int, float] = field(default_factory=dict)  # C helper: best GB/s per streams per thread


def read_bandwidth(threads: int, size: int = 1 << 30, repeats: int = 7) -> Bandwidth:
    """Measure read bandwidth with a large read-only sum (one untimed warm-up pass). With the C helper each run
    is the faster of two passes, one reading a stream per thread and one ``BANDWIDTH_STREAMS[-1]`` per thread,
    taken in turn; ``by_streams`` keeps each pattern's best."""
    threads = max(1, min(int(threads), 256))
    raw = np.ones(size + 64, dtype=np.uint8)  # ones: every page is touched before timing
    off = (-raw.ctypes.data) % 64
    buf = raw[off:off + size]
    lib = _membw_lib()
    by_streams: dict[int, float] = {}
    if lib is not None:
        n = size // 32
        sink = ctypes.c_uint64(0)
        ptr = ctypes.c_void_p(buf.ctypes.data)
        runs = []
        for i in range(repeats + 1):
            best = 0.0
            for st in BANDWIDTH_STREAMS:
                nbytes = (n // threads) // st // 8 * 8 * st * threads * 32
                gb_s = nbytes / lib.read_seconds(ptr, n, threads, st, ctypes.byref(sink)) / 1e9
                if i:  # (the first round is the warm-up)
                    by_streams[st] = max(by_streams.get(st, 0.0), gb_s)
                best = max(best, gb_s)
            if i:
                runs.append(best)
        nbytes, method = (n // threads) * threads * 32, "c"
    else:
        nbytes, method = size // 8 * 8, "numpy"
        runs = [nbytes / t / 1e9 for t in _numpy_read_times(buf, threads, repeats)]
    return Bandwidth(threads, statistics.median(runs), max(runs), runs, nbytes, method, by_streams=by_streams)


def _numpy_read_times(buf: np.ndarray, threads: int, repeats: int) -> list[float]:
    from concurrent.futures import ThreadPoolExecutor

    chunks = np.array_split(buf[: buf.size // 8 * 8].view(np.uint64), threads)
    times = []
    with ThreadPoolExecutor(threads) as ex:
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            list(ex.map(np.add.reduce, chunks))  # NumPy releases the GIL inside the reduction
            times.append(time.perf_counter() - t0)
    return times[1:]


@functools.lru_cache(maxsize=1)
def _membw_lib():
    """The bandwidth helper as a shared library, compiled once per machine into the cache; None without cc."""
    tag = hashlib.sha256((_MEMBW_C + platform.machine() + cpu_model()).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir(), "bench", f"membw-{tag}.so")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if not cc:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            src, out = os.path.join(tmp, "membw.c"), os.path.join(tmp, "membw.so")
            with open(src, "w") as f:
                f.write(_MEMBW_C)
            for arch in (["-march=native"], []):
                r = subprocess.run([cc, "-O3", *arch, "-shared", "-fPIC", "-pthread", src, "-o", out],
                                   capture_output=True)
                if r.returncode == 0:
                    break
            else:
                return None
            shutil.move(out, path)
    lib = ctypes.CDLL(path)
    lib.read_seconds.restype = ctypes.c_double
    lib.read_seconds.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                 ctypes.POINTER(ctypes.c_uint64)]
    return lib


# ---- models: the synthetic reference workload and GGUF inspection -----------------------------------------

def cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "onebit")


def synth_models(name: str = "bitnet-2b4t", folder: str | None = None, gguf: bool = False, seed: int = 0,
                 fresh: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Write the synthetic model (once; ``fresh`` rewrites) with ``1bit synth``: HF packed, and with ``gguf``
    also a llama-arch TQ2_0 GGUF with an F16 embedding for llama.cpp.
    -> {"name", "seed", "hf", "gguf" (or None), "written": paths written by this call}."""
    log = log or (lambda s: None)
    folder = folder or os.path.join(cache_dir(), "synth")
    os.makedirs(folder, exist_ok=True)
    stem = name if seed == 0 else f"{name}-seed{seed}"
    hf, gg = os.path.join(folder, stem), os.path.join(folder, f"{stem}-llama-tq2_0.gguf")
    written = []
    if fresh or not os.path.isdir(hf):
        log(f"writing {name} (HF packed) to {hf}")
        _synth(name, hf, seed, [])
        written.append(hf)
    if gguf and (fresh or not os.path.isfile(gg)):
        log(f"writing {name} (llama arch, TQ2_0, F16 embedding) to {gg}")
        _synth(name, gg, seed, ["--arch", "llama", "--type", "tq2_0"])
        written.append(gg)
    return {"name": name, "seed": seed, "hf": hf, "gguf": gg if gguf else None, "written": written}


def _synth(name: str, out: str, seed: int, extra: list[str]) -> None:
    """Run ``1bit synth`` in a child (it peaks at several GB) into a temporary name, then move it in place."""
    tmp = out[:-5] + ".partial.gguf" if out.endswith(".gguf") else out + ".partial"
    _remove(tmp)
    cmd = [sys.executable, "-m", "onebit.cli", "synth", name, tmp, "--seed", str(seed), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    if r.returncode != 0 and "--arch" in extra:
        # `1bit synth --arch llama` keeps relu2 on some versions; write the SwiGLU llama model directly
        code = "import sys; from onebit.eval.bench import write_llama_gguf as w; w(*sys.argv[1:])"
        r = subprocess.run([sys.executable, "-c", code, name, tmp, str(seed)], capture_output=True, text=True,
                           env=child_env())
    if r.returncode != 0:
        raise BenchError(f"could not write {out}: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    _remove(out)
    os.replace(tmp, out)


def write_llama_gguf(name: str, out: str, seed: int = 0) -> None:
    """The synthetic model as a SwiGLU llama-arch TQ2_0 GGUF (what llama.cpp runs as-is)."""
    from ..synth import random_weights, synth_config
    from ..tokenizer import byte_level_tokenizer
    from ..weights.gguf import save_gguf_model

    cfg = synth_config(name, arch="llama", hidden_act="silu", act_bits=None)
    tok = byte_level_tokenizer()
    meta = tok.to_gguf_metadata(vocab_size=cfg.vocab_size)
    save_gguf_model(out, cfg, random_weights(cfg, seed=int(seed)), meta, "tq2_0")


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


_LINEAR = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")


@functools.lru_cache(maxsize=8)
def inspect_gguf(path: str) -> dict:
    """Tensor types and the sizes a decode step reads, from the GGUF itself (llama.cpp keeps KV in f16)."""
    import gguf

    r = gguf.GGUFReader(path)
    arch = str(r.fields["general.architecture"].contents())

    def meta(key, default=None):
        f = r.fields.get(f"{arch}.{key}")
        return f.contents() if f is not None else default

    tensors = {t.name: t for t in r.tensors}
    linears = [t for name, t in tensors.items() if _LINEAR.search(name)]
    head = tensors.get("output.weight") or tensors["token_embd.weight"]
    n_head, n_kv = int(meta("attention.head_count")), int(meta("attention.head_count_kv"))
    k_len = int(meta("attention.key_length", int(meta("embedding_length")) // n_head))
    v_len = int(meta("attention.value_length", k_len))
    return {
        "path": path, "arch": arch, "layers": int(meta("block_count")), "kv_heads": n_kv,
        "linear_types": sorted({t.tensor_type.name for t in linears}), "linears": len(linears),
        "token_embd_type": tensors["token_embd.weight"].tensor_type.name,
        "output_type": tensors["output.weight"].tensor_type.name if "output.weight" in tensors else None,
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
        "linear_bytes": int(sum(t.n_bytes for t in linears)), "lm_head_bytes": int(head.n_bytes),
        "kv_bytes_per_position": int(meta("block_count")) * n_kv * (k_len + v_len) * 2,
    }


def gguf_bytes_per_token(g: dict) -> BytesPerToken:
    return BytesPerToken(g["linear_bytes"], g["lm_head_bytes"], g["kv_bytes_per_position"])


def check_tq2_gguf(g: dict) -> None:
    """The peer's file must be what the comparison claims: TQ2_0 linears and an F16 embedding (tied or F16 head)."""
    if g["linear_types"] != ["TQ2_0"] or not g["linears"]:
        raise BenchError(f"{g['path']}: linears are {g['linear_types']}, expected TQ2_0")
    if g["token_embd_type"] != "F16" or g["output_type"] not in (None, "F16"):
        raise BenchError(f"{g['path']}: token_embd {g['token_embd_type']}, output {g['output_type']}; expected F16")


# ---- timing, and what else the machine was doing meanwhile ----------------------------------------------

def machine_cpu_seconds() -> tuple[float, float] | None:
    """(busy, stolen) CPU seconds of the whole machine since boot, from /proc/stat (None elsewhere)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = v + [0] * (8 - len(v))
    return (user + nice + system + irq + softirq) / hz, steal / hz


class Stopwatch:
    """Wall time of a block, plus the share of the machine's CPU that OTHER processes used meanwhile
    (machine busy time minus this process's own CPU time, over wall x cores) and the hypervisor's steal."""

    def __enter__(self):
        self._m, self._own, self._t = machine_cpu_seconds(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t
        own, m = time.process_time() - self._own, machine_cpu_seconds()
        self.others_cpu = self.steal = None
        if m is not None and self._m is not None:
            cap = self.seconds * (os.cpu_count() or 1)
            self.others_cpu = max(0.0, m[0] - self._m[0] - own) / cap
            self.steal = (m[1] - self._m[1]) / cap

    def result(self, **extra) -> dict:
        return {"seconds": self.seconds, "others_cpu": self.others_cpu, "steal": self.steal, **extra}


# ---- engines (run inside a worker process) ---------------------------------------------------------------

class OnebitEngine:
    """Ours: ``onebit.load`` on a backend, one KV cache; prefill in chunks of 512 as ``generate_step`` does."""

    name = "onebit"

    def __init__(self, path: str, threads: int, max_len: int, lm_head: str = "f16", backend: str = "auto",
                 kv_dtype: str = "auto"):
        import onebit

        t0 = time.perf_counter()
        self.model = onebit.load(path, backend=backend, threads=threads, lm_head=lm_head, tokenizer=False,
                                 kv_dtype=kv_dtype)
        self.load_seconds = time.perf_counter() - t0
        self.net, self.lm_head = self.model.net, lm_head
        self.cache = self.net.make_cache(max_len)
        self.ids: list[int] = []
        self.valid = 0  # the cache holds the K/V of ids[:valid]

    def info(self) -> dict:
        be, head = self.model.backend, self.net.lm_head
        k = getattr(self.cache, "k", None)
        return {"engine": self.name, "backend": be.name, "isa": getattr(be, "isa", None),
                "backend_threads": getattr(be, "threads", None), "lm_head": self.lm_head,
                "lm_head_storage": getattr(head, "dtype_name", str(getattr(head, "dtype", "?"))),
                "kv_dtype": str(k.dtype) if k is not None else None, "vocab_size": self.model.config.vocab_size,
                "load_seconds": self.load_seconds,
                "bytes_per_token": asdict(model_bytes_per_token(self.net, self.cache, self.lm_head))}

    def set_ids(self, ids: list[int]) -> None:
        self.ids, self.valid = list(ids), 0

    def _forward(self, ids: list[int]) -> None:
        for i in range(0, len(ids), 512):
            self.net.forward_batch([(ids[i:i + 512], self.cache)], last_only=True)

    def _extend(self, n: int) -> float:
        """Untimed: make the cache hold exactly ids[:n] (extending what it holds). -> seconds spent."""
        t0 = time.perf_counter()
        if self.valid < n:
            self.cache.trim(self.valid)
            self._forward(self.ids[self.valid:n])
        self.cache.trim(n)
        self.valid = n
        return time.perf_counter() - t0

    def prefill(self, n: int) -> dict:
        self.cache.trim(0)
        with Stopwatch() as sw:
            self._forward(self.ids[:n])
        self.valid = n
        return sw.result(tokens=n)

    def decode(self, ctx: int, n: int) -> dict:
        fill = self._extend(ctx)
        with Stopwatch() as sw:
            for t in self.ids[ctx:ctx + n]:
                self.net.forward_batch([([t], self.cache)], last_only=True)
        self.valid = ctx + n
        return sw.result(tokens=n, fill_seconds=fill)

    def gemv(self) -> dict:
        """One token through every ternary linear (T=1), nothing else: the GEMV's effective bandwidth."""
        lins = ternary_linears(self.net)
        rng = np.random.default_rng(0)
        xs = {lin.in_features: rng.standard_normal((1, lin.in_features), dtype=np.float32) for lin in lins}
        with Stopwatch() as sw:
            for lin in lins:
                y = lin(xs[lin.in_features])
            self.model.backend.to_numpy(y)  # waits for asynchronous backends
        return sw.result(tokens=1, bytes=sum(lin.in_features * lin.out_features for lin in lins) // 4)


class LlamaCppEngine:
    """llama.cpp through llama-cpp-python's low-level ``Llama.eval``: its KV cache holds ``n_tokens`` positions
    (``eval`` first drops everything after them), so rewinding is setting ``n_tokens``."""

    name = "llama.cpp"

    def __init__(self, path: str, threads: int, max_len: int, n_batch: int = 512, **_):
        import llama_cpp

        t0 = time.perf_counter()
        self.llm = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=max_len,
                                   n_batch=n_batch, verbose=False)
        self.load_seconds = time.perf_counter() - t0
        self.threads, self.n_batch = threads, n_batch
        self.ids: list[int] = []
        self.valid = 0

    def info(self) -> dict:
        import llama_cpp

        return {"engine": self.name, "version": llama_cpp.__version__, "threads": self.threads,
                "n_batch": self.n_batch, "n_ctx": self.llm.n_ctx(), "vocab_size": self.llm.n_vocab(),
                "system_info": llama_cpp.llama_print_system_info().decode().strip(), "lm_head": "f16",
                "load_seconds": self.load_seconds}

    def set_ids(self, ids: list[int]) -> None:
        self.ids, self.valid = list(ids), 0
        self.llm.reset()

    def _extend(self, n: int) -> float:
        t0 = time.perf_counter()
        if self.valid < n:
            self.llm.n_tokens = self.valid
            self.llm.eval(self.ids[self.valid:n])
        self.llm.n_tokens = self.valid = n
        return time.perf_counter() - t0

    def prefill(self, n: int) -> dict:
        self.llm.reset()
        with Stopwatch() as sw:
            self.llm.eval(self.ids[:n])
        self.valid = n
        return sw.result(tokens=n)

    def decode(self, ctx: int, n: int) -> dict:
        fill = self._extend(ctx)
        with Stopwatch() as sw:
            for t in self.ids[ctx:ctx + n]:
                self.llm.eval([t])
        self.valid = ctx + n
        return sw.result(tokens=n, fill_seconds=fill)

    def gemv(self) -> None:
        return None  # not measurable from outside llama.cpp


ENGINES = {"onebit": OnebitEngine, "llama.cpp": LlamaCppEngine}


def memory_usage() -> dict:
    """Peak (``ru_maxrss``) and current resident memory of this process, in bytes."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak *= 1 if sys.platform == "darwin" else 1024
    current = None
    try:
        with open("/proc/self/status") as f:
            current = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        pass
    return {"peak_rss_bytes": peak, "rss_bytes": current}


# ---- the worker protocol ---------------------------------------------------------------------------------

def serve() -> None:
    """A worker's main loop: one JSON request per line on stdin, one JSON reply per line on the original stdout.
    Whatever else reaches stdout (C libraries' logs) is sent to stderr."""
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    engine = None
    while line := sys.stdin.readline():
        req = json.loads(line)
        op = req.pop("op")
        if op == "quit":
            break
        try:
            if op == "load":
                engine = ENGINES[req.pop("engine")](**req)
                result = engine.info()
            elif op == "memory":
                result = memory_usage()
            else:
                result = getattr(engine, op)(**req)
            out = {"ok": True, "result": result}
        except Exception as e:  # reported to the parent, which decides
            out = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        reply.write(json.dumps(out) + "\n")


def child_env(threads: int | None = None) -> dict:
    """The environment for child processes: this onebit importable, and BLAS/OpenMP pools sized to ``threads``."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    if threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    return env


class Worker:
    """A child process running ``serve()``. ``call(op, **args)`` returns the result or raises ``BenchError``."""

    def __init__(self, threads: int | None = None):
        code = "from onebit.eval.bench import serve; serve()"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=child_env(threads))

    def call(self, op: str, **args) -> Any:
        try:
            self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        line = self.proc.stdout.readline()
        if not line:
            raise BenchError(f"the worker died during {op!r} (exit status {self.proc.wait()})")
        out = json.loads(line)
        if not out["ok"]:
            raise BenchError(f"{op} failed in the worker: {out['error']}")
        return out["result"]

    def close(self) -> None:
        try:
            self.proc.stdin.write('{"op": "quit"}\n')
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


# ---- the suite: which configurations, which operations, in which order -----------------------------------

@dataclass
class EngineSpec:
    """One configuration: an engine on a model file at a thread count (lm_head and backend: ours only)."""

    engine: str  # "onebit" or "llama.cpp"
    path: str
    threads: int
    lm_head: str = "f16"
    backend: str = "auto"
    kv_dtype: str = "auto"

    @property
    def label(self) -> str:
        return f"onebit {self.backend}" if self.engine == "onebit" else self.engine

    def load_args(self, max_len: int) -> dict:
        args = {"engine": self.engine, "path": self.path, "threads": self.threads, "max_len": max_len}
        ours = {"lm_head": self.lm_head, "backend": self.backend, "kv_dtype": self.kv_dtype}
        return args | (ours if self.engine == "onebit" else {})


@dataclass
class Plan:
    """What to time, ``repeats`` runs each: decode of ``tokens`` steps after each context, prefill of each
    length, and one token through every ternary linear (the GEMV sweep)."""

    ctx: tuple[int, ...] = (64, 1024)
    prefill: tuple[int, ...] = (128, 512)
    tokens: int = 32
    repeats: int = 3
    gemv: bool = True
    seed: int = 0

    def schedule(self) -> list[tuple[str, int]]:
        """Prefills shortest first, then decodes from the longest context down: each step starts from the
        cache the previous one left (a decode at a shorter context only trims it), so filling is cheap."""
        ops = [("prefill", n) for n in sorted(self.prefill)] + [("decode", c) for c in sorted(self.ctx, reverse=True)]
        return ops + ([("gemv", 0)] if self.gemv else [])

    @property
    def max_len(self) -> int:
        return max([*self.prefill, *(c + self.tokens for c in self.ctx), 1])

    def token_ids(self, vocab: int) -> list[int]:
        return np.random.default_rng(self.seed).integers(0, vocab, self.max_len).tolist()

    def op_args(self, op: str, size: int) -> dict:
        return {"decode": {"ctx": size, "n": self.tokens}, "prefill": {"n": size}, "gemv": {}}[op]


@dataclass
class Run:
    """One timed run. decode: ``size`` = context before the timed steps; prefill: prompt length; gemv: 0."""

    op: str
    size: int
    repeat: int
    seconds: float
    tokens: int
    tok_s: float
    bytes: int = 0  # gemv: ternary bytes read
    fill_seconds: float = 0.0  # decode: untimed cache fill just before
    seq: int = 0  # position in the run's overall order (engines alternate)
    others_cpu: float | None = None  # share of the machine's CPU other processes used during the run
    steal: float | None = None  # share stolen by the hypervisor


@dataclass
class ConfigResult:
    spec: EngineSpec
    info: dict = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    error: str | None = None

    def rates(self, op: str, size: int) -> list[float]:
        return [r.tok_s for r in self.runs if r.op == op and r.size == size]


def run_group(specs: list[EngineSpec], plan: Plan, log: Callable[[str], None]) -> list[ConfigResult]:
    """Measure configurations side by side: all loaded at once, each operation run on each in turn."""
    results = [ConfigResult(s) for s in specs]
    workers: dict[int, Worker] = {}
    try:
        for i, res in enumerate(results):
            workers[i] = Worker(res.spec.threads)
            try:
                res.info = workers[i].call("load", **res.spec.load_args(plan.max_len))
                log(f"loaded {res.spec.label} ({res.spec.threads} threads, {res.spec.lm_head}) "
                    f"in {res.info['load_seconds']:.1f} s")
            except BenchError as e:
                res.error = str(e)
                log(f"{res.spec.label}: {e}")
                workers.pop(i).close()
        if workers:
            ids = plan.token_ids(min(results[i].info["vocab_size"] for i in workers))
            for w in workers.values():
                w.call("set_ids", ids=ids)
            _run_schedule(results, workers, plan, log)
        for i, w in workers.items():
            results[i].memory = w.call("memory")
    finally:
        for w in workers.values():
            w.close()
    return results


def _run_schedule(results: list[ConfigResult], workers: dict[int, Worker], plan: Plan, log) -> None:
    """Each operation, ``repeats`` times, on every live worker in turn. A worker that fails is dropped."""
    seq = 0
    for op, size in plan.schedule():
        for rep in range(plan.repeats):
            order = sorted(workers)
            for j in range(len(order)):
                i = order[(j + rep) % len(order)]  # rotate who goes first: no one always follows the same engine
                try:
                    out = workers[i].call(op, **plan.op_args(op, size))
                except BenchError as e:
                    results[i].error = str(e)
                    log(f"{results[i].spec.label}: {e}")
                    workers.pop(i).close()
                    continue
                if out is None:
                    continue
                seq += 1
                run = Run(op, size, rep, tok_s=out["tokens"] / out["seconds"], seq=seq, **out)
                results[i].runs.append(run)
                what = f"{run.bytes / run.seconds / 1e9:.1f} GB/s" if op == "gemv" else f"{run.tok_s:.2f} tok/s"
                log(f"{op}@{size} run {rep + 1}/{plan.repeats}: {results[i].spec.label} "
                    f"{results[i].spec.threads}t {results[i].spec.lm_head}: {what}")


# ---- the report ------------------------------------------------------------------------------------------

@dataclass
class Report:
    plan: Plan
    configs: list[ConfigResult]
    bandwidth: list[Bandwidth]
    machine: dict
    versions: dict
    models: dict
    started: str
    seconds: float = 0.0
    command: list[str] = field(default_factory=list)
    conditions: dict = field(default_factory=dict)  # machine load before the run (see wait_for_quiet)

    def bandwidth_gb_s(self, threads: int | None = None) -> float | None:
        """The best pass of every measurement with ``threads`` threads (default: the most threads measured)."""
        if not self.bandwidth:
            return None
        threads = threads or max(b.threads for b in self.bandwidth)
        return max((b.best for b in self.bandwidth if b.threads == threads), default=None)

    def peer_of(self, res: ConfigResult) -> ConfigResult | None:
        if res.spec.engine != "onebit":
            return None
        return next((c for c in self.configs if c.spec.engine != "onebit" and c.spec.threads == res.spec.threads
                     and c.runs), None)

    def metrics(self, res: ConfigResult) -> dict:
        """Medians per operation, with the roofline (decode) and the ratio to the peer at the same threads."""
        out, peer, bw = {}, self.peer_of(res), self.bandwidth_gb_s()
        bpt = BytesPerToken(**res.info["bytes_per_token"]) if res.info.get("bytes_per_token") else None
        for op, size in self.plan.schedule():
            rates = res.rates(op, size)
            if not rates:
                continue
            others = [r.others_cpu for r in res.runs if r.op == op and r.size == size and r.others_cpu is not None]
            busy = {"max_others_cpu": max(others) if others else None}
            m = {"median_tok_s": statistics.median(rates), "runs_tok_s": rates, **busy}
            if op == "gemv":
                gbs = [r.bytes / r.seconds / 1e9 for r in res.runs if r.op == "gemv"]
                m = {"median_gb_s": statistics.median(gbs), "runs_gb_s": gbs, **busy}
                m["of_bandwidth"] = m["median_gb_s"] / bw if bw else None
                out["gemv"] = m
                continue
            if op == "decode" and bpt is not None:
                m["bytes_per_token"] = bpt.at(decode_context(size, self.plan.tokens))
                m["effective_gb_s"] = m["median_tok_s"] * m["bytes_per_token"] / 1e9
                if bw:
                    m["roofline_tok_s"] = roofline_tok_s(bw, m["bytes_per_token"])
                    m["of_roofline"] = m["median_tok_s"] / m["roofline_tok_s"]
            if peer is not None and peer.rates(op, size):
                m["vs_peer"] = m["median_tok_s"] / statistics.median(peer.rates(op, size))
            out[f"{op}@{size}"] = m
        return out

    def summary(self) -> list[dict]:
        return [{"label": c.spec.label, "engine": c.spec.engine, "threads": c.spec.threads,
                 "lm_head": c.spec.lm_head, "error": c.error, "peak_rss_bytes": c.memory.get("peak_rss_bytes"),
                 "metrics": self.metrics(c) if c.runs else {}} for c in self.configs]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["roofline_bandwidth_gb_s"] = self.bandwidth_gb_s()
        d["summary"] = self.summary()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def markdown(self) -> str:
        return markdown_report(self)


BUSY = 0.10  # a figure is marked when other processes took more than this share of the CPU in one of its runs


def _num(x: float | None, busy: float | None = None) -> str:
    if x is None:
        return "—"
    mark = " †" if busy is not None and busy > BUSY else ""
    return (f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}") + mark


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def _bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= 0.1 * scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}x"


def markdown_report(report: Report) -> str:
    """A header line, the main table (ratio columns only when a peer ran) and the bytes-per-token table."""
    plan, peer = report.plan, next((c.spec.label for c in report.configs if c.spec.engine != "onebit"), None)
    head = ["engine", "threads", "lm_head"]
    for c in sorted(plan.ctx):
        head += [f"decode@{c} tok/s"] + ([f"vs {peer}"] if peer else []) + ["of roofline"]
    for n in sorted(plan.prefill):
        head += [f"prefill {n} tok/s"] + ([f"vs {peer}"] if peer else [])
    head += (["GEMV GB/s", "of bandwidth"] if plan.gemv else []) + ["RSS peak / end"]
    rows = [_table_row(report, c, peer) for c in report.configs]
    lines = [_header_line(report), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if any(r.others_cpu is not None and r.others_cpu > BUSY for c in report.configs for r in c.runs):
        lines += ["", f"† other processes used more than {BUSY:.0%} of the machine's CPU during at least one run of "
                      "this figure (per-run shares in the JSON: `others_cpu`); treat it as noisy."]
    lines += ["", *_bytes_table(report)]
    errors = [f"- {c.spec.label} ({c.spec.threads} threads, {c.spec.lm_head}): {c.error}" for c in report.configs
              if c.error]
    return "\n".join(lines + (["", "Errors:", *errors] if errors else [])) + "\n"


def _table_row(report: Report, res: ConfigResult, peer: str | None) -> list[str]:
    m, plan = report.metrics(res) if res.runs else {}, report.plan
    lm = res.spec.lm_head if res.spec.engine == "onebit" else str(res.info.get("lm_head", "f16"))
    row = [res.spec.label, str(res.spec.threads), lm]
    for c in sorted(plan.ctx):
        d = m.get(f"decode@{c}", {})
        row += [_num(d.get("median_tok_s"), d.get("max_others_cpu"))] + ([_ratio(d.get("vs_peer"))] if peer else [])
        row += [_pct(d.get("of_roofline"))]
    for n in sorted(plan.prefill):
        d = m.get(f"prefill@{n}", {})
        row += [_num(d.get("median_tok_s"), d.get("max_others_cpu"))] + ([_ratio(d.get("vs_peer"))] if peer else [])
    if plan.gemv:
        g = m.get("gemv", {})
        row += [_num(g.get("median_gb_s"), g.get("max_others_cpu")), _pct(g.get("of_bandwidth"))]
    peak, end = res.memory.get("peak_rss_bytes"), res.memory.get("rss_bytes")
    return row + ["—" if peak is None else f"{peak / 1e9:.2f} / {'—' if end is None else f'{end / 1e9:.2f}'} GB"]


def _header_line(report: Report) -> str:
    m = report.machine
    name = report.models.get("name") or os.path.basename(str(report.models.get("model", "model")).rstrip("/"))
    counts = sorted({b.threads for b in report.bandwidth})
    bw = ", ".join(f"{report.bandwidth_gb_s(t):.1f} GB/s ({t} thread{'s' if t > 1 else ''})" for t in counts)
    p = report.plan
    return (f"**{name}** on {m.get('cpu', '?')}, {m.get('usable_cores', '?')} cores "
            f"({', '.join(m.get('flags', [])) or 'no SIMD flags read'}); read bandwidth (best pass, 1 or "
            f"{BANDWIDTH_STREAMS[-1]} streams per thread) {bw or 'not measured'}. "
            f"Decode: {p.tokens} steps timed after filling the context; medians of {p.repeats} runs, engines "
            f"alternating; roofline = all-threads bandwidth / bytes per token.{_busy_note(report)}")


def _busy_note(report: Report) -> str:
    busy = report.conditions.get("busy")
    return "" if busy is None else f" Other processes used {busy:.0%} of the CPU just before the start."


def _bytes_table(report: Report) -> list[str]:
    """Bytes per decode token and the roofline at each context, per engine and lm_head."""
    bw, seen, ctxs = report.bandwidth_gb_s(), set(), sorted(report.plan.ctx)
    head = ["engine", "lm_head", "ternary", "lm_head bytes", "KV per position"]
    for c in ctxs:
        head += [f"bytes/token @{c}", f"roofline @{c} tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in report.configs:
        key = (res.spec.label, res.spec.lm_head)
        if key in seen or not res.info.get("bytes_per_token"):
            continue
        seen.add(key)
        b = BytesPerToken(**res.info["bytes_per_token"])
        row = [res.spec.label, str(res.info.get("lm_head", res.spec.lm_head)), _bytes(b.ternary), _bytes(b.lm_head),
               _bytes(b.kv_per_position)]
        for c in ctxs:
            total = b.at(decode_context(c, report.plan.tokens))
            row += [_bytes(total), _num(roofline_tok_s(bw, total)) if bw else "—"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


# ---- the machine and versions ----------------------------------------------------------------------------

_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
          "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "asimd", "asimddp", "sve", "hypervisor")


def _cpuinfo() -> dict:
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu_model() -> str:
    info = _cpuinfo()
    return info.get("model name") or info.get("Model") or platform.processor() or platform.machine()


def machine_info() -> dict:
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable,
            "flags": [f for f in _FLAGS if f in flags], "memory_bytes": mem, "machine": platform.machine(),
            "platform": platform.platform()}


def versions() -> dict:
    import importlib.metadata as md

    from .. import __version__

    out = {"python": platform.python_version(), "onebit": __version__}
    for dist in ("numpy", "llama_cpp_python", "gguf"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


# ---- one call for the command and the script -------------------------------------------------------------

def wait_for_quiet(max_wait: float, threshold: float = BUSY, log: Callable[[str], None] | None = None) -> dict:
    """Wait up to ``max_wait`` seconds for a 2-second window in which other processes use at most ``threshold``
    of the machine's CPU. -> {"busy": last window's busy share, "waited_s"}; proceeds anyway after ``max_wait``."""
    t0, busy, window, said = time.perf_counter(), None, 2.0 if max_wait > 0 else 0.5, -60.0
    while True:
        with Stopwatch() as sw:
            time.sleep(window)
        busy = sw.others_cpu
        waited = time.perf_counter() - t0
        if busy is None or busy <= threshold or waited >= max_wait:
            break
        if log and waited - said >= 30:
            said = waited
            log(f"other processes use {busy:.0%} of the CPU; waiting (up to {max_wait:.0f} s)")
    return {"busy": busy, "waited_s": waited, "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def default_threads() -> tuple[int, ...]:
    n = machine_info()["usable_cores"] or 1
    return tuple(sorted({1, n}))


def benchmark(model: str | None = None, *, backend: str = "auto", threads: tuple[int, ...] | None = None,
              lm_heads: tuple[str, ...] = ("f16", "int8"), plan: Plan | None = None, peer: str | None = None,
              peer_model: str | None = None, bandwidth_bytes: int = 1 << 30, synth: str = "bitnet-2b4t",
              synth_dir: str | None = None, fresh: bool = False, require_tq2: bool = False, wait_idle: float = 0.0,
              log: Callable[[str], None] | None = None, kv_dtype: str = "auto") -> Report:
    """Measure ``model`` (default: the synthetic ``synth`` shapes, written once to the cache) at each thread
    count and lm_head, with ``peer`` ("llama.cpp" on ``peer_model``, a GGUF) alternating in the same run.
    ``kv_dtype``: our KV cache precision (``onebit.load``'s option)."""
    log, plan = log or (lambda s: None), plan or Plan()
    threads = tuple(threads or default_threads())
    t0, started = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if peer and (peer not in ENGINES or peer == "onebit"):
        raise BenchError(f"unknown peer {peer!r} (known: llama.cpp)")
    models = _resolve_models(model, peer, peer_model, synth, synth_dir, fresh, plan.seed, log)
    if peer:
        models["peer_gguf"] = inspect_gguf(models["peer_model"])
        if require_tq2:
            check_tq2_gguf(models["peer_gguf"])
    conditions = wait_for_quiet(wait_idle, log=log)
    cores = machine_info()["usable_cores"] or 1
    bandwidth = _bandwidths(sorted({*threads, cores}), bandwidth_bytes, "start", log)
    specs = _specs(models, backend, threads, lm_heads, peer, kv_dtype)
    configs = []
    for t in threads:
        configs += run_group([s for s in specs if s.threads == t], plan, log)
        bandwidth += _bandwidths([cores], bandwidth_bytes, f"after {t} threads", log)  # best of several tries
    for c in configs:
        if c.spec.engine != "onebit" and "peer_gguf" in models:
            c.info["bytes_per_token"] = asdict(gguf_bytes_per_token(models["peer_gguf"]))
    return Report(plan, configs, bandwidth, machine_info(), versions(), models, started,
                  time.perf_counter() - t0, list(sys.argv), conditions)


def _bandwidths(counts: list[int], size: int, when: str, log) -> list[Bandwidth]:
    out = []
    for t in counts if size else []:
        out.append(read_bandwidth(t, size))
        out[-1].when = when
        b = out[-1]
        per = ", ".join(f"{k} stream{'s' if k > 1 else ''} per thread {v:.1f}" for k, v in b.by_streams.items())
        log(f"read bandwidth with {t} thread(s), {when}: median {b.gb_s:.1f}, best {b.best:.1f} GB/s"
            + (f" ({per})" if per else ""))
    return out


def _resolve_models(model, peer, peer_model, synth, synth_dir, fresh, seed, log) -> dict:
    if model is None:
        made = synth_models(synth, synth_dir, gguf=bool(peer and not peer_model), seed=seed, fresh=fresh, log=log)
        return {"name": f"{synth} shapes (synthetic, seed {seed})", "model": made["hf"],
                "peer_model": peer_model or made["gguf"], "written": made["written"]}
    if peer and not peer_model:
        if not str(model).endswith(".gguf"):
            raise BenchError(f"{peer} needs a GGUF: pass --peer-model FILE.gguf (the model is {model})")
        peer_model = model
    return {"name": None, "model": model, "peer_model": peer_model, "written": []}


def _specs(models: dict, backend: str, threads, lm_heads, peer, kv_dtype: str = "auto") -> list[EngineSpec]:
    """Per thread count: ours with each lm_head, the peer placed between them (ours, peer, ours)."""
    specs = []
    for t in threads:
        ours = [EngineSpec("onebit", models["model"], t, h, backend, kv_dtype) for h in lm_heads]
        theirs = [EngineSpec(peer, models["peer_model"], t)] if peer else []
        specs += ours[:1] + theirs + ours[1:]
    return specs


__all__ = [
    "BenchError", "BytesPerToken", "Bandwidth", "EngineSpec", "Plan", "Run", "ConfigResult", "Report",
    "benchmark", "run_group", "read_bandwidth", "roofline_tok_s", "decode_context", "lm_head_bytes",
    "model_bytes_per_token", "synth_models", "inspect_gguf", "check_tq2_gguf", "machine_info", "versions",
]
