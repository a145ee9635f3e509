"""The request bodies the server accepts, as pydantic models: FastAPI validates them and writes
them into ``/openapi.json``.

Fields follow OpenAI's API. Fields we do not honour are refused (400 naming the field) rather
than silently ignored, so a client never believes it got e.g. ``presence_penalty`` when it did not.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 16  # choices per request; n copies of the prompt are generated as one batch
MAX_STOP = 4  # stop strings per request, as in OpenAI's API


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: str


class _Sampling(BaseModel):
    """Parameters shared by both completion endpoints."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description="must be the served model's name when given")
    max_tokens: int | None = Field(None, ge=1, description="default: min(256, what the context has left)")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy decoding")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} strings; the text ends before the first")
    seed: int | None = Field(None, description="same seed and parameters give the same text; default: a fresh one")
    stream: bool = False

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stop)}")
        return stop

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)


class CompletionRequest(_Sampling):
    prompt: str = Field(..., min_length=1, description="sent as one user message through the chat template")
