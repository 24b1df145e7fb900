"""Aggregate decode throughput of `1bit serve` at 1, 4 and 16 concurrent streaming clients.

A synthetic mid-size BitNet (random ternary weights; default hidden 1024, 8 layers, vocab 32000) is written
to a temporary HF folder and served by the real CLI (`1bit serve`, a subprocess) on the cpu backend (numpy
if the C extension is not built). Clients stream /v1/completions over loopback, greedy over printable ASCII
(logit_bias), so every token is one SSE chunk and every request generates exactly --max-tokens tokens.
Throughput counts prompt prefill time too (each request has a distinct ~45-token prompt). Results go to
benchmarks/results/server-<date>.json.

    python benchmarks/bench_server.py [--hidden 1024 --layers 8 --clients 1 4 16 --max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

import httpx

# greedy over printable ASCII only: every token is one visible character (one SSE chunk), EOS never wins
PRINTABLE = {str(i): 100 for i in range(32, 127)}
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def write_model(folder: str, hidden: int, layers: int, vocab: int) -> dict:
    from onebit.config import ModelConfig
    from onebit.synth import random_weights
    from onebit.tokenizer import byte_level_tokenizer
    from onebit.weights.hf import write_hf

    spec = dict(arch="bitnet", vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=256, eos_token_id=[257])
    cfg = ModelConfig.from_dict(spec)
    write_hf(folder, cfg, random_weights(cfg, seed=0))
    byte_level_tokenizer().save(folder)
    return spec


def backend_name() -> str:
    try:
        from onebit.kernels.cpu import CpuBackend

        return "cpu" if CpuBackend.is_available() else "numpy"
    except ImportError:
        return "numpy"


def start_server(folder: str, backend: str, port: int, max_batch: int, threads: int | None):
    cmd = [sys.executable, "-m", "onebit.cli", "serve", folder, "--backend", backend, "--port", str(port),
           "--model-id", "bench", "--max-batch", str(max_batch), "--ctx", "1024", "--max-queue", "256"]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not become ready")


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "logit_bias": PRINTABLE}
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():  # only the usage chunk is parsed: keep the client light
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() - t0
            elif '"usage":{' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return {"tokens": tokens, "ttft": first, "seconds": time.perf_counter() - t0}


async def run_level(url: str, clients: int, requests_each: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def worker(c: int) -> list[dict]:
            out = []
            for j in range(requests_each):
                prompt = f"client {c} request {j}: " + "the quick brown fox jumps over the lazy dog " * 2
                out.append(await one_request(client, url, prompt, max_tokens))
            return out

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*[worker(c) for c in range(clients)]) for r in rs]
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    return {"clients": clients, "requests": len(results), "completion_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2),
            "per_client_tokens_per_s": round(sum(r["tokens"] / r["seconds"] for r in results) / len(results), 2),
            "ttft_p50_s": round(ttfts[len(ttfts) // 2], 4) if ttfts else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests-each", type=int, default=2, help="requests per client at each level")
    p.add_argument("--threads", type=int, default=None, help="server CPU threads (default: all cores)")
    p.add_argument("--backend", default=None, help="default: cpu if built, else numpy")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    backend = args.backend or backend_name()
    with tempfile.TemporaryDirectory() as folder, socket.socket() as s:
        spec = write_model(folder, args.hidden, args.layers, args.vocab)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        proc, url = start_server(folder, backend, port, max(args.clients), args.threads)
        try:
            asyncio.run(run_level(url, 1, 1, 8))  # warm-up
            levels = []
            for c in args.clients:
                levels.append(asyncio.run(run_level(url, c, args.requests_each, args.max_tokens)))
                print(json.dumps(levels[-1]), flush=True)
            metrics = httpx.get(url + "/metrics").text
        finally:
            proc.terminate()
            proc.wait(30)
    report = _report(args, backend, spec, levels, metrics)
    out = args.out or os.path.join(HERE, "results", f"server-{report['date']}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report["speedup_vs_1_client"]), "->", out)
    return 0


def _report(args, backend: str, spec: dict, levels: list[dict], metrics: str) -> dict:
    base = levels[0]["tokens_per_s"]
    return {
        "benchmark": "server aggregate decode throughput", "date": datetime.date.today().isoformat(),
        "backend": backend, "threads": args.threads or os.cpu_count(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "model": spec,
        "max_tokens": args.max_tokens, "levels": levels,
        "speedup_vs_1_client": {str(lv["clients"]): round(lv["tokens_per_s"] / base, 2) for lv in levels},
        "kernel_seconds": _kernel_seconds(metrics),
    }


def _kernel_seconds(metrics: str) -> dict:
    out = {}
    for line in metrics.splitlines():
        if line.startswith("onebit_kernel_seconds_total{"):
            op = line.split('"')[1]
            out[op] = round(float(line.rsplit(" ", 1)[1]), 3)
    return out


if __name__ == "__main__":
    sys.exit(main())
