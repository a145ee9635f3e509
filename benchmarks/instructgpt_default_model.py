"""The InstructGPT stages on the embedded default model, measured on held-out data.

    python benchmarks/instructgpt_default_model.py [--stages rm,dpo,ppo,ifeval] [--model SPEC]

* rm:  reward model on LLaMA-Factory's ``dpo_en_demo.json`` (300 preference pairs, 20% held
       out): held-out pairwise accuracy against the 50% chance line.
* dpo: DPO (sigmoid) on the same split: held-out implicit reward margin and accuracy (both 0
       before training, when the reference is the starting model).
* ppo: PPO with a verifier reward (IFEval's ``punctuation:no_comma`` check) on instructions
       from ``alpaca_en_demo.json`` that ask for no commas; held-out pass rate before and after
       (greedy decoding), and the KL to the starting model.
* ifeval: prompt- and instruction-level strict/loose accuracy of the starting model on the
       541 IFEval prompts (greedy, ``--ifeval-max-new-tokens``).

Not a speed benchmark: it reports what each stage changes. Sizes default to what a GPU does in
minutes; ``--small`` shrinks them for this 2-core CPU (``--ppo-cpu``: the ppo stage at CPU size
with the full 100 held-out prompts). Results go to ``--out``/results.json and
a table on stdout. Data files come from ``--data-dir`` (default: ../shared/data beside the repo).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def no_comma_prompts(alpaca: Path, out: Path, n: int, seed: int = 0) -> tuple[Path, list[dict]]:
    """Instructions without inputs, each asking for no commas; returns (train file, held-out rows)."""
    rows = [r for r in json.loads(alpaca.read_text()) if not r.get("input") and len(r["instruction"]) < 200]
    random.Random(seed).shuffle(rows)
    rows = [
        {
            "prompt": r["instruction"].strip() + " Do not use any commas in your response.",
            "instruction_id_list": ["punctuation:no_comma"],
            "kwargs": [{}],
        }
        for r in rows[:n]
    ]
    held = len(rows) // 5
    train = out / "no_comma_train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[held:]))
    return train, rows[:held]


def pass_rate(model_spec: str, rows: list[dict], max_new_tokens: int, batch_size: int) -> dict:
    from instructkit.generation import generate
    from instructkit.models.loading import load_model_and_tokenizer
    from instructkit.verifiers import aggregate, evaluate_response

    model, tokenizer = load_model_and_tokenizer(model_spec)
    responses = generate(
        model,
        tokenizer,
        [[{"role": "user", "content": r["prompt"]}] for r in rows],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    results = [
        evaluate_response(r["prompt"], resp, r["instruction_id_list"], r["kwargs"]) for r, resp in zip(rows, responses)
    ]
    agg = aggregate(results)
    return {
        "prompt_level_strict": agg["prompt_level_strict"],
        "prompt_level_loose": agg["prompt_level_loose"],
        "instruction_level_strict": agg["instruction_level_strict"],
        "instruction_level_loose": agg["instruction_level_loose"],
        "n": len(rows),
        "mean_words": sum(len(r.split()) for r in responses) / max(len(responses), 1),
        "examples": [{"prompt": r["prompt"], "response": resp} for r, resp in list(zip(rows, responses))[:3]],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default="rm,dpo,ppo,ifeval")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--out", default="runs/instructgpt-default")
    p.add_argument("--small", action="store_true", help="CPU-sized runs")
    p.add_argument(
        "--ppo-cpu",
        action="store_true",
        help="ppo sized for a 2-core CPU: 16 prompts a step, 48 new tokens, 20 steps, lr 1e-4, "
        "still 400 train / 100 held-out prompts",
    )
    p.add_argument("--ppo-steps", type=int, default=None)
    p.add_argument("--advantage", default="gae", help="gae (PPO with a value model), grpo or rloo")
    p.add_argument("--ppo-lr", type=float, default=None)
    p.add_argument("--ppo-new-tokens", type=int, default=None)
    p.add_argument("--dtype", default=None, help="training precision (fp32, bf16); default: fp32 on CPU, bf16 on GPU")
    p.add_argument("--ifeval-limit", type=int, default=None)
    p.add_argument("--ifeval-max-new-tokens", type=int, default=512)
    args = p.parse_args()
    data, out = Path(args.data_dir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    small = args.small
    results: dict = {"model": args.model, "small": small}
    results_path = out / "results.json"
    if results_path.is_file():
        results.update(json.loads(results_path.read_text()))
    stages = args.stages.split(",")

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=2))

    pairs = str(data / "peers" / "llama-factory" / "dpo_en_demo.json")
    common_data = {"path": pairs, "val_fraction": 0.2, "seed": 0, "max_length": 256 if small else 1024}
    train = {"batch_size": 8, "epochs": 1 if small else 2, "progress": False, "eval_every": 0}

    if "rm" in stages:
        from instructkit.train.reward import rm

        t = time.time()
        s = rm(
            {
                "model": args.model,
                "out": str(out / "rm"),
                "data": common_data,
                "peft": {"method": "full"},
                "optim": {"lr": 1e-5, "scheduler": "cosine", "warmup_ratio": 0.1},
                "train": train,
            }
        )
        results["rm"] = {
            k: s[k]
            for k in (
                "val_accuracy",
                "val_accuracy_before",
                "val_pairs",
                "train_loss",
                "val_loss",
                "steps",
                "bias",
                "tokens_per_s",
            )
        } | {"seconds": time.time() - t}
        save()

    if "dpo" in stages:
        from instructkit.train.dpo import dpo

        t = time.time()
        s = dpo(
            {
                "model": args.model,
                "out": str(out / "dpo"),
                "data": common_data,
                "peft": {"method": "lora", "r": 16, "alpha": 32},
                "beta": 0.1,
                "optim": {"lr": 5e-5, "scheduler": "cosine", "warmup_ratio": 0.1},
                "train": train,
            }
        )
        results["dpo"] = {
            k: v for k, v in s.items() if k.startswith("val_") or k in ("train_loss", "steps", "tokens_per_s")
        }
        results["dpo"]["seconds"] = time.time() - t
        save()

    if "ppo" in stages:
        from instructkit.train.ppo import ppo

        cpu = args.ppo_cpu  # 100 held-out prompts as on a GPU, CPU-sized rollouts
        prompts, held = no_comma_prompts(
            data / "peers" / "llama-factory" / "alpaca_en_demo.json", out, n=100 if small and not cpu else 500
        )
        new_tokens = args.ppo_new_tokens or (48 if small or cpu else 128)
        eval_batch = 50 if cpu else 16 if small else 64
        rollout = 16 if cpu else 8 if small else 64
        results["ppo_before"] = pass_rate(args.model, held, new_tokens, eval_batch)
        save()
        t = time.time()
        s = ppo(
            {
                "model": args.model,
                "out": str(out / "ppo"),
                "data": {"path": str(prompts)},
                "reward": {"function": "instructkit.verifiers:ifeval_reward"},
                "peft": {"method": "lora", "r": 16, "alpha": 32},
                "advantage": args.advantage,
                "group_size": 1 if args.advantage == "gae" else 4,
                "rollout_batch_size": rollout // (1 if args.advantage == "gae" else 4),
                "max_new_tokens": new_tokens,
                "temperature": 1.0,
                "ppo_epochs": 2,
                "kl_coef": 0.05,
                "missing_eos_penalty": None,
                "optim": {"lr": args.ppo_lr or (1e-4 if cpu else 5e-5), "scheduler": "constant"},
                "train": {
                    "max_steps": args.ppo_steps or (20 if cpu else 8 if small else 40),
                    "batch_size": 16 if cpu else 8 if small else 32,
                    "progress": False,
                    "dtype": args.dtype,
                },
            }
        )
        results["ppo_settings"] = {
            "advantage": args.advantage,
            "steps": args.ppo_steps,
            "lr": args.ppo_lr,
            "max_new_tokens": new_tokens,
            "dtype": args.dtype,
            "cpu_preset": cpu,
            "prompts_per_step": rollout,
            "held_out": len(held),
        }
        results["ppo"] = {k: v for k, v in s.items() if isinstance(v, (int, float))} | {"seconds": time.time() - t}
        results["ppo_after"] = pass_rate(str(out / "ppo"), held, new_tokens, eval_batch)
        metrics = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
        results["ppo_curve"] = [
            {k: m.get(k) for k in ("step", "reward_mean", "kl", "response_length")} for m in metrics
        ]
        save()

    if "ifeval" in stages:
        from instructkit.verifiers import read_ifeval_jsonl

        rows = [
            {"prompt": r.prompt, "instruction_id_list": r.instruction_id_list, "kwargs": r.kwargs}
            for r in read_ifeval_jsonl(data / "ifeval" / "input_data.jsonl")
        ][: args.ifeval_limit]
        t = time.time()
        results["ifeval"] = pass_rate(args.model, rows, args.ifeval_max_new_tokens, 64) | {
            "max_new_tokens": args.ifeval_max_new_tokens,
            "decoding": "greedy",
            "seconds": time.time() - t,
        }
        save()

    print(
        json.dumps(
            {
                k: {kk: vv for kk, vv in v.items() if kk != "examples"} if isinstance(v, dict) else v
                for k, v in results.items()
                if k != "ppo_curve"
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
