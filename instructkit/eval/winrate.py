"""Win rate of model A over model B from per-prompt scores, with ties and a 95% interval.

Pure arithmetic over two lists of scores (a reward model's, or any judge's); no model here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

Z_95 = 1.959963984540054  # standard normal quantile at 0.975


def outcome(score_a: float, score_b: float, tie_margin: float = 0.0) -> str:
    """``"win"`` when A's score exceeds B's by more than ``tie_margin``, ``"loss"`` when B's
    exceeds A's by more than it, else ``"tie"`` (margin 0: only exactly equal scores tie)."""
    if tie_margin < 0:
        raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
    diff = score_a - score_b
    return "win" if diff > tie_margin else "loss" if diff < -tie_margin else "tie"


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``successes / n`` (Wilson 1927).

    With p = successes / n:  centre = (p + z^2/2n) / (1 + z^2/n),
    half-width = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2). (0, 1) when n == 0.
    """
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float], tie_margin: float = 0.0) -> dict[str, Any]:
    """Wins, ties and losses of A against B prompt by prompt, and the win rate (ties count half).

    ``win_rate = (wins + ties / 2) / n``. The 95% interval is the Wilson score interval of that
    proportion with ``wins + ties / 2`` successes out of ``n``: a tie scores 1/2, whose variance
    is below that of a 0/1 outcome, so with ties the interval is slightly conservative (wider).
    Returns ``{"wins", "ties", "losses", "win_rate", "win_rate_ci_low", "win_rate_ci_high"}``.
    """
    if len(scores_a) != len(scores_b):
        raise ValueError(f"{len(scores_a)} scores for A but {len(scores_b)} for B")
    outcomes = [outcome(a, b, tie_margin) for a, b in zip(scores_a, scores_b)]
    wins, ties, losses = (outcomes.count(o) for o in ("win", "tie", "loss"))
    n = len(outcomes)
    low, high = wilson_interval(wins + ties / 2, n)
    return {
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "win_rate": (wins + ties / 2) / n if n else 0.0,
        "win_rate_ci_low": low,
        "win_rate_ci_high": high,
    }
