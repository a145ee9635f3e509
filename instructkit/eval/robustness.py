"""The ``robustness`` suite: a task suite re-run with perturbed prompts, and how far its number
drops from the clean prompts'.

Any suite that scores responses and names a headline number (``exact_match``, ``accuracy``,
``bleu``, ``rouge``, ``ifeval``; ``--robust-suite``, default ``exact_match``) is run on its own
data once per perturbation of :data:`PERTURBATIONS`, the clean prompts first. Only the
instruction is perturbed, never the data it applies to, so the reference answers stay right:
in a multi-line prompt the last line is taken as the data (the shipped tasks put the order to
read there) and the lines above it as the instruction; a one-line prompt is all instruction.
The prompt is the last user turn (``messages``, ShareGPT ``conversations``, a ``prompt`` string
or message list: the IFEval and prompts formats) or an alpaca ``instruction`` (its ``input``
is the data). System turns are left as they are.

- ``typos``: in about :data:`TYPO_SHARE` of the words that can take one (letters only, four or
  more, not an all-capitals placeholder such as ``NAME``), two neighbouring inner letters swap.
- ``case``: the instruction in lower case.
- ``paraphrase``: instruction verbs replaced by synonyms (:data:`SYNONYMS`, case kept), and the
  instruction set in one of :data:`FRAMES` ("Here is what I need: ...").
- ``distractor``: an irrelevant sentence (:data:`DISTRACTORS`: no names, places or numbers a
  task could read) put on a line of its own before the instruction.

Every choice is drawn from ``random.Random`` seeded by ``--seed``, the perturbation and the
record's index, so a run is reproducible and a record's perturbation does not depend on the
records around it. A perturbed record's key is ``KEY@PERTURBATION`` (its key: its ``key`` or
``id`` field, else its 0-based position), which is what rows of ``--responses`` name (or the
perturbed prompt text). Typos in an IFEval prompt can land in a keyword its checker looks for;
the checkers keep the clean keywords, so such a prompt is harder, not mis-scored.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instructkit.errors import InputError

if TYPE_CHECKING:
    from instructkit.eval.request import EvalRequest, Suite, SuiteRun

CLEAN = "clean"
TYPO_SHARE = 0.3
SYNONYMS = {
    "reply": "respond",
    "write": "compose",
    "give": "provide",
    "describe": "explain",
    "explain": "describe",
    "tell": "inform",
    "short": "brief",
    "show": "display",
}
FRAMES = (
    "Please help me with this task. {}",
    "{} Thank you!",
    "Here is what I need: {}",
    "I have a request. {}",
    "Task: {}",
)
DISTRACTORS = (
    "The office kitchen was repainted last spring.",
    "Some people prefer tea to coffee in the morning.",
    "It rained for most of the afternoon yesterday.",
    "My neighbour has started learning to play the violin.",
    "The library closes early on public holidays.",
    "A new bakery opened down the street last week.",
    "Cats tend to sleep for much of the day.",
    "The train was a few minutes late this morning.",
)
_ELIGIBLE = re.compile(r"(?<!\S)[A-Za-z]{4,}(?!\S)")
_SYNONYM = re.compile(r"(?<![A-Za-z])(" + "|".join(SYNONYMS) + r")(?![A-Za-z:])", re.IGNORECASE)


def typo_words(text: str) -> list[re.Match[str]]:
    """The words of ``text`` a typo may land in: whitespace-delimited, letters only, at least
    four, not all capitals, with two neighbouring inner letters that differ."""
    return [
        m
        for m in _ELIGIBLE.finditer(text)
        if not m.group().isupper() and any(a != b for a, b in zip(m.group()[1:-2], m.group()[2:-1]))
    ]


def typos(text: str, rng: random.Random) -> str:
    """``text`` with two neighbouring inner letters swapped in about :data:`TYPO_SHARE` of its
    eligible words (at least one when there is one); first and last letters stay."""
    words = typo_words(text)
    if not words:
        return text
    chosen = rng.sample(words, max(1, round(TYPO_SHARE * len(words))))
    out = list(text)
    for m in chosen:
        word = m.group()
        spots = [j for j in range(1, len(word) - 2) if word[j] != word[j + 1]]
        j = m.start() + rng.choice(spots)
        out[j], out[j + 1] = out[j + 1], out[j]
    return "".join(out)


def lower_case(text: str, rng: random.Random) -> str:
    return text.lower()


def synonyms(text: str) -> str:
    """Each word of :data:`SYNONYMS` replaced (capitalised when it was; not before a colon)."""

    def swap(m: re.Match[str]) -> str:
        new = SYNONYMS[m.group().lower()]
        return new.capitalize() if m.group()[0].isupper() else new

    return _SYNONYM.sub(swap, text)


def paraphrase(text: str, rng: random.Random) -> str:
    return rng.choice(FRAMES).format(synonyms(text))


def distractor(text: str, rng: random.Random) -> str:
    return f"{rng.choice(DISTRACTORS)}\n{text}"


#: name -> the instruction perturbed (a pure function of the text and a seeded generator).
PERTURBATIONS: dict[str, Callable[[str, random.Random], str]] = {
    "typos": typos,
    "case": lower_case,
    "paraphrase": paraphrase,
    "distractor": distractor,
}


def perturb_prompt(text: str, name: str, rng: random.Random, *, has_data: bool = True) -> str:
    """The prompt with its instruction perturbed by ``name`` (its last line kept as the data when
    ``has_data`` and the prompt has more than one line)."""
    if name == CLEAN:
        return text
    head, sep, data = text.rpartition("\n") if has_data else ("", "", text)
    if not sep:
        head, data = text, ""
    perturbed = PERTURBATIONS[name](head, rng)
    return f"{perturbed}\n{data}" if sep else perturbed


def rng_for(seed: int, name: str, index: int) -> random.Random:
    return random.Random(f"{seed}/{name}/{index}")


def perturb_row(data: dict[str, Any], name: str, rng: random.Random) -> dict[str, Any] | None:
    """A copy of a record with its prompt perturbed; None when it has no prompt this knows."""
    row = json.loads(json.dumps(data))
    for field, role_key, text_key, users in (
        ("messages", "role", "content", ("user",)),
        ("conversations", "from", "value", ("human", "user")),
        ("prompt", "role", "content", ("user",)),
    ):
        turns = row.get(field)
        if isinstance(turns, list):
            last = next((t for t in reversed(turns) if isinstance(t, dict) and t.get(role_key) in users), None)
            if last is not None and isinstance(last.get(text_key), str):
                last[text_key] = perturb_prompt(last[text_key], name, rng)
                return row
    if isinstance(row.get("prompt"), str):
        row["prompt"] = perturb_prompt(row["prompt"], name, rng)
        return row
    if isinstance(row.get("instruction"), str):  # alpaca: the input is the data
        row["instruction"] = perturb_prompt(row["instruction"], name, rng, has_data=False)
        return row
    return None


def perturbed_rows(path: str, limit: int | None, seed: int) -> tuple[list[str], list[list[dict[str, Any]]]]:
    """Each record's key and, per perturbation (clean first), its perturbed copies keyed
    ``KEY@PERTURBATION``. A record without a prompt to perturb is an InputError at its line."""
    from instructkit.data.readers import read_rows

    rows = read_rows(path)
    rows = rows[:limit] if limit else rows
    keys = []
    for i, row in enumerate(rows):
        given = next((row.data[k] for k in ("key", "id") if row.data.get(k) is not None), None)
        keys.append(str(given) if given is not None else str(i))
    out = []
    for name in (CLEAN, *PERTURBATIONS):
        copies = []
        for i, (row, key) in enumerate(zip(rows, keys)):
            copy = perturb_row(row.data, name, rng_for(seed, name, i))
            if copy is None:
                raise row.error(
                    "robustness perturbs the prompt: expected messages, conversations, a prompt or an instruction",
                    field="messages",
                )
            copies.append({**copy, "key": f"{key}@{name}"})
        out.append(copies)
    return keys, out


def run_robustness(request: EvalRequest, suites: Sequence[Suite]) -> SuiteRun:
    """The base suite's headline number on the clean prompts and under each perturbation, the drop
    (clean minus perturbed) per perturbation, the worst drop, and every run's metrics."""
    import tempfile

    from instructkit.datasets import resolve_data_path
    from instructkit.eval.request import SuiteRun

    base = request.robust_suite
    if base is None or base.headline is None:
        raise InputError("robustness needs --robust-suite: a suite that scores responses", field="robust_suite")
    path = resolve_data_path(request.data or base.reads.default_data or "shipped:extract/test")
    keys, groups = perturbed_rows(path, request.limit, request.seed)
    names = (CLEAN, *PERTURBATIONS)
    with tempfile.TemporaryDirectory(prefix="instructkit-robustness-") as tmp:
        # 1. Every perturbed prompt answered in one call: generated once, or the rows of --responses.
        combined = _write(Path(tmp) / "prompts.jsonl", [r for g in groups for r in g])
        loaded = request.model_and_tokenizer() if request.responses is None else None
        first = base.reads.run(replace(request, data=combined, limit=None, loaded=loaded), [base])
        # 2. Each perturbation scored on its own by the base suite, on those responses.
        per: dict[str, dict[str, Any]] = {}
        samples: list[dict[str, Any]] = []
        for name, rows in zip(names, groups):
            mine = [s for s in first.samples if str(s.get("key", "")).endswith(f"@{name}")]
            data = _write(Path(tmp) / f"{name}.jsonl", rows)
            given = _write(
                Path(tmp) / f"{name}.responses.jsonl", [{"key": s["key"], "response": s["response"]} for s in mine]
            )
            run = base.reads.run(replace(request, data=data, responses=given, limit=None, loaded=None), [base])
            per[name] = {m: v for m, v in run.metrics.items() if _number(v)}
            samples += [_joined(s1, s2, name) for s1, s2 in zip(mine, run.samples, strict=True)]
    metrics = _summary(base.headline, per)
    return SuiteRun(metrics, samples, path, len(keys), generation=request.generation(), coverage=first.coverage)


def _summary(headline: str, per: dict[str, dict[str, Any]]) -> dict[str, Any]:
    clean = per[CLEAN][headline]
    metrics: dict[str, Any] = {"robust_metric": headline, "robust_clean": clean}
    for name in PERTURBATIONS:
        metrics[f"robust_{name}"] = per[name][headline]
    for name in PERTURBATIONS:
        metrics[f"robust_drop_{name}"] = clean - per[name][headline]
    metrics["robust_drop_worst"] = max(metrics[f"robust_drop_{n}"] for n in PERTURBATIONS)
    metrics["robust_per_perturbation"] = per
    return metrics


def _joined(first: dict[str, Any], scored: dict[str, Any], name: str) -> dict[str, Any]:
    """A samples-file line: the scored sample, where its row came from (the first call's
    ``line``/``record`` and row fields), and the perturbation with the record's own key."""
    sample = {k: v for k, v in scored.items() if k not in ("line", "record")}
    source = {k: v for k, v in first.items() if k not in sample or k in ("line", "record")}
    key = str(sample.get("key", ""))
    return {"suite": "robustness", "perturbation": name, **source, **sample, "key": key.rsplit("@", 1)[0]}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _write(path: Path, rows: Sequence[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)
