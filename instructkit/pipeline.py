"""`instructkit run`: a recipe's stages in order, each stage's output feeding the next.

A recipe (see :mod:`instructkit.stages`) is validated whole before anything runs: every
stage's config, every data file it names (read and parsed as the stage will read it), and
every stage folder already there (a folder made by another config is an error, see
:mod:`instructkit.runs`). Then each stage writes its own run folder under the recipe's folder:
a finished stage is skipped on a rerun, an interrupted one resumes from its last checkpoint,
and ``--from STAGE`` reruns from that stage on.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from instructkit.config import PROMPT_LEARNING, dump_yaml
from instructkit.errors import InputError, did_you_mean
from instructkit.fileio import atomic_write_json, atomic_write_text
from instructkit.runs import RunDir, remove_run, remove_stale_temporaries, rerun_state
from instructkit.stages import RECIPES_DIR, STAGES, LoadedRecipe, Stage, load_recipe, shipped_recipes

# A later stage merges the earlier stage's adapter into the model it trains: these do not merge
# (virtual tokens; LoRA trained over a 4-bit base).
CANNOT_START_FROM = (*PROMPT_LEARNING, "qlora")

__all__ = ["RECIPES_DIR", "load_recipe", "run", "list_recipes", "plan_stages", "continual"]


@dataclasses.dataclass
class PlannedStage:
    """One stage of a recipe run: its registry entry, resolved config and run folder."""

    entry: Stage
    config: Any
    path: Path

    @property
    def name(self) -> str:
        return self.entry.name


def list_recipes() -> str:
    """The shipped recipes, one line each: name, stages, path (``instructkit run --list``)."""
    from instructkit.config import read_yaml

    lines = []
    for name, path in shipped_recipes().items():
        data, _ = read_yaml(path)
        lines.append(f"{name:12s} {' -> '.join(data.get('stages', []))}  ({path})")
    return "\n".join(lines)


def run(
    recipe: str | Path | None = None,
    *,
    out: str | Path | None = None,
    overrides: list[str] | None = None,
    from_stage: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run a recipe's stages in order; returns (and writes) the recipe summary."""
    # 1. Load and validate the whole recipe: every stage's config, errors at file:line or override.
    loaded = load_recipe(recipe, overrides)
    root = Path(out or Path("runs") / loaded.config.name)
    plan = plan_stages(loaded, root)
    # 2. Every data file of every stage exists and parses; every stage folder matches its config.
    check_data(plan, loaded)
    first_rerun = check_stage_folders(plan, from_stage, overwrite)
    # 3. Only now write anything: the recipe's config, and clear the stages that rerun.
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(root)  # what an interrupted stage's atomic write left behind
    atomic_write_text(root / "config.yaml", dump_yaml(loaded.config))
    for planned in plan[first_rerun:]:
        remove_run(planned.path)
    # 4. The stages, in order.
    started = time.time()
    summaries = run_stages(plan, loaded.config.model)
    # 5. The recipe's summary and report.
    from instructkit.report import write_report

    final_model = next((str(p.path) for p in reversed(plan) if p.entry.output == "policy"), loaded.config.model)
    summary = {
        "recipe": loaded.config.name,
        "out": str(root),
        "final_model": final_model,
        "seconds": round(time.time() - started, 1),
        "stages": summaries,
        "table": summaries.get("eval", {}).get("table", {}),
        "report": str(root / "report.html"),
    }
    write_report(root, summary)
    atomic_write_json(root / "summary.json", summary)
    if summaries.get("continual"):
        from instructkit.train.continual import format_results

        print(format_results(summaries["continual"]))
        if not summary["table"]:
            print(f"\nrun folder: {summary['out']}  (summary.json)\nreport: {summary['report']}")
    _print_table(summary)
    return summary


def continual(config: Any = None, overrides: list[str] | None = None, *, overwrite: bool = False) -> dict[str, Any]:
    """The ``continual`` stage (``instructkit continual --config FILE``, or a recipe's stage): the
    training leaf :func:`instructkit.train.continual.continual`, measured with eval's exact match
    and perplexity. It lives here because train/ may not import eval/; this floor joins them."""
    from instructkit.eval.conversations import score_perplexity
    from instructkit.eval.exact_match import evaluate_exact_match
    from instructkit.train.continual import Measures
    from instructkit.train.continual import continual as run_continual

    measures = Measures(exact_match=evaluate_exact_match, perplexity=score_perplexity)
    return run_continual(config, overrides, measures=measures, overwrite=overwrite)


def plan_stages(loaded: LoadedRecipe, root: Path) -> list[PlannedStage]:
    """Each stage's config with its run folder (``root/<stage>``) and the model it starts from: the
    previous policy stage's output unless its section names a model (an earlier stage's name, as in
    ``model: sft`` or distillation's ``teacher: sft``, stands for that stage's output); PPO scores
    with the recipe's reward model unless its section names a reward."""
    current, reward_model = loaded.config.model, None
    unmergeable: tuple[str, str] | None = None  # (stage, method) of a policy no stage can start from
    earlier: dict[str, str] = {}  # policy stages so far -> their run folders, for `model: sft`, `teacher: sft`
    plan = []
    for name in loaded.config.stages:
        entry, cfg, path = STAGES[name], loaded.stage_config(name), root / name
        section = dict(loaded.sections[name])
        for key in ("model", "teacher"):  # an earlier stage's name stands for its output
            later = section.get(key) in loaded.config.stages and section.get(key) not in earlier
            if later:
                raise loaded.origin.error(
                    f"names the {section[key]} stage, which is not a policy stage that runs before this one",
                    f"{name}.{key}",
                )
            if isinstance(section.get(key), str) and section[key] in earlier:
                section[key] = earlier[section[key]]
                if key == "teacher":
                    cfg = dataclasses.replace(cfg, teacher=section[key])
        if entry.output not in ("evaluation", "comparison") and unmergeable and "model" not in section:
            raise loaded.origin.error(
                f"starts from the {unmergeable[0]} stage, whose {unmergeable[1]} adapter cannot be merged into the "
                f"model this stage trains (docs/sft.md); train {unmergeable[0]} with lora, or name this stage's model",
                f"{name}.model",
                section=True,
            )
        if entry.output != "evaluation":
            cfg = dataclasses.replace(cfg, out=str(path), model=section.get("model", current))
        if hasattr(cfg, "reward") and reward_model is not None and not section.get("reward"):
            cfg = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, model=reward_model))
        if entry.output == "policy":
            current = earlier[name] = str(path)
            method = getattr(getattr(cfg, "peft", None), "method", None)
            unmergeable = (name, method) if method in CANNOT_START_FROM else None
        elif entry.output == "reward_model":
            reward_model = str(path)
        plan.append(PlannedStage(entry, cfg, path))
    return plan


def check_data(plan: list[PlannedStage], loaded: LoadedRecipe) -> None:
    """Every stage names what it needs, and every data file of every stage reads as the stage will
    read it (nothing tokenized)."""
    from instructkit.data.check import check_data_file

    for planned in plan:
        for key, problem in planned.entry.missing(planned.config):
            raise loaded.origin.error(problem, f"{planned.name}.{key}", section=True)
        for f in planned.entry.data_files(planned.config):
            dotted = f"{planned.name}.{f.key}"
            try:
                check_data_file(f.path, f.kind, format=f.format, columns=f.columns, dataset_info=f.dataset_info)
            except InputError as exc:
                inner = exc.problem if exc.file is None and exc.line is None else exc.format()
                raise loaded.origin.error(inner, dotted) from None


def check_stage_folders(plan: list[PlannedStage], from_stage: str | None, overwrite: bool) -> int:
    """The index of the first stage that reruns from scratch: ``--from``'s, else (with
    ``overwrite``) the first whose folder holds another config's run, else none (len(plan)).
    Raises InputError when a folder holds another config's run and neither option says what to do."""
    names = [p.name for p in plan]
    if from_stage is not None and from_stage not in names:
        raise InputError(
            f"--from: '{from_stage}' is not a stage of this recipe ({', '.join(names)})"
            f"{did_you_mean(from_stage, names)}",
            field="from",
        )
    first = names.index(from_stage) if from_stage is not None else len(plan)
    for i, planned in enumerate(plan[:first]):
        try:
            rerun_state(planned.path, planned.config, stage=planned.name)
        except InputError:
            if not overwrite:
                raise
            return i
    return first


def run_stages(plan: list[PlannedStage], start_model: str) -> dict[str, Any]:
    """Run (or skip, when finished) each stage; returns each stage's summary."""
    trained: list[tuple[str, str]] = [("base", start_model)]
    reward_model = None
    summaries: dict[str, Any] = {}
    for planned in plan:
        run_dir = RunDir(planned.path)
        done = run_dir.is_finished()
        print(
            f"== stage {planned.name}: {'already finished, skipped' if done else 'running'} ({planned.path})",
            flush=True,
        )
        if planned.entry.output == "evaluation":
            if not done:
                planned.entry.load()(planned.config, trained, planned.path, reward_model=reward_model)
                run_dir.write_config(planned.config)
        elif not done:
            planned.entry.load()(planned.config)
        if planned.entry.output == "policy":
            trained.append((planned.name, str(planned.path)))
        elif planned.entry.output == "reward_model":
            reward_model = str(planned.path)
        summaries[planned.name] = run_dir.saved_summary() if run_dir.is_finished() else {}
    return summaries


def _print_table(summary: dict[str, Any]) -> None:
    table = summary.get("table") or {}
    if not table:
        return
    from instructkit.report import HIDDEN_METRICS

    metrics = list(dict.fromkeys(k for row in table.values() for k in row if k not in HIDDEN_METRICS))
    width = max(len(name) for name in table) + 2
    widths = [max(10, len(m) + 2) for m in metrics]
    print("\n" + "model".ljust(width) + "".join(m.rjust(w) for m, w in zip(metrics, widths)))
    for name, row in table.items():
        cells = "".join(
            (f"{row[m]:.3f}" if isinstance(row.get(m), float) else str(row.get(m, "-"))).rjust(w)
            for m, w in zip(metrics, widths)
        )
        print(name.ljust(width) + cells)
    print(f"\nrun folder: {summary['out']}  (summary.json)")
    if summary.get("report"):
        print(f"report: {summary['report']}")
