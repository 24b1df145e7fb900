"""`1bit serve`: the OpenAI-compatible HTTP server (the socket opens first; /health is 503 until the model loads)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time

from .common import add_model_arguments

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(p) -> None:
    add_model_arguments(p)
    g = p.add_argument_group("network")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind; anything but loopback exposes the server to your network")
    g.add_argument("--port", type=int, default=8180, help="TCP port")
    g.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                   help="allowed browser origin (repeatable; '*' allows any); unset: localhost origins only")
    g.add_argument("--max-body-bytes", type=int, default=8 << 20, help="largest request body accepted (413 above)")
    g.add_argument("--mcp-port", type=int, default=8181,
                   help="port of the MCP server (streamable HTTP at /mcp) over the same engine and API keys")
    g.add_argument("--no-mcp", action="store_true", help="do not serve MCP")
    g = p.add_argument_group("security and limits")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (also: --api-key-file, env ONEBIT_API_KEY)")
    g.add_argument("--api-key-file", default=None, help="file with accepted API keys, one per line")
    g.add_argument("--rate-limit-rpm", type=float, default=0,
                   help="requests per minute per session (or per client address without one); 0: unlimited")
    g.add_argument("--rate-limit-tpm", type=float, default=0,
                   help="generated tokens per minute per session / client; 0: unlimited")
    g.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 503 + Retry-After")
    g = p.add_argument_group("engine and KV cache")
    g.add_argument("--ctx", type=int, default=None, help="context length per sequence (unset: the model's)")
    g.add_argument("--max-batch", type=int, default=16, help="sequences decoded together in one batched step")
    g.add_argument("--prefill-chunk", type=int, default=256,
                   help="most prompt tokens prefilled per step (long prompts do not stall running streams)")
    g.add_argument("--kv-budget", type=float, default=2048, metavar="MB",
                   help="KV cache memory for running requests and kept sessions; idle ones are evicted LRU")
    g.add_argument("--max-sessions", type=int, default=256, help="named sessions (X-1bit-Session) kept at most")
    g.add_argument("--session-ttl", type=float, default=1800, metavar="S",
                   help="seconds an idle session's KV cache is kept")
    g.add_argument("--model-id", default=None, help="the model name clients use (unset: the name of MODEL)")


def main(args) -> int:
    import uvicorn

    from ..engine import Engine
    from ..errors import OneBitError
    from ..server import ServerSettings, create_app, load_api_keys

    _check(args)
    keys = load_api_keys(args.api_key, args.api_key_file)
    if args.host not in LOOPBACK and not keys:
        print(f"1bit serve: warning: listening on {args.host} without an API key", file=sys.stderr)
    engine = Engine(loader=_loader(args), ctx=args.ctx, max_batch=args.max_batch, max_queue=args.max_queue,
                    prefill_chunk=args.prefill_chunk, kv_budget_bytes=int(args.kv_budget * (1 << 20)),
                    max_sessions=args.max_sessions, session_ttl=args.session_ttl)
    settings = ServerSettings(model_id=args.model_id or model_name(args.model), api_keys=keys,
                              cors_origins=args.cors_origin, max_body_bytes=args.max_body_bytes,
                              rate_limit_rpm=args.rate_limit_rpm, rate_limit_tpm=args.rate_limit_tpm)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, settings), host=args.host, port=args.port,
                                           log_level="info" if args.verbose else "warning",
                                           timeout_graceful_shutdown=5))
    engine.on_load_error = lambda e: setattr(server, "should_exit", True)
    print(f"1bit serve: {settings.model_id} at http://{args.host}:{args.port}/v1 (loading the model...)",
          file=sys.stderr)
    mcp = None if args.no_mcp else _mcp_listener(server, args, keys)
    if mcp is None:
        server.run()
    else:
        asyncio.run(_serve_both(server, *mcp))
    if engine.load_error is not None:
        e = engine.load_error
        raise e if isinstance(e, (OneBitError, OSError, ValueError)) else OneBitError(f"loading failed: {e}")
    return 0


# ---- the MCP listener: a second uvicorn server in the same process and loop, over the same engine ----------------


def _mcp_listener(api, args, keys):
    """(server, socket) for MCP at :mcp-port/mcp, or None when the port is taken (the API still serves).
    Without an API key it stays on loopback even when --host exposes the API."""
    import uvicorn

    from ..mcp import create_mcp_app

    host = args.host if keys or args.host in LOOPBACK else "127.0.0.1"
    if host != args.host:
        print(f"1bit serve: MCP stays on {host} (no API key to protect it on {args.host})", file=sys.stderr)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, args.mcp_port))
    except OSError as e:
        sock.close()
        print(f"1bit serve: warning: MCP not served, cannot listen on {host}:{args.mcp_port} ({e}); "
              "pick another --mcp-port or pass --no-mcp", file=sys.stderr)
        return None
    app = create_mcp_app(api.config.app.state.onebit, host=host)
    config = uvicorn.Config(app, log_level="info" if args.verbose else "warning", timeout_graceful_shutdown=2)
    print(f"1bit serve: MCP at http://{host}:{sock.getsockname()[1]}/mcp", file=sys.stderr)
    return _companion(config, api), sock


def _companion(config, leader):
    """A second uvicorn server in the process: it stops when ``leader`` does and leaves the signals to it."""
    import uvicorn

    class Companion(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield

        async def on_tick(self, counter: int) -> bool:
            return leader.should_exit or await super().on_tick(counter)

    return Companion(config)


async def _serve_both(api, mcp, sock) -> None:
    await asyncio.gather(api.serve(), mcp.serve(sockets=[sock]))


def _check(args) -> None:
    for name in ("max_queue", "max_batch", "prefill_chunk", "max_sessions", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.mcp_port < 65536:
        raise ValueError("--mcp-port must be a TCP port (1 to 65535)")
    if args.ctx is not None and args.ctx < 2:
        raise ValueError("--ctx must be at least 2")
    for name in ("kv_budget", "session_ttl", "rate_limit_rpm", "rate_limit_tpm"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must not be negative")


def _loader(args):
    def load():
        from ..kernels.timing import load_timed

        t0 = time.perf_counter()
        act = {"auto": "auto", "8": 8, "16": None}[args.act_bits]
        model = load_timed(args.model, args.backend, threads=args.threads, lm_head=args.lm_head,
                           ternarize=args.ternarize, act_bits=act, kv_dtype=args.kv_dtype)
        warm = hasattr(model.net.backend, "warmup")
        print(f"1bit serve: {'loaded' if warm else 'ready'} ({model.backend.name} backend, loaded in "
              f"{time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        if warm:  # the engine runs it before taking requests
            print(f"1bit serve: compiling kernels for batches up to {args.max_batch} (a minute or more the first "
                  "time on a machine; cached after)...", file=sys.stderr)
        return model

    return load


def model_name(path: str) -> str:
    """The id clients send as ``model``: a built-in name as is, else the file or folder name."""
    base = os.path.basename(os.path.normpath(path))
    return base[:-5] if base.endswith(".gguf") else base
