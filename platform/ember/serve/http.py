"""The HTTP surface of `ember serve` (FastAPI, mounted as the Serve replica's ingress).

    POST /v1/completions  {prompt, max_tokens, temperature, top_p, top_k, seed, stop, stream}   (SSE if stream)
    POST /v1/images       {class_label, guidance_scale, steps, seed, n}  -> base64 PNGs (diffusion, GAN)
    GET  /v1/models, GET /healthz

Every error is JSON `{"error": {"field": ..., "message": ...}}` with a 4xx for what the client sent: a bad
field (pydantic, strict types, unknown fields refused) 422, bad JSON 400, a missing or wrong bearer token
401, an oversized body 413. Ray's token auth does not cover the Serve HTTP port, so the bearer check
here is what protects it.
"""

from __future__ import annotations

import base64
import codecs
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ember.generation.decode import encode_prompt
from ember.generation.sampling import SamplingParams
from ember.serve.images import ImageQuery

OPEN_PATHS = {"/healthz"}  # liveness probes need no token


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(description="Text to continue (byte-level tokens).")
    max_tokens: int = Field(16, ge=1, description="Tokens to generate at most (the server caps it).")
    temperature: float = Field(1.0, ge=0, le=10, description="0 is greedy.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int | None = Field(None, ge=1, description="Sample among the k most likely tokens.")
    seed: int | None = Field(None, ge=0, description="Sampling seed; random when absent.")
    stop: list[str] | None = Field(None, max_length=8, description="Stop once the text contains one of these.")
    stream: bool = Field(False, description="Server-sent events, one per token.")
    model: str | None = Field(None, description="Ignored: one model per server.")


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    class_label: int | None = Field(None, ge=0, description="Class to condition on (class-conditional models).")
    guidance_scale: float | None = Field(None, ge=0, le=50, description="Classifier-free guidance (diffusion).")
    steps: int | None = Field(None, ge=1, le=1000, description="DDIM steps (diffusion).")
    seed: int | None = Field(None, ge=0, description="Sampling seed; random when absent.")
    n: int = Field(1, ge=1, le=16, description="Images to return.")


class Backend(Protocol):
    """What the replica offers the routes (serve/app.py's EmberServer)."""

    family: str
    seq_len: int
    max_tokens_limit: int

    def describe(self) -> dict[str, Any]: ...
    def failure(self) -> str | None: ...
    def generate(
        self, prompt: list[int], max_tokens: int, params: SamplingParams, stop: list[str]
    ) -> AsyncIterator: ...
    async def images(self, query: ImageQuery) -> list[bytes]: ...
    def num_classes(self) -> int: ...


def error(status: int, field: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"field": field, "message": message}}, status_code=status, headers=headers)


def build_api(backend: Backend, token: str | None, max_body_bytes: int) -> FastAPI:
    api = FastAPI(title="ember serve", docs_url=None, redoc_url=None, openapi_url=None)
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_middleware(RequestGuard, token=token, max_body_bytes=max_body_bytes)
    _completion_routes(api, backend)
    _other_routes(api, backend)
    return api


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return error(400, "body", f"invalid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(location) or "body"
    return error(422, field, f"{field}: {first.get('msg')}")


def _completion_routes(api: FastAPI, backend: Backend) -> None:
    @api.post("/v1/completions")
    async def completions(body: CompletionRequest):
        if backend.family != "gpt":
            return error(400, "model", f"this server holds a {backend.family} model; use /v1/images")
        if body.max_tokens > backend.max_tokens_limit:
            return error(422, "max_tokens", f"max_tokens: at most {backend.max_tokens_limit} on this server")
        tokenizer = getattr(backend, "tokenizer", None)
        prompt = encode_prompt(body.prompt, tokenizer)
        if len(prompt) > backend.seq_len:
            return error(422, "prompt", f"prompt: {len(prompt)} tokens; the model's context is {backend.seq_len}")
        if backend.failure():
            return error(503, "server", f"the serving ranks failed ({backend.failure()}); restarting")
        params = SamplingParams(body.temperature, body.top_k, body.top_p, _seed(body.seed))
        tokens = backend.generate(prompt, body.max_tokens, params, body.stop or [])
        completion_id = f"cmpl-{secrets.token_hex(8)}"
        if body.stream:
            return StreamingResponse(_events(tokens, completion_id, tokenizer), media_type="text/event-stream")
        return await _collect(tokens, completion_id, len(prompt), tokenizer)


async def _collect(tokens: AsyncIterator, completion_id: str, prompt_tokens: int, tokenizer=None) -> JSONResponse:
    generated, reason = [], None
    try:
        async for token, finish in tokens:
            generated.append(token)
            reason = finish
    except RuntimeError as exc:
        return error(503, "server", str(exc))
    choice = {"index": 0, "text": TextDecoder(tokenizer).feed(generated, final=True), "tokens": generated,
              "finish_reason": reason}  # fmt: skip
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(generated),
             "total_tokens": prompt_tokens + len(generated)}  # fmt: skip
    return JSONResponse({"id": completion_id, "object": "text_completion", "created": int(time.time()),
                         "choices": [choice], "usage": usage})  # fmt: skip


async def _events(tokens: AsyncIterator, completion_id: str, tokenizer=None) -> AsyncIterator[str]:
    decoder = TextDecoder(tokenizer)
    try:
        async for token, reason in tokens:
            text = decoder.feed([token], final=reason is not None)
            choice = {"index": 0, "text": text, "token": token, "finish_reason": reason}
            yield f"data: {json.dumps({'id': completion_id, 'object': 'text_completion', 'choices': [choice]})}\n\n"
    except RuntimeError as exc:
        yield f"data: {json.dumps({'error': {'field': 'server', 'message': str(exc)}})}\n\n"
    yield "data: [DONE]\n\n"


def _other_routes(api: FastAPI, backend: Backend) -> None:
    @api.post("/v1/images")
    async def images(body: ImageRequest):
        if backend.family not in ("diffusion", "gan"):
            return error(400, "model", f"this server holds a {backend.family} model; use /v1/completions")
        if body.class_label is not None and body.class_label >= max(backend.num_classes(), 1):
            return error(422, "class_label", f"class_label: the model has {backend.num_classes()} classes")
        query = ImageQuery(body.n, body.class_label, body.guidance_scale, body.steps, _seed(body.seed))
        pngs = await backend.images(query)
        return {"created": int(time.time()), "data": [{"b64_png": base64.b64encode(png).decode()} for png in pngs]}

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"object": "model", "owned_by": "ember", **backend.describe()}]}

    @api.get("/healthz")
    async def healthz():
        if backend.failure():
            return error(503, "server", backend.failure())
        info = backend.describe()  # open to probes: no paths or process ids here
        return {"status": "ok", "family": info["family"], "steps": info.get("steps", 0)}


def _seed(seed: int | None) -> int:
    return secrets.randbits(63) if seed is None else seed


class TextDecoder:
    """Tokens -> text, holding back an incomplete UTF-8 character until its last byte arrives. With a tokenizer
    file: the text of all tokens so far, less what was already sent (a trailing partial character held back)."""

    def __init__(self, tokenizer=None) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.tokenizer = tokenizer if tokenizer is not None and tokenizer.path is not None else None
        self.tokens: list[int] = []
        self.sent = 0

    def feed(self, tokens: list[int], final: bool = False) -> str:
        if self.tokenizer is None:
            return self.decoder.decode(bytes(t for t in tokens if 0 < t < 256), final=final)
        self.tokens += tokens
        text = self.tokenizer.decode(self.tokens)
        ready = len(text) if final or not text.endswith("\ufffd") else len(text.rstrip("\ufffd"))
        piece, self.sent = text[self.sent : ready], max(self.sent, ready)
        return piece


class RequestGuard:
    """ASGI middleware: bearer token on every path but /healthz, and a cap on the request body, checked
    before FastAPI parses anything. Starlette has no body-size limit of its own, hence this."""

    def __init__(self, app, token: str | None, max_body_bytes: int) -> None:
        self.app, self.token, self.max_body_bytes = app, token, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        if self.token and scope["path"] not in OPEN_PATHS and not self._authorized(headers.get("authorization")):
            challenge = {"WWW-Authenticate": "Bearer"}
            return await error(401, "Authorization", "missing or wrong bearer token", challenge)(scope, receive, send)
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
        response = error(413, "body", f"request body over {self.max_body_bytes} bytes")
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
