"""`instructkit run`: a recipe's stages in order, each stage's output feeding the next.

A recipe is one YAML with a ``stages`` list and a section per stage. Each stage writes its own
run folder under the recipe's folder; a stage whose ``summary.json`` exists is finished and is
skipped on a rerun, an interrupted stage resumes from its last checkpoint, and ``--from STAGE``
reruns from that stage on.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

from instructkit.config import from_dict, merge, parse_overrides, read_yaml, to_dict
from instructkit.errors import InputError, did_you_mean

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


@dataclasses.dataclass
class EvalStageConfig:
    suites: list[str] = dataclasses.field(default_factory=lambda: ["exact_match"])
    data: str = "shipped:extract/test"  # held-out conversations
    max_new_tokens: int = 64
    batch_size: int = 16
    k_shot: int = 0  # also report k-shot prompting of the untuned model when > 0
    limit: int | None = None
    # Held-out preference pairs for the `preference` suite (does each model itself prefer the
    # chosen response?); used when `preference` is among the suites.
    preference_data: str = "shipped:extract_prefs/val"


@dataclasses.dataclass
class RecipeConfig:
    name: str = "recipe"
    model: str = "smollm2-135m-instruct"  # the model the first stage starts from
    stages: list[str] = dataclasses.field(default_factory=lambda: ["sft", "eval"])
    sft: dict[str, Any] = dataclasses.field(default_factory=dict)  # SFT stage config (docs/sft.md)
    rm: dict[str, Any] = dataclasses.field(default_factory=dict)  # reward-model stage (docs/rm.md)
    dpo: dict[str, Any] = dataclasses.field(default_factory=dict)  # DPO-family stage (docs/dpo.md)
    ppo: dict[str, Any] = dataclasses.field(default_factory=dict)  # PPO/GRPO stage (docs/ppo.md)
    eval: EvalStageConfig = dataclasses.field(default_factory=EvalStageConfig)


# Stage name -> name of its config class in instructkit.config (looked up lazily).
STAGE_CONFIGS = {"sft": "SFTConfig", "rm": "RewardConfig", "dpo": "DPOConfig", "ppo": "PPOConfig"}
STAGES = (*STAGE_CONFIGS, "eval")


@dataclasses.dataclass
class LoadedRecipe:
    config: RecipeConfig
    path: Path
    stages: dict[str, Any]  # stage name -> its validated, typed config

    def stage_config(self, stage: str) -> Any:
        return self.stages[stage]


def _stage_class(stage: str) -> type:
    import instructkit.config as config_module

    return getattr(config_module, STAGE_CONFIGS[stage])


def recipe_path(recipe: str | Path | None) -> Path:
    """A recipe file, or the name of a shipped one (``quickstart``)."""
    if recipe is None:
        return RECIPES_DIR / "quickstart.yaml"
    path = Path(recipe)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{recipe}.yaml"
    if shipped.is_file():
        return shipped
    names = [p.stem for p in RECIPES_DIR.glob("*.yaml")]
    raise InputError(f"no such recipe file or shipped recipe{did_you_mean(str(recipe), names)}; "
                     f"shipped: {', '.join(sorted(names))}", file=str(recipe))


def load_recipe(recipe: str | Path | None, overrides: list[str] | None = None) -> LoadedRecipe:
    """Load and validate a recipe, including the config of every stage it has a section for."""
    path = recipe_path(recipe)
    data, lines = read_yaml(path)
    cfg = from_dict(RecipeConfig, data, file=str(path), lines=lines)
    if overrides:
        cfg = from_dict(RecipeConfig, merge(to_dict(cfg), parse_overrides(overrides)), file="command line")
    for i, stage in enumerate(cfg.stages):
        if stage not in STAGES:
            raise InputError(f"unknown stage '{stage}' (one of {', '.join(STAGES)}){did_you_mean(stage, STAGES)}",
                             file=str(path), line=lines.get("stages"), field=f"stages[{i}]")
    stages = {}
    for stage in STAGE_CONFIGS:
        section = getattr(cfg, stage)
        if stage in cfg.stages or section:
            stages[stage] = from_dict(_stage_class(stage), {"model": cfg.model, **section}, file=str(path),
                                      lines=lines, prefix=f"{stage}.")
    stages["eval"] = cfg.eval
    return LoadedRecipe(cfg, path, stages)


def run(recipe: str | Path | None = None, *, out: str | Path | None = None, overrides: list[str] | None = None,
        from_stage: str | None = None) -> dict[str, Any]:
    """Run a recipe's stages in order; returns (and writes) the recipe summary."""
    from instructkit.train.engine import atomic_write_json, atomic_write_text
    from instructkit.config import dump_yaml

    loaded = load_recipe(recipe, overrides)
    cfg = loaded.config
    root = Path(out or Path("runs") / cfg.name)
    if from_stage is not None and from_stage not in cfg.stages:
        raise InputError(f"--from: '{from_stage}' is not a stage of this recipe ({', '.join(cfg.stages)})"
                         f"{did_you_mean(from_stage, cfg.stages)}", field="from")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "config.yaml", dump_yaml(cfg))
    if from_stage is not None:
        for stage in cfg.stages[cfg.stages.index(from_stage):]:
            shutil.rmtree(root / stage, ignore_errors=True)

    started = time.time()
    current_model, reward_model = cfg.model, None
    trained: list[tuple[str, str]] = [("base", cfg.model)]
    summaries: dict[str, Any] = {}
    for stage in cfg.stages:
        stage_dir = root / stage
        done = (stage_dir / "summary.json").is_file()
        print(f"== stage {stage}: {'already finished, skipped' if done else 'running'} ({stage_dir})", flush=True)
        if stage == "eval":
            if not done:
                _eval_stage(cfg.eval, trained, stage_dir, reward_model=reward_model)
        else:
            # A stage starts from the previous stage's model unless its section names one.
            explicit = getattr(cfg, stage)
            stage_cfg = dataclasses.replace(loaded.stage_config(stage), out=str(stage_dir),
                                            model=explicit.get("model", current_model))
            if stage == "ppo" and reward_model is not None:
                stage_cfg = _with_reward_model(stage_cfg, explicit, reward_model)
            if not done:
                STAGE_FUNCTIONS[stage]()(stage_cfg)
            if stage == "rm":
                reward_model = str(stage_dir)
            else:
                current_model = str(stage_dir)
                trained.append((stage, current_model))
        summaries[stage] = _read_json(stage_dir / "summary.json")

    from instructkit.report import write_report

    summary = {"recipe": cfg.name, "out": str(root), "final_model": current_model,
               "seconds": round(time.time() - started, 1), "stages": summaries,
               "table": summaries.get("eval", {}).get("table", {}), "report": str(root / "report.html")}
    write_report(root, summary)
    atomic_write_json(root / "summary.json", summary)
    _print_table(summary)
    return summary


def _stage_function(module: str, name: str):
    def load():
        import importlib

        return getattr(importlib.import_module(module), name)

    return load


STAGE_FUNCTIONS = {
    "sft": _stage_function("instructkit.train.sft", "sft"),
    "rm": _stage_function("instructkit.train.reward", "rm"),
    "dpo": _stage_function("instructkit.train.dpo", "dpo"),
    "ppo": _stage_function("instructkit.train.ppo", "ppo"),
}


def _with_reward_model(stage_cfg: Any, explicit: dict[str, Any], reward_model: str) -> Any:
    """PPO scores with the recipe's reward model unless its section names another reward."""
    reward = getattr(stage_cfg, "reward", None)
    if reward is None or explicit.get("reward"):
        return stage_cfg
    return dataclasses.replace(stage_cfg, reward=dataclasses.replace(reward, model=reward_model))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _eval_stage(cfg: EvalStageConfig, models: list[tuple[str, str]], out: Path, *,
                reward_model: str | None = None) -> None:
    """Evaluate the starting model (zero-shot, and k-shot if asked) and every trained stage."""
    from instructkit.eval.preference import evaluate_preferences
    from instructkit.eval.run import evaluate
    from instructkit.models.loading import load_model_and_tokenizer
    from instructkit.train.engine import atomic_dir, atomic_write_json

    table: dict[str, dict[str, Any]] = {}
    suites = [s for s in cfg.suites if s != "preference"]
    with atomic_dir(out) as tmp:
        runs = [(name, spec, 0) for name, spec in models]
        if cfg.k_shot:
            runs.insert(1, (f"base {cfg.k_shot}-shot", models[0][1], cfg.k_shot))
        for name, spec, k in runs:
            print(f"   evaluating {name}", flush=True)
            stem = name.replace(" ", "_")
            loaded = load_model_and_tokenizer(spec)
            metrics: dict[str, Any] = {}
            if suites:
                result = evaluate(model=spec, suites=suites, data=cfg.data, max_new_tokens=cfg.max_new_tokens,
                                  batch_size=cfg.batch_size, k_shot=k, limit=cfg.limit, loaded=loaded,
                                  out=str(tmp / f"{stem}.json"))
                metrics.update(result["metrics"])
            if "preference" in cfg.suites and k == 0:  # prompting does not change log-likelihoods
                result = evaluate_preferences(*loaded, data=cfg.preference_data, batch_size=cfg.batch_size,
                                              limit=cfg.limit)
                samples = result.pop("samples")
                atomic_write_json(tmp / f"{stem}.preference.json", result)
                (tmp / f"{stem}.preference.samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
                metrics.update(result)
            table[name] = {k2: v for k2, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        atomic_write_json(tmp / "summary.json", {"stage": "eval", "data": cfg.data, "table": table})


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
        cells = "".join((f"{row[m]:.3f}" if isinstance(row.get(m), float) else str(row.get(m, "-"))).rjust(w)
                        for m, w in zip(metrics, widths))
        print(name.ljust(width) + cells)
    print(f"\nrun folder: {summary['out']}  (summary.json)")
    if summary.get("report"):
        print(f"report: {summary['report']}")
