"""`instructkit eval`: run evaluation suites on a model and write what each example got.

Suites live in :data:`SUITES` (aliases in :data:`ALIASES`). Most score generated responses
against the held-out conversations: :func:`evaluate` produces the responses once per model
(or reads them from a ``--responses`` file) and every such suite scores the same ones.
``perplexity`` scores the references under the model; ``ifeval`` reads its own benchmark format.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instructkit.data.schema import Message
from instructkit.errors import InputError, did_you_mean


class Needs(enum.Enum):
    """What a suite scores: responses to the held-out prompts, the model itself, or its own data."""

    RESPONSES = "responses"
    MODEL = "model"
    OWN_DATA = "own_data"


@dataclass
class Responses:
    """One model's responses to the held-out prompts, with what the suites score them against.

    ``prompts`` are the records' own prompt turns (without k-shot demonstrations: the reward
    model judges the answer to the question asked). ``rewards``/``baseline`` are filled on first
    use, so the reward model and the baseline run at most once however many suites need them.
    """

    prompts: list[list[Message]]
    responses: list[str]
    references: list[str]
    judge: Callable[[Sequence[Sequence[Message]], Sequence[str]], list[float]] | None = None
    make_baseline: Callable[[], list[str]] | None = None
    tie_margin: float = 0.0
    _cache: dict[str, list[Any]] = field(default_factory=dict)

    def rewards(self) -> list[float]:
        if "rewards" not in self._cache:
            self._cache["rewards"] = self.judge(self.prompts, self.responses)
        return self._cache["rewards"]

    def baseline(self) -> list[str]:
        if "baseline" not in self._cache:
            self._cache["baseline"] = self.make_baseline()
        return self._cache["baseline"]

    def baseline_rewards(self) -> list[float]:
        if "baseline_rewards" not in self._cache:
            self._cache["baseline_rewards"] = self.judge(self.prompts, self.baseline())
        return self._cache["baseline_rewards"]


def _exact_match(r: Responses):
    from instructkit.eval.tasks import score_exact_match

    return score_exact_match(r.responses, r.references)


def _accuracy(r: Responses):
    from instructkit.eval.tasks import score_accuracy

    return score_accuracy(r.responses, r.references)


def _bleu(r: Responses):
    from instructkit.eval.tasks import score_bleu

    return score_bleu(r.responses, r.references)


def _rouge(r: Responses):
    from instructkit.eval.tasks import score_rouge

    return score_rouge(r.responses, r.references)


def _reward(r: Responses):
    from instructkit.eval.reward import score_reward

    return score_reward(r.rewards())


def _winrate(r: Responses):
    from instructkit.eval.reward import score_winrate

    return score_winrate(r.rewards(), r.baseline_rewards(), r.baseline(), r.tie_margin)


def _perplexity(model, tokenizer, records, batch_size: int) -> dict[str, Any]:
    """Token-weighted loss and perplexity of the reference assistant turns."""
    import math

    import torch

    from instructkit.data.collate import pad_batch
    from instructkit.data.templates import encode_conversation
    from instructkit.models.lm import CausalLMLoss

    encoded = [e for e in (encode_conversation(tokenizer, r.messages) for r in records) if e is not None]
    module = CausalLMLoss(model).eval()
    total = count = 0.0
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            batch = pad_batch(encoded[start:start + batch_size], pad_id=tokenizer.pad_token_id)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            loss, n = module(**batch)
            total, count = total + float(loss), count + float(n)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50))}


@dataclass(frozen=True)
class Suite:
    name: str
    needs: Needs
    score: Callable[..., Any] | None
    metrics: str  # what it reports, for --help and docs


SUITES: dict[str, Suite] = {s.name: s for s in (
    Suite("exact_match", Needs.RESPONSES, _exact_match, "exact_match"),
    Suite("accuracy", Needs.RESPONSES, _accuracy,
          "accuracy, precision/recall/f1 _macro and _micro, off_label, per_label report"),
    Suite("bleu", Needs.RESPONSES, _bleu, "bleu, chrf (corpus, 0-100)"),
    Suite("rouge", Needs.RESPONSES, _rouge, "rouge1, rouge2, rougeL (mean F-measure)"),
    Suite("reward", Needs.RESPONSES, _reward, "reward_mean, reward_std"),
    Suite("winrate", Needs.RESPONSES, _winrate,
          "wins, ties, losses, win_rate, win_rate_ci_low/high, baseline_reward_mean"),
    Suite("perplexity", Needs.MODEL, _perplexity, "loss, perplexity"),
    Suite("ifeval", Needs.OWN_DATA, None, "prompt/instruction-level strict/loose accuracy, per type"),
    Suite("preference", Needs.OWN_DATA, None,
          "pref_accuracy, pref_margin, pref_accuracy_per_token: does the model itself give the chosen "
          "response of held-out pairs the higher log-likelihood"),
)}
ALIASES = {"loss": "perplexity", "f1": "accuracy"}


def resolve_suites(names: Sequence[str]) -> list[str]:
    """Suite names with aliases resolved and duplicates dropped, in order; unknown names are an
    InputError naming the closest suite."""
    out: list[str] = []
    for raw in names:
        name = raw.strip()
        if name not in SUITES and name not in ALIASES:
            known = [*SUITES, *ALIASES]
            raise InputError(f"unknown suite '{name}' (one of {', '.join(known)}){did_you_mean(name, known)}",
                             field="suite")
        name = ALIASES.get(name, name)
        if name not in out:
            out.append(name)
    if not out:
        raise InputError("no suite given", field="suite")
    return out


def read_responses(path: str | Path) -> dict[str, str]:
    """Responses produced elsewhere: JSONL records with ``key`` or ``prompt``, and ``response``.
    Returns response by key (as a string) and by prompt text."""
    from instructkit.data.readers import read_rows

    out: dict[str, str] = {}
    for row in read_rows(str(path)):
        response = row.data.get("response")
        if not isinstance(response, str):
            raise row.error("expected a string 'response'", field="response")
        ids = [str(row.data[k]) for k in ("key", "prompt") if row.data.get(k) is not None]
        if not ids:
            raise row.error("a response needs the 'key' or the 'prompt' it answers", field="key")
        for i in ids:
            out[i] = response
    return out


def evaluate_ifeval(*, data: str | Path, model: str | None = None, responses: str | Path | None = None,
                    out: str | None = None, max_new_tokens: int = 512, batch_size: int = 16,
                    limit: int | None = None, loaded: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """IFEval: prompt- and instruction-level accuracy, strict and loose, with a per-type breakdown.

    ``data`` is a file in the benchmark's format (``key``, ``prompt``, ``instruction_id_list``,
    ``kwargs``). Responses are generated greedily from ``model`` with its chat template, or read
    from ``responses`` (no model is loaded). Every prompt's response and each instruction's
    strict and loose verdict go to the samples file beside ``out``.
    """
    from instructkit.verifiers import aggregate, evaluate_response, read_ifeval_jsonl

    prompts = read_ifeval_jsonl(data)[:limit] if limit else read_ifeval_jsonl(data)
    if responses is not None:
        given = read_responses(responses)
        texts = []
        for p in prompts:
            text = given.get(str(p.key)) if p.key is not None else None
            text = text if text is not None else given.get(p.prompt)
            if text is None:
                raise InputError(f"no response for the prompt with key {p.key!r} of {data}", file=str(responses),
                                 field="key")
            texts.append(text)
    else:
        from instructkit.generation import generate
        from instructkit.models.loading import load_model_and_tokenizer

        if model is None:
            raise InputError("ifeval needs --model or --responses", field="model")
        model_obj, tokenizer = loaded or load_model_and_tokenizer(model)
        texts = generate(model_obj, tokenizer, [[{"role": "user", "content": p.prompt}] for p in prompts],
                         max_new_tokens=max_new_tokens, batch_size=batch_size)
    results = [evaluate_response(p.prompt, t, p.instruction_id_list, p.kwargs) for p, t in zip(prompts, texts)]
    summary = aggregate(results)
    metrics = {"model": str(model) if responses is None else None, "responses": str(responses) if responses else None,
               "data": str(data), "decoding": "greedy" if responses is None else "given",
               "max_new_tokens": max_new_tokens if responses is None else None, **summary}
    samples = [{"suite": "ifeval", "key": p.key, "prompt": p.prompt, "response": t,
                "instruction_id_list": p.instruction_id_list, "strict": r["strict"], "loose": r["loose"],
                "prompt_strict": r["prompt_strict"], "prompt_loose": r["prompt_loose"]}
               for p, t, r in zip(prompts, texts, results)]
    if out:
        _write(out, metrics, samples)
    return {"metrics": metrics, "samples": samples}


def _write(out: str, metrics: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    from instructkit.train.engine import atomic_write_json, atomic_write_text

    out_path = Path(out)
    atomic_write_json(out_path, metrics)
    atomic_write_text(out_path.with_suffix(".samples.jsonl"), "".join(json.dumps(s) + "\n" for s in samples))


def _record_keys(data_path: str, n: int) -> list[str]:
    """Each held-out record's key: its ``key`` or ``id`` field, else its 0-based position."""
    from instructkit.data.readers import read_rows

    try:
        rows = read_rows(data_path)
    except InputError:
        rows = []
    keys = []
    for i in range(n):
        row = rows[i].data if i < len(rows) and len(rows) >= n else {}
        given = next((row[k] for k in ("key", "id") if row.get(k) is not None), None)
        keys.append(str(given) if given is not None else str(i))
    return keys


def match_responses(path: str | Path, keys: Sequence[str], prompts: Sequence[str], *, data: str) -> list[str]:
    """The response to each held-out record from a JSONL of ``{"key" or "prompt", "response"}``.

    A record is matched by its key (see :func:`_record_keys`) first, then by the text of its
    last prompt turn. A record with no response is an InputError naming it.
    """
    from instructkit.data.readers import read_rows

    by_key: dict[str, str] = {}
    by_prompt: dict[str, str] = {}
    for row in read_rows(str(path)):
        response = row.data.get("response")
        if not isinstance(response, str):
            raise row.error("expected a string 'response'", field="response")
        if row.data.get("key") is None and row.data.get("prompt") is None:
            raise row.error("a response needs the 'key' or the 'prompt' it answers", field="key")
        if row.data.get("key") is not None:
            by_key[str(row.data["key"])] = response
        if isinstance(row.data.get("prompt"), str):
            by_prompt[row.data["prompt"]] = response
    out = []
    for i, (key, prompt) in enumerate(zip(keys, prompts)):
        text = by_key.get(key, by_prompt.get(prompt))
        if text is None:
            short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            raise InputError(f"no response for held-out record {i} of {data} (key {key!r}, prompt {short!r})",
                             file=str(path), field="response")
        out.append(text)
    return out


def evaluate(*, model: str | None = None, suites: list[str], data: str | None = None, out: str | None = None,
             max_new_tokens: int = 64, batch_size: int = 16, k_shot: int = 0, limit: int | None = None,
             shots_data: str | None = None, loaded: tuple[Any, Any] | None = None,
             responses: str | None = None, reward_model: str | None = None, baseline: str | None = None,
             baseline_responses: str | None = None, seed: int = 0, temperature: float = 0.0,
             tie_margin: float = 0.0) -> dict[str, Any]:
    """Evaluate ``model`` on held-out ``data`` with each suite; write metrics and samples to ``out``.

    ``data`` (conversations: prompt turns, then the reference assistant turn) defaults to the
    shipped extraction test split. Responses are generated once (greedy unless ``temperature``
    > 0, seeded by ``seed``), with ``k_shot`` demonstrations from ``shots_data`` (default: that
    dataset's train split) before each prompt, or read from ``responses`` (no model is loaded).
    ``reward`` and ``winrate`` are judged by ``reward_model``; ``winrate`` compares with the
    responses of ``baseline`` (a model, generated the same way) or ``baseline_responses``.
    Returns ``{"metrics": {...}, "samples": [one dict per record]}``.
    """
    from instructkit.data.formats import load_records
    from instructkit.data.schema import Conversation
    from instructkit.datasets import resolve_data_path
    from instructkit.eval.exact_match import split_reference, with_shots

    names = resolve_suites(suites)
    if "ifeval" in names:
        if len(names) > 1:
            raise InputError("ifeval reads its own data format: run it as a suite of its own", field="suite")
        if not data:
            raise InputError("ifeval needs --data: a file in the IFEval format (key, prompt, "
                             "instruction_id_list, kwargs)", field="data")
        return evaluate_ifeval(data=data, model=model, out=out, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, limit=limit, loaded=loaded, responses=responses)
    if "preference" in names:
        if len(names) > 1:
            raise InputError("preference reads preference pairs: run it as a suite of its own", field="suite")
        if responses is not None:
            raise InputError("preference scores the pairs under a model, so it cannot run on --responses",
                             field="suite")
        from instructkit.eval.preference import evaluate_preferences

        result = evaluate_preferences(*(loaded or _load(model)), data=data, batch_size=batch_size, limit=limit)
        samples = result.pop("samples")
        metrics = {"model": str(model) if model is not None else None, **result}
        if out:
            _write(out, metrics, samples)
        return {"metrics": metrics, "samples": samples}
    # 1. Check the options against the suites before anything slow happens.
    generated = [n for n in names if SUITES[n].needs is Needs.RESPONSES]
    if {"reward", "winrate"} & set(names) and not reward_model:
        raise InputError("the reward and winrate suites need --reward-model: a reward-model folder "
                         "(e.g. trained by `instructkit rm`)", field="reward_model")
    if "winrate" in names and bool(baseline) == bool(baseline_responses):
        raise InputError("winrate needs exactly one of --baseline (a model) or --baseline-responses (a JSONL)",
                         field="baseline")
    if responses is not None and "perplexity" in names:
        raise InputError("perplexity scores the references under a model, so it cannot run on --responses; "
                         "run it in a separate call with --model", field="suite")
    if k_shot < 0:
        raise InputError(f"k_shot must be >= 0, got {k_shot}", field="k_shot")
    if tie_margin < 0:
        raise InputError(f"tie_margin must be >= 0, got {tie_margin}", field="tie_margin")
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature}", field="temperature")
    if responses is None and model is None and loaded is None:
        raise InputError("give --model, or --responses to score responses made elsewhere", field="model")

    # 2. The held-out records: prompts, references, keys; the k-shot demonstrations.
    data_path = resolve_data_path(data or "shipped:extract/test")
    records = load_records(data_path).records
    records = records[:limit] if limit else records
    if not all(isinstance(r, Conversation) for r in records):
        raise InputError("evaluation data must be conversations (prompt turns + reference answer)", file=data_path)
    prompts, references = zip(*(split_reference(r, i) for i, r in enumerate(records))) if records else ((), ())
    prompts, references = [list(p) for p in prompts], list(references)
    keys = _record_keys(data_path, len(records))
    shots = []
    if k_shot and (responses is None or baseline):
        shots = load_records(resolve_data_path(shots_data or "shipped:extract/train")).records[:k_shot]
        if len(shots) < k_shot:
            raise InputError(f"k_shot={k_shot} needs that many shots, got {len(shots)}", field="shots_data")

    # 3. Responses: generated once per model and shared by every suite, or read from a file.
    def produce(spec: str | None, given: str | None, model_tok: tuple[Any, Any] | None) -> list[str]:
        if given is not None:
            return match_responses(given, keys, [p[-1].content for p in prompts], data=data_path)
        from instructkit.generation import generate

        model_obj, tokenizer = model_tok or _load(spec)
        if not prompts:
            return []
        return generate(model_obj, tokenizer, [with_shots(p, shots) for p in prompts],
                        max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature, seed=seed)

    loaded_main = loaded
    if responses is None and (generated or "perplexity" in names) and loaded_main is None:
        loaded_main = _load(model)
    metrics: dict[str, Any] = {
        "model": None if responses is not None else str(model) if model is not None else None,
        "responses": str(responses) if responses is not None else None, "data": str(data_path),
        "suites": names, "k_shot": k_shot, "n": len(records),
        "generation": {"decoding": "given" if responses is not None else "greedy" if temperature == 0 else "sampled",
                       "temperature": temperature, "seed": seed, "max_new_tokens": max_new_tokens},
    }
    samples: list[dict[str, Any]] = []
    if generated:
        from instructkit.eval.reward import RewardJudge

        shared = Responses(
            prompts=prompts, responses=produce(model, responses, loaded_main), references=references,
            judge=RewardJudge(reward_model, batch_size) if reward_model else None,
            make_baseline=lambda: produce(baseline, baseline_responses, None), tie_margin=tie_margin)
        samples = [{"key": k, "prompt": p[-1].content, "response": r, "reference": ref}
                   for k, p, r, ref in zip(keys, prompts, shared.responses, references)]
        # 4. Every suite scores the same responses; per-example scores join that example's line.
        for name in generated:
            suite_metrics, per_example = SUITES[name].score(shared)
            metrics.update(suite_metrics)
            for sample, extra in zip(samples, per_example):
                sample.update(extra)
        if reward_model:
            metrics["judge"] = {"reward_model": str(reward_model), "tie_margin": tie_margin,
                                "baseline": str(baseline or baseline_responses) if "winrate" in names else None}
    if "perplexity" in names:
        metrics.update(_perplexity(*loaded_main, records, batch_size))
    if out:
        _write(out, metrics, samples)
    return {"metrics": metrics, "samples": samples}


def _load(spec: str | None) -> tuple[Any, Any]:
    from instructkit.models.loading import load_model_and_tokenizer

    if spec is None:
        raise InputError("a model is needed here: give --model", field="model")
    return load_model_and_tokenizer(spec)
