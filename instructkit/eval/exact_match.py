"""Exact-match evaluation: does the model's greedy response equal the reference answer?

Meant for tasks with one right answer in a fixed format (the shipped ``extract`` dataset,
classification labels, arithmetic). Each record is a :class:`Conversation` whose last
assistant turn is the reference; everything before it is the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from instructkit.data.schema import Conversation, Message
from instructkit.errors import InputError


def normalize(text: str) -> str:
    """``text`` without leading and trailing whitespace (spaces, tabs, newlines).

    Nothing else is normalised: case, punctuation, inner whitespace and Unicode form all
    count, because the tasks scored this way define their answer format exactly.
    """
    return text.strip()


def exact_match(pred: str, ref: str) -> bool:
    """True when ``pred`` and ``ref`` are equal after :func:`normalize`."""
    return normalize(pred) == normalize(ref)


def split_reference(conversation: Conversation, index: int | None = None) -> tuple[list[Message], str]:
    """The prompt (all turns before the last assistant turn) and the reference (its content)."""
    messages = conversation.messages
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=None)
    if last is None:
        raise InputError("the conversation has no assistant turn to use as the reference", record=index)
    if last == 0:
        raise InputError("the conversation has no prompt before its assistant turn", record=index)
    return list(messages[:last]), messages[last].content


def with_shots(prompt: list[Message], shots: Sequence[Conversation]) -> list[Message]:
    """``prompt`` with each shot's turns inserted after its leading system turns.

    A shot contributes its whole conversation except system turns (the record's own system
    turn, if any, stays first), so the model sees solved examples as earlier chat turns.
    """
    head = 0
    while head < len(prompt) and prompt[head].role == "system":
        head += 1
    shot_turns = [m for shot in shots for m in shot.messages if m.role != "system"]
    return prompt[:head] + shot_turns + prompt[head:]


def evaluate_exact_match(
    model: Any,
    tokenizer: Any,
    records: Sequence[Conversation],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    k_shot: int = 0,
    shots: Sequence[Conversation] | None = None,
    template: str | None = None,
) -> dict[str, Any]:
    """Greedy-decode a response to each record's prompt and score it against the reference.

    With ``k_shot > 0`` the first ``k_shot`` conversations of ``shots`` are put before every
    prompt (see :func:`with_shots`). Returns ``{"exact_match": fraction correct (0 when there
    are no records), "n": number of records, "samples": [{"prompt": content of the last
    prompt turn, "response", "reference", "correct"}, ...]}`` in record order.
    """
    from instructkit.generation import generate

    if k_shot < 0:
        raise InputError(f"k_shot must be >= 0, got {k_shot}", field="k_shot")
    chosen_shots = list(shots or [])[:k_shot]
    if len(chosen_shots) < k_shot:
        raise InputError(f"k_shot={k_shot} needs that many shots, got {len(chosen_shots)}", field="shots")

    prompts, references = [], []
    for i, record in enumerate(records):
        prompt, reference = split_reference(record, i)
        prompts.append(prompt)
        references.append(reference)
    full_prompts = [with_shots(p, chosen_shots) for p in prompts]
    responses = (
        generate(
            model,
            tokenizer,
            full_prompts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            temperature=0.0,
            template=template,
        )
        if full_prompts
        else []
    )

    samples = [
        {"prompt": p[-1].content, "response": r, "reference": ref, "correct": exact_match(r, ref)}
        for p, r, ref in zip(prompts, responses, references)
    ]
    n = len(samples)
    return {
        "exact_match": sum(s["correct"] for s in samples) / n if n else 0.0,
        "n": n,
        "samples": samples,
    }
