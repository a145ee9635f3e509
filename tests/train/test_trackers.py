"""``train.report_to``: a tiny SFT run's metrics and config, read back from the trackers' own
stores (TensorBoard's event files through tensorboard's EventAccumulator, MLflow's file store
through MlflowClient) and compared with ``metrics.jsonl``, the run's record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructkit.errors import InputError
from instructkit.train.engine import MetricsLog, StopTraining, flat_config
from instructkit.train.sft import sft
from tests.tiny import toy_conversations, write_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", toy_conversations(40))


def config(tiny: Path, data: Path, out: Path, report_to: list[str], **train) -> dict:
    return {
        "model": str(tiny),
        "out": str(out),
        "data": {"path": str(data), "val_fraction": 0.2, "max_length": 64},
        "peft": {"method": "lora", "r": 4, "alpha": 8},
        "optim": {"lr": 1e-2, "scheduler": "linear", "warmup_steps": 1},
        "train": {"batch_size": 8, "max_steps": 4, "eval_every": 2, "progress": False, "report_to": report_to, **train},
    }


def logged(out: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as metric -> {step: value}, every numeric key but the step itself."""
    series: dict[str, dict[int, float]] = {}
    for record in MetricsLog(out / "metrics.jsonl").read():
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                series.setdefault(key, {})[record["step"]] = float(value)
    return series


def tensorboard_scalars(out: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    series: dict[str, dict[int, float]] = {}
    for tag in events.Tags()["scalars"]:
        points = [(e.step, e.value) for e in events.Scalars(tag)]
        assert len({s for s, _ in points}) == len(points), f"{tag}: a step logged twice"
        series[tag] = dict(points)
    return series


def mlflow_run(out: Path):
    from mlflow.tracking import MlflowClient

    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    return client, client.get_run(run_id)


def mlflow_series(out: Path, keys) -> dict[str, list[tuple[int, float]]]:
    client, run = mlflow_run(out)
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)) for k in keys}


def assert_same(series: dict[str, dict[int, float]], expected: dict[str, dict[int, float]]) -> None:
    """Every metric at every step, TensorBoard's float32 against the JSON float64."""
    assert set(expected) <= set(series), sorted(set(expected) - set(series))
    for key, points in expected.items():
        assert sorted(series[key]) == sorted(points), key
        for step, value in points.items():
            assert series[key][step] == pytest.approx(value, rel=1e-6, abs=1e-6), (key, step)


def test_tensorboard_and_mlflow_hold_every_metric_at_every_step_and_the_config(
    tiny, data, tmp_path, monkeypatch
):  # fmt: skip
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    sft(config(tiny, data, out, ["tensorboard", "mlflow"]))
    expected = logged(out)
    # What the run logs: the step metrics at steps 1-4, the held-out loss at 2 and 4 only.
    assert {"loss", "lr", "tokens_per_s", "tokens", "epoch", "val_loss"} <= set(expected)
    assert sorted(expected["loss"]) == [1, 2, 3, 4] and sorted(expected["val_loss"]) == [2, 4]

    assert_same(tensorboard_scalars(out), expected)

    mlflow = mlflow_series(out, expected)
    assert_same({k: dict(v) for k, v in mlflow.items()}, expected)
    assert all(len(v) == len(expected[k]) for k, v in mlflow.items())  # each step once
    _, run = mlflow_run(out)
    params = run.data.params
    assert (
        params["optim.lr"] == "0.01"
        and params["peft.r"] == "4"
        and params["train.report_to"] == str(["tensorboard", "mlflow"]).replace("'", '"')
    )
    assert set(params) == set(flat_config(out / "config.yaml"))


def test_a_resumed_run_keeps_one_point_a_step_in_tensorboard_and_continues_the_mlflow_run(
    tiny, data, tmp_path, monkeypatch
):  # fmt: skip
    """Killed after step 3 with a checkpoint at 2, then rerun: metrics.jsonl drops step 3 and logs
    3 and 4 again; TensorBoard purges its step-3 points (``purge_step``), MLflow logs into the same
    run (its id in trackers.json), whose history then holds step 3 twice and ends with the resumed
    values."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    cfg = config(tiny, data, out, ["tensorboard", "mlflow"], save_every=2)

    def crash(step: int) -> None:
        if step == 3:
            raise StopTraining("simulated crash")

    with pytest.raises(StopTraining):
        sft(cfg, on_step=crash)
    first_id = json.loads((out / "trackers.json").read_text())["mlflow"]
    sft(cfg)
    expected = logged(out)
    assert sorted(expected["loss"]) == [1, 2, 3, 4]
    assert_same(tensorboard_scalars(out), expected)
    assert json.loads((out / "trackers.json").read_text())["mlflow"] == first_id
    history = mlflow_series(out, ["loss"])["loss"]
    assert [s for s, _ in history] == [1, 2, 3, 3, 4]
    last = {}
    client, run = mlflow_run(out)
    for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.timestamp):
        last[m.step] = m.value
    assert last == pytest.approx(expected["loss"])


def test_wandb_writes_an_offline_run_in_the_run_folder(tiny, data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "run"
    sft(config(tiny, data, out, ["wandb"], max_steps=2))
    wandb_id = json.loads((out / "trackers.json").read_text())["wandb"]
    runs = list((out / "wandb").glob(f"offline-run-*-{wandb_id}"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), sorted(p.name for p in (out / "wandb").iterdir())


def test_an_unknown_or_missing_tracker_is_a_config_error_before_any_model_loads(tiny, data, tmp_path, monkeypatch):
    with pytest.raises(InputError, match="report_to") as err:
        sft(config(tiny, data, tmp_path / "a", ["tensorbord"]))
    assert "tensorboard" in str(err.value)  # did you mean

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(InputError, match="'mlflow' is not installed"):
        sft(config(tiny, data, tmp_path / "b", ["mlflow"]))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
