"""Where GGUF q8_0 loses the default model's greedy text: each group of weight matrices rounded to
q8_0 alone (the `gguf` package's own quantize/dequantize, what `instructkit export --quant q8_0`
writes), scored against the fp32 model on the same teacher-forced held-out conversations.

For every variant: the share of positions whose next-token argmax is unchanged, the mean KL from
the fp32 next-token distribution, and the largest logit difference. The `f16` row is the f16
export's rounding, for scale. `q8_0, clipped scale` chooses each block's scale to minimise the
block's squared rounding error (a search below the max-abs scale, still a valid Q8_0 block), a
check that the plain max-abs rounding is not simply a poor encoder. `q8_0 GPTQ` is what
`instructkit export --quant q8_0 --rounding gptq` writes: the decoder layers' blocks chosen by GPTQ
on calibration conversations from the training split (`--calibration-*`), the embedding rounded
to nearest.

    .venv/bin/python benchmarks/gguf_q8_sensitivity.py --model smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, machine_line, markdown_table, save_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GROUPS = ("embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rounders() -> dict[str, Any]:
    import gguf
    import numpy as np

    q8 = gguf.GGMLQuantizationType.Q8_0

    def q8_0(a):
        return gguf.quants.dequantize(gguf.quants.quantize(a, q8), q8).reshape(a.shape)

    def clipped(a):
        blocks = a.reshape(-1, 32).astype(np.float64)
        amax = np.abs(blocks).max(1, keepdims=True)
        best, best_err = None, None
        for f in np.linspace(0.85, 1.0, 16):
            d = (amax * f / 127).astype(np.float16).astype(np.float64)
            d[d == 0] = 1.0
            r = np.clip(np.round(blocks / d), -128, 127) * d
            err = ((r - blocks) ** 2).sum(1, keepdims=True)
            if best is None:
                best, best_err = r, err
            else:
                better = err < best_err
                best, best_err = np.where(better, r, best), np.where(better, err, best_err)
        return best.reshape(a.shape).astype(np.float32)

    def f16(a):
        return a.astype(np.float16).astype(np.float32)

    return {"f16": f16, "q8_0": q8_0, "q8_0 clipped scale": clipped}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct", help="default: %(default)s")
    parser.add_argument("--data", default="shipped:extract/test", help="default: %(default)s")
    parser.add_argument("--conversations", type=int, default=40, help="default: %(default)s")
    parser.add_argument("--calibration-data", default="shipped:extract/train", help="GPTQ's (default: %(default)s)")
    parser.add_argument("--calibration-examples", type=int, default=256, help="default: %(default)s")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gguf_q8_sensitivity.json")
    args = parser.parse_args(argv)

    import copy

    import torch

    from instructkit.data.formats import load_records
    from instructkit.datasets import resolve_data_path
    from instructkit.export import calibration_batches
    from instructkit.models.gptq import dequantize, sequential_gptq
    from instructkit.models.loading import load_model_and_tokenizer

    machine = machine_info(("torch", "transformers", "gguf"))
    model, tokenizer = load_model_and_tokenizer(args.model, dtype="fp32", device="cpu", merge_adapter=True)
    model.eval()
    records = load_records(resolve_data_path(args.data)).records[: args.conversations]
    texts = [
        tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in r.messages], tokenize=False)
        for r in records
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        reference = model(**batch).logits[real]
    # parameters, not state_dict(): a tied LM head is the embedding matrix, rounded once
    original = {name: p.detach().clone() for name, p in model.named_parameters()}

    def score(name: str, rounding: Any, selected, chosen: dict | None = None) -> dict[str, Any]:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(original[n])
                if chosen is not None and n in chosen:
                    p.copy_(chosen[n])
                elif p.ndim == 2 and p.shape[-1] % 32 == 0 and selected(n):
                    p.copy_(torch.from_numpy(rounding(original[n].numpy())))
            logits = model(**batch).logits[real]
        kl = torch.nn.functional.kl_div(
            logits.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean"
        )
        return {
            "variant": name,
            "argmax_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
            "kl": float(kl),
            "max_abs_logit_diff": float((logits - reference).abs().max()),
        }

    rounding = rounders()
    results = [score(name, fn, lambda n: True) for name, fn in rounding.items()]
    print("-- GPTQ", file=sys.stderr, flush=True)
    calibration = calibration_batches(tokenizer, args.calibration_data, args.calibration_examples)
    with torch.no_grad():  # score() leaves the last variant's weights in place: GPTQ starts from fp32
        for n, p in model.named_parameters():
            p.copy_(original[n])
    blocks = sequential_gptq(copy.deepcopy(model), calibration)
    chosen = {n: dequantize(q, d) for n, (q, d) in blocks.items()}
    results.append(score("q8_0 GPTQ", rounding["q8_0"], lambda n: True, chosen))
    for group in GROUPS:
        print(f"-- {group}", file=sys.stderr, flush=True)
        results.append(score(f"q8_0 {group} only", rounding["q8_0"], lambda n, g=group: g in n))

    headers = ["weights rounded", "next-token argmax unchanged", "mean KL", "max |logit diff|"]
    rows = [
        [r["variant"], f"{r['argmax_agreement']:.4f}", f"{r['kl']:.5f}", f"{r['max_abs_logit_diff']:.3f}"]
        for r in results
    ]
    print(markdown_table(headers, rows))
    print(
        f"\nmodel {args.model}; {len(records)} conversations of {args.data}, teacher-forced, "
        f"{int(real.sum())} positions; fp32 forward passes with the rounded weights in place."
    )
    print(machine_line(machine))
    save_results(
        args.out, "gguf_q8_sensitivity", settings=vars(args) | {"out": str(args.out)}, machine=machine, results=results
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
