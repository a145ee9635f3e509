"""The HTTP server: an OpenAI-compatible FastAPI app over one loaded model.

Endpoints: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{model}``,
``POST /v1/chat/completions`` and ``POST /v1/completions`` (both optionally streamed as
server-sent events); their documentation at ``/docs`` and ``/redoc`` works offline. Every error
body has OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``; what does not exist
(another model, a path no endpoint has) is a 404 with the body OpenAI's API sends for it: type
``invalid_request_error``, code ``model_not_found`` for a model, no code for a path. Concurrent requests
are generated together in one batch (see :class:`instructkit.serve.engine.Batcher`).

Named LoRA adapters over the base are served as models of their own (``/v1/models`` lists them with
``parent`` = the base's id, as vLLM does); a request's ``model`` picks one, and requests for
different adapters share the batch. ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``
(vLLM's endpoints and bodies) change them while the server runs.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from instructkit.errors import InputError
from instructkit.serve.classify import ClassifyService, model_task, served_inputs
from instructkit.serve.engine import (
    DEFAULT_MAX_BATCH,
    Choice,
    EngineError,
    LoraAdapters,
    QueueFull,
    Sampling,
    Submission,
    UnknownAdapter,
    make_batcher,
)
from instructkit.serve.schema import (
    STREAM_DESCRIPTION,
    ChatCompletion,
    ChatCompletionRequest,
    Classification,
    ClassificationRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    Health,
    LoadLoraAdapterRequest,
    ModelCard,
    ModelList,
    NotFoundResponse,
    UnloadLoraAdapterRequest,
    _Sampling,
)

DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_QUEUE = 16
DEFAULT_MAX_LORAS = 4  # adapters loaded at once when not told (or as many as given at the start)
ERROR_STATUSES = {
    400: "malformed body, unknown field, value out of range, or prompt + max_tokens past the context",
    401: "an API key is set and the request lacks it or has another",
    404: "`model` names a model this server does not serve (type invalid_request_error, code model_not_found, "
    "as OpenAI's API answers; the `openai` client raises NotFoundError), or the path has no endpoint",
    500: "generation failed (the message says why)",
    503: "the batch is full and max_queue requests already wait",
}


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {**self.headers, **({"WWW-Authenticate": "Bearer"} if self.status == 401 else {})}
        return JSONResponse(body, status_code=self.status, headers=headers)


def context_length(model: Any) -> int | None:
    """Most tokens (prompt + response) the model has positions for, if its config says."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_adapter_name(name: str, model_name: str, field: str) -> None:
    """An InputError when ``name`` cannot name an adapter (empty, the base's id, peft's ``__base__``)."""
    if not name or name in (model_name, LoraAdapters.BASE):
        taken = "is empty" if not name else f"is the {'base' if name == model_name else 'name peft keeps for the base'}"
        raise InputError(f"an adapter name that {taken}: '{name}'", field=field)


def check_adapters(adapters: dict[str, str], model_name: str, max_loras: int | None) -> tuple[dict[str, str], int]:
    """The adapter folders of ``adapters`` (name -> spec) and the resolved ``max_loras``, checked
    from their config files against the base ``model_name`` before any model loads."""
    for name in adapters:
        check_adapter_name(name, model_name, field="adapter")
    limit = max(DEFAULT_MAX_LORAS, len(adapters)) if max_loras is None else max_loras
    if limit < 0:
        raise InputError(f"max_loras must be at least 0, got {limit}", field="max_loras")
    if len(adapters) > limit:
        raise InputError(f"{len(adapters)} adapters given, but max_loras is {limit}", field="max_loras")
    from instructkit.models.loading import lora_adapter_folder

    return {name: lora_adapter_folder(spec, model_name) for name, spec in adapters.items()}, limit


def create_app(
    model: Any,
    tokenizer: Any,
    model_name: str,
    *,
    api_key: str | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_batch: int = DEFAULT_MAX_BATCH,
    label_store: str | None = None,
    runs_dir: str | None = None,
    adapters: dict[str, str] | None = None,
    max_loras: int | None = None,
) -> FastAPI:
    """An app serving ``model``; with ``api_key``, ``/v1/*`` needs ``Authorization: Bearer <key>``.

    The web pages (chat, ranking over ``label_store``, runs under ``runs_dir``) come from
    :mod:`instructkit.serve.pages`.

    Up to ``max_batch`` choices generate together; ``max_queue`` requests may wait while the
    batch is full, and more get a 503.

    ``adapters`` (name -> LoRA adapter folder or run folder) are served over ``model`` under
    those names, and up to ``max_loras`` (default: 4, or as many as given) may be loaded at once
    through ``/v1/load_lora_adapter``; each must sit on the model spec ``model_name``.
    """
    folders, max_loras = check_adapters(dict(adapters or {}), model_name, max_loras)
    engine = make_batcher(model, tokenizer, max_batch=max_batch, max_queue=max_queue, max_loras=max_loras)
    for name, folder in folders.items():
        engine.load(name, folder)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await anyio.to_thread.run_sync(engine.close)

    # /docs and /redoc come from pages.docs_router: FastAPI's own load their scripts from a CDN.
    app = FastAPI(
        title="instructkit",
        description=f"OpenAI-compatible API serving {model_name}",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.engine = engine
    card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "instructkit"}

    def cards() -> dict[str, dict]:
        """The base's card and each served adapter's, by id."""
        adapter_cards = {
            name: {**card, "id": name, "root": folder, "parent": model_name}
            for name, folder in engine.served_adapters.items()
        }
        return {model_name: card, **adapter_cards}

    context = context_length(model)
    if context is not None:  # a prompt-learning adapter's virtual tokens take positions before each prompt
        context -= engine.virtual_tokens
    # A classify run's classifier or tagger answers /classify (and not the generation endpoints).
    task = model_task(model)
    classifier = None
    if task is not None:
        inputs = served_inputs(model_name)
        classifier = ClassifyService(
            model, tokenizer, task, inputs, max_batch=max_batch, max_queue=max_queue, context=context
        )
    app.state.classifier = classifier

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
        where = f"{request.method} {request.url.path}"
        # The router's own 404 and 405 (no route matched) come without an endpoint in the scope.
        if "endpoint" not in request.scope and exc.status_code == 404:
            return APIError(
                404, f"Invalid URL ({where}): there is no such endpoint; the API has {api_endpoints()} (see /docs)"
            ).response()
        if exc.status_code == 405:
            allowed = {k.lower(): v for k, v in (exc.headers or {}).items()}.get("allow", "")
            return APIError(
                405,
                f"{where} is not allowed; this path answers {allowed}",
                code="method_not_allowed",
                headers=exc.headers,
            ).response()
        return APIError(exc.status_code, str(exc.detail), headers=exc.headers).response()

    def api_endpoints() -> str:
        return ", ".join(
            f"{method} {route.path_format}"
            for route in app.routes
            if isinstance(route, APIRoute) and route.path_format.startswith("/v1/")
            for method in sorted(route.methods)
        )

    def unknown_model(name: str) -> APIError:
        served = ", ".join(f"'{n}'" for n in cards())
        return APIError(404, f"The model `{name}` does not exist: this server serves {served}", code="model_not_found")

    # 2. Authentication: a constant-time comparison against the one key.
    def authorized(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")

    # 3. Endpoints, with every status they answer documented in /openapi.json.
    def errors(*statuses: int) -> dict:
        return {
            status: {
                "model": NotFoundResponse if status == 404 else ErrorResponse,
                "description": ERROR_STATUSES[status],
            }
            for status in statuses
        }

    def answers(model: type) -> dict:
        event = {
            "type": "object",
            "required": ["data"],
            "description": STREAM_DESCRIPTION,
            "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
        }
        stream = {"text/event-stream": {"schema": event}}
        return {200: {"model": model, "content": stream}, **errors(400, 401, 404, 500, 503)}

    @app.get("/health", response_model=Health)
    async def health() -> dict:
        return {
            "status": "ok",
            "model": model_name,
            "busy": engine.running > 0,
            "generating": engine.running,
            "waiting": engine.waiting,
        }

    # exclude_none: the base's card has OpenAI's four fields; an adapter's adds root and parent.
    @app.get(
        "/v1/models",
        dependencies=[Depends(authorized)],
        response_model=ModelList,
        response_model_exclude_none=True,
        responses=errors(401),
    )
    async def models() -> dict:
        return {"object": "list", "data": list(cards().values())}

    # `:path`: a model's id is its --model spec, which may hold slashes (runs/quickstart/sft)
    @app.get(
        "/v1/models/{model:path}",
        dependencies=[Depends(authorized)],
        response_model=ModelCard,
        response_model_exclude_none=True,
        responses={
            **errors(401),
            404: {"model": NotFoundResponse, "description": "no model with this id is served here"},
        },
    )
    async def model_card(model: str) -> dict:
        found = cards().get(model)
        if found is None:
            raise unknown_model(model)
        return found

    @app.post(
        "/v1/load_lora_adapter",
        dependencies=[Depends(authorized)],
        response_model=None,
        responses={
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "loaded"},
            400: {
                "model": ErrorResponse,
                "description": "the name is taken or invalid, max_loras adapters are loaded, or the folder is not "
                "a LoRA adapter (safetensors) on the served base",
            },
            **errors(401),
        },
    )
    async def load_lora_adapter(body: LoadLoraAdapterRequest) -> PlainTextResponse:
        from instructkit.models.loading import lora_adapter_folder

        check_adapter_name(body.lora_name, model_name, field="lora_name")
        folder = await anyio.to_thread.run_sync(lora_adapter_folder, body.lora_path, model_name)
        await anyio.to_thread.run_sync(engine.load, body.lora_name, folder)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post(
        "/v1/unload_lora_adapter",
        dependencies=[Depends(authorized)],
        response_model=None,
        responses={
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "removed"},
            400: {"model": ErrorResponse, "description": "malformed body or unknown field"},
            404: {"model": ErrorResponse, "description": "no adapter of this name is served (code model_not_found)"},
            **errors(401),
        },
    )
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest) -> PlainTextResponse:
        # Answers once the adapter is gone: its requests in flight finish first.
        try:
            await anyio.to_thread.run_sync(engine.unload, body.lora_name)
        except UnknownAdapter:
            raise APIError(
                404,
                f"The LoRA adapter `{body.lora_name}` is not loaded (or is being unloaded)",
                param="lora_name",
                code="model_not_found",
            ) from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post(
        "/v1/chat/completions",
        dependencies=[Depends(authorized)],
        response_model=ChatCompletion,
        responses=answers(ChatCompletion),
    )
    async def chat_completions(body: ChatCompletionRequest):
        messages = [m.model_dump() for m in body.messages]
        return await _answer(body, messages, chat=True)

    @app.post(
        "/v1/completions", dependencies=[Depends(authorized)], response_model=Completion, responses=answers(Completion)
    )
    async def completions(body: CompletionRequest):
        return await _answer(body, [{"role": "user", "content": body.prompt}], chat=False)

    @app.post(
        "/classify",
        dependencies=[Depends(authorized)],
        response_model=Classification,
        response_model_exclude_none=True,
        responses={
            **errors(400, 401, 404, 503),
            500: {"model": ErrorResponse, "description": "classification failed (the message says why)"},
        },
    )
    async def classify(body: ClassificationRequest) -> dict:
        """vLLM's classification API over a classify run (docs/serve.md, 'Classifiers and taggers')."""
        if classifier is None:
            raise APIError(
                400,
                f"The model does not support the Classification API: {model_name} generates text (serve it at "
                "/v1/completions and /v1/chat/completions); /classify answers for a classify run's "
                "seq_classification or token_classification model (instructkit serve --model runs/classify)",
                param="model",
                code="model_not_classifier",
            )
        if body.model not in (None, model_name):
            raise unknown_model(body.model)
        try:
            with classifier.admitted():
                items, tokens = await anyio.to_thread.run_sync(classifier.classify, body.texts(), body.instruction)
        except QueueFull as exc:
            raise APIError(503, str(exc), type="server_error", code="server_busy") from None
        except (InputError, APIError):
            raise
        except Exception as exc:  # answered as a 500 in OpenAI's shape, not a dropped connection
            raise APIError(
                500, f"classification failed: {exc}", type="server_error", code="classification_failed"
            ) from exc
        return {
            "id": "classify-" + uuid.uuid4().hex,
            "object": "list",
            "created": int(time.time()),
            "model": model_name,
            "data": items,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
        }

    async def _answer(body: _Sampling, messages: list[dict], *, chat: bool):
        if classifier is not None:
            endpoint = "Chat Completions" if chat else "Completions"
            raise APIError(
                400,
                f"The model does not support the {endpoint} API: {model_name} is a {classifier.task} model "
                "(a classifier, which generates nothing); send its inputs to POST /classify",
                param="model",
                code="model_not_generative",
            )
        adapter = None if body.model in (None, model_name) else body.model
        if adapter is not None and adapter not in engine.served_adapters:
            raise unknown_model(body.model)
        prompt_ids = engine.encode(messages)  # a seq2seq model's: the source text, no chat template
        sampling = Sampling(
            max_new_tokens=_max_tokens(body, len(prompt_ids)),
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed if body.seed is not None else secrets.randbits(31),
            stop=tuple(body.stop_list()),
        )
        try:
            sub = engine.submit(prompt_ids, sampling, n=body.n, adapter=adapter)
        except QueueFull as exc:
            raise APIError(503, str(exc), type="server_error", code="server_busy") from None
        except UnknownAdapter:  # unloaded since the check above
            raise unknown_model(body.model) from None
        meta = {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "created": int(time.time()),
            "model": adapter or model_name,
        }
        if body.stream:
            usage = len(prompt_ids) if body.stream_options and body.stream_options.include_usage else None
            return StreamingResponse(
                _stream(sub, meta, chat, usage), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        try:
            done = await sub.choices()
        except EngineError as exc:
            raise APIError(500, str(exc), type="server_error", code="generation_failed") from None
        finally:
            sub.cancel()  # nothing left once done; frees the rows when the client went away
        completion = sum(c.completion_tokens for c in done)
        usage = {
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": completion,
            "total_tokens": len(prompt_ids) + completion,
        }
        return {
            **meta,
            "object": "chat.completion" if chat else "text_completion",
            "choices": [_choice(c, chat) for c in done],
            "usage": usage,
        }

    def _max_tokens(body: _Sampling, prompt_tokens: int) -> int:
        if context is None:
            return body.max_tokens or DEFAULT_MAX_TOKENS
        left = context - prompt_tokens
        wanted = body.max_tokens if body.max_tokens is not None else min(DEFAULT_MAX_TOKENS, left)
        if left < 1 or wanted > left:
            raise APIError(
                400,
                f"this model's context is {context} tokens, but {prompt_tokens + max(wanted, 1)} were "
                f"requested ({prompt_tokens} in the prompt, {max(wanted, 1)} for the response)",
                param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                code="context_length_exceeded",
            )
        return wanted

    async def _stream(sub: Submission, meta: dict, chat: bool, prompt_tokens: int | None) -> AsyncIterator[str]:
        """The answer as server-sent events; with ``prompt_tokens``, a last chunk has the usage."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        completion = 0

        def event(index: int, delta: dict | str, finish: str | None = None) -> str:
            choice = (
                {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
                if chat
                else {"index": index, "text": delta, "logprobs": None, "finish_reason": finish}
            )
            return f"data: {json.dumps({**meta, 'object': obj, 'choices': [choice]})}\n\n"

        try:
            if chat:
                for index in range(sub.n):
                    yield event(index, {"role": "assistant", "content": ""})
            async for item in sub.events():
                if isinstance(item, Choice):
                    completion += item.completion_tokens
                    yield event(item.index, {} if chat else "", item.finish_reason)
                else:
                    yield event(item.index, {"content": item.text} if chat else item.text)
            if prompt_tokens is not None:
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion,
                }
                yield f"data: {json.dumps({**meta, 'object': obj, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        except EngineError as exc:  # the status line is already sent: the error goes in the stream
            error = {"message": str(exc), "type": "server_error", "param": None, "code": "generation_failed"}
            yield f"data: {json.dumps({'error': error})}\n\n"
        finally:
            sub.cancel()  # the client went away, or the stream ended: either way the rows may go

    # FastAPI documents a 422 for every body; this app answers invalid bodies with 400 instead.
    # It also documents a JSON 200 beside the plain text the adapter endpoints answer.
    default_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = default_openapi()
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
                    ok = operation.get("responses", {}).get("200", {}).get("content", {})
                    if "text/plain" in ok:
                        ok.pop("application/json", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    # 4. Web pages: chat, ranking (with a label store), runs, and the API's documentation.
    from instructkit.serve.pages import docs_router, make_router

    app.include_router(make_router(label_store=label_store, runs_dir=runs_dir, api_key=api_key))
    app.include_router(docs_router(app.title, app.openapi_url))
    return app


def _choice(done: Choice, chat: bool) -> dict:
    if chat:
        return {
            "index": done.index,
            "message": {"role": "assistant", "content": done.text},
            "logprobs": None,
            "finish_reason": done.finish_reason,
        }
    return {"index": done.index, "text": done.text, "logprobs": None, "finish_reason": done.finish_reason}
