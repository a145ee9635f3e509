"""Prompt records: what PPO rolls out from and what the labelling tool samples for.

A prompt file holds records with ``prompt`` (a string, or a list of ``{role, content}``
messages ending with a user turn) plus any other fields, which reach reward functions as
keyword arguments (``answer`` for a verifier, say).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from instructkit.data.schema import ROLES, Message
from instructkit.errors import did_you_mean


@dataclass
class PromptRecord:
    """One prompt: its messages, the text a reward function sees, and the record's other fields."""

    messages: list[Message]
    text: str  # the `prompt` string, or the last user turn of a message list
    data: dict[str, Any] = field(default_factory=dict)  # every other field, passed to reward functions
    ids: list[int] = field(default_factory=list)  # rendered with the chat template + generation prompt


def read_prompts(path: str) -> list[PromptRecord]:
    """Records with ``prompt`` (a string, or a list of {role, content} messages ending with a user
    turn) plus any other fields. Bad records raise an InputError naming file, line and field."""
    from instructkit.data.readers import read_rows

    records = []
    for row in read_rows(path):
        if "prompt" not in row.data or row.data["prompt"] in (None, ""):
            raise row.error("missing field 'prompt'" + did_you_mean("prompt", row.data), field="prompt")
        value = row.data["prompt"]
        if isinstance(value, str):
            messages = [Message("user", value)]
        elif isinstance(value, list) and value:
            messages = []
            for i, item in enumerate(value):
                where = f"prompt[{i}]"
                if not isinstance(item, dict) or not isinstance(item.get("content"), str):
                    raise row.error("expected a message object with 'role' and string 'content'", field=where)
                if item.get("role") not in ROLES:
                    raise row.error(
                        f"unknown role {item.get('role')!r} (expected one of {', '.join(ROLES)})", field=f"{where}.role"
                    )
                messages.append(Message(item["role"], item["content"]))
            if messages[-1].role not in ("user", "tool"):
                raise row.error(f"the prompt must end with a user turn, not {messages[-1].role}", field="prompt")
        else:
            raise row.error("expected a string or a non-empty list of messages", field="prompt")
        text = (
            value
            if isinstance(value, str)
            else next((m.content for m in reversed(messages) if m.role == "user"), messages[-1].content)
        )
        records.append(PromptRecord(messages, text, {k: v for k, v in row.data.items() if k != "prompt"}))
    return records


def encode_prompts(
    tokenizer, prompts: list[PromptRecord], *, template: str | None, max_length: int
) -> tuple[list[PromptRecord], int]:
    """Render each prompt with the chat template and the generation prompt (into ``.ids``);
    prompts longer than ``max_length`` tokens are left out and counted."""
    from instructkit.data.templates import encode_prompt

    kept, too_long = [], 0
    for p in prompts:
        p.ids = encode_prompt(tokenizer, p.messages, template)
        if len(p.ids) <= max_length:
            kept.append(p)
        else:
            too_long += 1
    return kept, too_long
