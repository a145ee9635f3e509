"""SFT end to end on a tiny model built from a config: learning, invariances, resume, outputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from instructkit.train.engine import MetricsLog, StopTraining
from instructkit.train.sft import sft
from tests.tiny import toy_conversations, write_jsonl
from tests.train.invariants import losses

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", toy_conversations(40))


def config(tiny: Path, data: Path, out: Path, **train) -> dict:
    return {
        "model": str(tiny),
        "out": str(out),
        "data": {"path": str(data), "val_fraction": 0.0, "max_length": 64},
        "peft": {"method": "full"},
        "optim": {"lr": 3e-3, "scheduler": "linear", "warmup_steps": 1},
        "train": {"batch_size": 8, "grad_accum": 1, "max_steps": 6, "progress": False, **train},
    }


def torchrun_sft(config: Path, *, port: int) -> subprocess.CompletedProcess:
    """`instructkit sft --config CONFIG` in 2 CPU processes (gloo DDP) through torchrun."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [torchrun, "--nproc_per_node", "2", "--master_port", str(port), "-m", "instructkit", "sft", "--config"]
    return subprocess.run([*command, str(config)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_sft_lowers_the_loss_and_writes_the_run_folder(tiny, data, tmp_path):
    cfg = config(tiny, data, tmp_path / "run", max_steps=25)
    cfg["data"]["val_fraction"] = 0.2
    cfg["optim"]["lr"] = 2e-2
    summary = sft(cfg)
    curve = losses(tmp_path / "run")
    assert len(curve) == 25
    assert sum(curve[-5:]) / 5 < 0.6 * sum(curve[:5]) / 5
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "final/config.json", "final/model.safetensors"):
        assert (tmp_path / "run" / name).is_file(), name
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(first)
    assert summary["val_loss"] is not None and summary["steps"] == 25
    # final/ loads with plain transformers
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")


def test_gradient_accumulation_is_exact(tiny, data, tmp_path):
    """Batch 8 x accumulation 1 and batch 2 x accumulation 4 see the same 8 examples per step;
    with the loss divided by the step's total trained tokens (not a mean of micro-batch means)
    they take identical steps, so the loss curves agree to float rounding."""
    sft(config(tiny, data, tmp_path / "a", batch_size=8, grad_accum=1))
    sft(config(tiny, data, tmp_path / "b", batch_size=2, grad_accum=4))
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == len(b) == 6
    assert a[0] != a[-1]
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5


def test_mean_of_means_would_differ(tiny, data, tmp_path):
    """Control for the test above: micro-batches have different token counts, so averaging
    per-micro-batch means would not equal the token-weighted loss of the whole step."""
    from instructkit.data.formats import load_records
    from instructkit.data.templates import encode_conversation
    from tests.tiny import real_tokenizer

    tok = real_tokenizer()
    recs = load_records(str(data)).records[:8]
    counts = [sum(1 for x in encode_conversation(tok, r.messages).labels[1:] if x != -100) for r in recs]
    micro = [sum(counts[i : i + 2]) for i in range(0, 8, 2)]
    assert len(set(micro)) > 1


def test_interrupted_run_resumes_exactly(tiny, data, tmp_path):
    sft(config(tiny, data, tmp_path / "full", save_every=2, dropout=0.1))

    def crash(step: int) -> None:
        if step == 5:  # after step 5 is logged, before its checkpoint would exist
            raise StopTraining("simulated crash")

    with pytest.raises(StopTraining):
        sft(config(tiny, data, tmp_path / "cut", save_every=2, dropout=0.1), on_step=crash)
    assert not (tmp_path / "cut" / "final").exists()
    sft(config(tiny, data, tmp_path / "cut", save_every=2, dropout=0.1))
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert [r["step"] for r in MetricsLog(tmp_path / "cut" / "metrics.jsonl").read()] == list(range(1, 7))
    assert full == cut  # exact: same weights, optimizer, schedule, RNG and data position


def test_lora_saves_an_adapter_and_merged_weights(tiny, data, tmp_path):
    cfg = config(tiny, data, tmp_path / "lora", max_steps=3)
    cfg["peft"] = {"method": "lora", "r": 4, "alpha": 8}
    cfg["save_merged"] = True
    summary = sft(cfg)
    assert (tmp_path / "lora" / "final" / "adapter_config.json").is_file()
    assert (tmp_path / "lora" / "merged" / "config.json").is_file()
    assert summary["trainable_parameters"] < summary["total_parameters"] / 2
    from instructkit.models.loading import load_model

    model = load_model(tmp_path / "lora", device="cpu")
    assert hasattr(model, "peft_config")


def test_lora_sft_from_a_lora_run_starts_from_that_run(tiny, data, tmp_path):
    """An sft stage whose model is an adapter run folds the earlier adapter in before its own LoRA.
    With a learning rate of 1e-9 the second run barely moves, so its result must equal the first
    run merged (before the fix it equalled the base model: the earlier adapter was dropped)."""
    import torch

    from instructkit.models.loading import load_model

    first = config(tiny, data, tmp_path / "first", max_steps=3)
    first["peft"] = {"method": "lora", "r": 4, "alpha": 8}
    sft(first)
    second = config(tmp_path / "first", data, tmp_path / "second", max_steps=1)
    second["peft"] = {"method": "lora", "r": 4, "alpha": 8}
    second["optim"] = {"lr": 1e-9, "scheduler": "constant"}
    sft(second)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        after = load_model(tmp_path / "second", device="cpu", merge_adapter=True).eval()(input_ids=ids).logits
        earlier = load_model(tmp_path / "first", device="cpu", merge_adapter=True).eval()(input_ids=ids).logits
        base = load_model(tiny, device="cpu").eval()(input_ids=ids).logits
    assert (earlier - base).abs().max() > 1e-3  # the earlier run changed the model
    torch.testing.assert_close(after, earlier, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("peft", [{"method": "freeze", "trainable_layers": 1}, {"method": "freeze", "ffn_only": True}])
def test_freezing_trains_only_the_chosen_parameters(tiny, data, tmp_path, peft):
    from safetensors.torch import load_file

    cfg = config(tiny, data, tmp_path / "frz", max_steps=2, save_every=1)
    cfg["peft"] = peft
    sft(cfg)
    saved = load_file(str(tmp_path / "frz" / "checkpoints" / "step-000002" / "trainable.safetensors"))
    if "trainable_layers" in peft:
        assert saved and all(".layers.1." in n for n in saved)
    else:
        assert saved and all(".mlp." in n for n in saved)
    assert not any("embed" in n for n in saved)


@pytest.mark.dist
def test_two_processes_match_one(tiny, data, tmp_path):
    """torchrun with 2 CPU processes (gloo DDP) and batch 4 each takes the same steps as one
    process with batch 8: same examples per step, same token-weighted loss."""
    cfg_one = config(tiny, data, tmp_path / "one", batch_size=8)
    cfg_two = config(tiny, data, tmp_path / "two", batch_size=4)
    (tmp_path / "two.yaml").write_text(json.dumps(cfg_two))
    sft(cfg_one)
    proc = torchrun_sft(tmp_path / "two.yaml", port=29517)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    assert max(abs(x - y) for x, y in zip(one, two)) < 1e-4


@pytest.mark.dist
def test_two_processes_with_one_held_out_record_finish_with_the_same_val_loss(tiny, data, tmp_path):
    """One validation record for two processes: one process has nothing to evaluate. The loop
    must not wait on it (it hung in DDP's forward), and the loss is the one record's."""
    one_record = write_jsonl(tmp_path / "val.jsonl", toy_conversations(1))
    cfg_one = config(tiny, data, tmp_path / "one", batch_size=8, max_steps=2)
    cfg_two = config(tiny, data, tmp_path / "two", batch_size=4, max_steps=2)
    for cfg in (cfg_one, cfg_two):
        cfg["data"]["val_path"] = str(one_record)
    (tmp_path / "two.yaml").write_text(json.dumps(cfg_two))
    single = sft(cfg_one)
    proc = torchrun_sft(tmp_path / "two.yaml", port=29518)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["val_examples"] == 1 and two["val_loss"] == pytest.approx(single["val_loss"], rel=1e-4)


def test_cut_response_keeps_long_examples_that_whole_turns_leaves_out(tiny, tmp_path, capsys):
    """Four demonstrations whose answer runs past max_length: left out and counted by default, kept
    with their answer cut (and its end-of-turn marker trained) with data.truncation: cut-response."""
    from instructkit.data.formats import load_records
    from instructkit.data.templates import encode_conversation
    from tests.tiny import real_tokenizer

    long = [
        {
            "messages": [
                {"role": "user", "content": f"count to {n}"},
                {"role": "assistant", "content": " ".join(map(str, range(200)))},
            ]
        }
        for n in range(4)
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", toy_conversations(12) + long)
    base = config(tiny, path, tmp_path / "whole", max_steps=1)
    whole = sft(base)
    assert whole["dropped_too_long"] == 4 and whole["cut_to_fit"] == 0 and whole["train_examples"] == 12
    assert "4 training examples did not fit max_length=64 and were left out (data.truncation: cut-response" in (
        capsys.readouterr().out
    )
    cut_cfg = config(tiny, path, tmp_path / "cut", max_steps=1)
    cut_cfg["data"]["truncation"] = "cut-response"
    cut = sft(cut_cfg)
    assert cut["dropped_too_long"] == 0 and cut["cut_to_fit"] == 4 and cut["train_examples"] == 16
    assert "4 training examples were longer than max_length=64: their last kept assistant turn was cut" in (
        capsys.readouterr().out
    )
    tok = real_tokenizer()
    record = load_records(str(path)).records[-1]
    enc = encode_conversation(tok, record.messages, max_length=64, truncation="cut-response")
    assert len(enc.input_ids) <= 64 and enc.cut
    assert tok.decode(enc.input_ids[-1:]) == "<|im_end|>" and enc.labels[-1] == enc.input_ids[-1]  # marker trained
    from instructkit.errors import InputError
    from instructkit.train.dpo import dpo

    with pytest.raises(InputError, match="data.truncation"):
        dpo({"model": str(tiny), "data": {"path": str(path), "truncation": "cut-response"}})
