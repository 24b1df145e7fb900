"""`1bit mcp`: an MCP server on stdio (for clients that spawn a process) over a running `1bit serve`."""

from __future__ import annotations

import sys


def add_arguments(p) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8180",
                   help="the running `1bit serve` (its /admin routes answer every tool)")
    p.add_argument("--api-key", default=None,
                   help="the server's API key, if it has one (also: env ONEBIT_API_KEY)")


def main(args) -> int:
    import anyio

    from ..mcp import serve_stdio
    from ..server.auth import load_api_keys

    keys = load_api_keys(args.api_key)
    print(f"1bit mcp: MCP on stdio for {args.url}", file=sys.stderr)  # stdout carries the protocol only
    anyio.run(serve_stdio, args.url, keys[0] if keys else None)
    return 0
