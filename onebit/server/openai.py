"""OpenAI wire format: request models (validated, unknown fields ignored), errors, and response/chunk shapes."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import SamplingParams
from ..engine import Chunk, TokenLogprob, Usage

# ---- errors ------------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error the client sees as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---- requests ----------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields shared by chat and completions."""

    model: str | None = Field(None, description="the served model's id (see GET /v1/models)")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    prompt_cache_key: str | None = Field(None, max_length=256, description="alias of the X-1bit-Session header")
    session_id: str | None = Field(None, max_length=256, description="alias of the X-1bit-Session header")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def parse(model: type[BaseModel], raw: bytes) -> Any:
    """Validate a JSON body: invalid JSON, lone surrogates and bad fields are 400s naming the field."""
    try:
        data = json.loads(raw)
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("The request contains invalid Unicode (a lone surrogate).") from None
    except ValueError as e:
        raise bad_request(f"We could not parse the JSON body of your request: {e}") from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


def validation_error(e: ValidationError) -> APIError:
    err = e.errors(include_url=False)[0]
    param = ".".join(str(p) for p in err["loc"] if p != "body") or None
    where = f"'{param}'" if param else "the request"
    return bad_request(f"Invalid value for {where}: {err['msg']}.", param=param, code="invalid_value")


def sampling_params(req: _Sampling, vocab_size: int) -> SamplingParams:
    """The request's sampling fields as SamplingParams (OpenAI defaults: temperature 1, top_p 1)."""
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab_size:
            raise bad_request(f"Invalid key in 'logit_bias': {key!r} is not a token id in [0, {vocab_size}).",
                              param="logit_bias")
        if not -100 <= value <= 100:
            raise bad_request(f"Invalid value in 'logit_bias' for token {key}: {value} is not in [-100, 100].",
                              param="logit_bias")
        bias[int(key)] = float(value)
    top_p = 1.0 if req.top_p is None else req.top_p
    try:
        return SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=top_p if top_p > 0 else 1e-9, top_k=max(0, req.top_k or 0), min_p=req.min_p or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0, presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0, logit_bias=bias,
            seed=None if req.seed is None else req.seed % 2**64)
    except ValueError as e:
        raise bad_request(str(e)) from None


def stop_strings(req: _Sampling) -> list[str]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 16:
        raise bad_request("Invalid 'stop': at most 16 stop strings.", param="stop")
    if any(not s for s in stops):
        raise bad_request("Invalid 'stop': stop strings must not be empty.", param="stop")
    return stops


def check_stream_options(req: _Sampling) -> bool:
    """Whether to send a usage chunk; stream_options without stream is an error, as at OpenAI."""
    if req.stream_options is not None and not req.stream:
        raise bad_request("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                          param="stream_options")
    return bool(req.stream and req.stream_options and req.stream_options.include_usage)


def flat_messages(messages: list[ChatMessage]) -> list[dict]:
    """Messages as template input: content parts joined into one string, None content as ""."""
    out = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            content = "\n".join(p.text for p in content)
        d = {"role": m.role, "content": content or ""}
        if m.name is not None:
            d["name"] = m.name
        out.append(d)
    return out


# ---- responses ---------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_body(u: Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": 0}}


def sum_usage(usages: list[Usage]) -> Usage:
    return Usage(sum(u.prompt_tokens for u in usages), sum(u.completion_tokens for u in usages),
                 sum(u.cached_tokens for u in usages))


def _token_entry(token: str, data: bytes, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(data)}


def chat_logprobs(lps: list[TokenLogprob]) -> dict:
    content = [{**_token_entry(t.text, t.bytes, t.logprob),
                "top_logprobs": [_token_entry(s, b, lp) for _, s, b, lp in t.top]} for t in lps]
    return {"content": content, "refusal": None}


def completion_logprobs(lps: list[TokenLogprob], offset: int) -> dict:
    offsets = []
    for t in lps:
        offsets.append(offset)
        offset += len(t.text)
    return {"tokens": [t.text for t in lps], "token_logprobs": [t.logprob for t in lps],
            "top_logprobs": [{s: lp for _, s, _, lp in t.top} for t in lps], "text_offset": offsets}


class Shaper:
    """Builds one request's response and SSE chunks; subclasses give the chat / completion shapes."""

    object_name = ""
    chunk_name = ""

    def __init__(self, model: str, n_choices: int, logprobs: bool, include_usage: bool = False):
        self.id, self.created, self.model = new_id(self.prefix), int(time.time()), model
        self.n_choices, self.logprobs, self.include_usage = n_choices, logprobs, include_usage

    prefix = "cmpl"

    def _envelope(self, name: str, choices: list[dict]) -> dict:
        body = {"id": self.id, "object": name, "created": self.created, "model": self.model,
                "system_fingerprint": "onebit", "choices": choices}
        if self.include_usage:
            body["usage"] = None
        return body

    def chunk(self, choices: list[dict]) -> dict:
        return self._envelope(self.chunk_name, choices)

    def usage_chunk(self, usage: Usage) -> dict:
        return {**self._envelope(self.chunk_name, []), "usage": usage_body(usage)}

    def response(self, texts: list[str], lps: list[list[TokenLogprob]], finish: list[str | None],
                 usage: Usage) -> dict:
        choices = [self.choice(i, texts[i], lps[i], finish[i]) for i in range(self.n_choices)]
        return {**self._envelope(self.object_name, choices), "usage": usage_body(usage)}


class ChatShaper(Shaper):
    object_name, chunk_name, prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def start_chunks(self) -> list[dict]:
        return [self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]) for i in range(self.n_choices)]

    def delta(self, index: int, c: Chunk) -> dict | None:
        if not c.text and not c.logprobs:
            return None
        lp = chat_logprobs(c.logprobs) if self.logprobs and c.logprobs else None
        return self.chunk([{"index": index, "delta": {"content": c.text}, "logprobs": lp, "finish_reason": None}])

    def finish_chunk(self, index: int, reason: str) -> dict:
        return self.chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}])

    def choice(self, i: int, text: str, lps: list[TokenLogprob], finish: str | None) -> dict:
        return {"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": chat_logprobs(lps) if self.logprobs else None, "finish_reason": finish}


class CompletionShaper(Shaper):
    object_name, chunk_name, prefix = "text_completion", "text_completion", "cmpl"

    def __init__(self, *args, echo: list[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.echo = echo  # per choice: the prompt text to put first
        self.offsets = [len(e) for e in echo] if echo else [0] * self.n_choices

    def start_chunks(self) -> list[dict]:
        if not self.echo:
            return []
        return [self.chunk([{"index": i, "text": t, "logprobs": None, "finish_reason": None}])
                for i, t in enumerate(self.echo) if t]

    def delta(self, index: int, c: Chunk) -> dict | None:
        if not c.text and not c.logprobs:
            return None
        lp = completion_logprobs(c.logprobs, self.offsets[index]) if self.logprobs and c.logprobs else None
        self.offsets[index] += len(c.text)
        return self.chunk([{"index": index, "text": c.text, "logprobs": lp, "finish_reason": None}])

    def finish_chunk(self, index: int, reason: str) -> dict:
        return self.chunk([{"index": index, "text": "", "logprobs": None, "finish_reason": reason}])

    def choice(self, i: int, text: str, lps: list[TokenLogprob], finish: str | None) -> dict:
        head = self.echo[i] if self.echo else ""
        lp = completion_logprobs(lps, len(head)) if self.logprobs else None
        return {"index": i, "text": head + text, "logprobs": lp, "finish_reason": finish}
