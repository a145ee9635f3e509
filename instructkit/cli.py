"""The `instructkit` command: a thin table of subcommands over library functions.

Each subcommand parses its arguments and calls a Python function of the same name; bad input
ends with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from instructkit import __version__
from instructkit.errors import EXIT_BAD_INPUT, InputError

DEFAULT_MODEL = "smollm2-135m-instruct"
OVERRIDES_HELP = "config overrides as dotted key=value, e.g. optim.lr=1e-4 peft.method=full"


def _quiet_libraries() -> None:
    import logging
    import warnings

    # torchao announces its CUDA-only kernels and torch.compile deprecations on import: not the user's concern.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)

    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


# ----------------------------------------------------------------------------------------------
# Commands


def cmd_run(args: argparse.Namespace) -> int:
    if args.list:
        from instructkit.pipeline import list_recipes

        print(list_recipes())
        return 0
    from instructkit.pipeline import run

    words = list(args.recipe_and_overrides)
    recipe = words.pop(0) if words and "=" not in words[0] else None
    run(recipe, out=args.out, overrides=words, from_stage=args.from_stage, overwrite=args.overwrite)
    return 0  # run prints its table and paths


def cmd_sweep(args: argparse.Namespace) -> int:
    from instructkit.sweep import sweep

    sweep(
        args.recipe,
        args.space,
        args.overrides,
        out=args.out,
        trials=args.trials,
        sampler=args.sampler,
        jobs=args.jobs,
        stage=args.stage,
        seed=args.seed,
        backend=args.backend,
    )
    return 0  # sweep prints its table


def _stage_command(name: str):
    """``instructkit sft|rm|dpo|ppo``: the stage's Python function, its summary printed."""

    def command(args: argparse.Namespace) -> int:
        from instructkit.stages import STAGES

        function = STAGES[name].load()
        print(json.dumps(function(args.config, args.overrides, overwrite=args.overwrite), indent=2))
        return 0

    return command


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from instructkit.inspect import inspect_data, parse_columns

    columns = parse_columns(args.columns) if args.columns is not None else None
    print(
        inspect_data(
            args.file,
            format=args.format,
            columns=columns,
            dataset_info=args.dataset_info,
            model=args.model,
            template=args.template,
            max_length=args.max_length,
            color=not args.no_color and sys.stdout.isatty(),
        )
    )
    return 0


EVAL_DESCRIPTION = """\
Evaluate a model on held-out conversations (prompt turns, then the reference answer).
Give --model (e.g. --model smollm2-135m-instruct, the embedded default) or --responses.
Responses are generated once, greedily (--temperature/--seed to sample), and shared by every
suite; --responses FILE.jsonl scores responses made elsewhere instead (no model is loaded):
every row is scored, several per prompt included; rows that answer no held-out record are
counted (unmatched_rows) and warned about.

suites (comma-separated):
  exact_match  response equals the reference (surrounding whitespace ignored)
  accuracy     classification labels: accuracy, precision/recall/F1 per label, macro and micro (alias f1)
  bleu         sacrebleu corpus BLEU and chrF
  rouge        rouge-score ROUGE-1, ROUGE-2, ROUGE-L F-measure
  reward       mean reward-model score of the responses (needs --reward-model)
  winrate      win rate of --model over --baseline (or --responses over --baseline-responses)
               judged by --reward-model, with ties and a 95% Wilson interval
  perplexity   loss and perplexity of the reference answers under the model (alias loss)
  ifeval       verifiable instructions; --data in the IFEval format (run on its own)
  preference   does the model itself prefer the chosen response? log-likelihood accuracy and
               margin on --data preference pairs (default: the shipped held-out pairs; run on its own)
  refusal      refusal rate on harmful requests, over-refusal on benign look-alikes, per category
               (default: the shipped set; run on its own; docs/safety.md)
  injection    how often an instruction hidden in the input data (a canary) is obeyed (run on its own)
  robustness   --robust-suite (default exact_match) re-run under typos, case, paraphrase and
               distractor perturbations of the prompts: the drop per perturbation (run on its own)

--k-shot N puts N solved examples before every prompt: the prompting baseline for the untuned model.

examples:
  instructkit eval --model runs/quickstart/sft --suite exact_match,bleu,rouge --data test.jsonl
  instructkit eval --model runs/ppo --baseline runs/sft --suite winrate --reward-model runs/rm
  instructkit eval --suite accuracy --data test.jsonl --responses vllm_outputs.jsonl
"""


def cmd_eval(args: argparse.Namespace) -> int:
    from instructkit.eval.run import evaluate

    result = evaluate(
        model=args.model,
        suites=args.suite.split(","),
        data=args.data,
        out=args.out,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        k_shot=args.k_shot,
        limit=args.limit,
        shots_data=args.shots_from,
        responses=args.responses,
        reward_model=args.reward_model,
        baseline=args.baseline,
        baseline_responses=args.baseline_responses,
        seed=args.seed,
        temperature=args.temperature,
        tie_margin=args.tie_margin,
        robust_suite=args.robust_suite,
    )
    print(json.dumps({k: v for k, v in result["metrics"].items() if k not in ("per_type", "per_label")}, indent=2))
    return 0


def _sampling(args: argparse.Namespace) -> dict[str, object]:
    """The options `generate` and `chat` share (see :func:`_sampling_args`)."""
    return {
        "system": args.system,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }


def cmd_generate(args: argparse.Namespace) -> int:
    from instructkit.chat import generate_text
    from instructkit.models.vision import vision_folder

    if vision_folder(args.model) is not None:  # a vision run answers greedily, with its images (docs/vision.md)
        if args.temperature:  # generate's default is 0.7; a vision run has no sampling path
            print(
                "note: a vision run decodes greedily; --temperature, --top-p and --seed are not used", file=sys.stderr
            )
        from instructkit.serve.vision import answer_with_images

        text = answer_with_images(
            args.model, args.prompt, args.image, system=args.system, max_new_tokens=args.max_new_tokens
        )
        print(text)
        return 0
    if args.image:
        raise InputError(f"{args.model} is not a vision run; --image needs one (docs/vision.md)", field="--image")
    print(generate_text(args.model, args.prompt, **_sampling(args)))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from instructkit.chat import chat

    chat(args.model, **_sampling(args))
    return 0


def _named_adapters(specs: list[str]) -> dict[str, str]:
    """``--adapter NAME=PATH`` values as name -> path; an InputError for a malformed or repeated one."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InputError(f"expected NAME=PATH, got '{spec}'", field="--adapter")
        if name in adapters:
            raise InputError(f"the name '{name}' is given twice", field="--adapter")
        adapters[name] = path
    return adapters


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from instructkit.models.loading import load_model_and_tokenizer
    from instructkit.serve import create_app
    from instructkit.serve.app import check_adapters

    adapters = _named_adapters(args.adapter)
    check_adapters(adapters, args.model, args.max_loras)  # from config files, before the model loads
    api_key = args.api_key or os.environ.get("INSTRUCTKIT_API_KEY") or None
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} with no API key; anyone who can reach it can use it", file=sys.stderr)
    if args.label_store is not None:
        from instructkit.serve.labels import LabelStore

        LabelStore(args.label_store)  # a missing or foreign file fails now, before the model loads
    from instructkit.models.vision import vision_folder

    if vision_folder(args.model) is not None:  # images in, text out: its own small app (serve/vision.py)
        from instructkit.models.vision import load_vision_model
        from instructkit.serve.vision import create_vision_app

        if adapters:
            raise InputError(f"{args.model} is a vision run; --adapter is for a text generator", field="--adapter")
        model, tokenizer = load_vision_model(args.model)
        uvicorn.run(create_vision_app(model, tokenizer, args.model), host=args.host, port=args.port)
        return 0
    from instructkit.serve.classify import classifier_task, load_classifier

    task = classifier_task(args.model)  # a classify run's classifier or tagger answers /classify
    if task is not None and adapters:
        raise InputError(
            f"{args.model} is a {task} model; LoRA adapters are served over a generator", field="--adapter"
        )
    if task is not None:
        model, tokenizer = load_classifier(args.model, task)
    else:  # Under named adapters a LoRA base is merged: the adapters go on its merged weights.
        model, tokenizer = load_model_and_tokenizer(args.model, merge_adapter=bool(adapters))
    app = create_app(
        model,
        tokenizer,
        args.model,
        api_key=api_key,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        label_store=args.label_store,
        runs_dir=args.runs,
        adapters=adapters,
        max_loras=args.max_loras,
    )
    uvicorn.run(app, host=args.host, port=args.port)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from instructkit.export import export

    result = export(
        args.model,
        args.out,
        fmt=args.format,
        quant=args.quant,
        check_data=args.check_data,
        check_prompts=args.check_prompts,
        rounding=args.rounding,
        calibration_data=args.calibration_data,
        calibration_examples=args.calibration_examples,
    )
    size = result["bytes"] / 2**20
    print(
        f"wrote {result['out']} ({result['format']}{', ' + result['quant'] if result['quant'] else ''}, {size:.1f} MiB)"
    )
    print(
        f"checked: loaded back, max |logit difference| {result['max_abs_logit_diff']:.3g} over "
        f"{result['positions']} positions, greedy next token agrees at {100 * result['argmax_agreement']:.0f}%"
    )
    if "greedy_same" in result:
        print(
            f"checked: greedy answers to {result['greedy_prompts']} held-out prompts of {args.check_data}: "
            f"{result['greedy_same']} the same text"
        )
        for d in result["greedy_differ"]:
            print(f"  prompt {d['index']}: source {d['source']!r}, written {d['written']!r}")
    return 0


def cmd_label_create(args: argparse.Namespace) -> int:
    from instructkit.serve.labels import create_label_store

    print(
        json.dumps(
            create_label_store(
                args.prompts,
                args.model,
                k=args.k,
                out=args.out,
                seed=args.seed,
                temperature=args.temperature,
                top_p=args.top_p,
                max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size,
                limit=args.limit,
            ),
            indent=2,
        )
    )
    return 0


def cmd_label_export(args: argparse.Namespace) -> int:
    from instructkit.serve.labels import export_rankings

    print(json.dumps(export_rankings(args.store, args.out), indent=2))
    return 0


# ----------------------------------------------------------------------------------------------
# Parser


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model: embedded name, HF folder or cached id, GGUF file or run folder (default {DEFAULT_MODEL})",
    )
    p.add_argument("--system", default=None, help="system message (default: the template's own)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instructkit",
        description="Make a pretrained language model follow instructions: SFT, reward models, "
        "preference tuning, evaluation. Start with `instructkit run`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  instructkit run                                # the quickstart on the embedded model\n"
        "  instructkit sft --config recipes/quickstart.yaml train.max_steps=50\n"
        "  instructkit rm --config recipes/instructgpt.yaml\n"
        "  instructkit dpo --config recipes/dpo.yaml loss=ipo beta=0.5\n"
        "  instructkit data inspect data.jsonl --model smollm2-135m-instruct\n"
        "  instructkit eval --model runs/quickstart/sft --suite exact_match --data test.jsonl\n"
        "  instructkit generate --model runs/quickstart/sft --prompt 'Hello!'",
    )
    parser.add_argument("--version", action="version", version=f"instructkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "run",
        help="run a recipe's stages in order (default: the quickstart)",
        description="Run a recipe: its stages in order, each feeding the next. With no "
        "recipe, the built-in quickstart on the embedded default model.",
    )
    # One positional list, split in cmd_run: argparse cannot take an optional positional, then
    # options, then more positionals (`run dpo --out X a=b` would reject `a=b`).
    p.add_argument(
        "recipe_and_overrides",
        nargs="*",
        default=[],
        metavar="[RECIPE] [KEY=VALUE ...]",
        help="a recipe YAML or shipped recipe name (quickstart, instructgpt, dpo, rlvr; default "
        "quickstart), then overrides such as sft.optim.lr=1e-4 or eval.limit=20",
    )
    p.add_argument("--out", default=None, help="run folder (default: runs/<recipe name>)")
    p.add_argument("--from", dest="from_stage", default=None, help="rerun from this stage on")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="rerun from the first stage whose folder holds a run of another config "
        "(default: stop and list the changes)",
    )
    p.add_argument("--list", action="store_true", help="list the shipped recipes and exit")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "sweep",
        help="search hyperparameters of a recipe with Optuna (docs/sweep.md)",
        description="Run a recipe once per trial with values from a space file, prune trials whose "
        "held-out loss lags, and print the table (OUT/sweep.json, OUT/report.html).",
    )
    p.add_argument("recipe", help="a recipe YAML or shipped recipe name")
    p.add_argument(
        "overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="every trial's overrides, e.g. sft.train.max_steps=50",
    )
    p.add_argument("--space", required=True, help="YAML: dotted key -> {type: float|int|categorical, ...}")
    p.add_argument("--trials", type=int, default=10, help="trials in all (default 10; grid: at most the grid)")
    p.add_argument("--sampler", default="tpe", help="tpe (default) or grid")
    p.add_argument("--jobs", type=int, default=1, help="trials at once, in worker processes (default 1)")
    p.add_argument("--stage", default=None, help="whose val_loss is minimised (default: the first key's stage)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    p.add_argument("--backend", default="optuna", help="optuna (default) or ray (Ray Tune, untested)")
    p.add_argument("--out", default=None, help="sweep folder (default: runs/<recipe name>-sweep)")
    p.set_defaults(func=cmd_sweep)

    from instructkit.stages import STAGES

    for name, entry in STAGES.items():
        if not entry.command:
            continue
        p = sub.add_parser(
            name,
            help=entry.help,
            description=entry.description + " Writes a run folder with "
            "config.yaml, metrics.jsonl, summary.json, checkpoints/ and final/; rerunning the "
            "same command resumes from the last checkpoint (or does nothing when finished); a "
            "rerun with a changed config stops and lists the changes.",
        )
        p.add_argument("--config", required=True, help=f"stage config YAML, or a recipe YAML (its {name} section runs)")
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="replace a run folder made with another config (default: stop and list the changes)",
        )
        p.add_argument("overrides", nargs="*", default=[], help=OVERRIDES_HELP)
        p.set_defaults(func=_stage_command(name))

    p = sub.add_parser("data", help="look at a data file before training on it")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    q = dsub.add_parser(
        "inspect",
        help="format, counts, token lengths, one rendered example",
        description="Print the detected format, record counts, token-length statistics "
        "under a model's tokenizer, and one example with its trained tokens marked.",
    )
    q.add_argument(
        "file",
        help="data file (json, jsonl, csv, parquet, txt), shipped:NAME/SPLIT, or with "
        "--dataset-info the name of a dataset in it",
    )
    q.add_argument("--format", default=None, help="force a format instead of detecting it")
    q.add_argument(
        "--columns",
        default=None,
        metavar="KEY=COLUMN[,KEY=COLUMN...]",
        help="map keys to your columns, as data.columns does, e.g. prompt=question,response=answer",
    )
    q.add_argument(
        "--dataset-info",
        default=None,
        metavar="PATH",
        help="a LLaMA-Factory dataset_info.json; FILE is then the name of a dataset in it",
    )
    q.add_argument("--model", default=DEFAULT_MODEL, help=f"whose tokenizer and template (default {DEFAULT_MODEL})")
    q.add_argument("--template", default=None, help="chat template: chatml, llama-3, alpaca (default: the tokenizer's)")
    q.add_argument("--max-length", type=int, default=512, help="length limit to report against (default 512)")
    q.add_argument("--no-color", action="store_true", help="mark trained tokens with brackets, not colour")
    q.set_defaults(func=cmd_data_inspect)

    p = sub.add_parser(
        "eval",
        help="evaluate a model on held-out data",
        description=EVAL_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"model or run folder that generates the responses (model A for winrate), "
        f"e.g. {DEFAULT_MODEL}; required unless --responses",
    )
    p.add_argument("--suite", default="exact_match", help="comma-separated suites (default exact_match)")
    p.add_argument("--data", default=None, help="held-out file (default: the shipped extraction test split)")
    p.add_argument("--out", default=None, help="write metrics JSON here, and per-example JSONL beside it")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--k-shot", type=int, default=0, help="in-context examples taken from --shots-from data")
    p.add_argument(
        "--shots-from",
        default=None,
        help="conversations to take k-shot examples from (default: the shipped extraction train split)",
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N records")
    p.add_argument(
        "--responses",
        default=None,
        help="score responses made elsewhere (JSONL with key or prompt, and response; every row is "
        "scored); instead of --model",
    )
    p.add_argument("--reward-model", default=None, help="reward-model folder that judges the reward and winrate suites")
    p.add_argument("--baseline", default=None, help="winrate: model B, whose responses A is compared with")
    p.add_argument(
        "--baseline-responses",
        default=None,
        help="winrate: model B's responses made elsewhere (same JSONL shape as --responses)",
    )
    p.add_argument(
        "--tie-margin",
        type=float,
        default=0.0,
        help="winrate: reward differences within this are ties (default 0: exact ties only)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed, and robustness's perturbations (default 0)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily; > 0 samples")
    p.add_argument("--robust-suite", default="exact_match", help="robustness: the suite re-run under perturbed prompts")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "generate",
        help="sample one response",
        description="Sample a response to one prompt, rendered with the model's chat template.",
    )
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument(
        "--image", action="append", default=[], help="an image for a vision run (repeatable; at <image> tags or first)"
    )
    _sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "chat",
        help="chat in the terminal",
        description="Interactive chat with a model "
        "(the conversation is kept; /reset clears it, /exit or Ctrl-D quits).",
    )
    _sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model at /v1/chat/completions and /v1/completions (OpenAI's API; "
        "see docs/serve.md). Concurrent requests generate together in one batch "
        "(continuous batching: a request joins the running batch at the next token).",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="model or run folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $INSTRUCTKIT_API_KEY)"
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="most choices (rows) generating together; a request with n=4 takes 4 (default 8)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=16,
        help="requests that may wait while the batch is full; more get 503 (default 16)",
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also serve the LoRA adapter (or run folder) PATH, trained on --model, as model NAME; "
        "repeat for more. Requests for different adapters share the batch",
    )
    p.add_argument(
        "--max-loras",
        type=int,
        default=None,
        metavar="N",
        help="most LoRA adapters loaded at once, --adapter ones and those from POST /v1/load_lora_adapter "
        "(default 4, or the number of --adapter when more; 0: none)",
    )
    p.add_argument(
        "--label-store",
        default=None,
        metavar="STORE.sqlite",
        help="serve the ranking page (/rank) over this store from `instructkit label create`",
    )
    p.add_argument(
        "--runs", default="runs", metavar="DIR", help="run folders listed on the runs page (/runs) (default runs/)"
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "export",
        help="write a model out as an HF folder, merged weights or a GGUF file",
        description="Export a model or run folder: --format hf (as saved: an adapter stays an adapter), "
        "merged (adapters folded into the base: an ordinary HF folder) or gguf (one file for llama.cpp, "
        "Ollama and transformers, with the tokenizer and chat template; --quant f16, q8_0 or q4_0). "
        "The written model is loaded back and compared with the source. See docs/export.md.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="model or run folder (default: %(default)s)")
    p.add_argument("--format", default="merged", choices=["hf", "merged", "gguf"], help="default: %(default)s")
    p.add_argument("--quant", default="f16", choices=["f16", "q8_0", "q4_0"], help="GGUF weights (default: f16)")
    p.add_argument("--out", required=True, help="output folder (hf, merged) or file ending in .gguf")
    p.add_argument(
        "--rounding",
        default="nearest",
        choices=["nearest", "gptq"],
        help="q8_0: round each weight to nearest, or choose the blocks by GPTQ on calibration "
        "conversations so each layer's output moves least (slower: minutes) (default: %(default)s)",
    )
    p.add_argument(
        "--calibration-data",
        default="shipped:extract/train",
        help="--rounding gptq: conversations whose inputs the rounding keeps (default: %(default)s)",
    )
    p.add_argument(
        "--calibration-examples",
        type=int,
        default=256,
        help="--rounding gptq: how many of them (default: %(default)s)",
    )
    p.add_argument(
        "--check-data",
        default="shipped:extract/test",
        help="held-out conversations for the check (default: %(default)s)",
    )
    p.add_argument(
        "--check-prompts",
        type=int,
        default=20,
        help="prompts both models answer greedily in the check; 0 skips it (default: %(default)s)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "label",
        help="human feedback: sample K responses per prompt, rank them, export",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The InstructGPT labelling loop (see docs/label.md):\n"
        "  1. instructkit label create --prompts prompts.jsonl --model M --k 4 --out store.sqlite\n"
        "  2. instructkit serve --model M --label-store store.sqlite   # people rank at /rank\n"
        "  3. instructkit label export store.sqlite --out rankings.jsonl\n"
        "  4. instructkit rm --config rm.yaml data.path=rankings.jsonl",
    )
    lsub = p.add_subparsers(dest="label_command", metavar="SUBCOMMAND", required=True)
    q = lsub.add_parser(
        "create",
        help="sample K responses to each prompt into a new label store",
        description="Sample K responses to each prompt (temperature sampling, seeded) and write "
        "them to a new SQLite label store. Prompts: JSONL/JSON/CSV/Parquet records with "
        "'prompt', a string or a list of {role, content} messages ending with a user "
        "turn (other fields are ignored). The store appears whole or not at all.",
    )
    q.add_argument("--prompts", required=True, help="prompts file, or shipped:NAME/SPLIT")
    q.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"model or run folder to sample from (default {DEFAULT_MODEL})"
    )
    q.add_argument("--k", type=int, default=4, help="responses per prompt, at least 2 (default 4)")
    q.add_argument("--out", required=True, help="the new store (.sqlite); must not exist yet")
    q.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    q.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    q.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    q.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per response (default 256)")
    q.add_argument("--batch-size", type=int, default=16, help="sequences generated together (default 16)")
    q.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    q.set_defaults(func=cmd_label_create)
    q = lsub.add_parser(
        "export",
        help="write the rankings as the ranking data `instructkit rm` reads",
        description="Write every ranking in the store (skips left out) as JSONL records "
        "{prompt, responses, ranks, annotator, ranked_at, ...}, ranks[i] being the rank "
        "of responses[i] (0 = best, equal = tie): the ranking format `instructkit rm` "
        "trains on. Written to a temporary file, then renamed.",
    )
    q.add_argument("store", help="label store from `instructkit label create`")
    q.add_argument("--out", required=True, help="rankings file to write (.jsonl)")
    q.set_defaults(func=cmd_label_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options (`run dpo --out X a=b`); argparse alone stops
    # filling a positional list at the first option, so the words it left are added back here.
    args, extra = parser.parse_known_args(argv)
    words = "recipe_and_overrides" if hasattr(args, "recipe_and_overrides") else "overrides"
    if extra and hasattr(args, words) and not any(e.startswith("-") for e in extra):
        setattr(args, words, [*getattr(args, words), *extra])
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _quiet_libraries()
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except InputError as exc:
        print(f"instructkit: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("instructkit: interrupted; finished steps are checkpointed, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
