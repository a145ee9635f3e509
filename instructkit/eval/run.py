"""`instructkit eval`: run evaluation suites on a model and write what each example got.

Suites live in :data:`SUITES`, each a function ``(model, tokenizer, records, options) -> dict``
returning metrics plus per-example ``samples``; later suites (ifeval, reward, win rate) join
the same table.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from instructkit.errors import InputError, did_you_mean


def _exact_match(model, tokenizer, records, opts) -> dict[str, Any]:
    from instructkit.eval.exact_match import evaluate_exact_match

    return evaluate_exact_match(model, tokenizer, records, max_new_tokens=opts["max_new_tokens"],
                                batch_size=opts["batch_size"], k_shot=opts["k_shot"], shots=opts["shots"])


def _loss(model, tokenizer, records, opts) -> dict[str, Any]:
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
        for start in range(0, len(encoded), opts["batch_size"]):
            batch = pad_batch(encoded[start:start + opts["batch_size"]], pad_id=tokenizer.pad_token_id)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            loss, n = module(**batch)
            total, count = total + float(loss), count + float(n)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50)), "n": len(encoded), "samples": []}


SUITES: dict[str, Callable[..., dict[str, Any]]] = {"exact_match": _exact_match, "loss": _loss,
                                                    "ifeval": None}  # ifeval: see evaluate_ifeval


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


def evaluate(*, model: str, suites: list[str], data: str | None = None, out: str | None = None,
             max_new_tokens: int = 64, batch_size: int = 16, k_shot: int = 0, limit: int | None = None,
             shots_data: str | None = None, loaded: tuple[Any, Any] | None = None,
             responses: str | None = None) -> dict[str, Any]:
    """Evaluate ``model`` on held-out ``data`` with each suite; write metrics and samples to ``out``.

    ``data`` defaults to the shipped extraction test split; k-shot examples come from
    ``shots_data`` (default: that dataset's train split).
    """
    from instructkit.data.formats import load_records
    from instructkit.data.schema import Conversation
    from instructkit.datasets import resolve_data_path
    from instructkit.models.loading import load_model_and_tokenizer

    for suite in suites:
        if suite not in SUITES:
            raise InputError(f"unknown suite '{suite}' (one of {', '.join(SUITES)}){did_you_mean(suite, SUITES)}",
                             field="suite")
    if "ifeval" in suites:
        if len(suites) > 1:
            raise InputError("ifeval reads its own data format: run it as a suite of its own", field="suite")
        if not data:
            raise InputError("ifeval needs --data: a file in the IFEval format (key, prompt, "
                             "instruction_id_list, kwargs)", field="data")
        return evaluate_ifeval(data=data, model=model, out=out, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, limit=limit, loaded=loaded, responses=responses)
    data_path = resolve_data_path(data or "shipped:extract/test")
    records = load_records(data_path).records[:limit] if limit else load_records(data_path).records
    if not all(isinstance(r, Conversation) for r in records):
        raise InputError("evaluation data must be conversations (prompt turns + reference answer)", file=data_path)
    shots = []
    if k_shot:
        shots = load_records(resolve_data_path(shots_data or "shipped:extract/train")).records[:k_shot]
    model_obj, tokenizer = loaded or load_model_and_tokenizer(model)
    opts = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "k_shot": k_shot, "shots": shots}
    metrics: dict[str, Any] = {"model": str(model), "data": str(data_path), "k_shot": k_shot}
    samples: list[dict[str, Any]] = []
    for suite in suites:
        result = SUITES[suite](model_obj, tokenizer, records, opts)
        metrics.update({k: v for k, v in result.items() if k != "samples"})
        samples += [{"suite": suite, **s} for s in result.get("samples", [])]
    if out:
        _write(out, metrics, samples)
    return {"metrics": metrics, "samples": samples}
