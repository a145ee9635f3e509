"""The decoder's comparison line on instructed classification data: the eval suites read
``text, label, instruction`` records as prompts of instruction + text with the label as the
reference, and k-shot demonstrations come from the same instruction, the labels in turn."""

from __future__ import annotations

import pytest

from instructkit.data.tasks import ClassifiedText, as_conversation, label_shots, prompt_text
from instructkit.errors import InputError
from instructkit.eval.conversations import read_conversations, record_shots
from instructkit.eval.request import EvalRequest
from tests.tiny import write_jsonl

TOPIC, MOOD = "Topic? Answer a or b.", "Mood? Answer up or down."


def rows() -> list[dict]:
    return [
        {"instruction": TOPIC, "text": "t1", "label": "a"},
        {"instruction": TOPIC, "text": "t2", "label": "a"},
        {"instruction": MOOD, "text": "m1", "label": "up"},
        {"instruction": TOPIC, "text": "t3", "label": "b"},
        {"instruction": MOOD, "text": "m2", "label": "down"},
        {"instruction": TOPIC, "text": "t4", "label": "b"},
        {"instruction": MOOD, "text": "m3", "label": "up"},
    ]


def records() -> list[ClassifiedText]:
    return [ClassifiedText(r["text"], r["label"], r["instruction"]) for r in rows()]


def test_a_record_is_asked_as_instruction_then_text():
    record = ClassifiedText("my card was charged twice", "billing", "What is it about?")
    assert prompt_text(record) == "What is it about?\n\nmy card was charged twice"
    assert prompt_text(ClassifiedText("just text", "x")) == "just text"
    conversation = as_conversation(record)
    assert [(m.role, m.content) for m in conversation.messages] == [
        ("user", "What is it about?\n\nmy card was charged twice"),
        ("assistant", "billing"),
    ]


def test_label_shots_take_the_instructions_labels_in_turn():
    # TOPIC's records by label: a: t1, t2; b: t3, t4 -> in turn: t1 (a), t3 (b), t2 (a), t4 (b).
    assert [r.text for r in label_shots(records(), TOPIC, 4)] == ["t1", "t3", "t2", "t4"]
    assert [r.text for r in label_shots(records(), TOPIC, 3)] == ["t1", "t3", "t2"]
    # MOOD: up: m1, m3; down: m2 -> m1 (up), m2 (down), m3 (up); a fourth does not exist.
    assert [r.text for r in label_shots(records(), MOOD, 4)] == ["m1", "m2", "m3"]
    assert label_shots(records(), "another instruction", 2) == []


def test_eval_reads_classification_records_as_prompts(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", rows())
    held = read_conversations(str(path), limit=None)
    assert [p[-1].content for p in held.prompts][:2] == [f"{TOPIC}\n\nt1", f"{TOPIC}\n\nt2"]
    assert held.references == [r["label"] for r in rows()]
    assert len(held.classified) == 7


def test_each_prompt_gets_shots_under_its_own_instruction(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", rows())
    test = write_jsonl(tmp_path / "test.jsonl", rows()[2:4])  # one MOOD, one TOPIC
    request = EvalRequest(model="m", data=str(test), k_shot=2, shots_data=str(train))
    shots = record_shots(request, read_conversations(str(test), limit=None))
    as_text = [[[m.content for m in s.messages] for s in per] for per in shots]
    assert as_text == [
        [[f"{MOOD}\n\nm1", "up"], [f"{MOOD}\n\nm2", "down"]],
        [[f"{TOPIC}\n\nt1", "a"], [f"{TOPIC}\n\nt3", "b"]],
    ]


def test_shots_default_to_the_shipped_train_split_and_need_a_source_otherwise(tmp_path):
    request = EvalRequest(model="m", data="shipped:classify/test", k_shot=4, limit=2)
    held = read_conversations("shipped:classify/test", limit=2)
    shots = record_shots(request, held)
    train = {(r["text"]) for r in _shipped_train()}
    for record, per in zip(held.classified, shots, strict=True):
        assert len(per) == 4
        for shot in per:
            instruction, _, text = shot.messages[0].content.partition("\n\n")
            assert instruction == record.instruction and text in train
    test = write_jsonl(tmp_path / "test.jsonl", rows())
    with pytest.raises(InputError, match="shots-from"):
        record_shots(EvalRequest(model="m", data=str(test), k_shot=1), read_conversations(str(test), None))
    with pytest.raises(InputError, match="needs that many"):
        record_shots(
            EvalRequest(model="m", data=str(test), k_shot=4, shots_data=str(test)), read_conversations(str(test), None)
        )


def _shipped_train() -> list[dict]:
    import json

    from instructkit.datasets import shipped_path

    return [json.loads(line) for line in shipped_path("classify", "train").read_text().splitlines()]


def test_the_accuracy_suite_scores_the_decoders_answers_against_the_labels(tmp_path):
    """Responses given in a file (no model), normalised (case, a trailing period) and scored
    against the labels: macro-F1 over the reference labels, counted by hand below."""
    from instructkit.eval.run import evaluate

    test = write_jsonl(tmp_path / "test.jsonl", rows()[:4])  # references: a, a, up, b
    answers = ["A.", "b", "Up", "b"]
    held = read_conversations(str(test), None)
    write_jsonl(
        tmp_path / "responses.jsonl",
        [{"prompt": p[-1].content, "response": a} for p, a in zip(held.prompts, answers, strict=True)],
    )
    metrics = evaluate(suites=["accuracy"], data=str(test), responses=str(tmp_path / "responses.jsonl"))["metrics"]
    # a: predicted once (right), 2 in truth -> P 1, R 1/2, F1 2/3. b: predicted twice, right once
    # -> P 1/2, R 1, F1 2/3. up: P 1, R 1, F1 1. Macro-F1 = (2/3 + 2/3 + 1) / 3 = 7/9.
    assert metrics["f1_macro"] == pytest.approx(7 / 9)
    assert metrics["accuracy"] == pytest.approx(3 / 4)
