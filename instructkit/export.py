"""`instructkit export`: a model or run folder out as an HF folder, merged weights, or one GGUF file.

- ``hf``: the model as it is saved (a peft adapter stays an adapter, with the base it names);
- ``merged``: adapters folded into the base, an ordinary HF folder any tool loads;
- ``gguf``: the merged model and its tokenizer in one GGUF file (``--quant f16|q8_0|q4_0``), for
  llama.cpp, Ollama and transformers. ``q8_0`` rounds to nearest, or with ``rounding="gptq"``
  by GPTQ on calibration conversations (:mod:`instructkit.models.gptq`): the same Q8_0 blocks,
  chosen so that each layer's output moves least.

Every export is checked after writing: the written model is loaded back and its next-token logits
on a probe text are compared with the source's (the largest absolute difference is reported,
with whether the greedy next tokens agree), and both models answer the first ``check_prompts``
held-out prompts of ``check_data`` greedily: how many answers are the same text. Outputs appear
whole or not at all.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

ExportFormat = Literal["hf", "merged", "gguf"]
FORMATS = ("hf", "merged", "gguf")
ROUNDINGS = ("nearest", "gptq")
PROBE = "Ada ordered three lamps for the office in Oslo. Reply with the name, the item, the count and the city."


def _probe_logits(model: Any, tokenizer: Any):
    import torch

    ids = torch.tensor([tokenizer(PROBE)["input_ids"]], device=next(model.parameters()).device)
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float().cpu()


def compare(source: Any, written: Any, tokenizer: Any) -> dict[str, Any]:
    """Largest logit difference on the probe text and the share of positions whose argmax agrees."""
    a, b = _probe_logits(source, tokenizer), _probe_logits(written, tokenizer)
    return {
        "max_abs_logit_diff": float((a - b).abs().max()),
        "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        "positions": int(a.shape[0]),
    }


def compare_greedy(
    source: Any, written: Any, tokenizer: Any, data: str, prompts: int, max_new_tokens: int = 32
) -> dict[str, Any]:
    """Greedy answers of both models to the first ``prompts`` held-out prompts of ``data``: how many
    are the same text, and the prompts where they differ (index, source answer, written answer)."""
    from instructkit.data.formats import load_records
    from instructkit.datasets import resolve_data_path
    from instructkit.generation import generate

    records = load_records(resolve_data_path(data)).records[:prompts]
    asked = [r.messages[:-1] if r.messages[-1].role == "assistant" else r.messages for r in records]
    a = generate(source, tokenizer, asked, max_new_tokens=max_new_tokens, batch_size=len(asked))
    b = generate(written, tokenizer, asked, max_new_tokens=max_new_tokens, batch_size=len(asked))
    differ = [{"index": i, "source": x, "written": y} for i, (x, y) in enumerate(zip(a, b)) if x != y]
    return {"greedy_same": len(asked) - len(differ), "greedy_prompts": len(asked), "greedy_differ": differ}


def calibration_batches(tokenizer: Any, data: str, examples: int, batch_size: int = 16) -> list[dict[str, Any]]:
    """The first ``examples`` conversations of ``data``, chat template applied, as padded batches
    (input_ids, attention_mask) for GPTQ's calibration."""
    from instructkit.data.formats import load_records
    from instructkit.datasets import resolve_data_path

    records = load_records(resolve_data_path(data)).records[:examples]
    texts = [
        tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in r.messages], tokenize=False)
        for r in records
    ]
    batches = []
    for i in range(0, len(texts), batch_size):
        b = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        batches.append({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
    return batches


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32").eval()


def export(
    model: str,
    out: str | os.PathLike,
    *,
    fmt: str = "merged",
    quant: str = "f16",
    check_data: str = "shipped:extract/test",
    check_prompts: int = 20,
    rounding: str = "nearest",
    calibration_data: str = "shipped:extract/train",
    calibration_examples: int = 256,
) -> dict[str, Any]:
    """Export ``model`` (a spec: run folder, HF folder, adapter, embedded name) to ``out``; the
    check compares greedy answers on ``check_prompts`` prompts of ``check_data`` (0: none).
    ``rounding="gptq"`` (q8_0 only) chooses the blocks by GPTQ on the first
    ``calibration_examples`` conversations of ``calibration_data``."""
    from instructkit.errors import InputError, did_you_mean
    from instructkit.fileio import atomic_dir
    from instructkit.models import bottleneck
    from instructkit.models.gguf_export import QUANTS, write_gguf
    from instructkit.models.loading import QUANTIZATION_RECORD, load_model, load_tokenizer, resolve

    if fmt not in FORMATS:
        raise InputError(
            f"unknown format {fmt!r} (one of {', '.join(FORMATS)}){did_you_mean(fmt, FORMATS)}", field="format"
        )
    if quant != "f16" and fmt != "gguf":
        raise InputError(f"--quant {quant} applies to --format gguf only", field="quant")
    if quant not in QUANTS:
        raise InputError(f"unknown GGUF quantisation {quant!r} (one of {', '.join(QUANTS)})", field="quant")
    out = Path(out)
    if fmt == "gguf" and out.suffix != ".gguf":
        raise InputError(f"a GGUF export is one file; name it *.gguf, not {out}", field="out")
    if fmt != "hf" and resolve(model).bottleneck:
        raise InputError(
            f"{model} holds bottleneck adapters (houlsby, pfeiffer), which cannot merge into the base "
            "(a nonlinearity sits between their projections); use --format hf",
            field="format",
        )
    if rounding not in ROUNDINGS:
        raise InputError(
            f"unknown rounding {rounding!r} (one of {', '.join(ROUNDINGS)}){did_you_mean(rounding, ROUNDINGS)}",
            field="rounding",
        )
    if rounding == "gptq" and not (fmt == "gguf" and quant == "q8_0"):
        raise InputError("rounding gptq writes GGUF q8_0 blocks: use --format gguf --quant q8_0", field="rounding")
    if rounding == "gptq" and calibration_examples < 1:
        raise InputError(
            f"--calibration-examples must be >= 1, got {calibration_examples}", field="calibration_examples"
        )
    if check_prompts < 0:
        raise InputError(f"--check-prompts must be >= 0, got {check_prompts}", field="check_prompts")
    if check_prompts:
        from instructkit.data.check import check_data_file

        check_data_file(check_data, "conversations")
    if rounding == "gptq":
        from instructkit.data.check import check_data_file

        check_data_file(calibration_data, "conversations")
    tokenizer = load_tokenizer(model)
    source = load_model(model, dtype="fp32", device="cpu", merge_adapter=fmt != "hf").eval()
    if fmt == "gguf":
        blocks = None
        if rounding == "gptq":
            import copy

            from instructkit.models.gptq import sequential_gptq

            batches = calibration_batches(tokenizer, calibration_data, calibration_examples)
            blocks = sequential_gptq(copy.deepcopy(source), batches)  # the source stays as it is, for the check
        write_gguf(source, tokenizer, out, quant=quant, blocks=blocks)
        written = _load_gguf(out)
    else:
        with atomic_dir(out) as tmp:
            if bottleneck.spec_of(source) is not None:  # its own layout, naming the base it was loaded on
                bottleneck.save(source, tmp, base_spec=None)
            else:
                source.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            adapter = resolve(model).adapter if fmt == "hf" else None
            # The base it sits on (an earlier stage's run), and how a qlora base was quantised.
            for name in ("instructkit_base.txt", QUANTIZATION_RECORD):
                marker = Path(adapter, name) if adapter else None
                if marker is not None and marker.is_file():
                    (tmp / marker.name).write_text(marker.read_text())
        written = load_model(str(out), dtype="fp32", device="cpu").eval()
    size = out.stat().st_size if out.is_file() else sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    result = {"format": fmt, "quant": quant if fmt == "gguf" else None, "out": str(out), "bytes": size}
    if rounding == "gptq":
        result |= {
            "rounding": "gptq",
            "calibration_data": calibration_data,
            "calibration_examples": calibration_examples,
        }
    result |= compare(source, written, tokenizer)
    if check_prompts:
        result |= compare_greedy(source, written, tokenizer, check_data, check_prompts)
    return result
