"""Win rate from hand-made scores: outcomes, ties, the tie margin and the Wilson interval."""

from __future__ import annotations

import math

import pytest

from instructkit.eval.winrate import Z_95, outcome, wilson_interval, win_rate


def test_outcome_and_margin():
    assert outcome(1.0, 0.0) == "win" and outcome(0.0, 1.0) == "loss" and outcome(0.5, 0.5) == "tie"
    assert outcome(1.05, 1.0) == "win"  # margin 0: any difference decides
    assert outcome(1.05, 1.0, tie_margin=0.1) == "tie" and outcome(1.0, 1.05, tie_margin=0.1) == "tie"
    assert outcome(1.2, 1.0, tie_margin=0.1) == "win"
    with pytest.raises(ValueError):
        outcome(1.0, 0.0, tie_margin=-1)


def test_win_rate_with_ties_counted_half():
    """A vs B per prompt: 3>1 win, 1<2 loss, 2=2 tie, 2>1.95 win, 0.5=0.5 tie.
    Margin 0: W 2, T 2, L 1 -> (2 + 2/2) / 5 = 0.6. Margin 0.1: 2 vs 1.95 becomes a tie ->
    W 1, T 3, L 1 -> (1 + 1.5) / 5 = 0.5."""
    a, b = [3, 1, 2, 2, 0.5], [1, 2, 2, 1.95, 0.5]
    exact = win_rate(a, b)
    assert (exact["wins"], exact["ties"], exact["losses"]) == (2, 2, 1)
    assert exact["win_rate"] == pytest.approx(0.6)
    margin = win_rate(a, b, tie_margin=0.1)
    assert (margin["wins"], margin["ties"], margin["losses"]) == (1, 3, 1)
    assert margin["win_rate"] == pytest.approx(0.5)


def test_wilson_interval_by_hand():
    """p = 3/5, n = 5, z = 1.96: z^2 = 3.8415, denominator 1 + z^2/n = 1.76829,
    centre (0.6 + 0.38415) / 1.76829 = 0.55655,
    half-width 1.95996 / 1.76829 * sqrt(0.24/5 + 3.8415/100) = 1.10839 * 0.29397 = 0.32583,
    interval (0.2307, 0.8824)."""
    m = win_rate([3, 1, 2, 2, 0.5], [1, 2, 2, 1.95, 0.5])  # 3 points out of 5, as above
    low, high = m["win_rate_ci_low"], m["win_rate_ci_high"]
    assert low == pytest.approx(0.2307, abs=2e-4) and high == pytest.approx(0.8824, abs=2e-4)
    assert wilson_interval(3, 5) == (low, high)
    assert pytest.approx(1.96, abs=1e-3) == Z_95


def test_wilson_interval_edges():
    """All wins out of 10: the interval reaches 1 but not down to 1 - it is (n/(n+z^2), 1)."""
    low, high = wilson_interval(10, 10)
    assert high == pytest.approx(1.0) and low == pytest.approx(10 / (10 + Z_95**2))
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low0, high0 = wilson_interval(0, 10)
    assert low0 == pytest.approx(0.0, abs=1e-12) and math.isclose(high0, 1 - low)


def test_lengths_must_match():
    with pytest.raises(ValueError, match="3 scores for A but 2 for B"):
        win_rate([1, 2, 3], [1, 2])
