"""Serving a vision run (``instructkit serve --model runs/vision/vision``): OpenAI's chat
completions with ``image_url`` content parts, answered greedily.

A vision run's decoder reads image features in place of token embeddings, which the batching
engine (token ids in, one shared KV cache) does not carry, so a vision run is served by this
small app instead: requests are answered one at a time, in a worker thread, by
:func:`instructkit.generation.generate_with_images`, the function ``instructkit generate
--image`` and the recipe's held-out scoring call, so the answers are the same. Sampling is not
offered (``temperature`` must be 0, ``n`` 1, no streaming): what is not honoured is refused with
a 400 naming the field, as the main server does.

Image parts take ``data:image/...;base64,`` URLs (what the openai client sends for a local file)
or, for a server on the user's own machine, a file path or ``file://`` URL.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from instructkit.errors import InputError


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; one resolution is used


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["image_url"]
    image_url: ImageURL


class VisionMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart | ImagePart]


class VisionChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    messages: list[VisionMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=0, description="a vision run answers greedily: 0 only")
    n: int = Field(1, ge=1, le=1)
    stream: Literal[False] = False


def request_prompt(body: VisionChatRequest) -> tuple[list[dict[str, str]], list[Any]]:
    """(messages with an ``<image>`` tag at each image part, the decoded images)."""
    from instructkit.data.vision import IMAGE_TAG, open_image

    messages, images = [], []
    for i, m in enumerate(body.messages):
        if isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content})
            continue
        text = []
        for j, part in enumerate(m.content):
            if isinstance(part, TextPart):
                text.append(part.text)
            else:
                images.append(
                    open_image(part.image_url.url, None, file=None, line=None, field=f"messages.{i}.content.{j}")
                )
                text.append(IMAGE_TAG)
        messages.append({"role": m.role, "content": "".join(text)})
    return messages, images


def create_vision_app(model: Any, tokenizer: Any, model_name: str, *, max_tokens: int = 64):
    """A FastAPI app answering ``/health``, ``/v1/models`` and ``/v1/chat/completions`` for a vision run."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    from instructkit.generation import generate_with_images

    app = FastAPI(title="instructkit (vision)", docs_url=None, redoc_url=None)
    lock = threading.Lock()  # one generation at a time: the model is not shared between threads
    card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "instructkit"}

    def error(status: int, message: str, param: str | None = None) -> JSONResponse:
        body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
        return JSONResponse(body, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"][1:])
        return error(400, f"{param}: {first['msg']}", param)

    @app.exception_handler(InputError)
    async def _bad_input(request: Request, exc: InputError) -> JSONResponse:
        return error(400, exc.problem, exc.field)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "busy": lock.locked()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: VisionChatRequest):
        import anyio

        if body.model not in (None, model_name):
            return error(404, f"The model '{body.model}' does not exist; this server serves {model_name}", "model")
        messages, images = request_prompt(body)
        limit = body.max_completion_tokens or body.max_tokens or max_tokens

        def answer() -> str:
            with lock:
                return generate_with_images(model, tokenizer, [(messages, images)], max_new_tokens=limit, batch_size=1)[
                    0
                ]

        text = await anyio.to_thread.run_sync(answer)
        completion = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return {
            "id": "chatcmpl-" + uuid.uuid4().hex,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": "length" if completion >= limit else "stop",
                }
            ],
            "usage": {"prompt_tokens": 0, "completion_tokens": completion, "total_tokens": completion},
        }

    return app


def answer_with_images(
    spec: str, prompt: str, images: list[str], *, system: str | None = None, max_new_tokens: int = 64
) -> str:
    """``instructkit generate --model RUN --image FILE --prompt TEXT``: the greedy answer of a vision
    run; each image goes where the prompt has an ``<image>`` tag, else all of them before the text."""
    from instructkit.data.vision import IMAGE_TAG, open_image
    from instructkit.generation import generate_with_images
    from instructkit.models.vision import load_vision_model

    opened = [open_image(p, None, file=p, line=None, field="--image") for p in images]
    tags = prompt.count(IMAGE_TAG)
    if tags == 0:
        prompt = IMAGE_TAG * len(opened) + prompt
    elif tags != len(opened):
        raise InputError(f"{tags} {IMAGE_TAG} tag(s) in the prompt but {len(opened)} --image file(s)", field="--prompt")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    model, tokenizer = load_vision_model(spec)
    return generate_with_images(model, tokenizer, [(messages, opened)], max_new_tokens=max_new_tokens, batch_size=1)[0]
