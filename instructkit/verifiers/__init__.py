"""Verifiable instructions: rule-based checks of a response, as benchmark scores and as rewards.

Every reward here follows instructkit's reward protocol, ``(prompt, response, **data) -> float``
(see :mod:`instructkit.rewards`), so a record of the matching data format drives RL rewards
as is: ``ifeval_reward(record.prompt, response, instruction_id_list=..., kwargs=...)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from instructkit.verifiers.ifeval import (
    INSTRUCTIONS,
    IFEvalPrompt,
    aggregate,
    check_kwargs,
    evaluate_response,
    loose_variants,
    read_ifeval_jsonl,
)

__all__ = [
    "INSTRUCTIONS",
    "IFEvalPrompt",
    "aggregate",
    "check_kwargs",
    "evaluate_response",
    "ifeval_reward",
    "loose_variants",
    "read_ifeval_jsonl",
]


def ifeval_reward(
    prompt: str,
    response: str,
    *,
    instruction_id_list: Sequence[str],
    kwargs: Sequence[Mapping[str, Any]],
    **data: Any,
) -> float:
    """The fraction of the record's instructions the response follows, strictly (0.0 to 1.0).

    Other fields of the record (``key``, ...) are accepted and ignored, so a whole IFEval-format
    record can be passed as ``**data``.
    """
    if not instruction_id_list:
        raise ValueError("ifeval_reward needs at least one instruction id")
    verdicts = evaluate_response(prompt, response, instruction_id_list, kwargs)["strict"]
    return sum(verdicts) / len(verdicts)
