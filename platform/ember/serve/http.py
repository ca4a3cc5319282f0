"""The HTTP surface of `ember serve` (FastAPI, mounted as the Serve replica's ingress), OpenAI's API as vLLM serves it.

    POST /v1/completions       prompt (text, texts, token ids), n, stop, logprobs, echo, penalties, stream ...
    POST /v1/chat/completions  messages rendered by the --chat-template given at serve time
    POST /v1/images            {class_label, guidance_scale, steps, seed, n}  -> base64 PNGs (diffusion, GAN)
    GET  /v1/models, /v1/models/{id}, /health, /healthz, /metrics

Every error is OpenAI's `{"error": {"message", "type", "param", "code"}}`: 400 for what the client sent (bad
JSON, a bad or unknown field, a prompt the model cannot take), 401 without the bearer token, 404 for an
unknown model or path, 413 for an oversized body, 503 (with Retry-After) when busy or restarting. Ray's token
auth does not cover the Serve HTTP port, so the bearer check here is what protects it.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ember.generation.decode import encode_prompt
from ember.generation.sampling import SamplingParams
from ember.serve.completions import Choice, Shape, choices_for, collect, stream
from ember.serve.images import ImageQuery
from ember.serve.metrics import RequestCounts
from ember.serve.protocol import ApiError, ChatRequest, CompletionRequest, SamplingFields

OPEN_PATHS = {"/healthz", "/health"}  # liveness probes need no token


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    class_label: int | None = Field(None, ge=0, le=2**31, description="Class to condition on (class-conditional).")
    guidance_scale: float | None = Field(None, ge=0, le=50, description="Classifier-free guidance (diffusion).")
    steps: int | None = Field(None, ge=1, le=1000, description="DDIM steps (diffusion).")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Sampling seed; random when absent.")
    n: int = Field(1, ge=1, le=16, description="Images to return.")
    model: str | None = Field(None, max_length=256)


class Backend(Protocol):
    """What the replica offers the routes (serve/app.py's EmberServer)."""

    family: str
    seq_len: int
    vocab_size: int
    max_tokens_limit: int
    max_sequences: int  # per request
    model_name: str

    def describe(self) -> dict[str, Any]: ...
    def failure(self) -> str | None: ...
    def generate(self, prompt: list[int], max_tokens: int, params: SamplingParams, stop: list[str],
                 logprobs: int | None, prompt_logprobs: bool): ...  # fmt: skip
    def room(self, sequences: int) -> bool: ...
    def chat_prompt(self, request: ChatRequest) -> str: ...
    async def images(self, query: ImageQuery) -> list[bytes]: ...
    def num_classes(self) -> int: ...
    async def metrics(self) -> str: ...


def error(status: int, message: str, param: str | None = None, code: str = "invalid_value",
          headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    return api_error_response(ApiError(status, message, param, code, headers))


class AsciiJSONResponse(JSONResponse):
    """Errors may quote what the client sent, lone UTF-16 surrogates included, which UTF-8 cannot encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def api_error_response(exc: ApiError) -> JSONResponse:
    return AsciiJSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return api_error_response(exc)


def build_api(backend: Backend, token: str | None, max_body_bytes: int, counts: RequestCounts) -> FastAPI:
    api = FastAPI(title="ember serve", docs_url=None, redoc_url=None, openapi_url=None)
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(ApiError, _api_error)
    api.add_exception_handler(HTTPException, _http_error)
    api.add_exception_handler(Exception, _unexpected)
    _completion_routes(api, backend)
    _other_routes(api, backend)
    known = {route.path for route in api.routes}
    api.add_middleware(RequestGuard, token=token, max_body_bytes=max_body_bytes, counts=counts, known_paths=known)
    return api


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return error(400, f"invalid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None, "invalid_json")
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    location = [part for part in location if not _is_union_branch(part)]
    field = ".".join(location) or None
    kind = first.get("type", "")
    code = {"extra_forbidden": "unknown_parameter", "missing": "missing_required_parameter"}.get(kind, "invalid_value")
    message = f"{field or 'body'}: {first.get('msg')}"
    if kind == "extra_forbidden":
        message = f"{field}: unrecognized request argument (this server does not support it)"
    return error(400, message, field, code)


def _is_union_branch(part: str) -> bool:
    """pydantic names the branch of a union it tried (`str`, `list[int]`, `function-after[...]`): not a field."""
    return "[" in part or part in ("str", "int", "float", "bool", "list", "dict", "none")


async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
    return error(exc.status_code, str(exc.detail), None, code, getattr(exc, "headers", None))


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    return error(500, f"internal error: {type(exc).__name__}: {exc}", None, "internal_error")


def _completion_routes(api: FastAPI, backend: Backend) -> None:
    @api.post("/v1/completions")
    async def completions(body: CompletionRequest):
        _check_text_model(backend, body.model)
        _refuse_unsupported(body)
        prompts = [_checked_prompt(backend, tokens) for tokens in _prompt_tokens(backend, body.prompt)]
        logprobs = min(body.logprobs, backend.vocab_size) if body.logprobs is not None else None
        shape = _shape(backend, body, _max_tokens(backend, body.max_tokens), logprobs, body.echo, prompts, chat=False)
        return await _answer(backend, body, prompts, shape)

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        _check_text_model(backend, body.model)
        _check_stream_options(body)
        prompt = _checked_prompt(backend, _encoded(backend, backend.chat_prompt(body), "messages"), "messages")
        top = min(body.top_logprobs or 0, backend.vocab_size) if body.logprobs else None
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs set to true", "top_logprobs")
        limit = _max_tokens(backend, body.max_completion_tokens or body.max_tokens)
        shape = _shape(backend, body, limit, top, False, [prompt], chat=True)
        return await _answer(backend, body, [prompt], shape)


def _shape(backend: Backend, body: SamplingFields, max_tokens: int, logprobs: int | None, echo: bool,
           prompts: list[list[int]], chat: bool) -> Shape:  # fmt: skip
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    usage = bool(body.stream_options and body.stream_options.include_usage)
    prompt_tokens = sum(len(prompt) for prompt in prompts)
    tokenizer = getattr(backend, "tokenizer", None)
    return Shape(max_tokens, stop, logprobs, echo, chat, backend.model_name, prompt_tokens, usage, tokenizer)


async def _answer(backend: Backend, body: SamplingFields, prompts: list[list[int]], shape: Shape):
    choices: list[Choice] = choices_for(prompts, body.n, _sampling(backend, body), body.seed)
    if len(choices) > backend.max_sequences:  # could never be admitted whole: not a matter of retrying
        raise ApiError(400, f"n: {len(choices)} sequences (prompts x n); this server takes at most "
                       f"{backend.max_sequences} per request", "n")  # fmt: skip
    if backend.failure():
        raise ApiError(503, f"the serving ranks failed ({backend.failure()}); restarting", None, "ranks_failed",
                       {"Retry-After": "5"})  # fmt: skip
    if not backend.room(len(choices)):
        raise ApiError(503, "the server is busy: too many sequences wait; retry later", None, "overloaded",
                       {"Retry-After": "1"})  # fmt: skip
    if body.stream:
        return StreamingResponse(stream(backend.generate, choices, shape), media_type="text/event-stream")
    return JSONResponse(await collect(backend.generate, choices, shape))


def _check_text_model(backend: Backend, model: str | None) -> None:
    if backend.family != "gpt":
        raise ApiError(400, f"this server holds a {backend.family} model; use /v1/images", "model")
    _check_model_name(backend, model)


def _check_model_name(backend: Backend, model: str | None) -> None:
    if model is not None and model != backend.model_name:
        raise ApiError(404, f"The model `{model}` does not exist; this server serves `{backend.model_name}`",
                       "model", "model_not_found")  # fmt: skip


def _refuse_unsupported(body: CompletionRequest) -> None:
    if body.suffix is not None:
        raise ApiError(400, "suffix: not supported (the model does not fill in the middle)", "suffix", "unsupported")
    if body.best_of is not None and body.best_of != body.n:
        raise ApiError(400, f"best_of: only best_of == n ({body.n}) is supported", "best_of", "unsupported")
    if body.max_tokens == 0 and not body.echo:
        raise ApiError(400, "max_tokens: 0 only with echo (the prompt's log-probs)", "max_tokens")
    _check_stream_options(body)


def _check_stream_options(body: SamplingFields) -> None:
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options: only with stream set to true", "stream_options")


def _prompt_tokens(backend: Backend, prompt: str | list) -> list[list[int]]:
    if isinstance(prompt, str):
        return [_encoded(backend, prompt, "prompt")]
    if isinstance(prompt[0], str):
        return [_encoded(backend, text, "prompt") for text in prompt]
    return [list(prompt)] if isinstance(prompt[0], int) else [list(tokens) for tokens in prompt]


def _encoded(backend: Backend, text: str, param: str) -> list[int]:
    try:
        return encode_prompt(text, getattr(backend, "tokenizer", None))
    except UnicodeEncodeError as exc:  # JSON can carry a lone surrogate ("\\ud800"); UTF-8 cannot
        raise ApiError(400, f"{param}: not valid Unicode ({exc.reason} at character {exc.start})", param) from exc


def _checked_prompt(backend: Backend, tokens: list[int], param: str = "prompt") -> list[int]:
    if len(tokens) > backend.seq_len:
        raise ApiError(400, f"{param}: {len(tokens)} tokens; the model's context is {backend.seq_len}", param,
                       "context_length_exceeded")  # fmt: skip
    outside = next((token for token in tokens if token >= backend.vocab_size), None)
    if outside is not None:
        raise ApiError(400, f"{param}: token {outside} is outside the model's vocabulary of {backend.vocab_size}",
                       param)  # fmt: skip
    return tokens


def _max_tokens(backend: Backend, asked: int | None) -> int:
    if asked is not None and asked > backend.max_tokens_limit:
        raise ApiError(400, f"max_tokens: at most {backend.max_tokens_limit} on this server", "max_tokens")
    return backend.max_tokens_limit if asked is None else asked


def _sampling(backend: Backend, body: SamplingFields) -> SamplingParams:
    bias = []
    for key, value in (body.logit_bias or {}).items():
        if not (key.isascii() and key.isdigit() and int(key) < backend.vocab_size):
            raise ApiError(400, f"logit_bias: {key!r} is no token id of the vocabulary of {backend.vocab_size}",
                           "logit_bias")  # fmt: skip
        bias.append((int(key), value))
    top_k = body.top_k if body.top_k not in (None, -1, 0) else None
    temperature = 1.0 if body.temperature is None else body.temperature
    return SamplingParams(temperature, top_k, body.top_p, 0, body.presence_penalty, body.frequency_penalty,
                          body.repetition_penalty, tuple(bias))  # fmt: skip


def _other_routes(api: FastAPI, backend: Backend) -> None:
    @api.post("/v1/images")
    async def images(body: ImageRequest):
        if backend.family not in ("diffusion", "gan"):
            raise ApiError(400, f"this server holds a {backend.family} model; use /v1/completions", "model")
        _check_model_name(backend, body.model)
        if body.class_label is not None and body.class_label >= max(backend.num_classes(), 1):
            raise ApiError(400, f"class_label: the model has {backend.num_classes()} classes", "class_label")
        query = ImageQuery(body.n, body.class_label, body.guidance_scale, body.steps, _seed(body.seed))
        pngs = await backend.images(query)
        return {"created": int(time.time()), "data": [{"b64_png": base64.b64encode(png).decode()} for png in pngs]}

    def model_card() -> dict[str, Any]:
        return {"object": "model", "owned_by": "ember", "created": 0, **backend.describe(), "id": backend.model_name}

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @api.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        _check_model_name(backend, model_id)
        return model_card()

    @api.get("/healthz")
    @api.get("/health")
    async def healthz():
        if backend.failure():
            return error(503, backend.failure(), None, "ranks_failed")
        info = backend.describe()  # open to probes: no paths or process ids here
        return {"status": "ok", "family": info["family"], "steps": info.get("steps", 0)}

    @api.get("/metrics")
    async def metrics():
        return PlainTextResponse(await backend.metrics(), media_type="text/plain; version=0.0.4")


def _seed(seed: int | None) -> int:
    return secrets.randbits(63) if seed is None else seed


class RequestGuard:
    """ASGI middleware: bearer token on every path but the health probes, and a cap on the request body,
    checked before FastAPI parses anything (Starlette has no body-size limit of its own); counts every answer."""

    def __init__(self, app, token: str | None, max_body_bytes: int, counts: RequestCounts, known_paths: set[str]):
        self.app, self.token, self.max_body_bytes = app, token, max_body_bytes
        self.counts, self.known_paths = counts, known_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"  # the route, under Serve's prefix
        label = path if path in self.known_paths else "other"  # bounded label values

        async def counted_send(message) -> None:
            if message["type"] == "http.response.start":
                self.counts.count(label, message["status"])
            await send(message)

        await self.guarded(scope, path, receive, counted_send)

    async def guarded(self, scope, path: str, receive, send) -> None:
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        if self.token and path not in OPEN_PATHS and not self._authorized(headers.get("authorization")):
            challenge = {"WWW-Authenticate": "Bearer"}
            refusal = error(401, "missing or wrong bearer token", "Authorization", "invalid_api_key", challenge)
            return await refusal(scope, receive, send)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._too_large(scope, receive, send)
        body = await self._read_body(receive)
        if body is None:
            return await self._too_large(scope, receive, send)
        await self.app(scope, _replay(body, receive), send)

    def _authorized(self, header: str | None) -> bool:
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), self.token.encode())

    async def _read_body(self, receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, scope, receive, send) -> None:
        response = error(413, f"request body over {self.max_body_bytes} bytes", "body", "body_too_large")
        await response(scope, receive, send)


def _replay(body: bytes, receive):
    sent = False

    async def replayed() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # afterwards: disconnect notices, as the server sends them

    return replayed
