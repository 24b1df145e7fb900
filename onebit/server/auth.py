"""Bearer-token auth: keys from --api-key, --api-key-file or ONEBIT_API_KEY; constant-time comparison."""

from __future__ import annotations

import hmac
import json
import os

from starlette.types import ASGIApp, Receive, Scope, Send

from .openai import error_body

ENV_VAR = "ONEBIT_API_KEY"
PUBLIC_PATHS = frozenset({"/health"})


def load_api_keys(api_key: str | None = None, api_key_file: str | None = None,
                  environ: dict | None = None) -> list[str]:
    """Every accepted key: the flag, each non-empty line of the file, and the env var (all optional)."""
    keys = []
    if api_key:
        keys.append(api_key)
    if api_key_file:
        with open(api_key_file, encoding="utf-8") as f:
            keys += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        if not keys:
            raise ValueError(f"{api_key_file}: no API key in the file")
    env = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
    if env:
        keys.append(env)
    return keys


def key_matches(given: str, keys: list[str]) -> bool:
    """Constant-time check of ``given`` against every key (no early exit on the first match)."""
    given_b = given.encode("utf-8", "replace")
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(given_b, k.encode("utf-8"))
    return ok


class BearerAuth:
    """ASGI middleware: 401 in OpenAI's shape unless ``Authorization: Bearer <key>`` names a key.
    /health and CORS preflights (OPTIONS) stay public."""

    def __init__(self, app: ASGIApp, keys: list[str]):
        self.app, self.keys = app, list(keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or not self.keys or scope["path"] in PUBLIC_PATHS
                or scope["method"] == "OPTIONS"):
            await self.app(scope, receive, send)
            return
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and key_matches(token.strip(), self.keys):
            await self.app(scope, receive, send)
            return
        message = ("You didn't provide an API key. Provide it as 'Authorization: Bearer YOUR_KEY'." if not auth
                   else "Incorrect API key provided.")
        body = json.dumps(error_body(message, "invalid_request_error", None, "invalid_api_key")).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
