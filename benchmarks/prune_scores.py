"""Wanda against magnitude pruning on the tuned model, in one run: held-out exact match and the
reference answers' loss at each unstructured sparsity (20-50%) and at 2:4, with the sparsity
measured on every pruned matrix.

Each variant is pruned by the prune stage (`instructkit.train.prune.prune`) from the same model on the
same calibration records, loaded back as every instructkit command loads it, checked (the share of
zeros in every decoder linear layer; for 2:4, that every group of four consecutive weights along a
row holds at least two zeros), and scored by the ``exact_match`` suite on held-out conversations.

    .venv/bin/python benchmarks/prune_scores.py --model runs/compress/dpo
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, machine_line, markdown_table, save_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def variants(sparsities: list[float]) -> dict[str, dict[str, Any]]:
    """dense, then magnitude and Wanda at each unstructured sparsity, then both at 2:4."""
    out: dict[str, dict[str, Any]] = {"dense": {}}
    for s in sparsities:
        for scores in ("magnitude", "wanda"):
            out[f"{scores} {100 * s:.0f}%"] = {"scores": scores, "sparsity": s}
    for scores in ("magnitude", "wanda"):
        out[f"{scores} 2:4"] = {"scores": scores, "pattern": "semi_structured"}
    return out


def check_matrices(model: Any, semi_structured: bool) -> dict[str, Any]:
    """Zeros per decoder linear layer, and for 2:4 how many matrices hold the pattern exactly."""
    import torch

    from instructkit.models.prune import decoder_layers

    shares, pattern_ok, matrices = [], 0, 0
    for layer in decoder_layers(model):
        for module in layer.modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            w = module.weight.detach()
            matrices += 1
            shares.append(float((w == 0).float().mean()))
            if semi_structured:
                groups = w.reshape(w.shape[0], -1, 4)  # (rows, in / 4, 4)
                pattern_ok += bool(((groups == 0).sum(-1) >= 2).all())
    return {
        "matrices": matrices,
        "min_zero_share": min(shares),
        "max_zero_share": max(shares),
        "two_of_four_matrices": pattern_ok if semi_structured else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="runs/compress/dpo", help="the tuned model (default: %(default)s)")
    parser.add_argument("--calibration-examples", type=int, default=64, help="default: %(default)s")
    parser.add_argument(
        "--sparsities", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5], help="default: %(default)s"
    )
    parser.add_argument("--eval-limit", type=int, default=100, help="default: %(default)s")
    parser.add_argument("--eval-batch-size", type=int, default=50, help="default: %(default)s")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prune_scores.json")
    args = parser.parse_args(argv)

    from instructkit.eval.run import evaluate
    from instructkit.models.loading import load_model_and_tokenizer
    from instructkit.train.prune import prune

    machine = machine_info(("torch", "transformers"))
    results = []
    with tempfile.TemporaryDirectory(prefix="prune-scores-") as tmp:
        for name, settings in variants(args.sparsities).items():
            print(f"-- {name}", file=sys.stderr, flush=True)
            spec, row = args.model, {"variant": name, **settings}
            if settings:
                cfg = {
                    "model": args.model,
                    "out": str(Path(tmp) / name.replace(" ", "_").replace("%", "").replace(":", "of")),
                    "data": {"path": "shipped:extract/train", "max_length": 128},
                    "calibration_examples": args.calibration_examples,
                    **settings,
                }
                summary = prune(cfg)
                spec, row["sparsity"] = summary["final"], summary["sparsity"]
            model, tokenizer = load_model_and_tokenizer(spec, dtype="fp32", device="cpu", merge_adapter=True)
            if settings:
                row |= check_matrices(model, settings.get("pattern") == "semi_structured")
            metrics = evaluate(
                model=spec,
                suites=["exact_match", "perplexity"],
                data="shipped:extract/test",
                limit=args.eval_limit,
                batch_size=args.eval_batch_size,
                max_new_tokens=32,
                loaded=(model, tokenizer),
            )["metrics"]
            row["exact_match"], row["loss"] = metrics["exact_match"], metrics["loss"]
            results.append(row)

    headers = ["variant", "zeros (pruned layers)", "zeros per matrix", "2:4 matrices", "exact match", "answer loss"]
    rows = [
        [
            r["variant"],
            f"{r['sparsity']:.3f}" if "sparsity" in r else "-",
            f"{r['min_zero_share']:.3f}-{r['max_zero_share']:.3f}" if "matrices" in r else "-",
            f"{r['two_of_four_matrices']}/{r['matrices']}" if r.get("two_of_four_matrices") is not None else "-",
            f"{r['exact_match']:.3f}",
            f"{r['loss']:.3f}",
        ]
        for r in results
    ]
    print(markdown_table(headers, rows))
    print(
        f"\nmodel {args.model}; calibration: the first {args.calibration_examples} records of shipped:extract/train; "
        f"exact match on {args.eval_limit} held-out test conversations (shipped:extract/test), greedy; answer "
        "loss: the mean cross-entropy of their reference answers."
    )
    print(machine_line(machine))
    save_results(
        args.out, "prune_scores", settings=vars(args) | {"out": str(args.out)}, machine=machine, results=results
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
