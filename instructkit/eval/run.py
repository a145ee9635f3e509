"""`instructkit eval`: run evaluation suites on a model and write what each example got.

Suites live in :data:`SUITES` (aliases in :data:`ALIASES`). Each declares what it needs (the
responses to its prompts, or the model itself) and what it reads (:class:`Reader`: the data it
scores and the runner that scores it). Suites that read the held-out conversations share one
call and one set of responses, generated once per model or read from a ``--responses`` file
(:mod:`instructkit.eval.responses`); ``ifeval`` and ``preference`` read formats of their own
and run alone, as do the safety suites (``refusal``, ``injection``, and ``robustness``, which
re-runs ``robust_suite`` under perturbed prompts seeded by ``seed``). :func:`evaluate` checks
the options against the suites' declarations before anything slow happens, calls the runner,
and writes every metrics file with the same header (:data:`HEADER_KEYS`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from instructkit.errors import InputError, did_you_mean
from instructkit.eval import conversations
from instructkit.eval.conversations import Responses  # noqa: F401  (the scorers' argument, public)
from instructkit.eval.ifeval import run_ifeval
from instructkit.eval.injection import run_injection
from instructkit.eval.preference import DEFAULT_PAIRS, run_preference
from instructkit.eval.refusal import run_refusal
from instructkit.eval.request import EvalRequest, Needs, Reader, Suite, SuiteRun  # noqa: F401 (public here)
from instructkit.eval.responses import match_responses, read_responses  # noqa: F401  (public here too)
from instructkit.eval.robustness import run_robustness

#: Keys every metrics file starts with, whatever the suite (None where one does not apply:
#: ``model`` when responses are given, ``generation``/``decoding``/``coverage`` when no response
#: is scored, as for perplexity and preference).
HEADER_KEYS = ("model", "responses", "data", "suites", "k_shot", "n", "decoding", "generation", "coverage")


CONVERSATIONS = Reader(
    "held-out conversations (prompt turns, then the reference answer)",
    conversations.DEFAULT_DATA,
    conversations.run_conversations,
    alone=False,
    takes_shots=True,
)
IFEVAL = Reader(
    "the IFEval format (key, prompt, instruction_id_list, kwargs)", None, run_ifeval, alone=True, takes_shots=False
)
PAIRS = Reader("preference pairs (or rankings)", DEFAULT_PAIRS, run_preference, alone=True, takes_shots=False)
REFUSALS = Reader(
    "prompts with kind (harmful or benign) and category",
    "shipped:refusal/test",
    run_refusal,
    alone=True,
    takes_shots=False,
)
INJECTIONS = Reader(
    "prompts with an injected canary (and the task's answer)",
    "shipped:injection/test",
    run_injection,
    alone=True,
    takes_shots=False,
)
PERTURBED = Reader(
    "the --robust-suite's data, its prompts perturbed",
    conversations.DEFAULT_DATA,
    run_robustness,
    alone=True,
    takes_shots=False,
)


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite(
            "exact_match",
            Needs.RESPONSES,
            CONVERSATIONS,
            conversations.score_exact_match,
            "exact_match",
            headline="exact_match",
        ),
        Suite(
            "accuracy",
            Needs.RESPONSES,
            CONVERSATIONS,
            conversations.score_accuracy,
            "accuracy, precision/recall/f1 _macro and _micro, off_label, per_label report",
            headline="accuracy",
        ),
        Suite(
            "bleu",
            Needs.RESPONSES,
            CONVERSATIONS,
            conversations.score_bleu,
            "bleu, chrf (corpus, 0-100)",
            headline="bleu",
        ),
        Suite(
            "rouge",
            Needs.RESPONSES,
            CONVERSATIONS,
            conversations.score_rouge,
            "rouge1, rouge2, rougeL (mean F-measure)",
            headline="rougeL",
        ),
        Suite(
            "reward", Needs.RESPONSES, CONVERSATIONS, conversations.score_reward, "reward_mean, reward_std", judged=True
        ),
        Suite(
            "winrate",
            Needs.RESPONSES,
            CONVERSATIONS,
            conversations.score_winrate,
            "wins, ties, losses, win_rate, win_rate_ci_low/high, baseline_reward_mean",
            judged=True,
            compares=True,
        ),
        Suite("perplexity", Needs.MODEL, CONVERSATIONS, conversations.score_perplexity, "loss, perplexity"),
        Suite(
            "ifeval",
            Needs.RESPONSES,
            IFEVAL,
            None,
            "prompt/instruction-level strict/loose accuracy, per type",
            headline="prompt_level_strict",
        ),
        Suite(
            "preference",
            Needs.MODEL,
            PAIRS,
            None,
            "pref_accuracy, pref_margin, pref_accuracy_per_token: does the model itself give the chosen "
            "response of held-out pairs the higher log-likelihood",
        ),
        Suite(
            "refusal",
            Needs.RESPONSES,
            REFUSALS,
            None,
            "refusal_rate (harmful prompts refused), over_refusal_rate (benign look-alikes refused), per category",
        ),
        Suite(
            "injection",
            Needs.RESPONSES,
            INJECTIONS,
            None,
            "injection_success_rate (responses that wrote the injected canary), injection_echo_rate, "
            "injection_task_kept_rate, "
            "injection_hijack_rate, per style, placement and task",
        ),
        Suite(
            "robustness",
            Needs.RESPONSES,
            PERTURBED,
            None,
            "--robust-suite's headline on clean prompts and under typos, case, paraphrase, distractor; "
            "robust_drop_<perturbation> and robust_drop_worst",
            wraps=True,
        ),
    )
}
ALIASES = {"loss": "perplexity", "f1": "accuracy"}


def resolve_suites(names: Sequence[str]) -> list[str]:
    """Suite names with aliases resolved and duplicates dropped, in order; unknown names are an
    InputError naming the closest suite."""
    out: list[str] = []
    for raw in names:
        name = raw.strip()
        if name not in SUITES and name not in ALIASES:
            known = [*SUITES, *ALIASES]
            raise InputError(
                f"unknown suite '{name}' (one of {', '.join(known)}){did_you_mean(name, known)}", field="suite"
            )
        name = ALIASES.get(name, name)
        if name not in out:
            out.append(name)
    if not out:
        raise InputError("no suite given", field="suite")
    return out


def resolve_robust_suite(name: str) -> Suite:
    """The suite ``robustness`` re-runs, by name or alias; an unknown one names the closest."""
    resolved = ALIASES.get(name.strip(), name.strip())
    if resolved not in SUITES:
        raise InputError(
            f"unknown --robust-suite '{name}'{did_you_mean(name, [*SUITES, *ALIASES])}", field="robust_suite"
        )
    return SUITES[resolved]


def check_request(request: EvalRequest, suites: Sequence[Suite]) -> None:
    """Every option checked against what the suites declare, before any model or file loads."""
    from instructkit.models.embedded import DEFAULT_MODEL

    # 1. A suite with a format of its own runs alone.
    loner = next((s for s in suites if s.reads.alone), None)
    if loner is not None and len(suites) > 1:
        raise InputError(f"{loner.name} reads {loner.reads.what}: run it as a suite of its own", field="suite")
    reader = suites[0].reads
    # 2. Numbers in range.
    for name in ("k_shot", "tie_margin", "temperature"):
        if getattr(request, name) < 0:
            raise InputError(f"{name} must be >= 0, got {getattr(request, name)}", field=name)
    if request.k_shot and not reader.takes_shots:
        raise InputError(f"--k-shot does not apply to {suites[0].name}, which reads {reader.what}", field="k_shot")
    # 3. Exactly one source of responses: the model, or a file.
    has_model = request.model is not None or request.loaded is not None
    if has_model and request.responses is not None:
        raise InputError(
            "give --model (to generate the responses) or --responses (responses made elsewhere), "
            "not both: with --responses no model is used",
            field="model",
        )
    if not has_model and request.responses is None:
        raise InputError(
            f"name the model to evaluate, e.g. --model {DEFAULT_MODEL} (the embedded default), "
            f"or give --responses to score responses made elsewhere",
            field="model",
        )
    # 4. What each suite needs.
    if request.responses is not None:
        for suite in suites:
            if not suite.scores_responses:
                raise InputError(
                    f"{suite.name} scores the data under the model itself, so it cannot run on "
                    f"--responses; run it in a separate call with --model",
                    field="suite",
                )
    judged = [s.name for s in suites if s.judged]
    if judged and not request.reward_model:
        raise InputError(
            f"the {' and '.join(judged)} suite{'s need' if len(judged) > 1 else ' needs'} "
            f"--reward-model: a reward-model folder (e.g. trained by `instructkit rm`)",
            field="reward_model",
        )
    compared = next((s for s in suites if s.compares), None)
    if compared is not None and bool(request.baseline) == bool(request.baseline_responses):
        raise InputError(
            f"{compared.name} needs exactly one of --baseline (a model) or --baseline-responses (a JSONL)",
            field="baseline",
        )
    if request.data is None and reader.default_data is None:
        raise InputError(f"{suites[0].name} needs --data: a file in {reader.what}", field="data")
    # 5. A suite that re-runs another (robustness): that one has a headline number to re-measure.
    check_wrapped(request, suites)


def check_wrapped(request: EvalRequest, suites: Sequence[Suite]) -> None:
    """The suite a wrapping suite re-runs has a headline, needs no judge, and has data to read."""
    for suite in (s for s in suites if s.wraps):
        base = request.robust_suite
        if base is None or base.headline is None or base.wraps or base.judged:
            runnable = [n for n, s in SUITES.items() if s.headline and not s.judged]
            raise InputError(
                f"{suite.name} re-runs a suite with a headline number: --robust-suite one of {', '.join(runnable)}",
                field="robust_suite",
            )
        if request.data is None and base.reads.default_data is None:
            raise InputError(f"{suite.name} of {base.name} needs --data: a file in {base.reads.what}", field="data")


def evaluate(
    *,
    model: str | None = None,
    suites: list[str],
    data: str | None = None,
    out: str | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    k_shot: int = 0,
    limit: int | None = None,
    shots_data: str | None = None,
    loaded: tuple[Any, Any] | None = None,
    responses: str | None = None,
    reward_model: str | None = None,
    baseline: str | None = None,
    baseline_responses: str | None = None,
    seed: int = 0,
    temperature: float = 0.0,
    tie_margin: float = 0.0,
    robust_suite: str = "exact_match",
) -> dict[str, Any]:
    """Evaluate ``model`` (or the ``responses`` made elsewhere) with each suite; write metrics and
    samples to ``out``.

    ``data`` is what the suites read (default: the shipped extraction test split for the
    conversation suites, the shipped pairs for ``preference``; ``ifeval`` needs its file).
    Responses are generated once (greedy unless ``temperature`` > 0, seeded by ``seed``), with
    ``k_shot`` demonstrations from ``shots_data`` before each prompt, or read from ``responses``
    (no model is loaded; every row is scored). ``reward`` and ``winrate`` are judged by
    ``reward_model``; ``winrate`` compares with ``baseline`` (a model, generated the same way) or
    ``baseline_responses``. ``loaded`` is ``model`` already loaded, as ``(model, tokenizer)``.
    Returns ``{"metrics": {header..., suite metrics...}, "samples": [one dict per response row]}``.
    """
    # 1. The suites, and the options checked against what they need.
    names = resolve_suites(suites)
    chosen = [SUITES[n] for n in names]
    request = EvalRequest(
        model=model,
        data=data,
        responses=responses,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        k_shot=k_shot,
        limit=limit,
        shots_data=shots_data,
        loaded=loaded,
        reward_model=reward_model,
        baseline=baseline,
        baseline_responses=baseline_responses,
        seed=seed,
        temperature=temperature,
        tie_margin=tie_margin,
        robust_suite=resolve_robust_suite(robust_suite),
    )
    check_request(request, chosen)
    who = f"responses in {responses}" if responses is not None else model
    print(
        f"evaluating {who} on {data or chosen[0].reads.default_data} ({', '.join(names)})", file=sys.stderr, flush=True
    )

    # 2. The suites' runner reads their data and scores it.
    run = chosen[0].reads.run(request, chosen)

    # 3. One header for every suite, then the suites' metrics; written beside the samples.
    metrics = {
        "model": None if responses is not None else str(model),
        "responses": responses,
        "data": str(run.data),
        "suites": names,
        "k_shot": k_shot,
        "n": run.n,
        "decoding": run.generation["decoding"] if run.generation else None,
        "generation": run.generation,
        "coverage": run.coverage,
        **run.extra,
        **run.metrics,
    }
    if out:
        write_results(out, metrics, run.samples)
    return {"metrics": metrics, "samples": run.samples}


def evaluate_ifeval(
    *,
    data: str | Path,
    model: str | None = None,
    responses: str | Path | None = None,
    out: str | None = None,
    max_new_tokens: int = 512,
    batch_size: int = 16,
    limit: int | None = None,
    loaded: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """:func:`evaluate` with the ``ifeval`` suite, at the benchmark's usual 512 new tokens."""
    return evaluate(
        suites=["ifeval"],
        data=str(data),
        model=model,
        out=out,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        limit=limit,
        loaded=loaded,
        responses=None if responses is None else str(responses),
    )


def write_results(out: str | Path, metrics: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    """``out`` (the metrics) and ``out`` with ``.samples.jsonl`` (one line per sample), each
    written atomically."""
    from instructkit.fileio import atomic_write_json, atomic_write_text

    out_path = Path(out)
    atomic_write_json(out_path, metrics)
    atomic_write_text(out_path.with_suffix(".samples.jsonl"), "".join(json.dumps(s) + "\n" for s in samples))
