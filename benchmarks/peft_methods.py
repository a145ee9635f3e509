"""Every method of the method registry on one table: the shipped extraction task, the default model.

Each method trains the quickstart's SFT stage (``recipes/quickstart.yaml``: the shipped
``extract`` demonstrations, max_length 128, batch 8) for the same number of steps from the same
seed, in a fresh worker process, and is then scored on the held-out test split by the
``exact_match`` suite (greedy, batched generation). The columns:

- trainable / total parameters (tied weights counted once);
- real tokens/s: the engine's count of attention-mask tokens over training time, without
  checkpoint writes (``summary.json: tokens_per_s``);
- peak RSS over the training window (``_common.MemoryProbe``) and the process peak;
- held-out exact match on ``--eval-limit`` test conversations;
- what is saved on disk for the method: the weight files of ``final/`` (an adapter, or the whole
  model for full, freeze and bitfit), not the tokenizer.

The learning rate is the method's own (``LEARNING_RATES``): methods that train a few vectors or
virtual tokens need a larger step than LoRA does, and a table at one learning rate would rank
the learning rate, not the method. Everything else is held equal. The base model's row (no
training) gives the starting exact match. A method the machine cannot run (QLoRA needs a GPU
here, BitFit needs bias terms) gets its reason in the table instead of numbers.

    .venv/bin/python benchmarks/peft_methods.py                    # every method, 24 steps
    .venv/bin/python benchmarks/peft_methods.py --methods lora ia3 --steps 8 --eval-limit 20
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
from _common import MemoryProbe, machine_info, machine_line, markdown_table, run_worker, save_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"

# The method's learning rate (constant after 2 warm-up steps). LoRA's is the quickstart's.
LEARNING_RATES: dict[str, float] = {
    "full": 5e-5,
    "freeze": 1e-4,
    "bitfit": 1e-2,
    "lora": 1e-3,
    "dora": 1e-3,
    "rslora": 2.5e-4,  # alpha / sqrt(r) scales 4x LoRA's alpha / r at r 16
    "vera": 1e-2,
    "loha": 1e-3,
    "lokr": 1e-3,
    "ia3": 1e-2,
    "ln_tuning": 1e-2,
    "prompt_tuning": 3e-2,
    "prefix_tuning": 1e-2,
    "p_tuning": 1e-2,
    "houlsby": 1e-3,
    "pfeiffer": 1e-3,
    "qlora": 1e-3,
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def weights_on_disk(folder: Path) -> int:
    """Bytes of the weight files of a saved model or adapter folder (tokenizer files left out)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def stage_config(method: str, steps: int, batch_size: int, seed: int, out: Path) -> dict[str, Any]:
    from instructkit.stages import load_recipe

    sft = dict(load_recipe("quickstart").sections["sft"])
    sft.update(
        model=MODEL,
        out=str(out),
        peft={**sft.get("peft", {}), "method": method} if method in ("lora", "dora", "rslora") else {"method": method},
        optim={"lr": LEARNING_RATES.get(method, 1e-3), "scheduler": "constant", "warmup_steps": 2},
        train={"batch_size": batch_size, "max_steps": steps, "save_every": 0, "eval_every": 0, "seed": seed},
    )
    return sft


def worker(method: str, args: argparse.Namespace) -> dict[str, Any]:
    from instructkit.errors import InputError
    from instructkit.eval.run import evaluate
    from instructkit.train.sft import sft

    with tempfile.TemporaryDirectory(prefix=f"peft-{method}-") as tmp:
        out = Path(tmp) / "run"
        model = MODEL
        result: dict[str, Any] = {"method": method}
        if method != "base":
            probe = MemoryProbe()
            probe.start()
            try:
                summary = sft(stage_config(method, args.steps, args.batch_size, args.seed, out))
            except InputError as e:
                return {**result, "skipped": str(e)}
            finally:
                probe.stop()
            model = summary["final"]
            result.update(
                probe.result(),
                trainable=summary["trainable_parameters"],
                total=summary["total_parameters"],
                tokens_per_s=summary["tokens_per_s"],
                train_loss=summary["train_loss"],
                train_seconds=summary["train_seconds"],
                saved_bytes=weights_on_disk(Path(summary["final"])),
            )
        started = time.perf_counter()
        metrics = evaluate(
            model=model,
            suites=["exact_match"],
            data="shipped:extract/test",
            limit=args.eval_limit,
            batch_size=args.eval_batch_size,
            max_new_tokens=32,
        )["metrics"]
        result.update(exact_match=metrics["exact_match"], eval_seconds=round(time.perf_counter() - started, 1))
    return result


def report(results: list[dict[str, Any]], args: argparse.Namespace, machine: dict[str, Any]) -> str:
    headers = ["method", "lr", "trainable", "% of total", "tokens/s", "peak RSS MiB", "exact match", "saved MiB"]
    rows = []
    for r in results:
        if "skipped" in r:
            rows.append([r["method"], "-", "-", "-", "-", "-", "-", f"not run: {r['skipped']}"])
        elif r["method"] == "base":
            rows.append(["base (untrained)", "-", 0, "0.00", "-", "-", f"{r['exact_match']:.3f}", "-"])
        else:
            rows.append(
                [
                    r["method"],
                    f"{LEARNING_RATES.get(r['method'], 1e-3):g}",
                    r["trainable"],
                    f"{100 * r['trainable'] / r['total']:.3f}",
                    f"{r['tokens_per_s']:.1f}",
                    f"{r['train_peak_rss_mib']:.0f}",
                    f"{r['exact_match']:.3f}",
                    f"{r['saved_bytes'] / 2**20:.2f}",
                ]
            )
    lines = [
        markdown_table(headers, rows),
        "",
        f"{args.steps} steps of batch {args.batch_size} on shipped:extract/train (max_length 128, seed {args.seed}); "
        f"exact match on {args.eval_limit} held-out test conversations, greedy, 32 new tokens.",
        machine_line(machine),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=None, help="methods to run (default: every registered one)")
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per method (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="default: %(default)s")
    parser.add_argument(
        "--eval-limit", type=int, default=100, help="held-out test conversations (default: %(default)s)"
    )
    parser.add_argument("--eval-batch-size", type=int, default=50, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "peft_methods.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        result = worker(args.worker, args)
        args.result.write_text(json.dumps(result))
        return 0

    from instructkit.models.embedded import embedded_model_dir  # converts the GGUF once, before the workers
    from instructkit.models.peft_methods import METHODS

    embedded_model_dir()
    methods = args.methods or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r} (one of {', '.join(METHODS)})")
    machine = machine_info(("torch", "transformers", "peft"))
    shared = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
    shared += ["--eval-limit", str(args.eval_limit), "--eval-batch-size", str(args.eval_batch_size)]
    results = []
    for method in ["base", *methods]:
        print(f"-- {method}", file=sys.stderr, flush=True)
        try:
            results.append(run_worker(__file__, method, shared))
        except SystemExit as exc:  # one method's crash is a row of the table, not the end of the run
            results.append({"method": method, "skipped": f"worker failed ({exc})"})
        save_results(
            args.out, "peft_methods", settings=vars(args) | {"out": str(args.out)}, machine=machine, results=results
        )
        r = results[-1]
        print(
            f"   {json.dumps({k: r[k] for k in ('exact_match', 'tokens_per_s', 'skipped') if k in r})}", file=sys.stderr
        )
    table = report(results, args, machine)
    print(table)
    save_results(
        args.out, "peft_methods", settings=vars(args) | {"out": str(args.out)}, machine=machine, results=results
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
