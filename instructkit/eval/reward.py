"""Reward-model judged suites: the mean reward of a model's responses, and its win rate over a
baseline's responses to the same prompts.

The reward model is one trained by ``instructkit rm`` (or any one-label sequence classifier),
loaded once by :class:`RewardJudge` and scoring (prompt turns, response) pairs with its own
chat template; its stored bias is applied, which shifts every score alike and so changes no
win, tie or loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from instructkit.data.schema import Message
from instructkit.eval.tasks import Scored
from instructkit.eval.winrate import outcome, win_rate


class RewardJudge:
    """Scores responses with the reward model at ``spec`` (a folder or run folder), loaded on
    first use so that a run that never needs it never pays for it."""

    def __init__(self, spec: str, batch_size: int = 16):
        self.spec = spec
        self.batch_size = batch_size
        self._loaded: tuple[Any, Any, float] | None = None

    def __call__(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str]) -> list[float]:
        from instructkit.models.reward_model import load_reward_model, score

        if self._loaded is None:
            self._loaded = load_reward_model(self.spec)
        model, tokenizer, bias = self._loaded
        return score(
            model,
            tokenizer,
            prompts,
            [[Message("assistant", r)] for r in responses],
            bias=bias,
            batch_size=self.batch_size,
        )


def score_reward(rewards: Sequence[float]) -> Scored:
    """``reward_mean`` and ``reward_std`` (population) of the responses' rewards."""
    n = len(rewards)
    mean = sum(rewards) / n if n else 0.0
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / n) if n else 0.0
    return {"reward_mean": mean, "reward_std": std}, [{"reward": r} for r in rewards]


def score_winrate(
    rewards: Sequence[float],
    baseline_rewards: Sequence[float],
    baseline_responses: Sequence[str],
    tie_margin: float = 0.0,
) -> Scored:
    """Win rate of the responses over the baseline's (see :func:`instructkit.eval.winrate.win_rate`),
    with both mean rewards; each example records the baseline's response and reward and the outcome."""
    metrics = win_rate(rewards, baseline_rewards, tie_margin)
    n = len(baseline_rewards)
    metrics["baseline_reward_mean"] = sum(baseline_rewards) / n if n else 0.0
    per_example = [
        {"reward": a, "baseline_response": text, "baseline_reward": b, "outcome": outcome(a, b, tie_margin)}
        for a, b, text in zip(rewards, baseline_rewards, baseline_responses)
    ]
    return metrics, per_example
