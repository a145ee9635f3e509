"""Continual learning recipe: tasks trained one after another, with strategies against forgetting,
measured after every task as an accuracy matrix.

A continual stage trains its tasks 0, 1, ..., T-1 in order with LoRA SFT, once per strategy,
each strategy from the same starting model:

* ``naive``: one adapter, tuned on each task in turn (sequential fine-tuning);
* ``replay``: the same, with earlier tasks' training examples mixed into each task's epoch
  (``replay.fraction`` of its examples or of its trained tokens; ``losses.continual`` schedules);
* ``ewc``: the same, with the EWC penalty towards each earlier task's weights, weighted by the
  diagonal Fisher taken from that task's data when it finished (Kirkpatrick et al. 2017, Eq. 3);
* ``lwf``: the same, with the KL to the previous model's token distributions on the new task's
  inputs (Li and Hoiem 2017, Eq. 2); the previous model is the adapter as the task found it, or
  the adapter disabled for the first task;
* ``adapter_per_task``: a new adapter per task; at inference the task's name routes to its
  adapter (:class:`AdapterRouter`), and a task without one is answered by the starting model.

Before the first task (the starting model, the baseline of forward transfer) and after every
task, every task's held-out exact match is measured (row i of R) with the perplexity of a
generic text. The stage's run folder holds::

    baseline.json                      the starting model's row, shared by the strategies
    <strategy>/<i>-<task>/             an SFT run folder per task (config.yaml, metrics.jsonl,
                                       checkpoints/, final/, summary.json with its row of R)
    checkpoints/step-N/progress.json   N units (baseline, tasks) finished: the stage resumes
    summary.json                       R per strategy with ACC, BWT, FWT and forgetting

A rerun follows :mod:`instructkit.runs`: finished tasks are kept, an interrupted task resumes
from its checkpoint, a changed config stops with the list of changes (``--overwrite`` restarts).

Measuring is eval's job, and train/ may not import eval/: the exact-match and perplexity
functions come in as :class:`Measures` (``instructkit.pipeline.continual`` passes eval's).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instructkit.config import ContinualConfig, ContinualTaskConfig, DataConfig, SFTConfig
from instructkit.losses import continual as cl
from instructkit.stages import resolve_stage_config

# ----------------------------------------------------------------------------------------------
# What the recipe is given and what it reads


@dataclasses.dataclass(frozen=True)
class Measures:
    """The held-out measurements, as eval/ defines them.

    ``exact_match(model, tokenizer, records, *, max_new_tokens, batch_size, template)`` returns
    ``{"exact_match", "n", "samples"}`` (:func:`instructkit.eval.exact_match.evaluate_exact_match`);
    ``perplexity(model, tokenizer, records, batch_size, where)`` returns ``{"loss", "perplexity"}``
    (:func:`instructkit.eval.conversations.score_perplexity`).
    """

    exact_match: Callable[..., dict[str, Any]]
    perplexity: Callable[..., dict[str, Any]]


@dataclasses.dataclass
class Task:
    """One task, read and encoded: training examples (and validation), held-out records."""

    name: str
    config: ContinualTaskConfig
    data: DataConfig  # the task's data as its SFT run folder records it
    train: list[dict[str, list[int]]]
    val: list[dict[str, list[int]]]
    test: list[Any]  # Conversation records: the prompt, then the reference answer


@dataclasses.dataclass
class Run:
    """What every task of a stage shares: config, tokenizer, tasks, general text, measures, folder."""

    cfg: ContinualConfig
    tokenizer: Any
    tasks: list[Task]
    general: list[Any]  # Text records (empty: no general-ability perplexity)
    measures: Measures
    root: Path
    device: Any

    def task_dir(self, strategy: str, i: int) -> Path:
        return self.root / strategy / f"{i}-{self.tasks[i].name}"


def task_data(cfg: ContinualConfig, task: ContinualTaskConfig) -> DataConfig:
    d = cfg.data
    return DataConfig(
        path=task.train,
        val_path=task.val,
        val_fraction=0.0,  # no val file: no validation loss, every record trains
        template=d.template,
        max_length=d.max_length,
        limit=task.limit,
    )


def load_tasks(cfg: ContinualConfig, tokenizer: Any) -> list[Task]:
    """Every task's data read, validated and encoded; bad records fail here, before training."""
    from instructkit.data.encoders import encode_records
    from instructkit.train import setup

    tasks = []
    for tc in cfg.tasks:
        data = task_data(cfg, tc)
        splits = setup.load_splits(data, what=f"training data for task '{tc.name}'")
        encode = partial(encode_records, tokenizer, template=data.template, max_length=data.max_length)
        enc = setup.encode_splits(
            splits,
            partial(encode, where=tc.train),
            data,
            f"task '{tc.name}': no trainable examples left after encoding (all too long?)",
            encode_val=partial(encode, where=tc.val or tc.train),
        )
        test = setup.read_records(DataConfig(path=tc.test))
        tasks.append(Task(tc.name, tc, data, enc.train, enc.val, test[: cfg.eval.limit] if cfg.eval.limit else test))
    return tasks


def load_general(cfg: ContinualConfig) -> list[Any]:
    from instructkit.train import setup

    if not cfg.data.general:
        return []
    return setup.read_records(DataConfig(path=cfg.data.general, format="text"))


# ----------------------------------------------------------------------------------------------
# Loss modules: the SFT loss plus a strategy's term, over the engine's (loss_sum, count)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class PenalisedLoss(nn.Module):
    """SFT loss plus EWC's penalty per optimizer step: ``(ce_sum + penalty * count, count)``.

    The engine divides the step's summed loss by the step's summed count, so adding ``penalty *
    count`` in every micro-batch adds the penalty exactly once per step, whatever the
    accumulation. In eval mode (the validation loss) the plain SFT loss is returned.
    """

    def __init__(self, lm_loss: nn.Module, penalty: Callable[[], torch.Tensor]) -> None:
        super().__init__()
        self.lm_loss, self.penalty = lm_loss, penalty

    def forward(self, **batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ce, count = self.lm_loss(**batch)
        if not self.training:
            return ce, count
        return ce + self.penalty().to(ce.dtype) * count, count


def ewc_penalty_of(model: nn.Module, anchors: Sequence[dict[str, torch.Tensor]], lam: float) -> torch.Tensor:
    """One EWC penalty per earlier task (the paper's "separate penalties"), summed."""
    params = trainable(model)
    total = torch.zeros(())
    for saved in anchors:
        fisher = {n[len("fisher.") :]: t for n, t in saved.items() if n.startswith("fisher.")}
        anchor = {n[len("anchor.") :]: t for n, t in saved.items() if n.startswith("anchor.")}
        total = total + cl.ewc_penalty(params, anchor, fisher, lam)
    return total


def position_logits(model: nn.Module, positions: torch.Tensor, **inputs: Any) -> torch.Tensor:
    """(N, V) logits at the (B, T) ``positions``, through the one position path (``lm.outputs_at``)."""
    from instructkit.models.lm import outputs_at

    out = outputs_at(model, positions, **inputs)
    return out.logits if out.logits is not None else out.hidden @ out.weight.T


class DistilledLoss(nn.Module):
    """SFT loss plus LwF's distillation term: ``(ce_sum + weight * kl_sum, count)`` over the
    trained positions (:func:`instructkit.losses.continual.lwf_distillation`); the teacher is the
    model inside ``previous()`` (a context in which it is the previous model), without gradients.
    In eval mode the plain SFT loss is returned."""

    def __init__(
        self,
        model: nn.Module,
        previous: Callable[[], contextlib.AbstractContextManager],
        weight: float,
        temperature: float,
    ) -> None:
        super().__init__()
        self.model, self.previous, self.weight, self.temperature = model, previous, weight, temperature

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from instructkit.models.lm import next_token_positions

        # input_ids, attention_mask, labels: (B, T)
        positions, targets = next_token_positions(labels)  # (B, T), (N,)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if self.training:
            with torch.no_grad(), self.previous():
                teacher = position_logits(self.model, positions, **inputs)  # (N, V)
        student = position_logits(self.model, positions, **inputs)  # (N, V)
        scores = student.to(torch.promote_types(student.dtype, torch.float32))
        ce = nn.functional.cross_entropy(scores, targets, reduction="sum")
        count = positions.sum()
        if not self.training:
            return ce, count
        everywhere = torch.ones(1, student.size(0), dtype=torch.bool, device=student.device)
        kl, _ = cl.lwf_distillation(student[None], teacher[None], everywhere, self.temperature)
        return ce + self.weight * kl, count


@contextlib.contextmanager
def swapped_weights(params: dict[str, nn.Parameter], state: dict[str, torch.Tensor]) -> Iterator[None]:
    """``params`` hold ``state`` inside the block, their own values again after it."""
    own = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(own[n])


# ----------------------------------------------------------------------------------------------
# Strategies


class Strategy:
    """What a strategy changes in a task's training; the defaults are sequential fine-tuning."""

    name = "naive"
    carries_adapter = True  # task i starts from task i-1's adapter (one adapter through the tasks)

    def examples(self, run: Run, i: int) -> list[dict[str, list[int]]]:
        """Task i's training examples (its own, or mixed with earlier tasks')."""
        return run.tasks[i].train

    def loss_module(self, run: Run, strategy_dir: Path, i: int, model: nn.Module, lm_loss: nn.Module) -> nn.Module:
        return lm_loss

    def after_task(self, run: Run, i: int, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors saved in task i's folder once it has trained (EWC's Fisher and anchor)."""
        return {}

    def measured(self, run: Run, strategy_dir: Path, i: int, model: nn.Module) -> Callable[[int], Any]:
        """``answering(j)``: a context in which ``model`` (or another) answers task j (-1: general text)."""
        return lambda j: contextlib.nullcontext(model)


class Replay(Strategy):
    name = "replay"

    def examples(self, run: Run, i: int) -> list[dict[str, list[int]]]:
        earlier = [e for t in run.tasks[:i] for e in t.train]
        return replay_mix(
            run.tasks[i].train, earlier, run.cfg.replay.fraction, run.cfg.replay.by, run.cfg.data.seed + i
        )


def replay_mix(
    new: Sequence[dict[str, list[int]]], old: Sequence[dict[str, list[int]]], fraction: float, by: str, seed: int
) -> list[dict[str, list[int]]]:
    """One epoch: every new example once and earlier examples making ``fraction`` of the epoch's
    examples (``by="examples"``) or of its trained tokens (``by="tokens"``), shuffled."""
    from instructkit.data.encoders import trained_tokens

    if not old:
        return list(new)
    if by == "tokens":
        order = cl.replay_schedule_by_tokens(
            [trained_tokens(e) for e in new], [trained_tokens(e) for e in old], fraction, seed=seed
        )
    else:
        order = cl.replay_schedule(len(new), len(old), fraction, seed=seed)
    pool = [*new, *old]
    return [pool[k] for k in order]


class EWC(Strategy):
    name = "ewc"

    def loss_module(self, run: Run, strategy_dir: Path, i: int, model: nn.Module, lm_loss: nn.Module) -> nn.Module:
        from safetensors.torch import load_file

        anchors = [load_file(str(run.task_dir(self.name, k) / "ewc.safetensors")) for k in range(i)]
        if not anchors:
            return lm_loss
        return PenalisedLoss(lm_loss, lambda: ewc_penalty_of(model, anchors, run.cfg.ewc.lambda_))

    def after_task(self, run: Run, i: int, model: nn.Module) -> dict[str, torch.Tensor]:
        if i == len(run.tasks) - 1:
            return {}  # no later task to penalise: the last task's Fisher would never be read
        fisher = task_fisher(model, run.tasks[i].train[: run.cfg.ewc.fisher_examples], run.tokenizer.pad_token_id)
        params = trainable(model)
        return {
            **{f"fisher.{n}": f for n, f in fisher.items()},
            **{f"anchor.{n}": p.detach().clone() for n, p in params.items()},
        }


def task_fisher(model: nn.Module, examples: Sequence[Any], pad_id: int, batch_size: int = 1) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the trainable weights at their current values, in eval mode:
    per-example gradients of each example's summed response NLL (sequence-level), squared, averaged.

    Each per-example backward runs through its whole micro-batch's graph, so micro-batches of one
    example (the default) cost the least: B examples a batch cost B backward passes of B rows."""
    from instructkit.data.collate import lm_collate
    from instructkit.models.lm import sequence_log_probs
    from instructkit.models.passes import module_device, to_device

    collate, device, params = lm_collate(pad_id), module_device(model), trainable(model)
    was_training = model.training
    model.eval()

    def per_batch() -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(examples), batch_size):
            batch = to_device(collate(list(examples[start : start + batch_size])), device)
            logps, _ = sequence_log_probs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            yield from cl.per_example_gradients(-logps, params)  # one micro-batch's graph at a time

    try:
        return cl.diagonal_fisher(per_batch())
    finally:
        model.train(was_training)


class LwF(Strategy):
    name = "lwf"

    def loss_module(self, run: Run, strategy_dir: Path, i: int, model: nn.Module, lm_loss: nn.Module) -> nn.Module:
        cfg = run.cfg.lwf
        params = trainable(model)
        if i == 0:  # the previous model is the starting model: the adapter off
            return DistilledLoss(model, model.disable_adapter, cfg.weight, cfg.temperature)
        previous = {n: p.detach().clone() for n, p in params.items()}  # the adapter as this task found it
        return DistilledLoss(model, lambda: swapped_weights(params, previous), cfg.weight, cfg.temperature)


class AdapterPerTask(Strategy):
    name = "adapter_per_task"
    carries_adapter = False

    def measured(self, run: Run, strategy_dir: Path, i: int, model: nn.Module) -> Callable[[int], Any]:
        router = AdapterRouter.load(
            run.cfg.model,
            {run.tasks[k].name: run.task_dir(self.name, k) / "final" for k in range(i + 1)},
            device=run.device,
        )
        names = [t.name for t in run.tasks]
        return lambda j: router.task(names[j] if j >= 0 else None)


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (Strategy(), Replay(), EWC(), LwF(), AdapterPerTask())}
"""Every strategy by name; ``config.ContinualStrategy`` lists the same names (a test checks)."""


class AdapterRouter:
    """One base model holding one LoRA adapter per task: ``with router.task(name) as model:``
    answers with that task's adapter, and with the base model alone for a task that has none
    (a task not trained yet, or ``None``). What ``adapter_per_task`` serves at inference."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.model, self.names = model, list(names)

    @classmethod
    def load(cls, base: str, adapters: dict[str, Path], *, device: Any = "cpu") -> AdapterRouter:
        """``base`` (a model spec) with each ``name -> adapter folder`` (a task's final/) loaded."""
        from peft import PeftModel

        from instructkit.models.loading import load_model

        model = load_model(base, dtype="fp32", device="cpu")
        items = list(adapters.items())
        model = PeftModel.from_pretrained(model, str(items[0][1]), adapter_name=items[0][0])
        for name, path in items[1:]:
            model.load_adapter(str(path), adapter_name=name)
        return cls(model.to(device).eval(), [name for name, _ in items])

    @contextlib.contextmanager
    def task(self, name: str | None) -> Iterator[nn.Module]:
        if name in self.names:
            self.model.set_adapter(name)
            yield self.model
        else:
            with self.model.disable_adapter():
                yield self.model


# ----------------------------------------------------------------------------------------------
# Measuring a row of R


def measure_row(run: Run, answering: Callable[[int], Any], out: Path) -> dict[str, Any]:
    """Every task's held-out exact match (batched greedy generation), and the general text's
    perplexity; each task's samples written to ``out/heldout/<task>.samples.jsonl``."""
    from instructkit.fileio import atomic_write_text
    from instructkit.models.passes import eval_mode

    cfg, row, perplexity = run.cfg, [], None
    for j, task in enumerate(run.tasks):
        with answering(j) as model, eval_mode(model):
            result = run.measures.exact_match(
                model,
                run.tokenizer,
                task.test,
                max_new_tokens=cfg.eval.max_new_tokens,
                batch_size=cfg.eval.batch_size,
                template=cfg.data.template,
            )
        row.append(result["exact_match"])
        lines = "".join(json.dumps(s) + "\n" for s in result["samples"])
        atomic_write_text(out / "heldout" / f"{task.name}.samples.jsonl", lines)
    if run.general:
        with answering(-1) as model, eval_mode(model):
            perplexity = run.measures.perplexity(
                model, run.tokenizer, run.general, cfg.eval.batch_size, cfg.data.general
            )["perplexity"]
    return {"exact_match": row, "perplexity": perplexity}


def baseline_row(run: Run) -> dict[str, Any]:
    """The starting model's row (the baseline of forward transfer), measured once per stage."""
    from instructkit.fileio import atomic_write_json
    from instructkit.models.loading import load_model

    path = run.root / "baseline.json"
    if path.is_file():
        return json.loads(path.read_text())
    model = load_model(run.cfg.model, dtype="fp32", device=str(run.device), trust_remote_code=run.cfg.trust_remote_code)
    row = measure_row(run, lambda j: contextlib.nullcontext(model), run.root / "baseline")
    atomic_write_json(path, row)
    return row


# ----------------------------------------------------------------------------------------------
# One task of one strategy: an SFT run folder


def task_config(run: Run, strategy: str, i: int) -> SFTConfig:
    cfg, task = run.cfg, run.tasks[i]
    steps = task.config.steps or cfg.train.max_steps
    return SFTConfig(
        model=cfg.model,
        out=str(run.task_dir(strategy, i)),
        data=task.data,
        peft=cfg.peft,
        optim=cfg.optim,
        train=dataclasses.replace(cfg.train, max_steps=steps),
        trust_remote_code=cfg.trust_remote_code,
    )


def train_task(run: Run, strategy: Strategy, i: int) -> dict[str, Any]:
    """Train task i of ``strategy`` in its run folder and measure every task after it; returns
    the folder's summary (with ``row``). A finished folder is returned as it is."""
    from safetensors.torch import load_file, save_file

    from instructkit.data.collate import lm_collate
    from instructkit.data.encoders import real_tokens, trained_tokens
    from instructkit.models.lm import CausalLMLoss
    from instructkit.train import engine, setup

    # 1. The task's run folder, with the rerun rules of an SFT run.
    cfg, task = task_config(run, strategy.name, i), run.tasks[i]
    stage = setup.open_run(cfg, stage="continual")
    if stage.finished:
        return stage.run.saved_summary()
    started = time.time()
    with stage.cleanup_on_failure():
        # 2. The model: a fresh adapter, or the previous task's (one adapter through the tasks).
        parts = setup.load_trainable(cfg, device=stage.accelerator.device)
        if strategy.carries_adapter and i > 0:
            previous = load_file(str(run.task_dir(strategy.name, i - 1) / "final" / "adapter_model.safetensors"))
            set_adapter_weights(parts.model, previous)
        # 3. The epoch's examples and the loss, as the strategy makes them.
        examples = strategy.examples(run, i)
        lm_loss = CausalLMLoss(parts.model, cfg.train.loss_chunk_size)
        loss = strategy.loss_module(run, run.root / strategy.name, i, parts.model, lm_loss)
        # 4. Train.
        stage.print(f"continual {strategy.name}: task {i} ({task.name}), {len(examples)} examples")
        result = engine.fit(
            loss_module=loss,
            model=parts.model,
            examples=examples,
            collate=lm_collate(run.tokenizer.pad_token_id),
            weight=trained_tokens,
            length=real_tokens,
            train=cfg.train,
            optim=cfg.optim,
            run=stage.run,
            accelerator=stage.accelerator,
            val_examples=task.val,
        )
        # 5. What the strategy keeps of this task (EWC's Fisher); final/; then every task measured.
        extra = strategy.after_task(run, i, parts.model)
        setup.save_final(parts.model, parts.tokenizer, stage.run, base_spec=run.cfg.model, merged=False)
        measuring = time.time()
        row = measure_row(run, strategy.measured(run, run.root / strategy.name, i, parts.model), stage.run.path)
    summary = setup.stage_summary(
        "continual",
        cfg,
        parts,
        stage.run,
        **result.summary(started),
        strategy=strategy.name,
        task=task.name,
        index=i,
        examples=len(examples),
        val_loss=result.final_val_loss,
        measure_seconds=round(time.time() - measuring, 2),
        seconds=round(time.time() - started, 2),
        row=row,
    )
    save = (lambda: save_file(extra, str(stage.run.path / "ewc.safetensors"))) if extra else (lambda: None)
    return stage.finish(summary, save)


def set_adapter_weights(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Load a saved LoRA adapter's weights (its final/ file) into the model's active adapter."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, saved)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter weights do not fit the model: {unexpected[0]}")


# ----------------------------------------------------------------------------------------------
# The stage


def continual(
    config: ContinualConfig | str | Path | dict | None = None,
    overrides: list[str] | None = None,
    *,
    measures: Measures,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run every strategy over the tasks; returns the summary (also written to summary.json)."""
    from instructkit.models.loading import load_tokenizer
    from instructkit.train import setup

    # 1. Resolve the config; check the stage folder (finished tasks are its checkpoints).
    cfg = resolve_stage_config(ContinualConfig, "continual", config, overrides)
    stage = setup.open_run(cfg, stage="continual", overwrite=overwrite)
    if stage.finished:
        return stage.run.saved_summary()
    with stage.cleanup_on_failure():
        # 2. Data: every task read and encoded, the general text; bad records fail before a model loads.
        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        run = Run(
            cfg,
            tokenizer,
            load_tasks(cfg, tokenizer),
            load_general(cfg),
            measures,
            stage.run.path,
            stage.accelerator.device,
        )
        # 3. The starting model's row: the baseline every strategy's forward transfer is measured from.
        baseline = baseline_row(run)
        units = itertools.count(1)
        mark_progress(stage.run.path, next(units), "baseline")
        # 4. Each strategy from the same starting model: the tasks in order, each measured after.
        results: dict[str, list[dict[str, Any]]] = {}
        for name in cfg.strategies:
            results[name] = []
            for i in range(len(run.tasks)):
                results[name].append(train_task(run, STRATEGIES[name], i))
                mark_progress(stage.run.path, next(units), f"{name}/{run.tasks[i].name}")
    # 5. The accuracy matrices and their metrics: summary.json, and the table.
    # (instructkit run prints them with format_results at the end of the recipe.)
    return stage.finish(stage_results(cfg, baseline, results), lambda: None)


def mark_progress(root: Path, units: int, what: str) -> None:
    """``checkpoints/step-N``: N units of the stage are done, so a rerun resumes (see runs.py)."""
    from instructkit.fileio import atomic_dir, atomic_write_json
    from instructkit.train.engine import prune_checkpoints

    with atomic_dir(root / "checkpoints" / f"step-{units:06d}") as tmp:
        atomic_write_json(tmp / "progress.json", {"units": units, "last": what})
    prune_checkpoints(root / "checkpoints", 1)


# ----------------------------------------------------------------------------------------------
# Results


def matrix_metrics(R: Sequence[Sequence[float]], baseline: Sequence[float]) -> dict[str, Any]:
    """ACC, BWT, FWT and forgetting of an accuracy matrix (:mod:`instructkit.losses.continual`)."""
    per_task, mean = cl.forgetting(R)
    return {
        "acc": cl.average_accuracy(R),
        "bwt": cl.backward_transfer(R),
        "fwt": cl.forward_transfer(R, baseline),
        "forgetting": per_task,
        "forgetting_mean": mean,
    }


def stage_results(
    cfg: ContinualConfig, baseline: dict[str, Any], results: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """summary.json: per strategy R (rows: after task i; columns: task j), its metrics, the
    general-text perplexity after each task and the seconds each task took."""
    strategies = {}
    for name, tasks in results.items():
        R = [t["row"]["exact_match"] for t in tasks]
        strategies[name] = {
            "R": R,
            **matrix_metrics(R, baseline["exact_match"]),
            "last_task": R[-1][-1],
            "perplexity": [t["row"]["perplexity"] for t in tasks],
            "task_seconds": [t.get("seconds") for t in tasks],
            "seconds": round(sum(t.get("seconds") or 0.0 for t in tasks), 1),
        }
    table = {
        name: {
            "acc": s["acc"],
            "bwt": s["bwt"],
            "fwt": s["fwt"],
            "forgetting_mean": s["forgetting_mean"],
            "first_task_forgetting": s["forgetting"][0],
            "last_task": s["last_task"],
            **({"perplexity": s["perplexity"][-1]} if s["perplexity"][-1] is not None else {}),
            "seconds": s["seconds"],
        }
        for name, s in strategies.items()
    }
    return {
        "stage": "continual",
        "model": cfg.model,
        "tasks": [t.name for t in cfg.tasks],
        "baseline": baseline,
        "strategies": strategies,
        "table": table,
    }


def format_results(summary: dict[str, Any]) -> str:
    """The accuracy matrix of each strategy and one line of metrics per strategy, as text."""
    tasks = summary["tasks"]
    width = max(12, *(len(t) + 2 for t in tasks))
    lines = []
    for name, s in summary["strategies"].items():
        lines.append(f"\n{name}: R[i][j] = exact match on task j after training task i")
        lines.append("after".ljust(width) + "".join(t.rjust(width) for t in tasks))
        rows = [("start", summary["baseline"]["exact_match"])] + list(zip(tasks, s["R"]))
        lines += [label.ljust(width) + "".join(f"{x:.3f}".rjust(width) for x in row) for label, row in rows]
    metrics = list(dict.fromkeys(k for row in summary["table"].values() for k in row))
    cells = [max(10, len(m) + 2) for m in metrics]
    lines.append("\n" + "strategy".ljust(18) + "".join(m.rjust(w) for m, w in zip(metrics, cells)))
    for name, row in summary["table"].items():
        values = (f"{row[m]:.3f}" if isinstance(row.get(m), float) else str(row.get(m, "-")) for m in metrics)
        lines.append(name.ljust(18) + "".join(v.rjust(w) for v, w in zip(values, cells)))
    return "\n".join(lines)
