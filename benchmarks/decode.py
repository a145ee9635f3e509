"""Greedy decoding of the default model: instructkit's decode loop against HF ``generate`` (and
llama.cpp where ``llama-cpp-python`` is installed) in one run, with the machine's
memory-bandwidth bound measured in the same run.

What is measured (one process, the model loaded once, fp32 on CPU):

- **tokens/s** at each ``--batch-sizes``: the held-out prompts (``shipped:extract/test``, the
  first ``--prompts``) cut in order into left-padded batches, ``--max-new-tokens`` new tokens
  per row with ``min_new_tokens`` equal to it, so both sides decode the same count (the stop ids
  are forbidden until then, in HF by its ``MinNewTokensLengthLogitsProcessor``, here by the same
  masking). Counted: rows x new tokens actually returned. One short warm-up batch first.
- **the bound**: a 256 MiB tensor copy (bytes read + written per second, best of 5, torch on the
  same threads) over the bytes of weights one decode step reads (every parameter once; an untied
  input embedding is not read, only its rows).
- **identity**: the new tokens of every row, ours against HF, at every batch size; and the
  texts :func:`instructkit.generation.generate` returns (normal stopping) against HF
  ``generate`` through the same stop rules.
- **where HF's time goes** at batch 1: the share of each step spent inside the model's forward
  (timed by hooks on the top module) for HF and for ours, and the torch.profiler table of HF.
- ``--compile``: our loop with the one-token step through ``torch.compile`` (compile time apart).
- ``--precisions bf16 int8``: our loop on a bf16 copy and on a torchao int8 weight-only copy,
  with the share of rows whose tokens equal fp32's.

    .venv/bin/python benchmarks/decode.py
    .venv/bin/python benchmarks/decode.py --prompts 8 --max-new-tokens 32 --batch-sizes 1 8 --no-profile
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, machine_line, markdown_table, save_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "decode.json"


def copy_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Bytes read + written per second by ``Tensor.copy_`` of ``mib`` MiB (best of ``repeats``)."""
    import torch

    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - started)
    return 2 * src.numel() * 4 / best


def weight_bytes_per_token(model: Any) -> int:
    """Bytes of weights one decode step reads: every parameter once (a tied embedding is read
    whole as the LM head), except an untied input embedding, of which only the rows are read."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != embed.data_ptr():
        total -= embed.numel() * embed.element_size()
    return total


class ForwardTimer:
    """Wall seconds spent inside ``model``'s top-level forward, by a pre- and a post-hook."""

    def __init__(self, model: Any) -> None:
        self.seconds, self.calls, self._t0 = 0.0, 0, 0.0
        self._handles = [
            model.register_forward_pre_hook(lambda *_: self._start()),
            model.register_forward_hook(lambda *_: self._stop()),
        ]

    def _start(self) -> None:
        self._t0 = time.perf_counter()

    def _stop(self) -> None:
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def hf_new_tokens(model, input_ids, mask, *, new: int, stop_ids, pad_id):
    import torch

    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
            eos_token_id=list(stop_ids), pad_token_id=pad_id,
        )  # fmt: skip
    return out[:, input_ids.shape[1] :]


def ours_new_tokens(model, input_ids, mask, *, new: int, stop_ids, pad_id, compile: bool = False):
    from instructkit.decoding import decode

    return decode(
        model, input_ids, mask, max_new_tokens=new, min_new_tokens=new, stop_ids=stop_ids, pad_id=pad_id,
        compile=compile,
    )  # fmt: skip


def timed(run, model, batches, *, new: int, stop_ids, pad_id, **kw) -> dict[str, Any]:
    """Warm up on the first batch (4 tokens), then decode every batch; tokens/s over all."""
    first_ids, first_mask = batches[0]
    run(model, first_ids, first_mask, new=4, stop_ids=stop_ids, pad_id=pad_id, **kw)
    timer = ForwardTimer(model)
    rows, tokens = [], 0
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        for ids, mask in batches:
            out = run(model, ids, mask, new=new, stop_ids=stop_ids, pad_id=pad_id, **kw)
            rows += out.tolist()
            tokens += out.numel()
    finally:
        timer.remove()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2),
        # CPU seconds of this process (all threads) move less than wall seconds when other
        # processes share the CPU: the column to read on a busy machine.
        "cpu_seconds": round(cpu_seconds, 3),
        "tokens_per_cpu_s": round(tokens / cpu_seconds, 2),
        "forward_share": round(timer.seconds / seconds, 3),
        "forward_calls": timer.calls,
        "rows": rows,
    }


def profile_hf(model, ids, mask, *, stop_ids, pad_id, new: int = 16) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        hf_new_tokens(model, ids, mask, new=new, stop_ids=stop_ids, pad_id=pad_id)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def llama_cpp_line(model: Any, tokenizer: Any, prompts: list[list[int]], new: int, threads: int) -> dict[str, Any]:
    """Batch-1 greedy tokens/s of llama.cpp on the model exported to GGUF (f16), or why not."""
    try:
        import llama_cpp
    except ImportError as exc:
        return {
            "error": f"llama-cpp-python is not installed ({exc}); `pip install llama-cpp-python` builds it from "
            "source, which on the 2-core development machine was still compiling after 25 minutes (docs/decoding.md)"
        }
    import tempfile

    from instructkit.models.gguf_export import write_gguf

    with tempfile.TemporaryDirectory(prefix="decode-gguf-") as tmp:
        gguf = write_gguf(model, tokenizer, Path(tmp) / "model.gguf", quant="f16")
        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, n_threads=threads, n_batch=512, verbose=False)
        llm.eval(prompts[0])  # warm-up
        llm.reset()
        tokens, rows = 0, []
        started = time.perf_counter()
        for p in prompts:
            llm.reset()
            llm.eval(p)
            row = []
            for _ in range(new):
                t = int(llm.sample(top_k=1, temp=0.0))
                row.append(t)
                llm.eval([t])
            rows.append(row)
            tokens += len(row)
        seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 2), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--compile", action="store_true", help="also time the compiled one-token step")
    parser.add_argument("--precisions", nargs="*", default=[], choices=["bf16", "int8"])
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    import torch

    from instructkit.data.formats import load_records
    from instructkit.data.templates import encode_prompt
    from instructkit.datasets import resolve_data_path
    from instructkit.decoding import reduced_precision
    from instructkit.generation import generate, generate_new, left_pad, stop_tokens
    from instructkit.models.loading import load_model_and_tokenizer

    machine = machine_info(("torch", "transformers", "torchao", "llama-cpp-python"))
    bandwidth = copy_bandwidth()
    model, tokenizer = load_model_and_tokenizer(args.model, dtype="fp32", device="cpu")
    model.eval()
    records = load_records(resolve_data_path("shipped:extract/test")).records[: args.prompts]
    chats = [r.messages[:-1] for r in records]
    prompts = [encode_prompt(tokenizer, c) for c in chats]
    stop_ids, stop_strings = stop_tokens(model, tokenizer, None, None)
    pad_id = tokenizer.pad_token_id
    per_token = weight_bytes_per_token(model)
    bound = bandwidth / per_token
    new = args.max_new_tokens
    common = {"new": new, "stop_ids": stop_ids, "pad_id": pad_id}

    results: dict[str, Any] = {"lines": {}, "identity": {}}
    table = []
    for b in args.batch_sizes:
        batches = [left_pad(prompts[i : i + b], pad_id, "cpu") for i in range(0, len(prompts), b)]
        hf = timed(hf_new_tokens, model, batches, **common)
        ours = timed(ours_new_tokens, model, batches, **common)
        lines = {"HF generate": hf, "instructkit": ours}
        if args.compile:
            started = time.perf_counter()
            ours_new_tokens(model, *batches[0], compile=True, **common)  # compiles for this batch shape
            if len(batches[-1][0]) != b:
                ours_new_tokens(model, *batches[-1], compile=True, **common)
            compile_s = time.perf_counter() - started
            lines["instructkit compiled"] = timed(ours_new_tokens, model, batches, compile=True, **common)
            lines["instructkit compiled"]["compile_seconds"] = round(compile_s, 1)
        for precision in args.precisions:
            low = reduced_precision(model, precision)
            lines[f"instructkit {precision}"] = timed(ours_new_tokens, low, batches, **common)
            del low
        for name, line in lines.items():
            same = sum(a == h for a, h in zip(line["rows"], hf["rows"]))
            line["rows_equal_to_hf"] = f"{same}/{len(hf['rows'])}"
            results["lines"][f"{name} @ batch {b}"] = {k: v for k, v in line.items() if k != "rows"}
            table.append([
                name, b, line["tokens_per_s"], f"{line['tokens_per_s'] / hf['tokens_per_s']:.2f}x",
                f"{line['tokens_per_cpu_s'] / hf['tokens_per_cpu_s']:.2f}x",
                f"{100 * line['tokens_per_s'] / bound:.0f}%" if b == 1 else "-", line["forward_share"],
                line["rows_equal_to_hf"], line.get("compile_seconds", "-"),
            ])  # fmt: skip
        results["identity"][f"batch {b}"] = ours["rows"] == hf["rows"]

    if not args.no_llama_cpp:
        line = llama_cpp_line(model, tokenizer, prompts, new, torch.get_num_threads())
        if "error" in line:
            results["llama_cpp"] = line
        else:
            hf1 = results["lines"].get("HF generate @ batch 1", {}).get("tokens_per_s")
            same = "-"
            results["llama_cpp"] = {k: v for k, v in line.items() if k != "rows"}
            table.append([
                "llama.cpp (f16 GGUF)", 1, line["tokens_per_s"], f"{line['tokens_per_s'] / hf1:.2f}x" if hf1 else "-",
                "-", f"{100 * line['tokens_per_s'] / bound:.0f}%", "-", same, "-",
            ])  # fmt: skip

    # The texts callers get: generation.generate against HF generate with the same stop rules.
    b = max(args.batch_sizes)
    ours_text = generate(model, tokenizer, chats, max_new_tokens=new, batch_size=b)
    hf_text = []
    with torch.inference_mode():
        for i in range(0, len(prompts), b):
            ids, mask = left_pad(prompts[i : i + b], pad_id, "cpu")
            out, width = generate_new(
                model, ids, mask, max_new_tokens=new, do_sample=False, eos_token_id=stop_ids, pad_token_id=pad_id
            )
            from instructkit.generation import decode_response

            hf_text += [decode_response(tokenizer, r, stop_ids, stop_strings) for r in out[:, width:].tolist()]
    results["identity"]["texts"] = f"{sum(a == h for a, h in zip(ours_text, hf_text))}/{len(hf_text)}"

    if not args.no_profile:
        ids, mask = left_pad(prompts[:1], pad_id, "cpu")
        results["hf_profile_batch1"] = profile_hf(model, ids, mask, stop_ids=stop_ids, pad_id=pad_id)

    results["bound"] = {
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "weight_bytes_per_token": per_token,
        "bound_tokens_per_s": round(bound, 1),
    }
    headers = [
        "decoder", "batch", "tokens/s", "vs HF", "vs HF (CPU s)", "of bound", "in forward", "rows = HF", "compile s",
    ]  # fmt: skip
    print(markdown_table(headers, table))
    print(
        f"\nbound: {bandwidth / 1e9:.1f} GB/s copy bandwidth / {per_token / 2**20:.0f} MiB of weights per token = "
        f"{bound:.0f} tokens/s at batch 1; {args.prompts} prompts, {new} new tokens per row, fp32, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"greedy texts through generation.generate equal to HF generate: {results['identity']['texts']}")
    if "error" in results.get("llama_cpp", {}):
        print(f"llama.cpp: {results['llama_cpp']['error']}")
    print(machine_line(machine))
    if "hf_profile_batch1" in results:
        print("\nHF generate at batch 1, 16 tokens, torch.profiler:\n" + results["hf_profile_batch1"])
    with contextlib.suppress(Exception):
        machine["load_avg_1m_after"] = round(__import__("os").getloadavg()[0], 2)
    save_results(args.out, "decode", settings=vars(args), machine=machine, **results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
