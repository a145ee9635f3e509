"""What a suite runner is given (:class:`EvalRequest`, one `instructkit eval` call's options)
and what it gives back (:class:`SuiteRun`), with the two things every runner that needs a model
does the same way: load it once, and generate with the call's decoding settings. Also what a
suite declares (:class:`Suite`, :class:`Reader`, :class:`Needs`), so the runners can name it
without importing the registry that imports them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from instructkit.errors import InputError


@dataclass(frozen=True)
class EvalRequest:
    """The options of one evaluation call, as :func:`instructkit.eval.run.evaluate` takes them."""

    model: str | None = None
    data: str | None = None
    responses: str | None = None
    max_new_tokens: int = 64
    batch_size: int = 16
    k_shot: int = 0
    limit: int | None = None
    shots_data: str | None = None
    loaded: tuple[Any, Any] | None = None
    reward_model: str | None = None
    baseline: str | None = None
    baseline_responses: str | None = None
    seed: int = 0
    temperature: float = 0.0
    tie_margin: float = 0.0
    robust_suite: Suite | None = None  # the suite the robustness suite re-runs under perturbed prompts

    def __post_init__(self) -> None:
        if self.loaded is not None and self.model is None:
            raise ValueError("evaluate(loaded=...) needs model= too: the metrics file names the model")

    def model_and_tokenizer(self) -> tuple[Any, Any]:
        """The model under evaluation: the one the caller loaded, else ``model`` loaded now."""
        return self.loaded if self.loaded is not None else load(self.model)

    def generate(self, model_and_tokenizer: tuple[Any, Any], prompts: Sequence[Any]) -> list[str]:
        """One response per prompt with this call's decoding settings (greedy at temperature 0)."""
        from instructkit.generation import generate

        if not prompts:
            return []
        model, tokenizer = model_and_tokenizer
        return generate(
            model,
            tokenizer,
            list(prompts),
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            temperature=self.temperature,
            seed=self.seed,
        )

    def generation(self) -> dict[str, Any]:
        """The metrics file's ``generation`` block for suites that score responses."""
        decoding = "given" if self.responses is not None else "greedy" if self.temperature == 0 else "sampled"
        return {
            "decoding": decoding,
            "temperature": self.temperature,
            "seed": self.seed,
            "max_new_tokens": self.max_new_tokens,
        }


@dataclass
class SuiteRun:
    """What a runner returns: its suites' metrics and samples, and what the header reports.

    ``data`` is the file read (resolved), ``n`` its held-out records (after ``limit``);
    ``generation`` is None when no response was scored, and ``coverage`` (see
    :meth:`instructkit.eval.responses.Answers.coverage`) likewise.
    """

    metrics: dict[str, Any]
    samples: list[dict[str, Any]]
    data: str
    n: int
    generation: dict[str, Any] | None = None
    coverage: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # suite-specific header entries (judge)


def load(spec: str | None) -> tuple[Any, Any]:
    from instructkit.models.loading import load_model_and_tokenizer

    if spec is None:
        raise InputError("a model is needed here: give --model", field="model")
    return load_model_and_tokenizer(spec)


# ----------------------------------------------------------------------------------------------
# What a suite declares (the registry itself is instructkit.eval.run.SUITES)


class Needs(enum.Enum):
    """What a suite scores: responses to its prompts, or the model itself (log-likelihoods)."""

    RESPONSES = "responses"
    MODEL = "model"


@dataclass(frozen=True)
class Reader:
    """The data a group of suites reads, and the runner that scores them on it.

    ``alone``: the format is the suite's own, so it runs as the only suite of its call.
    ``takes_shots``: k-shot demonstrations apply (they are conversations of the same task).
    """

    what: str
    default_data: str | None
    run: Callable[[EvalRequest, Sequence[Suite]], SuiteRun]
    alone: bool
    takes_shots: bool


@dataclass(frozen=True)
class Suite:
    name: str
    needs: Needs
    reads: Reader
    score: Callable[..., Any] | None  # what the conversations runner calls; own-format runners score themselves
    metrics: str  # what it reports, for --help and docs
    judged: bool = False  # scored by --reward-model
    compares: bool = False  # against --baseline or --baseline-responses
    headline: str | None = None  # its one number, which the robustness suite re-measures under perturbations
    wraps: bool = False  # re-runs another suite (--robust-suite), which must have a headline

    @property
    def scores_responses(self) -> bool:
        return self.needs is Needs.RESPONSES
