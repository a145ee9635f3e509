"""The `preference` suite: does the model itself prefer the chosen response of held-out pairs?

For each held-out (prompt, chosen, rejected) pair, the model's summed log-probability of each
response given the prompt (rendered with its chat template, as DPO trains it). Reported:

- ``pref_accuracy``: the fraction of pairs with ``log p(chosen) > log p(rejected)``;
- ``pref_margin``: the mean of ``log p(chosen) - log p(rejected)`` (nats);
- ``pref_accuracy_per_token``: the same comparison on per-token means, which does not favour the
  shorter response.

No reference model and no reward model are needed, so the base model, the SFT model and the
DPO model are measured on one scale: this is the held-out number a preference stage should move
(DPO's own ``val_reward_margin`` is relative to its reference, so it starts at 0 by definition).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from instructkit.errors import InputError

if TYPE_CHECKING:
    from instructkit.eval.request import EvalRequest, Suite, SuiteRun

DEFAULT_PAIRS = "shipped:extract_prefs/val"


def log_prob_pairs(
    model: Any,
    tokenizer: Any,
    pairs: list[Any],
    *,
    batch_size: int = 16,
    max_length: int = 512,
    template: str | None = None,
) -> list[dict[str, float]]:
    """Summed log-probs and token counts of chosen and rejected, one dict per pair that fits
    ``max_length`` (``index`` says which)."""
    from instructkit.data.collate import preference_collate
    from instructkit.data.encoders import encode_preferences
    from instructkit.models.lm import sequence_log_probs
    from instructkit.models.passes import no_grad_batches

    examples = []
    for index, pair in enumerate(pairs):  # one at a time, to know which pairs did not fit
        encoded, _ = encode_preferences(tokenizer, [pair], template=template, max_length=max_length, paired=True)
        examples += [{**e, "index": index} for e in encoded]
    out: list[dict[str, float]] = []
    for chunk, batch in no_grad_batches(model, examples, preference_collate(tokenizer.pad_token_id), batch_size):
        logps, counts = sequence_log_probs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        logps, counts = logps.double().cpu().tolist(), counts.cpu().tolist()
        n = len(chunk)  # the batch is all chosen rows, then all rejected rows
        out += [
            {
                "index": chunk[i]["index"],
                "chosen_logp": logps[i],
                "rejected_logp": logps[n + i],
                "chosen_tokens": counts[i],
                "rejected_tokens": counts[n + i],
            }
            for i in range(n)
        ]
    return out


def summarize(scored: list[dict[str, float]]) -> dict[str, float]:
    """Accuracy (sum and per-token), mean margin; ties count as not preferring the chosen."""
    if not scored:
        raise InputError("no held-out pair fits max_length", field="data")
    n = len(scored)
    margins = [s["chosen_logp"] - s["rejected_logp"] for s in scored]
    per_token = [
        s["chosen_logp"] / max(s["chosen_tokens"], 1) - s["rejected_logp"] / max(s["rejected_tokens"], 1)
        for s in scored
    ]
    return {
        "pref_accuracy": sum(m > 0 for m in margins) / n,
        "pref_margin": sum(margins) / n,
        "pref_accuracy_per_token": sum(m > 0 for m in per_token) / n,
        "pref_pairs": n,
    }


def read_pairs(data: str | None, limit: int | None = None) -> tuple[str, list[Any]]:
    """The resolved path of ``data`` (default: the shipped extraction pairs) and its pairs, from
    any pair or ranking format ``instructkit dpo`` reads (a ranking gives every untied pair)."""
    from instructkit.data.encoders import as_pairs
    from instructkit.data.formats import load_records
    from instructkit.datasets import resolve_data_path

    path = resolve_data_path(data or DEFAULT_PAIRS)
    records = load_records(path).records
    return path, as_pairs(records[:limit] if limit else records, path)


def pair_samples(pairs: Sequence[Any], scored: Sequence[dict[str, float]]) -> list[dict[str, Any]]:
    """One samples-file line per scored pair: its texts, log-probs and verdict."""
    return [
        {
            "prompt": _text(pairs[s["index"]].prompt),
            "chosen": _text(pairs[s["index"]].chosen),
            "rejected": _text(pairs[s["index"]].rejected),
            **s,
            "prefers_chosen": s["chosen_logp"] > s["rejected_logp"],
        }
        for s in scored
    ]


def evaluate_preferences(
    model: Any,
    tokenizer: Any,
    *,
    data: str | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    max_length: int = 512,
) -> dict[str, Any]:
    """Metrics and per-pair samples of the model's own preference on held-out pairs in ``data``
    (any pair or ranking format ``instructkit dpo`` reads; default: the shipped extraction pairs)."""
    path, pairs = read_pairs(data, limit)
    scored = log_prob_pairs(model, tokenizer, pairs, batch_size=batch_size, max_length=max_length)
    return {**summarize(scored), "pref_data": str(path), "samples": pair_samples(pairs, scored)}


def run_preference(request: EvalRequest, suites: Sequence[Suite]) -> SuiteRun:
    """The suite's runner: the model's own preference on the pairs in ``request.data``; ``n`` is
    the pairs read, ``pref_pairs`` those that fit and were scored."""
    from instructkit.eval.request import SuiteRun

    model, tokenizer = request.model_and_tokenizer()
    path, pairs = read_pairs(request.data, request.limit)
    scored = log_prob_pairs(model, tokenizer, pairs, batch_size=request.batch_size)
    return SuiteRun({**summarize(scored), "pref_data": str(path)}, pair_samples(pairs, scored), str(path), len(pairs))


def _text(messages: Any) -> str:
    """The last turn's text (the user's question, or the response)."""
    if isinstance(messages, list) and messages:
        last = messages[-1]
        return last.content if hasattr(last, "content") else str(last)
    return str(messages)
