"""The classify recipe on a tiny BERT built from a config (MiniLM's WordPiece tokenizer): both
tasks train and score from the head, final/ reloads as a plain classifier with its labels, the
engine invariants hold, the loss matches transformers' Trainer step by step, and bad input is a
located InputError (exit 2 through ``instructkit classify``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from instructkit.errors import InputError
from instructkit.train.classify import classify
from tests.tiny import write_jsonl
from tests.train.invariants import assert_accumulation_is_exact, assert_resumes_exactly, losses, trl_parity_args

COLOURS = ["red", "blue"]
SIZES = ["small", "large"]
NAMES = ["Ada", "Omar", "Lena", "Ivan"]
CITIES = ["Paris", "Lima", "Oslo", "Quito"]
LR = 1e-2  # a 32-wide random BERT's pooled [CLS] needs it to move within 10 steps (1e-3 barely does)


def tiny_bert_dir(path: Path, head: str | None = None, labels: list[str] | None = None, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BERT (no dropout) with MiniLM's tokenizer; with ``head``, saved as that
    head over ``labels`` (sorted, as a LabelSet orders them), so every loader gets the same head."""
    import torch
    import transformers

    from instructkit.models.loading import load_tokenizer

    tokenizer = load_tokenizer("minilm-l6")
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    if head is None:
        model = transformers.BertModel(config)
    else:
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {x: i for i, x in enumerate(labels)}
        model = getattr(transformers, head)(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def tickets(n: int) -> list[dict]:
    """Instructed records: the same kind of text under two instructions, each asking for another label."""
    rows = []
    for i in range(n):
        colour, size = COLOURS[i % 2], SIZES[(i // 4) % 2]
        text = f"a {size} {colour} box number {i}"
        if i % 4 < 2:
            rows.append({"instruction": "Which colour is it?", "text": text, "label": colour})
        else:
            rows.append({"instruction": "Which size is it?", "text": text, "label": size})
    return rows


def sentences(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        name, city = NAMES[i % 4], CITIES[(i // 4) % 4]
        if i % 2:
            rows.append(
                {"tokens": [name, "Smith", "visited", city, "."], "tags": ["B-PER", "I-PER", "O", "B-LOC", "O"]}
            )
        else:
            rows.append({"tokens": ["In", city, ",", name, "slept"], "tags": ["O", "B-LOC", "O", "B-PER", "O"]})
    return rows


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return tiny_bert_dir(tmp_path_factory.mktemp("bert") / "model")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {
        "seq": write_jsonl(root / "seq.jsonl", tickets(32)),
        "seq8": write_jsonl(root / "seq8.jsonl", tickets(8)),  # one full batch a step: a tiny BERT learns it in 10
        "seq_test": write_jsonl(root / "seq_test.jsonl", tickets(12)),
        "tok": write_jsonl(root / "tok.jsonl", sentences(32)),
        "tok_test": write_jsonl(root / "tok_test.jsonl", sentences(8)),
    }


def config(model: Path, train: Path, out: Path, task: str | None, test: Path | None = None, **train_kw) -> dict:
    return {
        "model": str(model),
        "out": str(out),
        "task": task,
        "data": {"path": str(train), "val_fraction": 0.0, "test_path": str(test) if test else None, "max_length": 32},
        "optim": {"lr": LR, "scheduler": "constant"},
        "train": {"batch_size": 8, "max_steps": 6, "progress": False, "log_every": 1, **train_kw},
    }


@pytest.mark.parametrize(
    ("task", "train", "test", "auto"),
    [
        ("seq_classification", "seq8", "seq_test", "AutoModelForSequenceClassification"),
        ("token_classification", "tok", "tok_test", "AutoModelForTokenClassification"),
    ],
)
def test_trains_scores_and_saves_a_plain_classifier(bert, data, tmp_path, task, train, test, auto):
    import torch
    import transformers

    from instructkit.data.tasks import LabelSet

    out = tmp_path / "run"
    summary = classify(config(bert, data[train], out, task, data[test], max_steps=12))
    curve = losses(out)
    assert len(curve) == 12 and curve[-1] < curve[0]
    held = json.loads((out / "heldout.json").read_text())
    assert held["task"] == task and held["before"] is not None and held["after"] is not None
    assert summary["heldout"] == held
    # final/ is a plain classifier of the training labels: config.json as HF writes it, and labels.json.
    labels = LabelSet.load(out / "final" / "labels.json").labels
    rows = tickets(8) if train == "seq8" else sentences(32)
    expected = sorted({x for r in rows for x in ([r["label"]] if "label" in r else r["tags"])})
    assert list(labels) == expected
    model = getattr(transformers, auto).from_pretrained(out / "final")
    assert model.config.id2label == dict(enumerate(expected))
    suffix = "ForSequenceClassification" if train == "seq8" else "ForTokenClassification"
    assert model.config.architectures[0].endswith(suffix)
    # The head saved is the head trained: rescoring the held-out split from final/ gives `after`.
    from instructkit.config import ClassifyConfig, load_config
    from instructkit.data.tasks import read_classification, read_tagged
    from instructkit.models.heads import classifier_collate, head_scores
    from instructkit.models.loading import load_tokenizer
    from instructkit.train.classify import TaskData, encode_data

    cfg = load_config(ClassifyConfig, None, base=config(bert, data[train], out, task, data[test]))
    read = read_tagged if train == "tok" else read_classification
    records = TaskData(read(data[train]), [], read(data[test]), LabelSet(labels))
    tokenizer = load_tokenizer(str(out / "final"))
    enc = encode_data(cfg, train == "tok", tokenizer, records)
    with torch.no_grad():
        again = head_scores(model, enc.held_out, LabelSet(labels), classifier_collate(tokenizer.pad_token_id), 16)
    assert again == held["after"]


def test_lora_trains_the_head_and_merges(bert, data, tmp_path):
    """LoRA on an encoder: only the adapter and the head train, and final/ is the merged model."""
    import torch
    import transformers

    out = tmp_path / "lora"
    cfg = config(bert, data["seq8"], out, "seq_classification", data["seq_test"], max_steps=10)
    cfg["peft"] = {"method": "lora", "r": 4, "alpha": 8}
    summary = classify(cfg)
    assert summary["trainable_parameters"] < summary["total_parameters"] / 5
    assert losses(out)[-1] < losses(out)[0]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert not any("lora" in name for name, _ in model.named_parameters())
    # The classifier moved from its start (seeded by train.seed, as the recipe does): the head
    # trained too, not only the adapter.
    from instructkit.data.tasks import LabelSet
    from instructkit.models.heads import load_head_model
    from instructkit.train.engine import set_seed

    set_seed(0)
    start = load_head_model(str(bert), "seq_classification", LabelSet(("blue", "large", "red", "small")))
    assert model.classifier.weight.shape == start.classifier.weight.shape == (4, 32)
    assert not torch.allclose(model.classifier.weight, start.classifier.weight)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, start.bert.embeddings.word_embeddings.weight)


@pytest.mark.parametrize(("task", "train"), [("seq_classification", "seq"), ("token_classification", "tok")])
def test_gradient_accumulation_is_exact(bert, data, tmp_path, task, train):
    make = lambda out, **kw: config(bert, data[train], out, task, max_steps=4, **kw)  # noqa: E731
    assert_accumulation_is_exact(classify, make, tmp_path)


@pytest.mark.parametrize(("task", "train"), [("seq_classification", "seq"), ("token_classification", "tok")])
def test_interrupted_run_resumes_exactly(bert, data, tmp_path, task, train):
    from safetensors.torch import load_file

    make = lambda out, **kw: config(bert, data[train], out, task, **kw)  # noqa: E731
    assert_resumes_exactly(classify, make, tmp_path)
    full = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    cut = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert full.keys() == cut.keys() and all((full[k] == cut[k]).all() for k in full)


# ----------------------------------------------------------------------------------------------
# Parity with transformers' Trainer


@pytest.mark.parametrize(
    ("task", "rows", "head", "collator"),
    [
        ("seq_classification", tickets, "BertForSequenceClassification", "DataCollatorWithPadding"),
        ("token_classification", sentences, "BertForTokenClassification", "DataCollatorForTokenClassification"),
    ],
)
def test_loss_matches_transformers_trainer(tmp_path, task, rows, head, collator):
    """The same tiny BERT and head (saved with the head, so both load the same weights), the same
    8 encoded examples as one full batch every step (so the data order cannot differ), AdamW at a
    constant lr (LR) without warm-up, clipping 1, no dropout: our per-step loss (sum / count) and
    the Trainer's (the head's own mean cross-entropy) agree within 1e-5 for 10 steps."""
    import transformers
    from datasets import Dataset

    from instructkit.data.tasks import (
        LabelSet,
        encode_classification,
        encode_tagged_record,
        read_classification,
        read_tagged,
    )

    data = write_jsonl(tmp_path / "train.jsonl", rows(8))
    tagging = task == "token_classification"
    records = (read_tagged if tagging else read_classification)(data)
    label_set = LabelSet.from_records(records)
    model_dir = tiny_bert_dir(tmp_path / "bert", head, list(label_set.labels), seed=3)

    ours = classify(config(model_dir, data, tmp_path / "ours", None, max_steps=10))  # task from architectures
    assert ours["task"] == task and ours["steps"] == 10
    ours_curve = losses(tmp_path / "ours")

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    if tagging:
        encoded = [encode_tagged_record(tokenizer, r, label_set, max_length=32) for r in records]
    else:
        encoded = [encode_classification(tokenizer, r, label_set, template="pair", max_length=32) for r in records]
    model = getattr(transformers, head).from_pretrained(model_dir)
    args = transformers.TrainingArguments(
        **(trl_parity_args(tmp_path / "hf") | {"learning_rate": LR}), seed=0, disable_tqdm=True
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(encoded),
        data_collator=getattr(transformers, collator)(tokenizer),
    )
    trainer.train()
    hf_curve = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(hf_curve) == len(ours_curve) == 10
    assert ours_curve[0] - ours_curve[-1] > 0.01  # it moved (1000 x the tolerance), so agreement is not trivial
    for step, (a, b) in enumerate(zip(ours_curve, hf_curve), 1):
        assert a == pytest.approx(b, abs=1e-5), f"step {step}: ours {a}, Trainer {b}"


# ----------------------------------------------------------------------------------------------
# Bad input


def test_task_not_determinable_is_an_input_error(bert, data, tmp_path):
    """minilm-like plain encoder (architectures: BertModel) and no task: refused before a model loads."""
    with pytest.raises(InputError, match="set task") as err:
        classify(config(bert, data["seq"], tmp_path / "run", None))
    assert err.value.field == "task"
    assert not (tmp_path / "run").exists()


def test_unknown_label_in_test_data_is_located(bert, data, tmp_path):
    rows = tickets(4) + [{"instruction": "Which colour is it?", "text": "a green box", "label": "gren"}]
    test = write_jsonl(tmp_path / "test.jsonl", rows)
    with pytest.raises(InputError, match="unknown label 'gren'") as err:
        classify(config(bert, data["seq"], tmp_path / "run", "seq_classification", test))
    assert (err.value.file, err.value.line, err.value.field) == (str(test), 5, "label")
    assert not (tmp_path / "run").exists()


def test_unknown_tag_in_validation_data_is_located(bert, data, tmp_path):
    rows = sentences(2) + [{"tokens": ["Ada", "sang"], "tags": ["B-PERSON", "O"]}]
    val = write_jsonl(tmp_path / "val.jsonl", rows)
    cfg = config(bert, data["tok"], tmp_path / "run", "token_classification")
    cfg["data"]["val_path"] = str(val)
    with pytest.raises(InputError, match="unknown label 'B-PERSON'") as err:
        classify(cfg)
    assert (err.value.file, err.value.line, err.value.field) == (str(val), 3, "tags[0]")


def _cli(config_file: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "instructkit", "classify", "--config", str(config_file)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_exits_2_on_tags_of_another_length_and_on_unknown_labels(bert, data, tmp_path):
    import yaml

    bad = write_jsonl(tmp_path / "bad.jsonl", sentences(3) + [{"tokens": ["Ada", "sang"], "tags": ["B-PER"]}])
    cfg = config(bert, bad, tmp_path / "run", "token_classification")
    (tmp_path / "tags.yaml").write_text(yaml.safe_dump(cfg))
    done = _cli(tmp_path / "tags.yaml")
    assert done.returncode == 2, done.stderr
    assert str(bad) in done.stderr and ":4" in done.stderr and "tags" in done.stderr and "Traceback" not in done.stderr

    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "a box", "label": "purple"}])
    cfg = config(bert, data["seq"], tmp_path / "run2", "seq_classification", test)
    (tmp_path / "label.yaml").write_text(yaml.safe_dump(cfg))
    done = _cli(tmp_path / "label.yaml")
    assert done.returncode == 2 and "unknown label 'purple'" in done.stderr and str(test) in done.stderr


# ----------------------------------------------------------------------------------------------
# In a recipe


def test_recipe_classify_then_eval_reports_the_heads(bert, data, tmp_path):
    """`instructkit run` over classify -> eval: the table is the untrained head, then the trained
    one (the classify stage's own held-out numbers), and report.html has the per-label section."""
    import yaml

    from instructkit.pipeline import run

    recipe = {
        "name": "cls",
        "model": str(bert),
        "stages": ["classify", "eval"],
        "classify": {
            k: v
            for k, v in config(bert, data["seq8"], tmp_path, "seq_classification", data["seq_test"]).items()
            if k not in ("model", "out")
        },
        "eval": {},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    summary = run(tmp_path / "recipe.yaml", out=tmp_path / "runs")
    held = json.loads((tmp_path / "runs" / "classify" / "heldout.json").read_text())
    assert list(summary["table"]) == ["untrained head", "classify"]
    assert summary["table"]["classify"]["f1_macro"] == held["after"]["f1_macro"]
    assert summary["table"]["untrained head"]["accuracy"] == held["before"]["accuracy"]
    page = (tmp_path / "runs" / "report.html").read_text()
    assert '<section id="heads">' in page and "confusion matrices" in page


def test_recipe_check_finds_a_bad_test_file_before_anything_runs(bert, data, tmp_path):
    """The recipe's up-front data check reads classify's files as the stage will: a tags list of
    another length in data.test_path fails with its line before the first stage starts."""
    import yaml

    from instructkit.pipeline import run

    bad = write_jsonl(tmp_path / "bad.jsonl", sentences(2) + [{"tokens": ["Ada", "sang"], "tags": ["O"]}])
    section = config(bert, data["tok"], tmp_path, "token_classification", bad)
    recipe = {
        "name": "tok",
        "model": str(bert),
        "stages": ["classify"],
        "classify": {"data": section["data"], "task": "token_classification"},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(InputError, match="1 tags for 2 tokens") as err:
        run(tmp_path / "recipe.yaml", out=tmp_path / "runs")
    assert str(bad) in err.value.format() and ":3" in err.value.format()
    assert not (tmp_path / "runs").exists()
