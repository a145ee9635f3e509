"""`instructkit sweep RECIPE --space SPACE`: hyperparameter search over any recipe keys.

Each trial is an ordinary `instructkit run` of the recipe with the trial's values as overrides,
into ``OUT/trial-NNN``; its objective is one stage's held-out loss (``val_loss`` in that stage's
summary). Optuna samples (TPE, or an exhaustive grid) and prunes: the engine calls back after
every held-out evaluation (``engine.validation_hook``) and a trial whose curve is below the
median of earlier trials at the same step stops there. Trials run in ``--jobs`` processes on
this machine, sharing one Optuna journal file (``OUT/optuna.journal``); ``--backend ray`` would
hand the trials to Ray Tune across machines (import-guarded and untested: ray is not installed
here). The results: a table printed and written to ``OUT/sweep.json``, and ``OUT/report.html``
with the search plotted.

The space file maps dotted recipe keys to a distribution, checked whole before any trial runs::

    sft.optim.lr: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}
    sft.peft.r: {type: int, low: 2, high: 16, step: 2}
    sft.optim.scheduler: {type: categorical, choices: [cosine, linear]}
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instructkit.config import read_yaml
from instructkit.errors import InputError, did_you_mean
from instructkit.fileio import atomic_write_json, atomic_write_text

TYPES = ("float", "int", "categorical")
SAMPLERS = ("tpe", "grid")
BACKENDS = ("optuna", "ray")


@dataclass(frozen=True)
class Param:
    """One searched key: ``type`` float/int with ``low``..``high`` (``log``, ``step``), or
    categorical ``choices``."""

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def grid(self) -> list[Any]:
        """Every value a grid search tries: the choices, or low..high by step (ints: step 1)."""
        if self.type == "categorical":
            return list(self.choices)
        step = self.step or 1
        n = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
        values = [self.low + i * step for i in range(n)]
        return [int(v) for v in values] if self.type == "int" else values

    def suggest(self, trial) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)


# ----------------------------------------------------------------------------------------------
# The space file, checked before anything runs


def _config_class(stage: str):
    from instructkit.stages import STAGES

    return STAGES[stage].config


def _check_key(key: str, error) -> None:
    """``key`` names a field of a stage's config: ``sft.optim.lr``."""
    from instructkit.stages import STAGES

    head, *rest = key.split(".")
    if head not in STAGES:
        raise error(f"unknown stage '{head}'{did_you_mean(head, STAGES)}: keys start with a stage name")
    cls, path = _config_class(head), head
    for part in rest:
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            raise error(f"unknown key '{path}.{part}'{did_you_mean(part, list(hints))}")
        cls, path = hints[part], f"{path}.{part}"
    if not rest or dataclasses.is_dataclass(cls):
        raise error(f"'{key}' is a section, not a value")


def _param(key: str, spec: Any, error) -> Param:
    if not isinstance(spec, dict) or spec.get("type") not in TYPES:
        raise error(f"give {{type: float|int|categorical, ...}}{did_you_mean(str(spec.get('type')), TYPES) if isinstance(spec, dict) else ''}")  # fmt: skip
    allowed = {"type", "choices"} if spec["type"] == "categorical" else {"type", "low", "high", "log", "step"}
    for name in spec:
        if name not in allowed:
            raise error(f"unknown field '{name}' for type {spec['type']} (one of {', '.join(sorted(allowed))})")
    if spec["type"] == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise error("categorical needs a non-empty list of choices")
        return Param(key, "categorical", choices=tuple(choices))
    low, high, log, step = spec.get("low"), spec.get("high"), bool(spec.get("log", False)), spec.get("step")
    number = int if spec["type"] == "int" else (int, float)
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, number):
            raise error(f"{name} must be {'an integer' if spec['type'] == 'int' else 'a number'}, got {value!r}")
    if not low < high:
        raise error(f"low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise error(f"log: true needs low > 0 (got {low})")
    if step is not None and (log or not isinstance(step, number) or step <= 0):
        raise error("step must be a positive number, and cannot be combined with log: true")
    return Param(key, spec["type"], float(low) if spec["type"] == "float" else low, high, log, step)


def load_space(path: str | Path, recipe: str | Path | None = None, overrides: list[str] | None = None) -> list[Param]:
    """The searched parameters of a space file; every problem is an ``InputError`` at its line.

    With ``recipe``, the recipe must also load with each range's ends (a learning rate of -1 or
    a LoRA rank of 0 is caught here, not in trial 5)."""
    data, lines = read_yaml(path)
    if not data:
        raise InputError("the space is empty: map dotted keys to {type: ...}", file=str(path))
    params = []
    for key, spec in data.items():

        def error(problem: str, key: str = key) -> InputError:
            return InputError(problem, file=str(path), line=lines.get(key), field=key)

        _check_key(key, error)
        params.append(_param(key, spec, error))
        if recipe is not None:
            from instructkit.stages import load_recipe

            ends = params[-1].choices if params[-1].type == "categorical" else (params[-1].low, params[-1].high)
            for value in ends:
                try:
                    load_recipe(recipe, [*(overrides or []), f"{key}={_override_value(value)}"])
                except InputError as exc:
                    raise error(f"the recipe rejects {key}={value}: {exc}") from None
    return params


def _override_value(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


# ----------------------------------------------------------------------------------------------
# One trial


@dataclass
class SweepSpec:
    recipe: str
    params: list[Param]
    out: Path
    stage: str
    trials: int
    sampler: str
    seed: int
    overrides: list[str] = dataclasses.field(default_factory=list)  # every trial's, before its own


def trial_overrides(params: dict[str, Any]) -> list[str]:
    return [f"{k}={_override_value(v)}" for k, v in params.items()]


def run_trial(spec: SweepSpec, trial, name: str | None = None) -> float:
    """The Optuna objective: run the recipe with the trial's values, report each held-out loss
    of the objective stage, prune when Optuna says so; returns that stage's final val_loss."""
    import optuna

    from instructkit.pipeline import run
    from instructkit.train.engine import validation_hook

    values = {p.key: p.suggest(trial) for p in spec.params}
    folder = spec.out / (name or f"trial-{trial.number:03d}")
    target = (folder / spec.stage).resolve()
    trial.set_user_attr("folder", str(folder))

    def report(run_path: Path, step: int, val_loss: float) -> None:
        if run_path.resolve() != target:
            return
        trial.report(val_loss, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} (val_loss {val_loss:.4f})")

    with validation_hook(report):
        summary = run(spec.recipe, out=folder, overrides=[*spec.overrides, *trial_overrides(values)])
    val_loss = summary["stages"].get(spec.stage, {}).get("val_loss")
    if val_loss is None:
        raise InputError(f"stage {spec.stage} reported no val_loss (does it have held-out data?)", field="--stage")
    return float(val_loss)


# ----------------------------------------------------------------------------------------------
# The study


def _storage(out: Path):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(out / "optuna.journal")))


def _sampler(spec: SweepSpec):
    import optuna

    if spec.sampler == "grid":
        return optuna.samplers.GridSampler({p.key: p.grid() for p in spec.params}, seed=spec.seed)
    return optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=min(3, spec.trials))


def _study(spec: SweepSpec, create: bool = False):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the table says what happened
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    kwargs = {"study_name": "sweep", "storage": _storage(spec.out), "sampler": _sampler(spec), "pruner": pruner}
    if create:
        return optuna.create_study(direction="minimize", load_if_exists=True, **kwargs)
    return optuna.load_study(**kwargs)


def _work(spec: SweepSpec) -> None:
    """One worker process: trials until the study holds ``spec.trials`` (any state)."""
    import optuna

    study = _study(spec)
    study.optimize(
        lambda t: run_trial(spec, t),
        callbacks=[optuna.study.MaxTrialsCallback(spec.trials, states=None)],
        catch=(),
    )


def sweep(
    recipe: str | Path,
    space: str | Path,
    overrides: list[str] | None = None,
    *,
    out: str | Path | None = None,
    trials: int = 10,
    sampler: str = "tpe",
    jobs: int = 1,
    stage: str | None = None,
    seed: int = 0,
    backend: str = "optuna",
) -> dict[str, Any]:
    """Search ``space`` over ``recipe`` (with ``overrides``, dotted ``key=value`` from the
    recipe's root, applied to every trial); returns (and writes to OUT/sweep.json) the summary."""
    # 1. Everything checked before a trial runs: the options, the space, the recipe with its ends.
    from instructkit.stages import load_recipe

    for name, value, allowed in (("--sampler", sampler, SAMPLERS), ("--backend", backend, BACKENDS)):
        if value not in allowed:
            raise InputError(f"'{value}' is not one of {', '.join(allowed)}{did_you_mean(value, allowed)}", field=name)
    if trials < 1 or jobs < 1:
        raise InputError("--trials and --jobs must be at least 1", field="--trials" if trials < 1 else "--jobs")
    overrides = list(overrides or [])
    params = load_space(space, recipe, overrides)
    loaded = load_recipe(recipe, overrides)
    stage = stage or params[0].key.split(".")[0]
    if stage not in loaded.config.stages:
        raise InputError(f"the recipe runs no stage '{stage}' ({', '.join(loaded.config.stages)})", field="--stage")
    out = Path(out or Path("runs") / f"{loaded.config.name}-sweep")
    spec = SweepSpec(str(recipe), params, out, stage, trials, sampler, seed, overrides)
    if backend == "ray":
        return _ray(spec, jobs)
    # 2. The study in a journal file every worker shares; the trials, here or in worker processes.
    out.mkdir(parents=True, exist_ok=True)
    _study(spec, create=True)
    started = time.time()
    if jobs == 1:
        _work(spec)
    else:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # torch and fork do not mix
        workers = [ctx.Process(target=_work, args=(spec,)) for _ in range(jobs)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if any(w.exitcode for w in workers):
            raise RuntimeError(f"a sweep worker failed (exit codes {[w.exitcode for w in workers]})")
    # 3. The table, sweep.json and the report.
    summary = summarize(_study(spec), spec, seconds=time.time() - started)
    atomic_write_json(out / "sweep.json", summary)
    atomic_write_text(out / "report.html", sweep_report(summary))
    print(format_table(summary))
    return summary


def summarize(study, spec: SweepSpec, seconds: float) -> dict[str, Any]:
    rows = []
    for t in sorted(study.trials, key=lambda t: t.number):
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name.lower(),
                "params": t.params,
                "val_loss": t.value,
                "last_step": max(t.intermediate_values, default=None),
                "curve": {str(k): v for k, v in sorted(t.intermediate_values.items())},
                "folder": t.user_attrs.get("folder"),
            }
        )
    done = [r for r in rows if r["state"] == "complete"]
    best = min(done, key=lambda r: r["val_loss"]) if done else None
    return {
        "recipe": spec.recipe,
        "stage": spec.stage,
        "objective": f"{spec.stage} val_loss (minimised)",
        "sampler": spec.sampler,
        "seed": spec.seed,
        "seconds": round(seconds, 1),
        "trials": rows,
        "best": best,
        "best_overrides": [*spec.overrides, *trial_overrides(best["params"])] if best else [],
    }


def format_table(summary: dict[str, Any]) -> str:
    keys = sorted({k for r in summary["trials"] for k in r["params"]})
    head = ["trial", "state", *keys, "val_loss", "last step"]
    body = []
    for r in summary["trials"]:
        values = [format(r["params"][k], ".3g") if isinstance(r["params"].get(k), float) else str(r["params"].get(k, "")) for k in keys]  # fmt: skip
        loss = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        body.append([str(r["trial"]), r["state"], *values, loss, str(r["last_step"] or "-")])
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in [head, *body]]
    best = summary["best"]
    tail = (
        f"best: trial {best['trial']}, {summary['stage']} val_loss {best['val_loss']:.4f}"
        if best
        else "no trial finished"
    )
    return "\n".join([*lines, tail])


def sweep_report(summary: dict[str, Any]) -> str:
    """A page of its own: the table, and the search plotted (each trial's held-out curve, pruned
    ones dashed; the objective by trial with the best so far)."""
    import base64
    import html
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in summary["trials"]:
        steps = [int(s) for s in r["curve"]]
        style = "--" if r["state"] == "pruned" else "-"
        left.plot(steps, list(r["curve"].values()), style, marker=".", label=f"trial {r['trial']} ({r['state']})")
    left.set(xlabel="step", ylabel="held-out loss", title="each trial's held-out loss")
    left.legend(fontsize=7)
    done = [r for r in summary["trials"] if r["val_loss"] is not None]
    right.scatter([r["trial"] for r in done], [r["val_loss"] for r in done], label="complete")
    best, so_far = math.inf, []
    for r in done:
        best = min(best, r["val_loss"])
        so_far.append(best)
    right.step([r["trial"] for r in done], so_far, where="post", label="best so far")
    right.set(xlabel="trial", ylabel=f"{summary['stage']} val_loss", title="the search")
    right.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    image = base64.b64encode(buf.getvalue()).decode()
    table = html.escape(format_table(summary))
    return (
        "<!doctype html><meta charset=utf-8><title>instructkit sweep</title>"
        f"<h1>Sweep: {html.escape(summary['recipe'])}</h1><p>{html.escape(summary['objective'])}, "
        f"sampler {summary['sampler']}, {len(summary['trials'])} trials, {summary['seconds']} s</p>"
        f"<pre>{table}</pre><img alt='the search' src='data:image/png;base64,{image}'>"
        f"<p>best overrides: <code>{html.escape(' '.join(summary['best_overrides']))}</code></p>"
    )


def _ray(spec: SweepSpec, jobs: int) -> dict[str, Any]:
    """Ray Tune over the same trials (Optuna's TPE as its search algorithm), across the machines
    of a running Ray cluster. Untested: ray is not installed where instructkit is tested."""
    try:
        from ray import tune
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise InputError("ray[tune] is not installed (pip install 'ray[tune]')", field="--backend") from None
    import optuna

    def trainable(config: dict[str, Any]) -> dict[str, float]:
        trial = optuna.trial.FixedTrial(config)  # no pruning under Ray: the trial runs to its end
        return {"val_loss": run_trial(spec, trial, name=f"ray-{tune.get_context().get_trial_id()}")}

    space = {p.key: tune.choice(p.grid()) if p.type == "categorical" else (tune.loguniform if p.log else tune.uniform)(p.low, p.high) for p in spec.params}  # fmt: skip
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            search_alg=OptunaSearch(metric="val_loss", mode="min", seed=spec.seed),
            num_samples=spec.trials,
            max_concurrent_trials=jobs,
        ),
    )
    results = tuner.fit()
    best = results.get_best_result(metric="val_loss", mode="min")
    return {"backend": "ray", "best": {"params": best.config, "val_loss": best.metrics["val_loss"]}}
