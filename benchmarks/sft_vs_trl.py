"""instructkit SFT vs TRL's SFTTrainer: LoRA on the same model, data, batches and settings.

    .venv/bin/python benchmarks/sft_vs_trl.py            # 20 steps of each, then the table
    .venv/bin/python benchmarks/sft_vs_trl.py --quick    # 3 steps of each (smoke run)

Each framework trains the model (default: the embedded SmolLM2-135M-Instruct) with LoRA for the
same number of steps, and the table shows, per framework: steps, real (non-pad) tokens and
seconds of the timed steps, real tokens per second, peak RSS, peak RSS above the RSS at the
start of training, and the last step's training loss. Results also go to
``benchmarks/results/sft_vs_trl.json`` (``sft_vs_trl-quick.json`` with ``--quick``).

What is held equal, and how:

* Process: each framework runs in its own fresh subprocess (this file with ``--worker``), one
  after the other, so neither inherits the other's memory; the parent only collects JSON.
* Data: the shipped ``extract_train.jsonl`` (system, user, assistant). instructkit reads it as
  messages; TRL gets each record as a conversational prompt-completion pair
  (``{"prompt": [system, user], "completion": [assistant]}``), so its default
  ``completion_only_loss`` trains the assistant turn, like instructkit's assistant-only loss.
  Both render the SmolLM2 chat template of the tokenizer; no example reaches ``--max-length``,
  and TRL is given only the examples instructkit keeps. The TRL worker checks that every example
  tokenises to the same ``input_ids`` in both.
* Batches: TRL reads the examples in the order instructkit's engine draws them
  (``StepPlan``: a seeded permutation per epoch) through a sequential sampler, so step k of
  both trains the same 8 examples. Each worker counts the attention-mask ones of every batch it
  trains; the parent checks that the counts agree step by step.
* Model and LoRA: fp32 on CPU (TRL: ``bf16=False, fp16=False, use_cpu=True``; TRL 1.x would
  otherwise default to bf16 autocast and gradient checkpointing), no gradient checkpointing, no
  packing, no padding-free. LoRA as in ``recipes/quickstart.yaml`` (r 16, alpha 32, dropout 0,
  ``all-linear``), through peft in both, initialised from the same seed; the workers hash the
  initial adapter weights and the parent checks that the hashes agree.
* Optimisation: batch 8 x accumulation 1, AdamW (torch, not fused; betas 0.9/0.999, eps 1e-8,
  weight decay 0), constant lr 1e-3 without warm-up, gradient clipping at 1.0, seed 0.
* Loop: no evaluation, logging every step, TRL saves nothing (``save_strategy="no"``) and shows
  no progress bar (instructkit: ``train.progress=false``), ``report_to="none"``,
  ``dataloader_num_workers=0``, torch's default thread count in both.

What is measured, and how:

* Time: from the end of step 1 to the end of the last step, so both skip the same warm-up step
  (reported separately). TRL: a ``TrainerCallback`` stamps ``on_step_end``. instructkit: the
  ``on_step`` callback of ``sft()``, minus the checkpoint the engine always writes after its last
  step (TRL here writes none); the engine's own clock (from its logged ``tokens_per_s``) is kept
  in the JSON as a cross-check. Process CPU seconds are stamped alongside, and the fastest step
  is reported: on a shared machine they show whether a run was slow or only waited for the CPU.
* Tokens/s: real tokens of the timed steps / their seconds.
* Memory: RSS when training starts (model loaded, adapters on, data tokenised) is the baseline;
  peak RSS is ``ru_maxrss`` at the end of training; the peak above baseline is the training
  window's peak (``ru_maxrss`` if training set the process peak, else a 50 ms RSS sampler)
  minus the baseline.
* Loss: the last step's training loss. The two are close but not identical by construction:
  TRL's completion is the assistant turn *including* the newline the template writes after
  ``<|im_end|>``, so TRL trains one more (easy) token per example than instructkit.

Known differences that are part of what is compared, not set-up: on CPU, TRL's fused LM head
projects every position to the vocabulary and masks afterwards (it compacts to the trained
positions only on CUDA/XPU), while instructkit projects only trained positions; TRL also computes
entropy and token accuracy for its logs every step.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import (
    MemoryProbe,
    StepClock,
    instructkit_fair_sections,
    machine_info,
    markdown_table,
    measure_callback,
    run_worker,
    save_results,
    timed_window,
    trainable_hash,
    trl_fair_args,
    write_json_atomic,
)

HERE = Path(__file__).resolve().parent
FRAMEWORKS = ("instructkit", "trl")
PACKAGES = ("instructkit", "torch", "transformers", "trl", "peft", "accelerate", "datasets")

# Optimisation settings held equal in both frameworks (LoRA comes from the quickstart recipe).
LR = 1e-3
BETAS = (0.9, 0.999)
EPS = 1e-8  # torch AdamW's default, which instructkit uses
WEIGHT_DECAY = 0.0
MAX_GRAD_NORM = 1.0


@dataclasses.dataclass(frozen=True)
class Settings:
    model: str = "smollm2-135m-instruct"
    steps: int = 20
    batch_size: int = 8
    max_length: int = 128
    seed: int = 0

    def argv(self) -> list[str]:
        return [
            "--model",
            self.model,
            "--steps",
            str(self.steps),
            "--batch-size",
            str(self.batch_size),
            "--max-length",
            str(self.max_length),
            "--seed",
            str(self.seed),
        ]


def data_path() -> Path:
    from instructkit.datasets import shipped_path

    return shipped_path("extract", "train")


def quickstart_lora():
    """The LoRA settings of ``recipes/quickstart.yaml`` (its peft section over the defaults)."""
    import yaml

    import instructkit
    from instructkit.config import PeftConfig, from_dict

    recipe = Path(instructkit.__file__).parent / "recipes" / "quickstart.yaml"
    peft_cfg = from_dict(PeftConfig, yaml.safe_load(recipe.read_text())["sft"]["peft"], file=str(recipe))
    if peft_cfg.method != "lora":
        raise SystemExit(f"{recipe}: expected peft.method lora, found {peft_cfg.method}")
    return peft_cfg


def _worker_common(framework: str, s: Settings) -> dict[str, Any]:
    import torch

    return {"framework": framework, "settings": dataclasses.asdict(s), "torch_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------
# Workers (each runs in its own process)


def worker_instructkit(s: Settings) -> dict[str, Any]:
    from instructkit.train import engine
    from instructkit.train.sft import sft

    lora = quickstart_lora()
    probe, clock = MemoryProbe(), StepClock()
    step_tokens: list[int] = []
    step_trained: list[int] = []
    seen: dict[str, Any] = {}
    original_fit, original_save = engine.fit, engine.save_checkpoint

    # sft() calls engine.fit once the model is loaded, adapted and the data encoded: the point at
    # which TRL calls on_train_begin. Wrap it to start the probe and the clock and count batches.
    def measured_fit(**kwargs):
        collate = kwargs["collate"]

        def counting_collate(examples):
            batch = collate(examples)
            step_tokens.append(int(batch["attention_mask"].sum()))
            step_trained.append(int((batch["labels"][:, 1:] != -100).sum()))
            return batch

        kwargs["collate"] = counting_collate
        seen["init_hash"] = trainable_hash(kwargs["model"])
        probe.start()
        clock.start()
        result = original_fit(**kwargs)
        probe.stop()
        seen["fit"] = result
        return result

    # The engine always checkpoints after the last step (before calling on_step); TRL here does
    # not save, so that write is left out of the step time.
    def unclocked_save(*args, **kwargs):
        with clock.excluded():
            return original_save(*args, **kwargs)

    engine.fit, engine.save_checkpoint = measured_fit, unclocked_save
    with tempfile.TemporaryDirectory(prefix="bench-instructkit-") as out:
        config = {
            "model": s.model,
            "out": out,
            "data": {"path": str(data_path()), "val_fraction": 0.0, "max_length": s.max_length, "packing": False},
            "peft": {
                "method": "lora",
                "r": lora.r,
                "alpha": lora.alpha,
                "dropout": lora.dropout,
                "target_modules": lora.target_modules,
            },
            **instructkit_fair_sections(
                steps=s.steps,
                batch_size=s.batch_size,
                lr=LR,
                seed=s.seed,
                betas=BETAS,
                weight_decay=WEIGHT_DECAY,
                max_grad_norm=MAX_GRAD_NORM,
            ),
        }
        summary = sft(config, on_step=lambda step: clock.stamp())
    fit = seen["fit"]
    if len(fit.history) != s.steps or len(step_tokens) != s.steps:
        raise SystemExit(f"expected {s.steps} logged steps, got {len(fit.history)} and {len(step_tokens)} batches")
    # Cross-check: the engine logs tokens_per_s = real tokens so far / seconds since its loop
    # started (checkpoint time excluded), so its own clock at the end of step k is cumulative
    # tokens / that rate.
    cumulative = itertools.accumulate(step_tokens)
    engine_step_end_s = [c / record["tokens_per_s"] for c, record in zip(cumulative, fit.history)]
    return {
        **_worker_common("instructkit", s),
        "steps": fit.steps,
        "step_tokens": step_tokens,
        "step_trained_tokens": step_trained,
        "step_end_s": clock.step_end_s,
        "step_end_cpu_s": clock.step_end_cpu_s,
        "engine_step_end_s": engine_step_end_s,
        "step_loss": [record["loss"] for record in fit.history],
        "init_hash": seen["init_hash"],
        "train_examples": summary["train_examples"],
        "memory": probe.result(),
    }


def to_prompt_completion(conversation) -> dict[str, list[dict[str, str]]]:
    """One single-turn conversation as TRL's conversational prompt-completion record."""
    messages = [{"role": m.role, "content": m.content} for m in conversation.messages]
    roles = [m["role"] for m in messages]
    if roles[-1] != "assistant" or roles.count("assistant") != 1:
        raise SystemExit(
            f"expected one assistant turn at the end, got roles {roles}: prompt-completion "
            "form would not train the same tokens as instructkit"
        )
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def worker_trl(s: Settings) -> dict[str, Any]:
    import peft
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from trl import __version__ as trl_version

    from instructkit.data.formats import load_records
    from instructkit.models.loading import resolve
    from instructkit.train.engine import StepPlan
    from instructkit.train.sft import encode_records

    # 1. The records instructkit keeps at this max_length, in the order its engine draws them.
    base = resolve(s.model).base
    tokenizer = AutoTokenizer.from_pretrained(base)
    records = load_records(str(data_path())).records
    kept, ours = [], []
    for i, record in enumerate(records):
        encoded, _ = encode_records(tokenizer, [record], template=None, max_length=s.max_length, where=str(data_path()))
        if encoded:
            kept.append(i)
            ours.append(encoded[0])
    plan = StepPlan(len(kept), s.batch_size, s.seed)
    order = [j for step in range(s.steps) for j in plan.indices(step)]
    dataset = Dataset.from_list([to_prompt_completion(records[kept[j]]) for j in order])

    # 2. Model and trainer. TRL seeds, then wraps the model with peft; instructkit seeds, loads,
    #    then wraps. Loading draws no random numbers, so the adapters start equal (checked by hash).
    model = AutoModelForCausalLM.from_pretrained(base, dtype="float32", use_safetensors=True)
    lora = quickstart_lora()
    probe, clock = MemoryProbe(), StepClock()
    seen: dict[str, Any] = {}

    with tempfile.TemporaryDirectory(prefix="bench-trl-") as out:
        args = trl_fair_args(
            SFTConfig,
            out=out,
            steps=s.steps,
            batch_size=s.batch_size,
            lr=LR,
            seed=s.seed,
            max_length=s.max_length,
            betas=BETAS,
            eps=EPS,
            weight_decay=WEIGHT_DECAY,
            max_grad_norm=MAX_GRAD_NORM,
            packing=False,
            shuffle_dataset=False,
        )
        peft_config = peft.LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[measure_callback(seen, probe, clock)],
        )
        if args.gradient_checkpointing or args.bf16 or args.fp16:
            raise SystemExit(f"TRL {trl_version}: expected fp32 without gradient checkpointing")
        if not trainer.completion_only_loss:
            raise SystemExit("TRL did not choose completion-only loss for the prompt-completion data")

        # 3. Same template and truncation: TRL's tokenised examples against instructkit's.
        theirs = trainer.train_dataset
        if len(theirs) != len(order):
            raise SystemExit(f"TRL kept {len(theirs)} of {len(order)} examples")
        same_ids = sum(theirs[n]["input_ids"] == ours[j]["input_ids"] for n, j in enumerate(order))
        if same_ids != len(order):
            raise SystemExit(f"only {same_ids} of {len(order)} examples tokenise to the same input_ids")
        extra = sorted(
            {
                tokenizer.decode([t])
                for n, j in enumerate(order)
                for t, a, b in zip(theirs[n]["input_ids"], theirs[n]["labels"], ours[j]["labels"])
                if (a != -100) != (b != -100)
            }
        )

        # 4. Count the real tokens of every batch TRL trains.
        step_tokens: list[int] = []
        step_trained: list[int] = []
        collator = trainer.data_collator

        def counting_collator(features):
            batch = collator(features)
            step_tokens.append(int(batch["attention_mask"].sum()))
            step_trained.append(int((batch["labels"][:, 1:] != -100).sum()))
            return batch

        trainer.data_collator = counting_collator
        trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    step_tokens, step_trained = step_tokens[: s.steps], step_trained[: s.steps]  # a prefetch may run ahead
    if len(clock.step_end_s) != s.steps or len(losses) != s.steps:
        raise SystemExit(f"expected {s.steps} steps, got {len(clock.step_end_s)} timed and {len(losses)} logged")
    return {
        **_worker_common("trl", s),
        "steps": trainer.state.global_step,
        "step_tokens": step_tokens,
        "step_trained_tokens": step_trained,
        "step_end_s": clock.step_end_s,
        "step_end_cpu_s": clock.step_end_cpu_s,
        "step_loss": losses,
        "init_hash": seen["init_hash"],
        "train_examples": len(kept),
        "same_input_ids": f"{same_ids}/{len(order)}",
        "labels_differ_on": extra,
        "memory": probe.result(),
    }


WORKERS = {"instructkit": worker_instructkit, "trl": worker_trl}


# ----------------------------------------------------------------------------------------------
# Parent: run the workers, check they trained alike, print the table


def summarise(r: dict[str, Any]) -> dict[str, Any]:
    """See :func:`_common.timed_window`."""
    return timed_window(r)


def checks(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ik, trl = results["instructkit"], results["trl"]
    return {
        "same_batches": ik["step_tokens"] == trl["step_tokens"],
        "same_initial_adapter": ik["init_hash"] == trl["init_hash"],
        "same_input_ids": trl["same_input_ids"],
        "trained_tokens": {name: sum(r["step_trained_tokens"]) for name, r in results.items()},
        "trl_labels_differ_on": trl["labels_differ_on"],
        "step1_loss": {name: r["step_loss"][0] for name, r in results.items()},
    }


def report(results: dict[str, dict[str, Any]], machine: dict[str, Any], check: dict[str, Any]) -> str:
    headers = [
        "framework",
        "steps",
        "real tokens",
        "train s",
        "tokens/s",
        "peak RSS MiB",
        "above baseline MiB",
        "final loss",
    ]
    rows = []
    for name, r in results.items():
        m, mem = r["summary"], r["memory"]
        rows.append(
            [
                name,
                r["steps"],
                m["timed_real_tokens"],
                round(m["timed_seconds"], 2),
                m["tokens_per_s"],
                round(mem["peak_rss_mib"]),
                round(mem["peak_above_baseline_mib"]),
                round(m["final_loss"], 4),
            ]
        )
    timed = next(iter(results.values()))["summary"]["timed_steps"]
    first = ", ".join(f"{n} {r['summary']['first_step_s']:.2f} s" for n, r in results.items())
    cpu = ", ".join(f"{n} {r['summary']['timed_cpu_seconds']:.2f} s" for n, r in results.items())
    fastest = ", ".join(f"{n} {r['summary']['fastest_step_s']:.2f} s" for n, r in results.items())
    v = machine["versions"]
    yes = {True: "yes", False: "NO"}
    lines = [
        markdown_table(headers, rows),
        "",
        f"Timed: the last {timed} steps (step 1 is warm-up: {first}). Real tokens: attention-mask ones of "
        f"the timed batches. Baseline: RSS when training starts. Process CPU time of the timed steps: {cpu}; "
        f"fastest timed step: {fastest}.",
        f"Same batches every step: {yes[check['same_batches']]}; same initial adapter: "
        f"{yes[check['same_initial_adapter']]}; same input_ids: {check['same_input_ids']}; trained tokens "
        + ", ".join(f"{k} {n}" for k, n in check["trained_tokens"].items())
        + (f" (TRL also trains {check['trl_labels_differ_on']})" if check["trl_labels_differ_on"] else ""),
        f"Machine: {machine['cpu']}, {machine['usable_cpus']} usable of {machine['cpu_count']} CPUs, "
        f"load avg {machine['load_avg_1m']} before, torch threads {results['instructkit']['torch_threads']}; "
        f"Python {machine['python']}, torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}, "
        f"peft {v['peft']}, accelerate {v['accelerate']}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=Settings.model, help="model spec (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=Settings.steps, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=Settings.batch_size, help="default: %(default)s")
    parser.add_argument("--max-length", type=int, default=Settings.max_length, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=Settings.seed, help="default: %(default)s")
    parser.add_argument("--quick", action="store_true", help="a 3-step smoke run")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/)")
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = Settings(args.model, 3 if args.quick else args.steps, args.batch_size, args.max_length, args.seed)
    if settings.steps < 1 or settings.batch_size < 1:
        parser.error("--steps and --batch-size must be at least 1")

    if args.worker:
        result = WORKERS[args.worker](settings)
        write_json_atomic(args.result, result)
        return 0

    # Convert the embedded GGUF model once, here, so neither worker pays for it.
    from instructkit.models.loading import resolve

    resolve(settings.model)
    machine = machine_info(PACKAGES)
    results = {}
    for name in FRAMEWORKS:
        print(f"running {name} ({settings.steps} steps) ...", file=sys.stderr, flush=True)
        results[name] = run_worker(__file__, name, settings.argv())
        results[name]["summary"] = summarise(results[name])
    machine["load_avg_1m_after"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    check = checks(results)
    print(report(results, machine, check))

    out = args.out or HERE / "results" / ("sft_vs_trl-quick.json" if args.quick else "sft_vs_trl.json")
    save_results(
        out, "sft_vs_trl", settings=dataclasses.asdict(settings), machine=machine, checks=check, results=results
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
