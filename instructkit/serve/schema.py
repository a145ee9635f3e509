"""The request bodies the server accepts and the answers it gives, as pydantic models: FastAPI
validates requests and JSON answers against them and writes them into ``/openapi.json``.

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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = Field(False, description="send a last chunk with `usage` and no choices")


class _Sampling(BaseModel):
    """Parameters shared by both completion endpoints."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(
        None, description="the served base's id or a served LoRA adapter's name (`/v1/models`); default: the base"
    )
    max_tokens: int | None = Field(None, ge=1, description="default: min(256, what the context has left)")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy decoding")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} strings; the text ends before the first")
    seed: int | None = Field(None, description="same seed and parameters give the same text; default: a fresh one")
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="only with `stream: true`")

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


# -- Responses: documented in /openapi.json (so clients and schemathesis can check them); the
# JSON ones are also what FastAPI validates each answer against before sending it.

FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int = Field(..., description="tokens of the rendered prompt")
    completion_tokens: int = Field(..., description="tokens generated over all choices (a final eos not counted)")
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str | None = Field(None, description="a LoRA adapter's folder (absent for the base)")
    parent: str | None = Field(None, description="a LoRA adapter's base: the base model's id (absent for the base)")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's body for ``POST /v1/load_lora_adapter``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str = Field(..., min_length=1, description="the `model` requests will name it by")
    lora_path: str = Field(
        ..., min_length=1, description="a LoRA adapter folder (or run folder) on the server's disk, on the served base"
    )


class UnloadLoraAdapterRequest(BaseModel):
    """vLLM's body for ``POST /v1/unload_lora_adapter``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str = Field(..., min_length=1)


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    busy: bool = Field(..., description="some request is generating")
    generating: int = Field(..., description="choices (batch rows) generating now")
    waiting: int = Field(..., description="requests whose choices have not all started")


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(..., description="invalid_request_error or server_error")
    param: str | None = Field(..., description="the request field at fault, when there is one")
    code: str | None


class ErrorResponse(BaseModel):
    """Every error body, in OpenAI's shape."""

    error: ErrorDetail


class NotFoundDetail(ErrorDetail):
    type: Literal["invalid_request_error"]
    param: None = Field(..., description="null, as OpenAI's API sends")
    code: Literal["model_not_found"] | None = Field(..., description="model_not_found for a model, null for a path")


class NotFoundResponse(BaseModel):
    """A 404, as OpenAI's API answers for what does not exist (the `openai` client raises
    `openai.NotFoundError`): an unknown `model` (code model_not_found) or path (code null)."""

    error: NotFoundDetail


STREAM_DESCRIPTION = (
    "one server-sent event of a `stream: true` answer: `data` is a JSON chunk "
    "(`object` chat.completion.chunk with `choices[].delta`, or text_completion with "
    "`choices[].text`; `index` says which choice), or `[DONE]` at the end"
)


# -- /classify: vLLM's classification API, for a classify run's classifier or tagger.

MAX_CLASSIFY_INPUTS = 256  # texts per /classify request


class ClassificationRequest(BaseModel):
    """vLLM's body for ``POST /classify``, with the instruction the classify stage renders."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description="the served model's id (`/v1/models`); default: it")
    input: str | list[str] = Field(..., description=f"a text, or up to {MAX_CLASSIFY_INPUTS} texts")
    instruction: str | None = Field(
        None,
        description="rendered with each text by the run's template; default: the run's one training "
        "instruction (a 400 when it trained under several), or none",
    )

    @field_validator("input")
    @classmethod
    def _texts(cls, value: str | list[str]) -> str | list[str]:
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise ValueError("give at least one text")
        if len(texts) > MAX_CLASSIFY_INPUTS:
            raise ValueError(f"at most {MAX_CLASSIFY_INPUTS} texts, got {len(texts)}")
        for i, text in enumerate(texts):
            if not text.strip():
                raise ValueError("an empty text" if isinstance(value, str) else f"text {i} is empty")
        return value

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class TaggedWord(BaseModel):
    text: str
    start: int = Field(..., description="character offset into the input: input[start:end] == text")
    end: int
    label: str = Field(..., description="the word's tag (argmax of the head at its first sub-token)")
    score: float = Field(..., description="the tag's probability")


class EntitySpan(BaseModel):
    entity: str = Field(..., description="the entity type: PER for B-PER/I-PER")
    start: int = Field(..., description="character offset of its first word")
    end: int = Field(..., description="character offset after its last word")
    text: str
    score: float = Field(..., description="mean probability of its words' tags")


class ClassificationData(BaseModel):
    index: int
    label: str | None = Field(None, description="the most probable label (a classifier; absent for a tagger)")
    probs: list[float] | None = Field(None, description="every label's probability, in the head's label order")
    num_classes: int
    tokens: list[TaggedWord] | None = Field(None, description="a tagger: the input's words with their tags")
    entities: list[EntitySpan] | None = Field(None, description="a tagger: the entities its tags mark (BIO)")


class ClassificationUsage(BaseModel):
    prompt_tokens: int = Field(..., description="tokens of the rendered inputs (instruction and special tokens)")
    total_tokens: int
    completion_tokens: int = Field(0, description="0: nothing is generated")


class Classification(BaseModel):
    id: str
    object: Literal["list"]
    created: int
    model: str
    data: list[ClassificationData]
    usage: ClassificationUsage
