"""``create_app(engine, settings)``: the FastAPI app (routes, OpenAI-shaped errors, CORS, auth, limits, metrics)."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .admin import router as admin_router
from .auth import BearerAuth
from .limits import BodyLimit, RateLimiter
from .metrics import Metrics
from .openai import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                     bad_request, error_body, flat_messages, parse, validation_error)
from .routes import Context, ServerSettings, chat_completions, completions, not_ready

log = logging.getLogger("onebit.server")

LOCALHOST_ORIGINS = r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?$"

# path -> request model documented for it (the handlers parse bodies themselves, to own every error)
_BODIES = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
           "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)}


def create_app(engine, settings: ServerSettings | None = None) -> FastAPI:
    """The HTTP app over ``engine``; its lifespan starts the engine (which may still be loading its model)
    and stops it on shutdown."""
    settings = settings or ServerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await anyio.to_thread.run_sync(engine.stop)

    from .. import __version__

    app = FastAPI(title="1bit", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.onebit = Context(engine, settings, Metrics(engine),
                               RateLimiter(settings.rate_limit_rpm, settings.rate_limit_tpm))
    _add_routes(app)
    app.include_router(admin_router, responses=_ERRORS)  # introspection and control (what `1bit mcp` calls)
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(BearerAuth, keys=settings.api_keys)
    app.add_middleware(CountRequests, metrics=app.state.onebit.metrics)
    app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins or [],
                       allow_origin_regex=None if settings.cors_origins else LOCALHOST_ORIGINS,
                       allow_methods=["*"], allow_headers=["*"],
                       expose_headers=["X-1bit-Session", "Retry-After"])
    app.openapi = lambda: _openapi(app)
    return app


def _add_routes(app: FastAPI) -> None:
    post = dict(responses=_ERRORS)
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], summary="Chat completion", **post)
    app.add_api_route("/v1/completions", completions, methods=["POST"], summary="Text completion", **post)
    app.add_api_route("/v1/models", list_models, methods=["GET"], summary="List models", responses=_ERRORS)
    app.add_api_route("/v1/models/{model_id:path}", get_model, methods=["GET"], summary="Describe a model",
                      responses=_ERRORS)
    app.add_api_route("/tokenize", tokenize, methods=["POST"], summary="Text or messages to token ids", **post)
    app.add_api_route("/detokenize", detokenize, methods=["POST"], summary="Token ids to text", **post)
    app.add_api_route("/health", health, methods=["GET"], summary="200 when ready, 503 while loading",
                      responses={503: {"model": ErrorResponse}})
    app.add_api_route("/metrics", metrics, methods=["GET"], summary="Prometheus metrics", responses=_ERRORS)


# ---- small endpoints ------------------------------------------------------------------------------------


def _model_card(c: Context) -> dict:
    return {"id": c.settings.model_id, "object": "model", "created": c.created, "owned_by": "onebit",
            "max_model_len": c.engine.ctx or None}


async def list_models(request: Request) -> dict:
    c: Context = request.app.state.onebit
    return {"object": "list", "data": [_model_card(c)]}


async def get_model(request: Request, model_id: str) -> dict:
    c: Context = request.app.state.onebit
    c.check_model(model_id)
    return _model_card(c)


async def health(request: Request) -> JSONResponse:
    engine = request.app.state.onebit.engine
    if engine.ready.is_set():
        return JSONResponse({"status": "ok"})
    err = not_ready(engine)
    status = "error" if engine.load_error else "loading"
    return JSONResponse({"status": status, **err.body()}, status_code=503, headers=err.headers)


async def metrics(request: Request) -> Response:
    return Response(request.app.state.onebit.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def tokenize(request: Request) -> dict:
    c: Context = request.app.state.onebit
    req = parse(TokenizeRequest, await request.body())
    c.check_model(req.model)
    model = c.ready_model()
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("Give exactly one of 'prompt' and 'messages'.")
    try:
        if req.messages is not None:
            ids = model.tokenizer.apply_chat_template(flat_messages(req.messages), tokenize=True,
                                                      add_generation_prompt=req.add_generation_prompt)
        else:
            ids = model.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    except Exception as e:  # noqa: BLE001 - template errors, unencodable text
        raise bad_request(f"Could not tokenize: {e}") from None
    return {"tokens": ids, "count": len(ids), "max_model_len": c.engine.ctx}


async def detokenize(request: Request) -> dict:
    c: Context = request.app.state.onebit
    req = parse(DetokenizeRequest, await request.body())
    c.check_model(req.model)
    model = c.ready_model()
    vocab = model.config.vocab_size
    if any(not 0 <= t < vocab for t in req.tokens):
        raise bad_request(f"Token ids must be in [0, {vocab}).", param="tokens")
    return {"prompt": model.tokenizer.decode(req.tokens)}


# ---- errors ------------------------------------------------------------------------------------------------


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def invalid(request: Request, e: RequestValidationError | ValidationError) -> JSONResponse:
        err = validation_error(e) if isinstance(e, ValidationError) else _request_validation(e)
        return JSONResponse(err.body(), status_code=400)

    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = f"Unknown endpoint {request.method} {request.url.path}" if e.status_code in (404, 405) \
            else str(e.detail)
        return JSONResponse(error_body(message, "invalid_request_error", None, code), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    async def crash(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(f"Internal error: {type(e).__name__}", "server_error"), status_code=500)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(ValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, crash)


def _request_validation(e: RequestValidationError) -> APIError:
    err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "path", "query")) or None
    return bad_request(f"Invalid value for {param or 'the request'}: {err.get('msg')}.", param=param,
                       code="invalid_value")


class CountRequests:
    """ASGI middleware: onebit_http_requests_total{route, status}."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in _KNOWN else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


_KNOWN = frozenset({*_BODIES, "/v1/models", "/health", "/metrics"})


# ---- OpenAPI -------------------------------------------------------------------------------------------------


def _openapi(app: FastAPI) -> dict:
    """The schema, with the request bodies the handlers parse themselves, 400 (not 422) for bad input, and
    ``model`` limited to the served model's id."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    model_id = app.state.onebit.settings.model_id
    for path, model in _BODIES.items():
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(js.pop("$defs", {}))
        if "model" in js.get("properties", {}):
            js["properties"]["model"] = {"anyOf": [{"type": "string", "enum": [model_id]}, {"type": "null"}]}
        components[model.__name__] = js
        schema["paths"][path]["post"]["requestBody"] = {
            "required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/"
                                                                                    f"{model.__name__}"}}}}
    for ops in schema["paths"].values():
        for op in ops.values():
            op.get("responses", {}).pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    app.openapi_schema = schema
    return schema
