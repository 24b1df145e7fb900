"""MCP tools over the live engine: ``build_server(control)``, served over streamable HTTP inside `1bit serve`
(``create_mcp_app``) or over stdio by `1bit mcp` (``serve_stdio``), which reaches a running server's /admin routes.

``control`` is an ``Admin`` (the engine in this process) or an ``HttpAdmin`` (a server elsewhere): the same
async methods returning the same models, so both transports answer alike. Tool errors carry the server's
message (a 400's reason, "no such session", "the model is still loading").
"""

from __future__ import annotations

import inspect
from typing import Annotated, Any
from urllib.parse import quote

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool
from mcp_types import ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field

from .server.admin import (Admin, DetokenizeArgs, Detokenized, Evicted, FieldName, Frequency, GenerateArgs,
                           Generated, Health, KernelTiming, KVCacheStats, MaxTokens, MinP, ModelList, Presence,
                           Repetition, ResetSampler, SamplerState, Seed, SessionInfo, SessionList, SetSampler,
                           Temperature, Tokenized, TokenizeArgs, TopK, TopP)
from .server.openai import APIError

__all__ = ["build_server", "create_mcp_app", "serve_stdio", "HttpAdmin", "TOOLS"]

INSTRUCTIONS = """\
Introspect and steer a running 1bit server (ternary LLM inference). Start with `health` or `list_models`.
Sessions are conversations pinned to a KV cache (X-1bit-Session); `list_sessions` / `inspect_session` show them,
`evict_session` frees one. Sampler overrides fill in the fields that requests leave unset. `kernel_timing`
shows where the time goes. Everything reported is the live state of the engine that serves the OpenAI API."""

READ = ToolAnnotations(read_only_hint=True, open_world_hint=False)
RESET = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False)
TOOLS = ("list_models", "health", "kv_cache_stats", "list_sessions", "inspect_session", "evict_session",
         "get_sampler_defaults", "set_sampler_overrides", "reset_sampler_overrides", "kernel_timing",
         "reset_kernel_timing", "generate", "tokenize", "detokenize")

SessionArg = Annotated[str, Field(min_length=1, max_length=256, description="the session id (X-1bit-Session)")]
OptionalSession = Annotated[str | None, Field(min_length=1, max_length=256,
                                              description="a session id; unset: server-wide")]


async def _call(awaitable):
    try:
        return await awaitable
    except APIError as e:
        raise ToolError(e.message) from None


def build_server(control) -> MCPServer:
    """The MCP server with every tool of ``TOOLS`` over ``control`` (an ``Admin`` or ``HttpAdmin``)."""
    from . import __version__

    tools: list[Tool] = []

    def tool(title: str, annotations: ToolAnnotations):
        def register(fn):
            doc = inspect.cleandoc(fn.__doc__ or "")
            tools.append(_strict(Tool.from_function(fn, title=title, description=doc, annotations=annotations)))
            return fn
        return register

    for add in (_add_state_tools, _add_session_tools, _add_sampler_tools, _add_kernel_tools, _add_generation_tools):
        add(tool, control)
    return MCPServer("onebit", title="1bit", version=__version__, instructions=INSTRUCTIONS, tools=tools,
                     log_level="WARNING")


def _strict(tool: Tool) -> Tool:
    """Refuse unknown arguments: a misspelt ``session_id`` must not turn a session's override server-wide."""
    loose = tool.fn_metadata.arg_model
    strict = type(loose.__name__, (loose,), {"model_config": ConfigDict(**loose.model_config, extra="forbid"),
                                             "__module__": __name__})
    tool.fn_metadata.arg_model = strict
    tool.parameters = strict.model_json_schema(by_alias=True)
    return tool


def _add_state_tools(tool, control) -> None:
    @tool(title="Loaded models", annotations=READ)
    async def list_models() -> ModelList:
        """The loaded model: id (what clients send as `model`), architecture, parameter count, bits per weight,
        context length as served and the model's own, and the compute backend. Use it first to learn what is
        being served and how large a prompt fits."""
        return await _call(control.list_models())

    @tool(title="Server health", annotations=READ)
    async def health() -> Health:
        """Whether the model is loaded and ready (or still loading, or failed), uptime, backend, ISA and threads,
        resident memory, KV cache bytes, and requests running and waiting. Use it to check the server is up,
        or to see how busy it is before sending work."""
        return await _call(control.health())

    @tool(title="KV cache statistics", annotations=READ)
    async def kv_cache_stats() -> KVCacheStats:
        """The KV cache: byte budget and bytes used, bytes per token, tokens cached, named sessions and anonymous
        prefix entries, hit rates (session and prefix) and evictions. Use it to judge whether conversations
        reuse their cache or memory pressure is evicting them."""
        return await _call(control.kv_cache_stats())


def _add_session_tools(tool, control) -> None:
    @tool(title="List sessions", annotations=READ)
    async def list_sessions() -> SessionList:
        """Every named session kept (most recently used first): tokens held, KV bytes, turns, busy or idle,
        seconds idle and its sampler overrides. Use it to find a session id or to see what holds the memory."""
        return await _call(control.list_sessions())

    @tool(title="Inspect a session", annotations=READ)
    async def inspect_session(session_id: SessionArg) -> SessionInfo:
        """One session: tokens held, last use, turns, bytes, overrides, and the text of its last cached tokens.
        Use it to check what a conversation's cache holds before reusing or evicting it."""
        return await _call(control.inspect_session(session_id))

    @tool(title="Evict a session",
              annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True,
                                          open_world_hint=False))
    async def evict_session(session_id: SessionArg) -> Evicted:
        """Drop an idle session's KV cache to free memory. Its next turn still works but prefills the whole
        conversation again (cached_tokens 0). Refused while a request is running on it."""
        return await _call(control.evict_session(session_id))


def _add_sampler_tools(tool, control) -> None:
    @tool(title="Sampler defaults and overrides", annotations=READ)
    async def get_sampler_defaults(session_id: OptionalSession = None) -> SamplerState:
        """The built-in sampler values, the server-wide overrides, a session's overrides (if session_id is
        given) and the effective values a request that sets nothing would get. Use it before changing them."""
        return await _call(control.get_sampler_defaults(session_id))

    @tool(title="Set sampler overrides",
              annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True,
                                          open_world_hint=False))
    async def set_sampler_overrides(temperature: Temperature = None, top_p: TopP = None, top_k: TopK = None,
                                    min_p: MinP = None, presence_penalty: Presence = None,
                                    frequency_penalty: Frequency = None, repetition_penalty: Repetition = None,
                                    seed: Seed = None, max_tokens: MaxTokens = None,
                                    session_id: OptionalSession = None) -> SamplerState:
        """Set sampler values applied to every later request that does not set those fields itself: server-wide,
        or for one session (session_id; these win over server-wide). Fields left out keep their current
        override. Requests that set a field keep their own value. Invalid values are refused."""
        args = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                    presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                    repetition_penalty=repetition_penalty, seed=seed, max_tokens=max_tokens, session_id=session_id)
        return await _call(control.set_sampler_overrides(SetSampler(**args)))

    @tool(title="Reset sampler overrides", annotations=RESET)
    async def reset_sampler_overrides(session_id: OptionalSession = None, fields: list[FieldName] | None = None,
                                      all_sessions: bool = False) -> SamplerState:
        """Remove sampler overrides: server-wide (default), one session's (session_id) or every session's
        (all_sessions); only the named fields if given. Requests then get the built-in values again."""
        args = ResetSampler(session_id=session_id, fields=fields, all_sessions=all_sessions)
        return await _call(control.reset_sampler_overrides(args))


def _add_kernel_tools(tool, control) -> None:
    @tool(title="Kernel timing", annotations=READ)
    async def kernel_timing(window_s: Annotated[float, Field(gt=0, le=3600, description="seconds of recent "
                                                             "steps for the tokens/s figures")] = 10.0
                            ) -> KernelTiming:
        """Where the time goes: cumulative and per-call time and call counts for every kernel (ternary matmul,
        attention, norms, rope, lm_head, sampling, ...), grouped, plus prompt and generated tokens/s over the
        last window_s seconds. Use it to find the bottleneck; reset_kernel_timing first for a clean measure."""
        return await _call(control.kernel_timing(window_s))

    @tool(title="Reset kernel timing", annotations=RESET)
    async def reset_kernel_timing() -> KernelTiming:
        """Zero the kernel timings and the tokens/s window, to measure one workload from a clean start."""
        return await _call(control.reset_kernel_timing())


def _add_generation_tools(tool, control) -> None:
    @tool(title="Generate a short completion",
              annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                                          open_world_hint=False))
    async def generate(prompt: Annotated[str, Field(min_length=1, max_length=100_000,
                                                    description="the text to continue (or the user message)")],
                       max_tokens: Annotated[int | None, Field(ge=1, le=1024, description="tokens to generate "
                                                               "(unset: an override, else 64)")] = None,
                       chat: Annotated[bool, Field(description="wrap the prompt as one user message in the chat "
                                                   "template")] = False,
                       stop: Annotated[list[Annotated[str, Field(min_length=1)]] | None,
                                       Field(max_length=16, description="stop strings")] = None,
                       session_id: Annotated[str | None, Field(min_length=1, max_length=256, description="run as "
                                                               "a turn of this session")] = None,
                       temperature: Temperature = None, top_p: TopP = None, top_k: TopK = None, min_p: MinP = None,
                       presence_penalty: Presence = None, frequency_penalty: Frequency = None,
                       repetition_penalty: Repetition = None, seed: Seed = None) -> Generated:
        """Run one short completion through the same engine and queue as the API, and return the text with
        timing (time to first token, tokens/s) and the sampler values used (after overrides). Use it to try the
        model or to measure speed; it is not meant for long outputs (at most 1024 tokens)."""
        args = GenerateArgs(prompt=prompt, max_tokens=max_tokens, chat=chat, stop=stop, session_id=session_id,
                            temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                            repetition_penalty=repetition_penalty, seed=seed)
        return await _call(control.generate(args))

    @tool(title="Tokenize", annotations=READ)
    async def tokenize(text: Annotated[str, Field(max_length=1_000_000, description="the text")],
                       add_special_tokens: Annotated[bool, Field(description="add BOS etc. as a completion "
                                                                 "request does")] = True,
                       chat: Annotated[bool, Field(description="render it as one user message with the chat "
                                                   "template")] = False) -> Tokenized:
        """Token ids and each token's text for a string. Use it to count tokens against the context length or
        to see how the model splits a word."""
        return await _call(control.tokenize(TokenizeArgs(text=text, add_special_tokens=add_special_tokens,
                                                         chat=chat)))

    @tool(title="Detokenize", annotations=READ)
    async def detokenize(tokens: Annotated[list[int], Field(max_length=1_000_000, description="token ids")]
                         ) -> Detokenized:
        """The text of a list of token ids (ids outside the vocabulary are refused)."""
        return await _call(control.detokenize(DetokenizeArgs(tokens=tokens)))


# ---- streamable HTTP inside `1bit serve` ------------------------------------------------------------------------


def create_mcp_app(context, host: str = "127.0.0.1"):
    """The ASGI app serving MCP at /mcp over the engine of ``context`` (the API app's ``app.state.onebit``),
    behind the API's bearer keys and CORS policy. Its lifespan runs the MCP session manager only (the API app
    starts and stops the engine)."""
    from starlette.middleware.cors import CORSMiddleware

    from .server.app import LOCALHOST_ORIGINS
    from .server.auth import BearerAuth

    settings = context.settings
    app = build_server(Admin(context)).streamable_http_app(streamable_http_path="/mcp", host=host)
    app = BearerAuth(app, keys=settings.api_keys)
    return CORSMiddleware(app, allow_origins=settings.cors_origins or [],
                          allow_origin_regex=None if settings.cors_origins else LOCALHOST_ORIGINS,
                          allow_methods=["GET", "POST", "DELETE", "OPTIONS"], allow_headers=["*"],
                          expose_headers=["mcp-session-id", "mcp-protocol-version"])


# ---- stdio for `1bit mcp`: the same tools over a running server's /admin routes ----------------------------------


class HttpAdmin:
    """``Admin``'s methods over HTTP: each calls one /admin route of a running `1bit serve` and returns the same
    model. Use as an async context manager (it holds one connection pool)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300.0, transport=None):
        import httpx2

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self._client = httpx2.AsyncClient(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    async def __aenter__(self) -> "HttpAdmin":
        return self

    async def __aexit__(self, *exc) -> None:
        await self._client.aclose()

    async def _request(self, model: type[BaseModel], method: str, path: str, body: BaseModel | None = None,
                       params: dict | None = None) -> Any:
        import httpx2

        json = body.model_dump(exclude_none=True) if body is not None else None
        try:
            r = await self._client.request(method, "/admin" + path, json=json, params=params)
        except httpx2.HTTPError as e:
            raise APIError(503, f"Cannot reach 1bit serve at {self.url} ({type(e).__name__}: {e}). Start it "
                                "with `1bit serve` or point `1bit mcp --url` at it.", type="server_error") from None
        if r.status_code >= 400:
            raise APIError(r.status_code, _error_message(r))
        return model.model_validate(r.json())

    async def list_models(self) -> ModelList:
        return await self._request(ModelList, "GET", "/models")

    async def health(self) -> Health:
        return await self._request(Health, "GET", "/health")

    async def kv_cache_stats(self) -> KVCacheStats:
        return await self._request(KVCacheStats, "GET", "/kv-cache")

    async def list_sessions(self) -> SessionList:
        return await self._request(SessionList, "GET", "/sessions")

    async def inspect_session(self, session_id: str) -> SessionInfo:
        return await self._request(SessionInfo, "GET", "/sessions/" + quote(session_id, safe=""))

    async def evict_session(self, session_id: str) -> Evicted:
        return await self._request(Evicted, "DELETE", "/sessions/" + quote(session_id, safe=""))

    async def get_sampler_defaults(self, session_id: str | None = None) -> SamplerState:
        params = {"session_id": session_id} if session_id else None
        return await self._request(SamplerState, "GET", "/sampler", params=params)

    async def set_sampler_overrides(self, args: SetSampler) -> SamplerState:
        return await self._request(SamplerState, "POST", "/sampler", args)

    async def reset_sampler_overrides(self, args: ResetSampler) -> SamplerState:
        return await self._request(SamplerState, "POST", "/sampler/reset", args)

    async def kernel_timing(self, window_s: float = 10.0) -> KernelTiming:
        return await self._request(KernelTiming, "GET", "/kernels", params={"window_s": window_s})

    async def reset_kernel_timing(self) -> KernelTiming:
        return await self._request(KernelTiming, "POST", "/kernels/reset")

    async def generate(self, args: GenerateArgs) -> Generated:
        return await self._request(Generated, "POST", "/generate", args)

    async def tokenize(self, args: TokenizeArgs) -> Tokenized:
        return await self._request(Tokenized, "POST", "/tokenize", args)

    async def detokenize(self, args: DetokenizeArgs) -> Detokenized:
        return await self._request(Detokenized, "POST", "/detokenize", args)


def _error_message(r) -> str:
    try:
        return r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {r.status_code} from {r.request.url}: {r.text[:200]}"


async def serve_stdio(url: str, api_key: str | None = None) -> None:
    """Serve the tools over stdin/stdout, each call going to the /admin routes of the server at ``url``."""
    async with HttpAdmin(url, api_key) as control:
        await build_server(control).run_stdio_async()
