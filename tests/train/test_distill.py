"""The distill stage on tiny models: the loss is the divergence computed from full logits, it
falls, the student moves toward the teacher, and each mode runs."""

from __future__ import annotations

import pytest
import torch

from instructkit.cli import main
from instructkit.config import DistillConfig, from_dict
from instructkit.data.collate import lm_collate
from instructkit.data.encoders import encode_records
from instructkit.data.formats import load_records
from instructkit.models.loading import load_model, load_tokenizer
from instructkit.train.distill import DistillLoss, distill
from tests.tiny import tiny_model_dir, toy_conversations, write_jsonl


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    return tiny_model_dir(root / "student", seed=1), tiny_model_dir(root / "teacher", seed=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", toy_conversations(24))


def cfg(student, teacher, data, out, **kw):
    train = {"batch_size": 8, "max_steps": 6, "progress": False, **kw.pop("train", {})}
    return {
        "model": str(student),
        "teacher": str(teacher),
        "out": str(out),
        "data": {"path": str(data), "val_fraction": 0.0, "max_length": 64},
        "optim": {"lr": 3e-3, "scheduler": "constant", "warmup_steps": 0},
        "train": train,
        **kw,
    }


def _batch(model_dir, data, n=6):
    tok = load_tokenizer(str(model_dir))
    records = load_records(str(data)).records[:n]
    examples, _ = encode_records(tok, records, template=None, max_length=64, where=str(data))
    return lm_collate(tok.pad_token_id)(examples)


def _reference(student, teacher, batch, beta, temperature, alpha):
    """The loss from full (B, T, V) logits, written from the definitions."""
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    log_q = torch.log_softmax(s[keep].double() / temperature, -1)
    log_p = torch.log_softmax(t[keep].double() / temperature, -1)
    p, q = log_p.exp(), log_q.exp()
    if beta == 0.0:
        div = (p * (log_p - log_q)).sum(-1)
    elif beta == 1.0:
        div = (q * (log_q - log_p)).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        div = beta * (p * (log_p - m.log())).sum(-1) + (1 - beta) * (q * (log_q - m.log())).sum(-1)
    ce = torch.nn.functional.cross_entropy(s[keep].double(), targets[keep], reduction="none")
    return (alpha * div + (1 - alpha) * ce).sum().item(), int(keep.sum())


@pytest.mark.parametrize(
    "loss,beta,temperature,alpha",
    [("forward_kl", 0.5, 1.0, 1.0), ("reverse_kl", 0.5, 2.0, 1.0), ("jsd", 0.3, 1.0, 0.6)],
)
def test_loss_equals_the_definition_on_full_logits(models, data, loss, beta, temperature, alpha):
    student_dir, teacher_dir = models
    student = load_model(str(student_dir), dtype="fp32", device="cpu").eval()
    teacher = load_model(str(teacher_dir), dtype="fp32", device="cpu").eval()
    c = from_dict(
        DistillConfig, {"teacher": "x", "loss": loss, "beta": beta, "temperature": temperature, "alpha": alpha}
    )
    batch = _batch(student_dir, data)
    got, count = DistillLoss(student, teacher, c)(batch["input_ids"], batch["attention_mask"], batch["labels"])
    want, n = _reference(student, teacher, batch, c.divergence_beta, temperature, alpha)
    assert int(count) == n
    assert got.item() == pytest.approx(want, rel=1e-4)  # fp32 sums over a 49k vocabulary vs float64
    same, _ = DistillLoss(teacher, teacher, from_dict(DistillConfig, {"teacher": "x"}))(
        batch["input_ids"], batch["attention_mask"], batch["labels"]
    )
    assert abs(same.item()) < 1e-4  # a model is its own perfect student


def test_positions_all_reads_the_divergence_at_every_real_token_and_the_cross_entropy_at_the_answers(models, data):
    """positions: all: alpha * sum of KL(p || q) over every position whose next token is real
    (prompt included, padding not) + (1 - alpha) * CE over the answer tokens; count = answer tokens."""
    student_dir, teacher_dir = models
    student = load_model(str(student_dir), dtype="fp32", device="cpu").eval()
    teacher = load_model(str(teacher_dir), dtype="fp32", device="cpu").eval()
    alpha, temperature = 0.7, 2.0
    c = from_dict(DistillConfig, {"teacher": "x", "alpha": alpha, "temperature": temperature, "positions": "all"})
    batch = _batch(student_dir, data)
    got, count = DistillLoss(student, teacher, c)(batch["input_ids"], batch["attention_mask"], batch["labels"])
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    mask = batch["attention_mask"].bool()
    real = mask[:, :-1] & mask[:, 1:]  # position i reads token i + 1, both real
    assert int(real.sum()) > int((batch["labels"] != -100).sum())  # the prompts count here
    log_p, log_q = torch.log_softmax(t[real] / temperature, -1), torch.log_softmax(s[real] / temperature, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum()
    targets = batch["labels"][:, 1:]
    answers = targets != -100
    ce = torch.nn.functional.cross_entropy(s[answers], targets[answers], reduction="sum")
    assert int(count) == int(answers.sum())
    assert got.item() == pytest.approx((alpha * kl + (1 - alpha) * ce).item(), rel=1e-4)


def test_offline_distillation_moves_the_student_toward_the_teacher(tmp_path, models, data):
    student_dir, teacher_dir = models
    summary = distill(cfg(student_dir, teacher_dir, data, tmp_path / "run", loss="forward_kl"))
    teacher = load_model(str(teacher_dir), dtype="fp32", device="cpu").eval()
    c = from_dict(DistillConfig, {"teacher": "x"})
    batch = _batch(student_dir, data, n=24)

    def kl(model_dir):
        student = load_model(str(model_dir), dtype="fp32", device="cpu").eval()
        with torch.no_grad():
            return DistillLoss(student, teacher, c)(batch["input_ids"], batch["attention_mask"], batch["labels"])[
                0
            ].item()

    assert kl(tmp_path / "run") < 0.5 * kl(student_dir)
    assert summary["mode"] == "offline" and summary["steps"] == 6


def test_on_policy_samples_the_students_answers_and_is_reproducible(tmp_path, models, data):
    student_dir, teacher_dir = models
    a = distill(cfg(student_dir, teacher_dir, data, tmp_path / "a", mode="on_policy", max_new_tokens=8))
    b = distill(cfg(student_dir, teacher_dir, data, tmp_path / "b", mode="on_policy", max_new_tokens=8))
    assert a["train_loss"] == b["train_loss"]  # sampling seeded by the batch: the same run twice
    offline = distill(cfg(student_dir, teacher_dir, data, tmp_path / "c"))
    assert a["train_loss"] != offline["train_loss"]


def test_sequence_mode_takes_a_teacher_with_another_tokenizer(tmp_path, models, data, capsys):
    student_dir, _ = models
    other = tiny_model_dir(tmp_path / "other", seed=3)
    tok = load_tokenizer(str(other))
    tok.add_tokens(["<extra_token>"])
    model = load_model(str(other), dtype="fp32", device="cpu")
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(other)
    tok.save_pretrained(other)
    path = tmp_path / "d.yaml"
    path.write_text(f"model: {student_dir}\nteacher: {other}\nout: {tmp_path / 'off'}\ndata: {{path: {data}}}\n")
    assert main(["distill", "--config", str(path), "train.max_steps=1"]) == 2
    assert "use mode: sequence" in capsys.readouterr().err
    summary = distill(cfg(student_dir, other, data, tmp_path / "seq", mode="sequence", max_new_tokens=6))
    assert summary["mode"] == "sequence" and summary["steps"] == 6


@pytest.mark.parametrize(
    "extra,message",
    [
        ("beta=0.2", "beta applies to loss: jsd"),
        ("alpha=1.5", "must be in [0, 1]"),
        ("mode=sequence alpha=0.5", "sequence mode fine-tunes"),
        ("loss=jsdd", "did you mean 'jsd'"),
        ("mode=on_policy positions=all", "positions: all applies to mode offline"),
    ],
)
def test_bad_settings_exit_2(tmp_path, models, data, capsys, extra, message):
    student_dir, teacher_dir = models
    path = tmp_path / "d.yaml"
    path.write_text(f"model: {student_dir}\nteacher: {teacher_dir}\nout: {tmp_path / 'run'}\ndata: {{path: {data}}}\n")
    assert main(["distill", "--config", str(path), *extra.split()]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
