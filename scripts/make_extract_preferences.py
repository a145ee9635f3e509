"""Derive preference pairs and RL prompts from the shipped extraction dataset.

    python scripts/make_extract_preferences.py [--out instructkit/datasets] [--pairs 400]

* ``extract_prefs_{train,val}.jsonl``: the prompt of an extraction record, its correct answer
  as ``chosen`` and a plausible mistake as ``rejected`` (a count off by one, a plural item, a
  wrong field order, a missing field, the fields as a comma list), for reward models and DPO.
* ``extract_prompts_{train,test}.jsonl``: the prompt and its reference ``answer``, for RL with
  a programmatic reward (``instructkit.rewards:exact_match``).

Seeded and pure Python: the same arguments always write byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent / "instructkit" / "datasets"


def fields(answer: str) -> dict[str, str]:
    return dict(part.split(": ", 1) for part in answer.split("; "))


def mistake(rng: random.Random, answer: str) -> str:
    f = fields(answer)
    kind = rng.choice(["count", "plural", "order", "missing", "commas"])
    if kind == "count":
        n = int(f["count"])
        f["count"] = str(n + 1 if n == 1 or rng.random() < 0.5 else n - 1)
    elif kind == "plural":
        f["item"] = f["item"] + "s"
    elif kind == "order":
        keys = list(f)
        rng.shuffle(keys)
        if keys == list(f):
            keys.reverse()
        return "; ".join(f"{k}: {f[k]}" for k in keys)
    elif kind == "missing":
        del f[rng.choice(list(f))]
    else:
        return ", ".join(f.values())
    return "; ".join(f"{k}: {v}" for k, v in f.items())


def read(split: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / f"extract_{split}.jsonl").read_text().splitlines()]


def build(pairs: int, prompts: int, seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    train, val, test = read("train"), read("val"), read("test")

    def pair(rec: dict) -> dict:
        *prompt, reply = rec["messages"]
        return {"prompt": prompt, "chosen": reply["content"], "rejected": mistake(rng, reply["content"])}

    def prompt_row(rec: dict) -> dict:
        *prompt, reply = rec["messages"]
        return {"prompt": prompt, "answer": reply["content"]}

    # Pairs and RL prompts are disjoint slices of train (SFT may have seen those prompts, as in
    # InstructGPT, whose stages share a prompt distribution); val and test stay held out.
    return {
        "prefs_train": [pair(r) for r in train[-pairs:]],
        "prefs_val": [pair(r) for r in val],
        "prompts_train": [prompt_row(r) for r in train[-pairs - prompts : -pairs]],
        "prompts_test": [prompt_row(r) for r in test],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in build(args.pairs, args.prompts, args.seed).items():
        path = args.out / f"extract_{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(path)


if __name__ == "__main__":
    main()
