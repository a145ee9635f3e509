"""instructkit DPO vs TRL's DPOTrainer: LoRA DPO on the same model, pairs, batches and settings.

    .venv/bin/python benchmarks/dpo_vs_trl.py                        # 10 steps of each, then the table
    .venv/bin/python benchmarks/dpo_vs_trl.py --quick                # 3 steps of each (smoke run)
    .venv/bin/python benchmarks/dpo_vs_trl.py --reference adapter    # reference from the adapter-off base

Each framework trains the model (default: the embedded SmolLM2-135M-Instruct) with LoRA and the
DPO (sigmoid) loss for the same number of steps, and the table shows, per framework: steps, real
(non-pad) prompt+chosen+rejected tokens and seconds of the timed steps, tokens per second, the
seconds spent precomputing reference log-probs (outside the timed steps), peak RSS, peak RSS
above the RSS at the start of training, and the last step's loss. Under it: the per-step loss and
reward-margin agreement of the two (the math is the same, so they must agree closely). Results
also go to ``benchmarks/results/dpo_vs_trl.json`` (``-adapter`` / ``-quick`` in the name for
those runs).

What is held equal, and how:

* Process: each framework runs in its own fresh subprocess (this file with ``--worker``), one
  after the other; the parent only selects the pairs, collects JSON and prints the table.
* Data: LLaMA-Factory's ``dpo_en_demo.json`` (``--data``). The parent keeps the pairs whose
  prompt+chosen and prompt+rejected both fit in ``--max-length`` under instructkit's encoding
  (whole turns, nothing cut), so neither framework truncates anything, and takes the first
  steps x batch of them: every pair is trained once, and both precompute reference log-probs for
  the same pairs. Both workers read that subset from one file. TRL gets plain strings: the prompt
  as instructkit renders it with the SmolLM2 chat template, each response as its text; TRL
  appends eos, which is the template's end-of-turn token ``<|im_end|>``. The TRL worker checks,
  pair by pair, that TRL's prompt+response ids equal instructkit's and that TRL's completion
  positions are exactly instructkit's labelled (scored) positions.
* Batches: TRL reads the pairs in the order instructkit's engine draws them (``StepPlan``)
  through a sequential sampler, so step k of both trains the same pairs; each worker counts the
  tokens of every batch it trains and the parent checks the counts agree step by step.
* Reference log-probs: the same strategy in both. Default ``--reference precompute``: computed
  once before training from the starting (adapter-off) model (instructkit ``reference:
  precompute``; TRL ``precompute_ref_log_probs=True``), timed separately and left out of the
  training time. ``--reference adapter``: computed every step by the peft model with its adapter
  disabled (instructkit ``reference: adapter``; TRL ``precompute_ref_log_probs=False``, its
  default with a peft model), so inside the training time.
* Model and LoRA: fp32 on CPU (TRL: ``bf16=False, fp16=False, use_cpu=True``), no gradient
  checkpointing (TRL 1.x defaults it on), no padding-free batches, dropout off. LoRA r 16, alpha
  32, dropout 0, ``all-linear`` through peft in both, initialised from the same seed; the workers
  hash the initial adapter weights and the parent checks the hashes agree.
* Optimisation: batch 4 pairs x accumulation 1, AdamW (torch, not fused: TRL
  ``optim="adamw_torch"``; betas 0.9/0.999, eps 1e-8, weight decay 0), constant lr 5e-5 without
  warm-up, gradient clipping at 1.0, beta 0.1, sigmoid loss, seed 0.
* Loop: no evaluation, logging every step, TRL saves nothing (``save_strategy="no"``), no
  progress bars, ``report_to="none"``, ``dataloader_num_workers=0``, torch's default threads.

What is measured, and how:

* Time: from the end of step 1 to the end of the last step, so both skip the same warm-up step.
  TRL: a ``TrainerCallback`` stamps ``on_step_end``. instructkit: the ``on_step`` callback of
  ``dpo()``, minus the checkpoint the engine always writes after its last step (TRL writes none).
  Process CPU seconds are stamped alongside, and the best single step's tokens/s is reported
  (step k is the same batch in both): on a shared machine they show whether a run was slow or
  only waited for the CPU. The reference precompute is timed on its own
  (TRL: ``DPOTrainer._precompute_ref_logps``, run from its constructor; instructkit:
  ``precompute_reference``, run before ``engine.fit``).
* Real tokens: the prompt+chosen+rejected tokens of the timed batches (attention-mask ones),
  the same count for both. instructkit's rows also carry the newline the template writes after
  ``<|im_end|>`` (one token per row, never scored); it is not counted, which slightly favours TRL.
* Memory: as in ``sft_vs_trl.py``: RSS when training starts (model loaded, adapters on, data
  tokenised, reference log-probs precomputed) is the baseline; peak RSS is ``ru_maxrss`` at the
  end of training; the peak above baseline is the training window's peak minus the baseline.
* Loss: per-step training loss of both; the table shows the last, the lines under it the
  largest relative difference over the steps (and the same for the mean reward margin).

Known differences that are part of what is compared, not set-up: TRL's model forward runs its
fused LM head over every position (log-probs, entropy, top-1 and mean logits per token, for its
logs), while instructkit projects only the scored positions, in chunks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
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
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "peers" / "llama-factory" / "dpo_en_demo.json"

# Settings held equal in both frameworks.
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
LR = 5e-5
BETAS = (0.9, 0.999)
EPS = 1e-8  # torch AdamW's default, which instructkit uses
WEIGHT_DECAY = 0.0
MAX_GRAD_NORM = 1.0
BETA = 0.1


@dataclasses.dataclass(frozen=True)
class Settings:
    model: str = "smollm2-135m-instruct"
    data: str = str(DEFAULT_DATA)
    steps: int = 10
    batch_size: int = 4
    # 256 would be the usual choice, but only 26 of the demo's 300 pairs fit there whole (61 at 384).
    max_length: int = 384
    seed: int = 0
    reference: str = "precompute"

    def argv(self) -> list[str]:
        return [
            "--model",
            self.model,
            "--data",
            self.data,
            "--steps",
            str(self.steps),
            "--batch-size",
            str(self.batch_size),
            "--max-length",
            str(self.max_length),
            "--seed",
            str(self.seed),
            "--reference",
            self.reference,
        ]


# ----------------------------------------------------------------------------------------------
# The pairs both frameworks train on (chosen by the parent, written to one file)


def pair_row(pair) -> dict[str, Any]:
    """A preference pair as an instructkit preference record (messages as plain dicts)."""

    def messages(ms):
        return [{"role": m.role, "content": m.content} for m in ms]

    return {"prompt": messages(pair.prompt), "chosen": messages(pair.chosen), "rejected": messages(pair.rejected)}


def select_pairs(s: Settings) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The first steps x batch pairs that fit ``max_length`` whole in both responses."""
    from instructkit.data.formats import load_records
    from instructkit.data.templates import Truncation, encode_prompt_response
    from instructkit.models.loading import load_tokenizer
    from instructkit.train.dpo import as_pairs

    tokenizer = load_tokenizer(s.model)
    pairs = as_pairs(load_records(s.data).records, s.data)
    fits = [
        p
        for p in pairs
        if all(
            encode_prompt_response(
                tokenizer, p.prompt, response, max_length=s.max_length, truncation=Truncation.WHOLE_TURNS
            )
            is not None
            for response in (p.chosen, p.rejected)
        )
    ]
    needed = s.steps * s.batch_size
    used = fits[:needed]
    if len(used) < s.batch_size:
        raise SystemExit(
            f"only {len(fits)} of {len(pairs)} pairs fit in {s.max_length} tokens; "
            f"raise --max-length or lower --batch-size"
        )
    info = {
        "pairs_in_data": len(pairs),
        "pairs_that_fit": len(fits),
        "pairs_used": len(used),
        "epochs": round(needed / (len(used) // s.batch_size * s.batch_size), 3),
    }
    return [pair_row(p) for p in used], info


def batch_counts(attention_mask, scored) -> dict[str, int]:
    """Token counts of one (2B, T) batch: real, real up to each row's last scored token, scored.

    ``scored`` (2B, T) marks the response tokens whose log-probs the loss sums. Tokens after a
    row's last scored one are instructkit's newline after ``<|im_end|>``; TRL's rows have none.
    """
    import torch

    positions = torch.arange(attention_mask.size(1))
    last = torch.where(scored, positions, -1).max(dim=1).values  # (2B,)
    trailing = (attention_mask.bool() & (positions[None, :] > last[:, None])).sum()
    real = attention_mask.sum()
    return {"real": int(real), "pair": int(real - trailing), "scored": int(scored[:, 1:].sum())}


def _worker_common(framework: str, s: Settings) -> dict[str, Any]:
    import torch

    return {"framework": framework, "settings": dataclasses.asdict(s), "torch_threads": torch.get_num_threads()}


def _timed(record: dict[str, Any], fn, *args):
    """Call ``fn(*args)`` and put its wall and process-CPU seconds in ``record``."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    record["seconds"] = round(time.perf_counter() - wall, 3)
    record["cpu_seconds"] = round(time.process_time() - cpu, 3)
    return out


# ----------------------------------------------------------------------------------------------
# Workers (each runs in its own process)


def worker_instructkit(s: Settings, pairs_path: str) -> dict[str, Any]:
    from instructkit.train import dpo as dpo_module
    from instructkit.train import engine

    probe, clock = MemoryProbe(), StepClock()
    counts: list[dict[str, int]] = []
    seen: dict[str, Any] = {}
    precompute: dict[str, Any] = {}
    original_fit, original_save = engine.fit, engine.save_checkpoint
    original_precompute = dpo_module.precompute_reference

    # dpo() precomputes the reference log-probs (with reference: precompute), then calls
    # engine.fit: the point at which TRL calls on_train_begin. Time the first on its own; wrap the
    # second to start the probe and the clock and count batches.
    def timed_precompute(model, examples, *args):
        precompute["pairs"] = len(examples)
        return _timed(precompute, original_precompute, model, examples, *args)

    def measured_fit(**kwargs):
        collate = kwargs["collate"]

        def counting_collate(examples):
            batch = collate(examples)
            counts.append(batch_counts(batch["attention_mask"], batch["labels"] != -100))
            return batch

        kwargs["collate"] = counting_collate
        seen["init_hash"] = trainable_hash(kwargs["model"])
        probe.start()
        clock.start()
        result = original_fit(**kwargs)
        probe.stop()
        seen["fit"] = result
        return result

    # The engine always checkpoints after the last step; TRL here does not save.
    def unclocked_save(*args, **kwargs):
        with clock.excluded():
            return original_save(*args, **kwargs)

    engine.fit, engine.save_checkpoint = measured_fit, unclocked_save
    dpo_module.precompute_reference = timed_precompute
    with tempfile.TemporaryDirectory(prefix="bench-instructkit-") as out:
        config = {
            "model": s.model,
            "out": out,
            "data": {"path": pairs_path, "val_fraction": 0.0, "max_length": s.max_length},
            "peft": {"method": "lora", **LORA},
            **instructkit_fair_sections(
                steps=s.steps,
                batch_size=s.batch_size,
                lr=LR,
                seed=s.seed,
                betas=BETAS,
                weight_decay=WEIGHT_DECAY,
                max_grad_norm=MAX_GRAD_NORM,
                dropout=0.0,
            ),
            "loss": "sigmoid",
            "beta": BETA,
            "reference": s.reference,
        }
        summary = dpo_module.dpo(config, on_step=lambda step: clock.stamp())
    fit = seen["fit"]
    if len(fit.history) != s.steps or len(counts) != s.steps:
        raise SystemExit(f"expected {s.steps} logged steps, got {len(fit.history)} and {len(counts)} batches")
    if (s.reference == "precompute") != bool(precompute):
        raise SystemExit(f"reference {s.reference}, but precompute_reference ran: {bool(precompute)}")
    return {
        **_worker_common("instructkit", s),
        "steps": fit.steps,
        "step_real_tokens": [c["real"] for c in counts],
        "step_tokens": [c["pair"] for c in counts],
        "step_scored_tokens": [c["scored"] for c in counts],
        "step_end_s": clock.step_end_s,
        "step_end_cpu_s": clock.step_end_cpu_s,
        "step_loss": [record["loss"] for record in fit.history],
        "step_margin": [record["reward_margin"] for record in fit.history],
        "precompute": precompute or None,
        "init_hash": seen["init_hash"],
        "train_pairs": summary["train_examples"],
        "memory": probe.result(),
    }


def response_text(messages, where: str) -> str:
    if len(messages) != 1 or messages[0].role != "assistant":
        raise SystemExit(f"{where}: expected one assistant message, got {[m.role for m in messages]}")
    return messages[0].content


def worker_trl(s: Settings, pairs_path: str) -> dict[str, Any]:
    os.environ["TQDM_DISABLE"] = "1"  # the reference precompute's bar
    import datasets
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    from trl import __version__ as trl_version

    from instructkit.data.formats import load_records
    from instructkit.data.templates import encode_prompt, encode_prompt_response
    from instructkit.models.loading import load_tokenizer, resolve
    from instructkit.train.engine import StepPlan

    datasets.disable_progress_bars()

    # 1. The pairs in the order instructkit's engine draws them, as TRL's plain-string records:
    #    the prompt as instructkit renders it, each response's text (TRL appends eos).
    base = resolve(s.model).base
    ours_tokenizer = load_tokenizer(s.model)  # what dpo() encodes with
    pairs = load_records(pairs_path).records
    plan = StepPlan(len(pairs), s.batch_size, s.seed)
    order = [j for step in range(s.steps) for j in plan.indices(step)]
    ours = [
        {side: encode_prompt_response(ours_tokenizer, p.prompt, getattr(p, side)) for side in ("chosen", "rejected")}
        for p in pairs
    ]
    text = [
        {
            "prompt": ours_tokenizer.decode(encode_prompt(ours_tokenizer, p.prompt)),
            "chosen": response_text(p.chosen, f"pair {i} chosen"),
            "rejected": response_text(p.rejected, f"pair {i} rejected"),
        }
        for i, p in enumerate(pairs)
    ]
    dataset = datasets.Dataset.from_list([text[j] for j in order])

    # 2. Model and trainer; TRL seeds, then wraps the model with peft (initial adapters checked by
    #    hash). With precompute_ref_log_probs the constructor runs the reference pass: timed.
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype="float32", use_safetensors=True)
    probe, clock = MemoryProbe(), StepClock()
    seen: dict[str, Any] = {}
    precompute: dict[str, Any] = {}
    original_precompute = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, dataset, name, batch_size):
        precompute.update(pairs=len(dataset), batch_size=batch_size)
        return _timed(precompute, original_precompute, self, dataset, name, batch_size)

    DPOTrainer._precompute_ref_logps = timed_precompute

    with tempfile.TemporaryDirectory(prefix="bench-trl-") as out:
        args = trl_fair_args(
            DPOConfig,
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
            disable_dropout=True,
            loss_type=["sigmoid"],
            beta=BETA,
            precompute_ref_log_probs=s.reference == "precompute",
            # instructkit precomputes in training-size batches
            precompute_ref_batch_size=s.batch_size,
        )
        peft_config = peft.LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=LORA["target_modules"],
            task_type="CAUSAL_LM",
        )
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[measure_callback(seen, probe, clock)],
        )
        if args.gradient_checkpointing or args.bf16 or args.fp16:
            raise SystemExit(f"TRL {trl_version}: expected fp32 without gradient checkpointing")
        if (s.reference == "precompute") != bool(precompute) or trainer.ref_model is not None:
            raise SystemExit(
                f"TRL {trl_version}: reference {s.reference} not set up as expected "
                f"(precomputed: {bool(precompute)}, separate ref model: {trainer.ref_model is not None})"
            )

        # 3. The very same tokens, scored at the very same positions: TRL's prompt+response is
        #    instructkit's row without the newline after <|im_end|>, and TRL's completion is
        #    exactly instructkit's labelled span.
        theirs = trainer.train_dataset
        if len(theirs) != len(order):
            raise SystemExit(f"TRL kept {len(theirs)} of {len(order)} pairs")
        same = 0
        for n, j in enumerate(order):
            row = theirs[n]
            ok = True
            for side in ("chosen", "rejected"):
                ids = row["prompt_ids"] + row[f"{side}_ids"]
                enc = ours[j][side]
                scored = [i for i, label in enumerate(enc.labels) if label != -100]
                ok &= (
                    enc.input_ids[: len(ids)] == ids
                    and scored == list(range(len(row["prompt_ids"]), len(ids)))
                    and len(ids) <= s.max_length
                )
            same += ok
        if same != len(order):
            raise SystemExit(f"only {same} of {len(order)} pairs have the same tokens and scored positions")

        # 4. Count the tokens of every batch TRL trains (the precompute used the collator already).
        counts: list[dict[str, int]] = []
        collator = trainer.data_collator

        def counting_collator(features):
            batch = collator(features)
            counts.append(batch_counts(batch["attention_mask"], batch["completion_mask"].bool()))
            return batch

        trainer.data_collator = counting_collator
        trainer.train()

    log = [entry for entry in trainer.state.log_history if "loss" in entry]
    counts = counts[: s.steps]  # a prefetch may run ahead
    if len(clock.step_end_s) != s.steps or len(log) != s.steps or len(counts) != s.steps:
        raise SystemExit(
            f"expected {s.steps} steps, got {len(clock.step_end_s)} timed, {len(log)} logged, {len(counts)} batches"
        )
    return {
        **_worker_common("trl", s),
        "steps": trainer.state.global_step,
        "step_real_tokens": [c["real"] for c in counts],
        "step_tokens": [c["pair"] for c in counts],
        "step_scored_tokens": [c["scored"] for c in counts],
        "step_end_s": clock.step_end_s,
        "step_end_cpu_s": clock.step_end_cpu_s,
        "step_loss": [entry["loss"] for entry in log],
        "step_margin": [entry["rewards/margins"] for entry in log],
        "precompute": precompute or None,
        "init_hash": seen["init_hash"],
        "train_pairs": len(pairs),
        "same_tokens": f"{same}/{len(order)}",
        "memory": probe.result(),
    }


WORKERS = {"instructkit": worker_instructkit, "trl": worker_trl}


# ----------------------------------------------------------------------------------------------
# Parent: choose the pairs, run the workers, check they trained alike, print the table


def summarise(r: dict[str, Any]) -> dict[str, Any]:
    """See :func:`_common.timed_window`."""
    return timed_window(r)


def agreement(a: list[float], b: list[float]) -> dict[str, Any]:
    """Largest per-step difference: absolute, relative to that step's larger magnitude, and
    relative to the largest magnitude of the run (``scale``; for series that start at 0)."""
    diffs = [abs(x - y) for x, y in zip(a, b)]
    rel = [d / max(abs(x), abs(y)) if max(abs(x), abs(y)) > 0 else 0.0 for d, x, y in zip(diffs, a, b)]
    scale = max(abs(x) for x in [*a, *b])
    return {
        "max_abs_diff": max(diffs),
        "max_rel_diff": max(rel),
        "step_of_max_rel": rel.index(max(rel)) + 1,
        "scale": scale,
        "max_diff_over_scale": max(diffs) / scale if scale > 0 else 0.0,
    }


def checks(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ik, trl = results["instructkit"], results["trl"]
    return {
        "same_batches": ik["step_tokens"] == trl["step_tokens"],
        "same_scored_tokens": ik["step_scored_tokens"] == trl["step_scored_tokens"],
        "same_initial_adapter": ik["init_hash"] == trl["init_hash"],
        "same_tokens": trl["same_tokens"],
        "uncounted_tokens": {name: sum(r["step_real_tokens"]) - sum(r["step_tokens"]) for name, r in results.items()},
        "step1_loss": {name: r["step_loss"][0] for name, r in results.items()},
        "loss": agreement(ik["step_loss"], trl["step_loss"]),
        "margin": agreement(ik["step_margin"], trl["step_margin"]),
    }


def report(
    results: dict[str, dict[str, Any]],
    machine: dict[str, Any],
    check: dict[str, Any],
    data: dict[str, Any],
    s: Settings,
) -> str:
    headers = [
        "framework",
        "reference",
        "steps",
        "real tokens",
        "train s",
        "tokens/s",
        "precompute s",
        "peak RSS MiB",
        "above baseline MiB",
        "final loss",
    ]
    rows = []
    for name, r in results.items():
        m, mem, pre = r["summary"], r["memory"], r["precompute"]
        rows.append(
            [
                name,
                s.reference,
                r["steps"],
                m["timed_real_tokens"],
                round(m["timed_seconds"], 2),
                m["tokens_per_s"],
                round(pre["seconds"], 2) if pre else "-",
                round(mem["peak_rss_mib"]),
                round(mem["peak_above_baseline_mib"]),
                round(m["final_loss"], 5),
            ]
        )
    timed = next(iter(results.values()))["summary"]["timed_steps"]
    first = ", ".join(f"{n} {r['summary']['first_step_s']:.2f} s" for n, r in results.items())
    cpu = ", ".join(f"{n} {r['summary']['timed_cpu_seconds']:.2f} s" for n, r in results.items())
    best = ", ".join(f"{n} {r['summary']['best_step_tokens_per_s']:.1f}" for n, r in results.items())
    v = machine["versions"]
    yes = {True: "yes", False: "NO"}
    loss, margin = check["loss"], check["margin"]
    lines = [
        markdown_table(headers, rows),
        "",
        f"Data: {data['pairs_used']} pairs of {Path(s.data).name} ({data['pairs_that_fit']} of "
        f"{data['pairs_in_data']} fit {s.max_length} tokens whole), {s.batch_size} pairs a step, "
        f"{data['epochs']} epoch(s). Real tokens: prompt+chosen+rejected of the timed batches.",
        f"Timed: the last {timed} steps (step 1 is warm-up: {first}); reference log-probs "
        + (
            "precomputed before training, timed apart (precompute s)."
            if s.reference == "precompute"
            else "from the adapter-disabled model inside every step."
        )
        + f" Process CPU time of the timed steps: {cpu}; best single timed step, tokens/s: {best}.",
        f"Same batches every step: {yes[check['same_batches']]}; same scored tokens: "
        f"{yes[check['same_scored_tokens']]}; same initial adapter: {yes[check['same_initial_adapter']]}; "
        f"same tokens and scored positions: {check['same_tokens']} pairs.",
        f"Loss agreement over {len(results['trl']['step_loss'])} steps: max relative difference "
        f"{loss['max_rel_diff']:.2e} (step {loss['step_of_max_rel']}, abs {loss['max_abs_diff']:.2e}); "
        f"mean reward margin: max abs difference {margin['max_abs_diff']:.2e} ({margin['max_diff_over_scale']:.2e} "
        f"of the largest margin, {margin['scale']:.2e}); "
        f"step-1 loss "
        + ", ".join(f"{k} {x:.6f}" for k, x in check["step1_loss"].items())
        + f" (ln 2 = {math.log(2):.6f}).",
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
    parser.add_argument("--data", default=Settings.data, help="preference pairs (default: LLaMA-Factory's dpo_en_demo)")
    parser.add_argument("--steps", type=int, default=Settings.steps, help="optimizer steps (default: %(default)s)")
    parser.add_argument(
        "--batch-size", type=int, default=Settings.batch_size, help="pairs a step (default: %(default)s)"
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=Settings.max_length,
        help="pairs longer than this are left out, not cut (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=Settings.seed, help="default: %(default)s")
    parser.add_argument(
        "--reference",
        choices=("precompute", "adapter"),
        default=Settings.reference,
        help="reference log-probs: once before training, or every step from the "
        "adapter-disabled model (default: %(default)s)",
    )
    parser.add_argument("--quick", action="store_true", help="a 3-step smoke run")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/)")
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--pairs", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = Settings(
        args.model,
        args.data,
        3 if args.quick else args.steps,
        args.batch_size,
        args.max_length,
        args.seed,
        args.reference,
    )
    if settings.steps < 1 or settings.batch_size < 1:
        parser.error("--steps and --batch-size must be at least 1")

    if args.worker:
        result = WORKERS[args.worker](settings, args.pairs)
        write_json_atomic(args.result, result)
        return 0

    # Convert the embedded GGUF model once, here, so neither worker pays for it; then choose the
    # pairs and write them where both workers read them.
    from instructkit.data.formats import load_records
    from instructkit.models.loading import resolve

    resolve(settings.model)
    rows, data = select_pairs(settings)
    machine = machine_info(PACKAGES)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-dpo-pairs-") as tmp:
        pairs_path = Path(tmp) / "pairs.jsonl"
        pairs_path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        if [pair_row(p) for p in load_records(str(pairs_path)).records] != rows:
            raise SystemExit(f"{pairs_path} does not read back as the pairs written")
        for name in FRAMEWORKS:
            print(
                f"running {name} ({settings.steps} steps, reference {settings.reference}) ...",
                file=sys.stderr,
                flush=True,
            )
            results[name] = run_worker(__file__, name, [*settings.argv(), "--pairs", str(pairs_path)])
            results[name]["summary"] = summarise(results[name])
    machine["load_avg_1m_after"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    check = checks(results)
    print(report(results, machine, check, data, settings))

    suffix = ("-adapter" if settings.reference == "adapter" else "") + ("-quick" if args.quick else "")
    out = args.out or HERE / "results" / f"dpo_vs_trl{suffix}.json"
    save_results(
        out,
        "dpo_vs_trl",
        settings=dataclasses.asdict(settings),
        data=data,
        machine=machine,
        checks=check,
        results=results,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
