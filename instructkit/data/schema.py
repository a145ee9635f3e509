"""Canonical record types that every input format is normalised into.

Readers turn alpaca, ShareGPT, OpenAI messages, preference, ranking, KTO, plain-text and
classification files into these plain dataclasses; everything downstream (templates, masks,
losses, evaluation) sees only these. Pure Python, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


IMAGE_PLACEHOLDER = "<image>"
"""Where an image block stood in a message's text, when images are read (``images=True``)."""


@dataclass(frozen=True)
class Message:
    """One turn. ``trained`` and ``images`` stay out of ``repr``: the train/validation split
    hashes the repr of records, and text-only data must split as it did before they existed."""

    role: str  # one of ROLES
    content: str
    trained: bool = field(default=True, repr=False)
    """False for an assistant turn the file gives ``loss_weight: 0`` (LLaMA-Factory v1): it stays
    in the context but its tokens get no labels. Always True for other roles (never trained)."""
    images: tuple[str, ...] = field(default=(), repr=False)
    """Resolved paths (or ``data:`` URLs) of the message's image blocks, in order; each stands in
    ``content`` as :data:`IMAGE_PLACEHOLDER`. Empty unless the loader was asked for images."""


@dataclass
class Conversation:
    """A demonstration: system/user/assistant/tool turns. Every assistant turn is trained,
    except those whose ``trained`` is False (``loss_weight: 0`` in the file)."""

    messages: list[Message]
    tools: str | None = None  # JSON string describing tools, when the data has one


@dataclass
class Preference:
    """One prompt and two responses, ``chosen`` preferred to ``rejected``.

    ``prompt`` holds the context turns (ending with a user turn); ``chosen`` and ``rejected``
    hold the assistant turn(s) that follow it.
    """

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]


@dataclass
class Ranking:
    """One prompt and K responses ordered best first, as InstructGPT labelers produce.

    ``ranks[i]`` is the rank of ``responses[i]`` (0 = best); equal ranks are ties, which the
    reward loss drops. When the file gives no ranks, the list order is the ranking.
    """

    prompt: list[Message]
    responses: list[list[Message]]
    ranks: list[int] = field(default_factory=list)


@dataclass
class Unpaired:
    """KTO-style data: one prompt and one response labelled desirable (True) or not."""

    prompt: list[Message]
    completion: list[Message]
    label: bool


@dataclass
class Text:
    """Plain text for continued pre-training (and the PPO-ptx term)."""

    text: str


@dataclass
class Classification:
    text: str
    label: str


Record = Conversation | Preference | Ranking | Unpaired | Text | Classification

FORMATS: tuple[str, ...] = (
    "alpaca",
    "messages",
    "sharegpt",
    "preference",
    "ranking",
    "kto",
    "text",
    "classification",
)
