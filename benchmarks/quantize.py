"""Quantised against fp32 in one run: weights on disk, decode tokens/s (eager and torch.compile)
and held-out exact match, for every CPU scheme of `instructkit quantize`.

Each scheme runs in a fresh worker process: the model (default: the quickstart's tuned SFT run) is
quantised by the quantize stage into a temporary folder, loaded back as every instructkit command
loads it, and then

- decoded greedily at batch 1 for ``--decode-tokens`` new tokens on one held-out prompt, after one
  warm-up run, with plain HF ``generate`` (eager) and again after ``torch.compile`` of the model's
  forward (the compile time is reported apart);
- scored by the ``exact_match`` suite on ``--eval-limit`` held-out test conversations.

    .venv/bin/python benchmarks/quantize.py --model runs/quickstart/sft
    .venv/bin/python benchmarks/quantize.py --schemes fp32 int8_weight_only --eval-limit 20 --decode-tokens 16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, machine_line, markdown_table, run_worker, save_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCHEMES = ("fp32", "int8_weight_only", "int8_dynamic", "int4_weight_only")


def _decode_speed(model: Any, tokenizer: Any, tokens: int) -> float:
    import torch

    from instructkit.data.formats import load_records
    from instructkit.data.templates import encode_prompt
    from instructkit.datasets import resolve_data_path

    record = load_records(resolve_data_path("shipped:extract/test")).records[0]
    ids = torch.tensor([encode_prompt(tokenizer, record.messages[:-1])])
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        model.generate(ids, **kwargs)  # warm-up
        started = time.perf_counter()
        out = model.generate(ids, **kwargs)
        elapsed = time.perf_counter() - started
    return (out.shape[1] - ids.shape[1]) / elapsed


def worker(scheme: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from instructkit.eval.run import evaluate
    from instructkit.models.loading import load_model_and_tokenizer
    from instructkit.train.quantize import quantize

    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix=f"quant-{scheme}-") as tmp:
        result: dict[str, Any] = {"scheme": scheme}
        spec = args.model
        if scheme != "fp32":
            summary = quantize({"model": args.model, "out": str(Path(tmp) / "run"), "scheme": scheme})
            spec = summary["final"]
            result["bytes"] = summary["bytes_on_disk"]
        model, tokenizer = load_model_and_tokenizer(spec, dtype="fp32", device="cpu", merge_adapter=True)
        model.eval()
        if scheme == "fp32":
            result["bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        result["eager_tokens_per_s"] = round(_decode_speed(model, tokenizer, args.decode_tokens), 2)
        metrics = evaluate(
            model=spec,
            suites=["exact_match"],
            data="shipped:extract/test",
            limit=args.eval_limit,
            batch_size=args.eval_batch_size,
            max_new_tokens=32,
            loaded=(model, tokenizer),
        )["metrics"]
        result["exact_match"] = metrics["exact_match"]
        started = time.perf_counter()
        try:
            model.forward = torch.compile(model.forward)
            _decode_speed(model, tokenizer, 4)  # compiles
            result["compile_seconds"] = round(time.perf_counter() - started, 1)
            result["compiled_tokens_per_s"] = round(_decode_speed(model, tokenizer, args.decode_tokens), 2)
        except Exception as exc:  # a scheme torch.compile cannot take: reported, not hidden
            result["compiled_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return result


def report(results: list[dict[str, Any]], args: argparse.Namespace, machine: dict[str, Any]) -> str:
    base = next(r for r in results if r["scheme"] == "fp32")
    headers = ["scheme", "weights MiB", "eager tok/s", "vs fp32", "compiled tok/s", "vs fp32 compiled", "exact match"]
    rows = []
    for r in results:
        compiled = r.get("compiled_tokens_per_s")
        rows.append(
            [
                r["scheme"],
                f"{r['bytes'] / 2**20:.1f}",
                f"{r['eager_tokens_per_s']:.2f}",
                f"{r['eager_tokens_per_s'] / base['eager_tokens_per_s']:.2f}x",
                f"{compiled:.2f}" if compiled else r.get("compiled_error", "-"),
                f"{compiled / base['compiled_tokens_per_s']:.2f}x"
                if compiled and base.get("compiled_tokens_per_s")
                else "-",
                f"{r['exact_match']:.3f}",
            ]
        )
    return "\n".join(
        [
            markdown_table(headers, rows),
            "",
            f"model {args.model}; greedy decoding at batch 1, {args.decode_tokens} new tokens after a warm-up; "
            f"exact match on {args.eval_limit} held-out test conversations (shipped:extract/test).",
            machine_line(machine),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="runs/quickstart/sft", help="model or run folder (default: %(default)s)")
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    parser.add_argument("--decode-tokens", type=int, default=64, help="default: %(default)s")
    parser.add_argument("--eval-limit", type=int, default=100, help="default: %(default)s")
    parser.add_argument("--eval-batch-size", type=int, default=50, help="default: %(default)s")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quantize.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.result.write_text(json.dumps(worker(args.worker, args)))
        return 0
    schemes = ["fp32", *[s for s in args.schemes if s != "fp32"]]
    machine = machine_info(("torch", "transformers", "torchao"))
    shared = ["--model", args.model, "--decode-tokens", str(args.decode_tokens)]
    shared += ["--eval-limit", str(args.eval_limit), "--eval-batch-size", str(args.eval_batch_size)]
    results = []
    for scheme in schemes:
        print(f"-- {scheme}", file=sys.stderr, flush=True)
        results.append(run_worker(__file__, scheme, shared))
    print(report(results, args, machine))
    save_results(args.out, "quantize", settings=vars(args) | {"out": str(args.out)}, machine=machine, results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
