"""The continual stage: every strategy end to end on a tiny model, replay's exact mix, EWC's and
LwF's terms at their reference points, adapter routing, the metrics of R, reruns and bad input."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest
import torch

from instructkit.config import ContinualConfig, ContinualStrategy, from_dict
from instructkit.errors import InputError
from instructkit.losses import continual as cl
from instructkit.stages import load_recipe
from instructkit.train import continual as ct
from tests.tiny import real_tokenizer, toy_conversations, write_jsonl

STRATEGIES = list(typing.get_args(ContinualStrategy))


def upper_conversations(n: int) -> list[dict]:
    """A second toy task on the same inputs: the words upper-cased instead of reversed."""
    rows = []
    for conv in toy_conversations(n):
        words = conv["messages"][0]["content"].removeprefix("reverse: ")
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": "upper: " + words},
                    {"role": "assistant", "content": words.upper()},
                ]
            }
        )
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("continual-data")
    return {
        "rev_train": str(write_jsonl(d / "rev_train.jsonl", toy_conversations(16))),
        "rev_test": str(write_jsonl(d / "rev_test.jsonl", toy_conversations(4))),
        "up_train": str(write_jsonl(d / "up_train.jsonl", upper_conversations(16))),
        "up_test": str(write_jsonl(d / "up_test.jsonl", upper_conversations(4))),
        "general": str(write_jsonl(d / "general.jsonl", [{"text": "The river runs past the old mill."}] * 3)),
    }


def config(tiny: Path, data: dict[str, str], out: Path, **extra) -> dict:
    cfg = {
        "model": str(tiny),
        "out": str(out),
        "tasks": [
            {"name": "rev", "train": data["rev_train"], "test": data["rev_test"], "steps": 2},
            {"name": "up", "train": data["up_train"], "test": data["up_test"], "steps": 2},
        ],
        "strategies": STRATEGIES,
        "data": {"max_length": 64, "general": data["general"]},
        "eval": {"max_new_tokens": 4, "batch_size": 4},
        "peft": {"method": "lora", "r": 4, "alpha": 8},
        "optim": {"lr": 1e-2},
        "train": {"batch_size": 4, "progress": False},
    }
    cfg.update(extra)
    return cfg


def run_stage(cfg: dict):
    from instructkit.pipeline import continual

    return continual(cfg)


# ----------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def finished(tiny, data, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("continual-run") / "continual"
    return run_stage(config(tiny, data, out)), out


def test_every_strategy_fills_an_accuracy_matrix_of_the_tasks_shape(finished):
    summary, out = finished
    assert summary["tasks"] == ["rev", "up"]
    assert list(summary["strategies"]) == STRATEGIES
    assert len(summary["baseline"]["exact_match"]) == 2
    for name, s in summary["strategies"].items():
        assert len(s["R"]) == 2 and all(len(row) == 2 for row in s["R"]), name
        assert all(0.0 <= x <= 1.0 for row in s["R"] for x in row)
        assert len(s["perplexity"]) == 2 and all(p > 1.0 for p in s["perplexity"])
        for i, task in enumerate(["rev", "up"]):
            folder = out / name / f"{i}-{task}"
            assert (folder / "summary.json").is_file() and (folder / "final" / "adapter_model.safetensors").is_file()
            assert len((folder / "heldout" / "rev.samples.jsonl").read_text().splitlines()) == 4
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "ewc" / "0-rev" / "ewc.safetensors").is_file()  # the Fisher task 1 is penalised with
    assert not (out / "ewc" / "1-up" / "ewc.safetensors").exists()  # no task after the last: none taken


def test_the_metrics_are_the_losses_functions_of_R(finished):
    summary, _ = finished
    b = summary["baseline"]["exact_match"]
    for s in summary["strategies"].values():
        R = s["R"]
        assert s["acc"] == cl.average_accuracy(R)
        assert s["bwt"] == cl.backward_transfer(R)
        assert s["fwt"] == cl.forward_transfer(R, b)
        assert (s["forgetting"], s["forgetting_mean"]) == cl.forgetting(R)
        assert s["last_task"] == R[-1][-1]


def test_adapter_per_task_leaves_earlier_tasks_as_they_were_learned(finished):
    """Each task has its own adapter, frozen once trained, and a task not trained yet is
    answered by the starting model: so R[1][0] == R[0][0] (BWT 0) and R[0][1] == b[1] (FWT 0)."""
    summary, _ = finished
    s, b = summary["strategies"]["adapter_per_task"], summary["baseline"]["exact_match"]
    assert s["R"][1][0] == s["R"][0][0] and s["R"][0][1] == b[1]
    assert s["bwt"] == 0.0 and s["fwt"] == 0.0
    # The general text goes to no task's adapter: the starting model's perplexity.
    assert s["perplexity"] == pytest.approx([summary["baseline"]["perplexity"]] * 2, rel=1e-5)


def test_a_rerun_of_a_finished_stage_returns_its_summary(finished, tiny, data):
    summary, out = finished
    again = run_stage(config(tiny, data, out))
    assert again == summary


def test_routing_answers_each_task_with_its_own_adapter_as_if_loaded_alone(finished, tiny):
    from instructkit.models.loading import load_model

    _, out = finished
    folders = {"rev": out / "adapter_per_task" / "0-rev" / "final", "up": out / "adapter_per_task" / "1-up" / "final"}
    router = ct.AdapterRouter.load(str(tiny), folders)
    ids = torch.tensor([real_tokenizer()("reverse: red blue")["input_ids"]])
    logits = {}
    for name, folder in folders.items():
        with router.task(name) as model, torch.no_grad():
            logits[name] = model(input_ids=ids).logits
        alone = load_model(str(folder), dtype="fp32", device="cpu").eval()
        with torch.no_grad():
            torch.testing.assert_close(logits[name], alone(input_ids=ids).logits)
    assert not torch.allclose(logits["rev"], logits["up"])
    with router.task(None) as model, torch.no_grad():
        base = load_model(str(tiny), dtype="fp32", device="cpu").eval()
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits)


# ----------------------------------------------------------------------------------------------
# Rerun rules


def test_an_interrupted_stage_resumes_keeping_its_finished_tasks(tiny, data, tmp_path, monkeypatch):
    out = tmp_path / "continual"
    cfg = config(tiny, data, out, strategies=["naive"])
    calls = []
    real = ct.train_task

    def fail_on_second(run, strategy, i):
        calls.append(i)
        if i == 1 and calls.count(1) == 1:
            raise KeyboardInterrupt
        return real(run, strategy, i)

    monkeypatch.setattr(ct, "train_task", fail_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_stage(cfg)
    first = (out / "naive" / "0-rev" / "summary.json").read_text()
    assert not (out / "summary.json").exists()
    # The rerun keeps task 0 as it was (its summary untouched) and trains task 1.
    summary = run_stage(cfg)
    assert (out / "naive" / "0-rev" / "summary.json").read_text() == first
    assert summary["strategies"]["naive"]["R"][0] == json.loads(first)["row"]["exact_match"]
    assert calls == [0, 1, 0, 1]


def test_a_rerun_with_another_config_stops_and_overwrite_restarts(tiny, data, tmp_path):
    from instructkit.pipeline import continual

    out = tmp_path / "continual"
    cfg = config(tiny, data, out, strategies=["naive"])
    continual(cfg)
    changed = {**cfg, "optim": {"lr": 5e-3}}
    with pytest.raises(InputError, match="optim.lr"):
        continual(changed)
    summary = continual(changed, overwrite=True)
    assert summary["strategies"]["naive"]["R"]


# ----------------------------------------------------------------------------------------------
# Replay, EWC and LwF, each at the point where its result is known


def examples(lengths: list[int], tag: int) -> list[dict]:
    """Encoded examples with ``n`` trained tokens each (labels = ids there), marked by ``tag``."""
    return [{"input_ids": [tag] * (n + 1), "labels": [-100] + [tag] * n} for n in lengths]


def test_replay_mixes_exactly_the_configured_share_of_examples():
    """30 new examples at fraction 0.25: k old with k / (30 + k) = 0.25, so k = 10 (40 in all)."""
    new, old = examples([3] * 30, 1), examples([3] * 7, 2)
    epoch = ct.replay_mix(new, old, 0.25, "examples", seed=0)
    replayed = sum(e["input_ids"][0] == 2 for e in epoch)
    assert len(epoch) == 40 and replayed == 10
    assert replayed / len(epoch) == 0.25
    assert sorted(map(str, (e for e in epoch if e["input_ids"][0] == 1))) == sorted(map(str, new))  # each once


def test_replay_by_tokens_mixes_the_configured_share_of_trained_tokens():
    """New: 8 examples of 5 trained tokens (40); fraction 0.2 asks for 40 * 0.2 / 0.8 = 10 old
    tokens, which old examples of 2 tokens each hit exactly: 5 of them."""
    new, old = examples([5] * 8, 1), examples([2] * 20, 2)
    epoch = ct.replay_mix(new, old, 0.2, "tokens", seed=3)
    old_tokens = sum(len(e["labels"]) - 1 for e in epoch if e["input_ids"][0] == 2)
    all_tokens = sum(len(e["labels"]) - 1 for e in epoch)
    assert old_tokens == 10 and old_tokens / all_tokens == 0.2


def test_replay_of_the_first_task_has_nothing_to_mix():
    new = examples([3] * 4, 1)
    assert ct.replay_mix(new, [], 0.5, "examples", seed=0) == new


@pytest.fixture()
def lora_model(tiny):
    from instructkit.config import PeftConfig
    from instructkit.models.loading import load_model
    from instructkit.models.peft_methods import apply_method

    torch.manual_seed(0)
    model = apply_method(load_model(str(tiny), dtype="fp32", device="cpu"), PeftConfig(r=4, alpha=8, init="gaussian"))
    return model


def encoded(rows: list[dict]) -> list[dict]:
    from instructkit.data.encoders import encode_records
    from instructkit.data.formats import load_records

    tokenizer = real_tokenizer()
    path = write_jsonl(Path(__import__("tempfile").mkdtemp()) / "rows.jsonl", rows)
    enc, _ = encode_records(tokenizer, load_records(str(path)).records, template=None, max_length=64, where="t")
    return enc


def test_ewc_penalty_is_zero_at_the_fisher_point_and_grows_as_weights_move(lora_model):
    ex = encoded(toy_conversations(6))
    fisher = ct.task_fisher(lora_model, ex, real_tokenizer().pad_token_id, batch_size=4)
    params = ct.trainable(lora_model)
    assert fisher.keys() == params.keys() and any(float(f.sum()) > 0 for f in fisher.values())
    saved = {
        **{f"fisher.{n}": f for n, f in fisher.items()},
        **{f"anchor.{n}": p.detach().clone() for n, p in params.items()},
    }
    assert float(ct.ewc_penalty_of(lora_model, [saved], lam=10.0)) == 0.0
    penalties = []
    for step in (1e-3, 2e-3, 4e-3):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[f"anchor.{n}"] + step)
        penalties.append(float(ct.ewc_penalty_of(lora_model, [saved], lam=10.0)))
    # A quadratic: doubling the move quadruples the penalty.
    assert 0 < penalties[0] < penalties[1] < penalties[2]
    assert penalties[1] / penalties[0] == pytest.approx(4.0, rel=1e-3)
    assert penalties[2] / penalties[1] == pytest.approx(4.0, rel=1e-3)


def test_the_ewc_penalty_counts_once_per_step(lora_model):
    """(ce_sum + P * count) / count over the step = ce mean + P, however it is accumulated."""
    from instructkit.data.collate import lm_collate
    from instructkit.models.lm import CausalLMLoss

    lm = CausalLMLoss(lora_model)
    loss = ct.PenalisedLoss(lm, lambda: torch.tensor(0.75)).train()
    batch = lm_collate(real_tokenizer().pad_token_id)(encoded(toy_conversations(3)))
    ce, count = lm(**batch)
    total, count2 = loss(**batch)
    assert count2 == count
    torch.testing.assert_close(total / count, ce / count + 0.75)
    loss.eval()
    torch.testing.assert_close(loss(**batch)[0], ce)  # validation loss: the task loss alone


def test_lwf_term_is_zero_when_the_model_equals_the_previous_one(lora_model):
    from instructkit.data.collate import lm_collate
    from instructkit.models.lm import CausalLMLoss

    batch = lm_collate(real_tokenizer().pad_token_id)(encoded(toy_conversations(3)))
    params = ct.trainable(lora_model)
    same = {n: p.detach().clone() for n, p in params.items()}
    ce, _ = CausalLMLoss(lora_model)(**batch)
    loss = ct.DistilledLoss(lora_model, lambda: ct.swapped_weights(params, same), 1.0, 2.0).train()
    total, _ = loss(**batch)
    torch.testing.assert_close(total, ce, rtol=1e-5, atol=1e-5)
    # Against another previous model the term is positive, and the weights are left as they were.
    moved = {n: p + 0.05 for n, p in same.items()}
    loss = ct.DistilledLoss(lora_model, lambda: ct.swapped_weights(params, moved), 1.0, 2.0).train()
    total, _ = loss(**batch)
    assert float(total) > float(ce) + 1e-4
    for n, p in params.items():
        assert torch.equal(p.detach(), same[n])
    # Its gradient flows to the student only.
    total.backward()
    assert all(p.grad is not None for p in params.values())


def test_lwf_on_the_first_task_distils_the_adapter_disabled(lora_model):
    """Once the adapter has moved the model differs from the base, so the term is > 0; with the
    adapter disabled on both sides (base against base) it is 0."""
    from instructkit.data.collate import lm_collate
    from instructkit.models.lm import CausalLMLoss

    with torch.no_grad():
        for p in ct.trainable(lora_model).values():
            p.add_(0.05)  # a LoRA starts as the identity (B = 0): move it off
    batch = lm_collate(real_tokenizer().pad_token_id)(encoded(toy_conversations(3)))
    ce, _ = CausalLMLoss(lora_model)(**batch)
    total, _ = ct.DistilledLoss(lora_model, lora_model.disable_adapter, 1.0, 2.0).train()(**batch)
    assert float(total) > float(ce)
    with lora_model.disable_adapter():
        ce_base, _ = CausalLMLoss(lora_model)(**batch)
        total_base, _ = ct.DistilledLoss(lora_model, lora_model.disable_adapter, 1.0, 2.0).train()(**batch)
    torch.testing.assert_close(total_base, ce_base, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The registry and bad input


def test_the_strategy_registry_and_the_config_literal_agree():
    assert list(ct.STRATEGIES) == STRATEGIES


def load(tmp_path: Path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return load_recipe(path)


TASKS = """  tasks:
    - {name: a, train: shipped:extract/train, test: shipped:extract/test}
    - {name: b, train: shipped:label/train, test: shipped:label/test}
"""


def test_a_recipe_section_loads_with_ewc_lambda(tmp_path):
    r = load(tmp_path, "stages: [continual]\ncontinual:\n  strategies: [ewc]\n  ewc: {lambda: 5}\n" + TASKS)
    cfg = r.stage_config("continual")
    assert cfg.ewc.lambda_ == 5.0 and cfg.tasks[1].name == "b" and cfg.model == "smollm2-135m-instruct"


@pytest.mark.parametrize(
    "section, field, problem",
    [
        ("  strategies: [replay]\n  replay: {fraction: 1.0}\n", "continual.replay.fraction", "must lie in"),
        ("  strategies: [replay]\n  replay: {fraction: -0.1}\n", "continual.replay.fraction", "must lie in"),
        ("  strategies: [ewcc]\n", "continual.strategies", "did you mean 'ewc'"),
        ("  strategies: [naive]\n  ewc: {lambda: 5}\n", "continual.ewc", "ewc settings apply to the ewc strategy"),
        ("  strategies: [ewc]\n  replay: {fraction: 0.3}\n", "continual.replay", "apply to the replay strategy"),
        ("  strategies: [lwf]\n  lwf: {temperatur: 2}\n", "continual.lwf.temperatur", "did you mean 'temperature'"),
    ],
)
def test_bad_strategy_settings_are_rejected_with_the_field(tmp_path, section, field, problem):
    with pytest.raises(InputError, match=problem) as info:
        load(tmp_path, "stages: [continual]\ncontinual:\n" + section + TASKS)
    assert info.value.field == field and info.value.line is not None


def test_a_task_without_data_is_rejected_at_its_line(tmp_path):
    text = "stages: [continual]\ncontinual:\n  tasks:\n    - {name: a, train: shipped:extract/train, test: x}\n"
    text += "    - name: b\n      test: shipped:label/test\n"
    with pytest.raises(InputError, match="task 'b' has no training data") as info:
        load(tmp_path, text)
    assert info.value.field == "continual.tasks.1.train" and info.value.line == 5


def test_bad_input_is_exit_2_before_any_model_loads(tmp_path, monkeypatch, capsys):
    import instructkit.models.loading as loading
    from instructkit.cli import main

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    path = tmp_path / "recipe.yaml"
    path.write_text("stages: [continual]\ncontinual:\n  strategies: [replay]\n  replay: {fraction: 1.5}\n" + TASKS)
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "replay.fraction" in capsys.readouterr().err
    path.write_text("stages: [continual]\ncontinual:\n" + TASKS.replace("shipped:label/train", str(tmp_path / "no")))
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "continual.tasks.1.train" in capsys.readouterr().err


def test_the_shipped_recipe_loads_and_lists_all_five_strategies():
    r = load_recipe("continual")
    cfg = r.stage_config("continual")
    assert cfg.strategies == STRATEGIES
    assert [t.name for t in cfg.tasks] == ["extract", "label", "keysort"]


def test_from_dict_builds_a_continual_config_with_defaults():
    cfg = from_dict(
        ContinualConfig,
        {"tasks": [{"name": "a", "train": "x", "test": "y"}] * 1 + [{"name": "b", "train": "x", "test": "y"}]},
    )
    assert cfg.strategies == ["naive"] and cfg.ewc.lambda_ == 100.0


def test_the_report_draws_each_strategys_matrix_and_forgetting_inline(finished, tmp_path):
    import re

    from instructkit.report import render

    summary, _ = finished
    page = render({"recipe": "c", "stages": {"continual": summary}, "table": {}}, tmp_path)
    section = page[page.index('<section id="continual">') :]
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', section)
    assert images == ["accuracy matrices", "forgetting per strategy"]
    rows = re.findall(r"<tr><td>(\w+)</td>", section)
    assert rows == STRATEGIES
    assert "http://" not in page and "https://" not in page  # self-contained: no CDN


def test_a_recipe_without_a_continual_stage_has_no_continual_section(tmp_path):
    from instructkit.report import render

    assert 'id="continual"' not in render({"recipe": "r", "stages": {}, "table": {}}, tmp_path)
