"""`instructkit generate` and `instructkit chat`: sample from any model or run folder, rendered
with the same chat template the model was trained with."""

from __future__ import annotations

from typing import Any

from instructkit.data.schema import Message


def _messages(system: str | None, turns: list[Message]) -> list[Message]:
    return ([Message("system", system)] if system else []) + turns


def generate_text(
    model: str,
    prompt: str,
    *,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.95,
    seed: int = 0,
    loaded: Any = None,
) -> str:
    """One response to one user message."""
    from instructkit.generation import generate
    from instructkit.models.loading import load_model_and_tokenizer

    model_obj, tokenizer = loaded or load_model_and_tokenizer(model)
    return generate(
        model_obj,
        tokenizer,
        [_messages(system, [Message("user", prompt)])],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )[0]


def chat(
    model: str,
    *,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.95,
    seed: int = 0,
    input_fn=input,
    print_fn=print,
) -> list[Message]:
    """A terminal chat that keeps the conversation; /reset clears it, /exit or EOF ends it."""
    from instructkit.generation import generate
    from instructkit.models.loading import load_model_and_tokenizer

    model_obj, tokenizer = load_model_and_tokenizer(model)
    turns: list[Message] = []
    print_fn(f"chatting with {model} (/reset clears, /exit quits)")
    while True:
        try:
            text = input_fn("you> ").strip()
        except EOFError:
            break
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            turns = []
            continue
        if not text:
            continue
        turns.append(Message("user", text))
        reply = generate(
            model_obj,
            tokenizer,
            [_messages(system, turns)],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed + len(turns),
        )[0]
        turns.append(Message("assistant", reply))
        print_fn(f"assistant> {reply}")
    return turns
