"""The HTTP server: an OpenAI-compatible FastAPI app over one loaded model.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` and
``POST /v1/completions`` (both optionally streamed as server-sent events). Every error body has
OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``. Requests take turns on the
model (see :class:`instructkit.serve.engine.OneAtATime`).
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from instructkit.data.templates import encode_prompt
from instructkit.errors import InputError
from instructkit.generation import generate
from instructkit.serve.engine import OneAtATime, QueueFull, TextStream
from instructkit.serve.schema import ChatCompletionRequest, CompletionRequest, _Sampling

DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_QUEUE = 16


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def context_length(model: Any) -> int | None:
    """Most tokens (prompt + response) the model has positions for, if its config says."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def create_app(model: Any, tokenizer: Any, model_name: str, *, api_key: str | None = None,
               max_queue: int = DEFAULT_MAX_QUEUE, label_store: str | None = None,
               runs_dir: str | None = None) -> FastAPI:
    """An app serving ``model``; with ``api_key``, ``/v1/*`` needs ``Authorization: Bearer <key>``.

    The web pages (chat, ranking over ``label_store``, runs under ``runs_dir``) come from
    :mod:`instructkit.serve.pages`.
    """
    app = FastAPI(title="instructkit", description=f"OpenAI-compatible API serving {model_name}")
    queue = OneAtATime(max_queue)
    app.state.queue = queue
    created = int(time.time())
    context = context_length(model)

    # 1. Errors, all in OpenAI's shape.
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            message, param = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
        else:
            param = ".".join(loc) or None
            message = f"{param}: {first['msg']}" if param else first["msg"]
        return APIError(400, message, param=param, code=first.get("type")).response()

    @app.exception_handler(InputError)
    async def _bad_input(request: Request, exc: InputError) -> JSONResponse:
        return APIError(400, exc.format(), param=exc.field).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    # 2. Authentication: a constant-time comparison against the one key.
    def authorized(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    # 3. Endpoints.
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "busy": queue.lock.locked(), "waiting": queue.waiting}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict:
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "instructkit"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest):
        messages = [m.model_dump() for m in body.messages]
        return await _answer(body, messages, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest):
        return await _answer(body, [{"role": "user", "content": body.prompt}], chat=False)

    async def _answer(body: _Sampling, messages: list[dict], *, chat: bool):
        if body.model is not None and body.model != model_name:
            raise APIError(404, f"model '{body.model}' is not served here (this server serves '{model_name}')",
                           param="model", code="model_not_found")
        if body.stream and body.n > 1:
            raise APIError(400, "streaming supports n=1 only", param="n")
        prompt_ids = encode_prompt(tokenizer, messages)
        max_tokens = _max_tokens(body, len(prompt_ids))
        seed = body.seed if body.seed is not None else secrets.randbits(31)
        params = dict(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=seed,
                      stop=body.stop_list())
        try:
            queue.admit()
        except QueueFull as exc:
            raise APIError(503, str(exc), type="server_error", code="server_busy") from None
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
                "model": model_name}
        if body.stream:
            return StreamingResponse(_stream(prompt_ids, params, meta, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        async with queue.turn():
            texts = await anyio.to_thread.run_sync(
                lambda: generate(model, tokenizer, [prompt_ids] * body.n, batch_size=body.n, **params))
        counts = [_count(t) for t in texts]
        choices = [_choice(i, t, _finish(c, max_tokens), chat) for i, (t, c) in enumerate(zip(texts, counts))]
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": sum(counts),
                 "total_tokens": len(prompt_ids) + sum(counts)}
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices, "usage": usage}

    def _max_tokens(body: _Sampling, prompt_tokens: int) -> int:
        if context is None:
            return body.max_tokens or DEFAULT_MAX_TOKENS
        left = context - prompt_tokens
        wanted = body.max_tokens if body.max_tokens is not None else min(DEFAULT_MAX_TOKENS, left)
        if left < 1 or wanted > left:
            raise APIError(400, f"this model's context is {context} tokens, but {prompt_tokens + max(wanted, 1)} were "
                                f"requested ({prompt_tokens} in the prompt, {max(wanted, 1)} for the response)",
                           param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded")
        return wanted

    def _count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    async def _stream(prompt_ids: list[int], params: dict, meta: dict, chat: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(delta: dict | str, finish: str | None = None) -> str:
            choice = ({"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish} if chat
                      else {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish})
            return f"data: {json.dumps({**meta, 'object': obj, 'choices': [choice]})}\n\n"

        async with queue.turn():
            stream = TextStream(model, tokenizer, prompt_ids, **params)
            try:
                if chat:
                    yield event({"role": "assistant", "content": ""})
                while (piece := await anyio.to_thread.run_sync(next, stream, None)) is not None:
                    yield event({"content": piece} if chat else piece)
                finish = _finish(_count(stream.text), params["max_new_tokens"])
                yield event({} if chat else "", finish)
                yield "data: [DONE]\n\n"
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(stream.close)

    # 4. Web pages: chat, ranking (with a label store), runs.
    from instructkit.serve.pages import make_router

    app.include_router(make_router(label_store=label_store, runs_dir=runs_dir, api_key=api_key))
    return app


def _finish(completion_tokens: int, max_tokens: int) -> str:
    # Re-tokenizing the text can differ by a token from what was sampled; close enough to tell
    # "ran out of room" from "stopped", which is what clients use finish_reason for.
    return "length" if completion_tokens >= max_tokens else "stop"


def _choice(index: int, text: str, finish: str, chat: bool) -> dict:
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
