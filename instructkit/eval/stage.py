"""The recipe's evaluation stage: every model of the recipe on the same held-out data, into one
folder, with a table of their numbers.

Each model is loaded once and evaluated with every suite of the stage config. Suites that read
the held-out conversations run in one call (``<name>.json`` and ``<name>.samples.jsonl``); a
suite that reads a format of its own runs alone (``<name>.<suite>.json`` and its samples), on
the stage config's ``<suite>_data`` when it has one (``preference_data``), else on ``data``.
With ``k_shot`` > 0 the starting model is also evaluated with that many demonstrations, by the
suites the demonstrations apply to. ``summary.json`` holds ``table``: per model, its numeric
metrics (with ``footprint: true``, also ``weights_mb``, ``parameters_m`` and
``decode_tokens_per_s``). The folder is written atomically: it appears whole or not at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def eval_stage(
    cfg: Any, models: Sequence[tuple[str, str]], out: str | Path, *, reward_model: str | None = None
) -> dict[str, Any]:
    """Evaluate ``models`` (``(name, model spec)`` pairs, the starting model first) into ``out``.

    ``cfg`` has the fields of the recipe's eval section: ``suites``, ``data``,
    ``max_new_tokens``, ``batch_size``, ``k_shot``, ``limit`` and ``<suite>_data`` for suites
    with a format of their own (``preference_data``, ``refusal_data``, ``injection_data``), and
    ``robust_suite``, the suite ``robustness`` re-runs. ``reward_model`` judges the ``reward``
    and ``winrate`` suites. Returns the summary written to ``out/summary.json``.
    """
    from instructkit.decoding import reduced_precision
    from instructkit.eval.conversations import read_conversations
    from instructkit.eval.footprint import footprint
    from instructkit.eval.heads import classifier_runs, head_eval_stage
    from instructkit.eval.run import HEADER_KEYS, SUITES, evaluate, resolve_suites
    from instructkit.eval.vision import vision_eval_stage, vision_runs
    from instructkit.fileio import atomic_dir, atomic_write_json
    from instructkit.models.loading import load_model_and_tokenizer
    from instructkit.models.seq2seq import starting_model

    # Vision runs first: their folders hold a heldout.json as classify runs do, and final/vision.json.
    if vision_runs(models):  # vision runs: the held-out answers their stages measured (eval/vision.py)
        return vision_eval_stage(models, out)
    if classifier_runs(models):  # classifiers and taggers: scored from the head, no generation (eval/heads.py)
        return head_eval_stage(models, out)
    # 1. The runs: every model zero-shot (then in each reduced weight precision asked for), and
    # the starting model k-shot right after it.
    precisions = getattr(cfg, "precisions", [])
    runs = [
        (f"{name} {p}" if p != "fp32" else name, spec, 0, p) for name, spec in models for p in ["fp32", *precisions]
    ]
    if cfg.k_shot:
        runs.insert(1, (f"base {cfg.k_shot}-shot", models[0][1], cfg.k_shot, "fp32"))
    # 2. The calls of each run: the shared-data suites together, each own-format suite alone.
    names = resolve_suites(cfg.suites)
    shared = [n for n in names if not SUITES[n].reads.alone]
    calls = ([("", shared, cfg.data)] if shared else []) + [
        (f".{n}", [n], getattr(cfg, f"{n}_data", cfg.data)) for n in names if SUITES[n].reads.alone
    ]

    prompts = read_conversations(cfg.data, cfg.footprint_prompts).prompts if cfg.footprint else []
    table: dict[str, dict[str, Any]] = {}
    with atomic_dir(out) as tmp:
        for name, spec, k, precision in runs:
            print(f"   evaluating {name}", flush=True)
            stem = name.replace(" ", "_")
            # A BERT2BERT's starting point is the untrained warm start, not its encoder (models/seq2seq.py).
            first = starting_model(spec, [s for _, s in models[1:]]) if spec == models[0][1] else None
            loaded = first or load_model_and_tokenizer(spec)
            if precision != "fp32":  # the same model with its weights in bf16 or int8 (instructkit.decoding)
                loaded = (reduced_precision(loaded[0], precision), loaded[1])
            metrics: dict[str, Any] = {}
            # 3. Each call writes its metrics and samples; the run's numbers join the table.
            for suffix, suites, data in calls:
                if k and not SUITES[suites[0]].reads.takes_shots:
                    continue  # demonstrations change neither log-likelihoods nor a benchmark's prompts
                judged = reward_model if any(SUITES[s].judged for s in suites) else None
                result = evaluate(
                    model=spec,
                    suites=suites,
                    data=data,
                    max_new_tokens=cfg.max_new_tokens,
                    batch_size=cfg.batch_size,
                    k_shot=k,
                    limit=cfg.limit,
                    loaded=loaded,
                    reward_model=judged,
                    robust_suite=getattr(cfg, "robust_suite", "exact_match"),
                    out=str(tmp / f"{stem}{suffix}.json"),
                )
                # The header (n, k_shot, ...) is the run's first call's; each call adds its suites' numbers.
                metrics.update({m: v for m, v in result["metrics"].items() if m not in HEADER_KEYS or m not in metrics})
            if cfg.footprint:  # size on disk, parameters, batch-1 decode speed (eval/footprint.py)
                metrics.update(footprint(spec, *loaded, prompts, cfg.max_new_tokens))
            table[name] = {m: v for m, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        # 4. The table of every model's numbers.
        summary = {"stage": "eval", "data": cfg.data, "table": table}
        atomic_write_json(tmp / "summary.json", summary)
    return summary
