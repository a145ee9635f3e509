"""`instructkit export`: hf, merged and gguf outputs load back as the model they came from."""

from __future__ import annotations

import pytest
import torch

from instructkit.cli import main
from instructkit.export import export
from instructkit.models.loading import load_model, load_tokenizer
from tests.tiny import tiny_model_dir


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory):
    """A run-shaped folder holding a LoRA adapter (nonzero B, so merging changes the weights)."""
    import peft

    root = tmp_path_factory.mktemp("export")
    base = tiny_model_dir(root / "base", seed=1)
    model = load_model(str(base), dtype="fp32", device="cpu")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    final = root / "run" / "final"
    lora.save_pretrained(final)
    load_tokenizer(str(base)).save_pretrained(final)
    (final / "instructkit_base.txt").write_text(str(base) + "\n")
    return root / "run", base


def _logits(spec):
    model = load_model(str(spec), dtype="fp32", device="cpu").eval()
    ids = torch.tensor([[5, 17, 230, 1000, 42]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_equals_the_adapter_and_differs_from_the_base(tmp_path, adapter_run):
    run, base = adapter_run
    result = export(str(run), tmp_path / "merged", fmt="merged")
    assert (tmp_path / "merged" / "config.json").is_file()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    torch.testing.assert_close(_logits(tmp_path / "merged"), _logits(run), atol=1e-5, rtol=1e-5)
    assert (_logits(tmp_path / "merged") - _logits(base)).abs().max() > 1e-3
    assert result["max_abs_logit_diff"] < 1e-4


def test_greedy_check_counts_the_held_out_prompts_whose_answers_are_the_same_text(tmp_path, adapter_run):
    from instructkit.data.formats import load_records
    from instructkit.datasets import resolve_data_path
    from instructkit.export import compare_greedy
    from instructkit.generation import generate

    run, base = adapter_run
    result = export(str(run), tmp_path / "merged", fmt="merged", check_prompts=6)
    assert (result["greedy_same"], result["greedy_prompts"], result["greedy_differ"]) == (6, 6, [])
    # Against the base (the adapter moved it), the differing prompts are exactly those whose
    # answers, generated one prompt at a time, differ.
    tokenizer = load_tokenizer(str(base))
    a, b = (load_model(str(m), dtype="fp32", device="cpu").eval() for m in (run, base))
    check = compare_greedy(a, b, tokenizer, "shipped:extract/test", 6, max_new_tokens=8)
    prompts = [r.messages[:-1] for r in load_records(resolve_data_path("shipped:extract/test")).records[:6]]
    alone = [
        (generate(a, tokenizer, [p], max_new_tokens=8)[0], generate(b, tokenizer, [p], max_new_tokens=8)[0])
        for p in prompts
    ]
    assert check["greedy_differ"] == [
        {"index": i, "source": x, "written": y} for i, (x, y) in enumerate(alone) if x != y
    ]
    assert check["greedy_same"] == sum(x == y for x, y in alone) < 6


def test_hf_keeps_the_adapter_on_its_base(tmp_path, adapter_run):
    run, _ = adapter_run
    export(str(run), tmp_path / "hf", fmt="hf")
    assert (tmp_path / "hf" / "adapter_config.json").is_file()
    torch.testing.assert_close(_logits(tmp_path / "hf"), _logits(run))


def test_gguf_through_the_command(tmp_path, adapter_run, capsys):
    run, _ = adapter_run
    out = tmp_path / "model.gguf"
    assert main(["export", "--model", str(run), "--format", "gguf", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "checked: loaded back" in printed and "agrees at 100%" in printed
    torch.testing.assert_close(_logits(out), _logits(run), atol=2e-2, rtol=0)  # f16 weights


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--format", "gguf", "--out", "x.bin"], "name it *.gguf"),
        (["--format", "merged", "--quant", "q8_0", "--out", "x"], "applies to --format gguf only"),
        (["--check-prompts", "-1", "--out", "x"], "--check-prompts must be >= 0"),
        (["--format", "gguf", "--rounding", "gptq", "--out", "x.gguf"], "use --format gguf --quant q8_0"),
        (
            ["--format", "gguf", "--quant", "q8_0", "--rounding", "gptq", "--calibration-examples", "0"]
            + ["--out", "x.gguf"],
            "--calibration-examples must be >= 1",
        ),
    ],
)
def test_bad_requests_exit_2_before_loading(tmp_path, adapter_run, capsys, argv, message):
    run, _ = adapter_run
    argv = [a if a not in ("x", "x.bin", "x.gguf") else str(tmp_path / a) for a in argv]
    assert main(["export", "--model", str(run), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_gptq_q8_0_export_writes_other_blocks_than_nearest_and_keeps_the_logits(tmp_path, adapter_run):
    import gguf

    run, _ = adapter_run
    kw = {"fmt": "gguf", "quant": "q8_0", "check_prompts": 2}
    nearest = export(str(run), tmp_path / "nearest.gguf", **kw)
    gptq = export(str(run), tmp_path / "gptq.gguf", rounding="gptq", calibration_examples=8, **kw)
    assert gptq["rounding"] == "gptq" and gptq["calibration_examples"] == 8 and "rounding" not in nearest
    assert gptq["bytes"] == nearest["bytes"]  # the same Q8_0 layout
    tensors = [{t.name: t for t in gguf.GGUFReader(tmp_path / f"{n}.gguf").tensors} for n in ("nearest", "gptq")]
    name = "blk.0.ffn_down.weight"
    assert tensors[0][name].tensor_type == tensors[1][name].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert not (tensors[0][name].data == tensors[1][name].data).all()
    assert (tensors[0]["token_embd.weight"].data == tensors[1]["token_embd.weight"].data).all()  # not a decoder linear
    torch.testing.assert_close(_logits(tmp_path / "gptq.gguf"), _logits(run), atol=5e-2, rtol=0)
