"""IFEval before and after RL with verifiable rewards (recipes/rlvr.yaml), on a fixed subset.

    python benchmarks/rlvr_ifeval.py --policy runs/rlvr/ppo [--base smollm2-135m-instruct]
        [--ifeval ../shared/data/ifeval/input_data.jsonl] [--n 100] [--max-new-tokens 128]

The subset (``subset()``), fixed before any measurement: IFEval's prompts with a single
instruction whose target a short answer can reach (no "at least N words" over 80, "at least N
sentences" over 5, more than 3 paragraphs or sections, 4 placeholders, 5 bullets or 3 highlights),
the first ``--n`` of them in the file's order. Why: on this CPU, 100 prompts at 128 new tokens
take minutes per model where all 541 at IFEval's 512 take hours; one instruction per prompt lets
the per-type change be read off directly; and a target that 128 tokens cannot reach would score 0
before and after whatever RL did. ``--n 541 --all-prompts --max-new-tokens 512`` is the whole
benchmark (for a GPU machine).

Before anything is generated, the training prompts (``--train``, default the shipped
``rlvr_prompts/train``) are checked against every IFEval prompt: identical texts, and the longest
run of words a training prompt shares with any IFEval prompt. Both models are decoded greedily
with the same budget; the table gives prompt- and instruction-level accuracy, strict and loose,
the per-type loose change, and the policy's KL to its starting model from the last PPO steps of
its ``metrics.jsonl``. Results go to ``--out``/results.json.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The largest targets a 128-token answer can reach, by argument (see the module docstring).
REACHABLE = {
    ("length_constraints:number_words", "num_words"): 80,
    ("length_constraints:number_sentences", "num_sentences"): 5,
    ("length_constraints:number_paragraphs", "num_paragraphs"): 3,
    ("length_constraints:nth_paragraph_first_word", "num_paragraphs"): 3,
    ("detectable_format:multiple_sections", "num_sections"): 3,
    ("detectable_content:number_placeholders", "num_placeholders"): 4,
    ("detectable_format:number_bullet_lists", "num_bullets"): 5,
    ("detectable_format:number_highlighted_sections", "num_highlights"): 3,
}


def reachable(instruction_id: str, kwargs: dict) -> bool:
    """Whether a short answer can meet the instruction ("less than" targets always can)."""
    if kwargs.get("relation") == "less than":
        return True
    return all(
        kwargs.get(name) is None or kwargs[name] <= limit
        for (kind, name), limit in REACHABLE.items()
        if kind == instruction_id
    )


def subset(rows: list[dict], n: int, all_prompts: bool = False) -> list[dict]:
    if all_prompts:
        return rows[:n]
    chosen = [
        r
        for r in rows
        if len(r["instruction_id_list"]) == 1
        and reachable(r["instruction_id_list"][0], {k: v for k, v in r["kwargs"][0].items() if v is not None})
    ]
    return chosen[:n]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


MAX_RUN = 30  # word runs longer than this count as 30


def overlap(train: list[dict], ifeval: list[dict]) -> dict:
    """Identical prompt texts, and the longest run of consecutive words (lower case, ``\\w+``)
    that any training prompt shares with any IFEval prompt."""
    ifeval_texts = {r["prompt"].strip() for r in ifeval}
    identical = sum(r["prompt"].strip() in ifeval_texts for r in train)
    runs: set[tuple[str, ...]] = set()
    for r in ifeval:
        words = _words(r["prompt"])
        runs.update(
            tuple(words[i:j]) for i in range(len(words)) for j in range(i + 1, min(i + MAX_RUN, len(words)) + 1)
        )
    best, example = 0, None
    for r in train:
        words = _words(r["prompt"])
        for i in range(len(words)):
            j = i + best + 1  # only a longer run matters
            while j <= min(i + MAX_RUN, len(words)) and tuple(words[i:j]) in runs:
                best, example = j - i, " ".join(words[i:j])
                j += 1
    return {"identical_prompts": identical, "longest_shared_word_run": best, "example": example}


def last_kl(policy: Path, steps: int = 5) -> float | None:
    metrics = policy / "metrics.jsonl"
    if not metrics.exists():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    kl = [r["kl"] for r in rows if "kl" in r][-steps:]
    return sum(kl) / len(kl) if kl else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="the RL run folder (recipes/rlvr.yaml's ppo stage)")
    p.add_argument("--base", default="smollm2-135m-instruct", help="the model it started from")
    p.add_argument("--ifeval", default=str(REPO.parent / "shared" / "data" / "ifeval" / "input_data.jsonl"))
    p.add_argument("--train", default="shipped:rlvr_prompts/train")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--all-prompts", action="store_true", help="the first --n prompts, no subset rule")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--out", default="runs/bench-rlvr-ifeval")
    p.add_argument("--reuse", action="store_true", help="keep a model's scores already in --out")
    p.add_argument("--skip", nargs="*", default=[], choices=["base", "policy"], help="score only the others")
    args = p.parse_args()

    from instructkit.datasets import resolve_data_path
    from instructkit.eval.run import evaluate_ifeval

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ifeval = [json.loads(line) for line in Path(args.ifeval).read_text().splitlines() if line.strip()]
    train = [json.loads(line) for line in Path(resolve_data_path(args.train)).read_text().splitlines()]
    results: dict = {"overlap": overlap(train, ifeval)}
    chosen = subset(ifeval, args.n, args.all_prompts)
    results["subset"] = {"n": len(chosen), "keys": [r["key"] for r in chosen], "max_new_tokens": args.max_new_tokens}
    path = out / "ifeval_subset.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    print(
        f"overlap with IFEval: {results['overlap']['identical_prompts']} identical prompts; longest shared run "
        f"{results['overlap']['longest_shared_word_run']} words",
        flush=True,
    )

    for name, model in (("base", args.base), ("policy", args.policy)):
        done = out / f"{name}.json"
        if args.reuse and done.exists():  # a model already scored on this subset (same file, same budget)
            metrics = json.loads(done.read_text())
            assert metrics["n"] == len(chosen) and metrics["generation"]["max_new_tokens"] == args.max_new_tokens
        elif name in args.skip:
            continue
        else:
            run = evaluate_ifeval(
                data=path,
                model=model,
                out=str(done),
                max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size,
            )
            metrics = run["metrics"]
        results[name] = {
            k: v for k, v in metrics.items() if k.startswith(("prompt_level", "instruction_level", "per_type"))
        }
        (out / "results.json").write_text(json.dumps(results, indent=2))
    if "base" not in results or "policy" not in results:
        return
    results["kl_last_steps"] = last_kl(Path(args.policy))
    (out / "results.json").write_text(json.dumps(results, indent=2))

    print(f"\nIFEval subset: {len(chosen)} prompts, greedy, {args.max_new_tokens} new tokens")
    print(f"{'metric':28} {'base':>7} {'policy':>7} {'change':>7}")
    for key in ("prompt_level_strict", "prompt_level_loose", "instruction_level_strict", "instruction_level_loose"):
        b, a = results["base"][key], results["policy"][key]
        print(f"{key:28} {b:7.3f} {a:7.3f} {a - b:+7.3f}")
    print(f"KL to the starting model (mean of the last PPO steps): {results['kl_last_steps']}")
    print(f"\n{'instruction type (loose)':46} {'n':>3} {'base':>6} {'policy':>6}")
    for kind, tally in results["base"]["per_type"].items():
        after = results["policy"]["per_type"][kind]
        print(f"{kind:46} {tally['count']:3d} {tally['loose']:6.2f} {after['loose']:6.2f}")


if __name__ == "__main__":
    main()
