"""Exact match: what is normalised, how prompts and references are cut from records, the score."""

from __future__ import annotations

import pytest

import instructkit.generation
from instructkit.data.schema import Conversation, Message
from instructkit.errors import InputError
from instructkit.eval.exact_match import evaluate_exact_match, exact_match, normalize, with_shots


def conv(*turns: tuple[str, str]) -> Conversation:
    return Conversation([Message(role, content) for role, content in turns])


def test_normalize_strips_surrounding_whitespace_only():
    assert normalize("  name: Ada; count: 3 \n\t") == "name: Ada; count: 3"
    assert normalize("a  b") == "a  b"  # inner whitespace counts
    assert normalize("Ada") != normalize("ada")  # so does case


def test_exact_match():
    assert exact_match("name: Ada\n", "name: Ada")
    assert not exact_match("name: Ada.", "name: Ada")
    assert not exact_match("name:Ada", "name: Ada")


class FakeGenerate:
    """Stands in for the model: answers from a table keyed by the last prompt turn."""

    def __init__(self, answers: dict[str, str]):
        self.answers = answers
        self.prompts: list[list[Message]] = []

    def __call__(self, model, tokenizer, prompts, **kwargs):
        assert kwargs["temperature"] == 0.0  # scored answers are greedy
        self.prompts += prompts
        return [self.answers[p[-1].content] for p in prompts]


def test_score_prompts_and_samples_from_hand_made_records(monkeypatch):
    """Three records, answers right, right up to whitespace, and wrong: exact match 2/3.

    The second record has two assistant turns: its prompt runs up to (not into) the last one,
    so it keeps the first exchange, and the reference is the last turn."""
    fake = FakeGenerate({"q1": "a1", "q2b": " a2b\n", "q3": "wrong"})
    monkeypatch.setattr(instructkit.generation, "generate", fake)
    records = [
        conv(("user", "q1"), ("assistant", "a1")),
        conv(("system", "s"), ("user", "q2"), ("assistant", "a2"), ("user", "q2b"), ("assistant", "a2b")),
        conv(("user", "q3"), ("assistant", "a3")),
    ]
    result = evaluate_exact_match(None, None, records, max_new_tokens=8, batch_size=2)
    assert result["exact_match"] == pytest.approx(2 / 3)
    assert result["n"] == 3
    assert [s["correct"] for s in result["samples"]] == [True, True, False]
    assert result["samples"][1] == {"prompt": "q2b", "response": " a2b\n", "reference": "a2b", "correct": True}
    assert [m.content for m in fake.prompts[1]] == ["s", "q2", "a2", "q2b"]


def test_k_shot_puts_the_shots_after_the_system_turn(monkeypatch):
    fake = FakeGenerate({"q": "a"})
    monkeypatch.setattr(instructkit.generation, "generate", fake)
    shots = [
        conv(("system", "ignored"), ("user", "sq1"), ("assistant", "sa1")),
        conv(("user", "sq2"), ("assistant", "sa2")),
        conv(("user", "unused"), ("assistant", "unused")),
    ]
    record = conv(("system", "s"), ("user", "q"), ("assistant", "a"))
    result = evaluate_exact_match(None, None, [record], k_shot=2, shots=shots)
    assert result["exact_match"] == 1.0
    assert [(m.role, m.content) for m in fake.prompts[0]] == [
        ("system", "s"),
        ("user", "sq1"),
        ("assistant", "sa1"),
        ("user", "sq2"),
        ("assistant", "sa2"),
        ("user", "q"),
    ]
    assert with_shots([Message("user", "q")], shots[1:2]) == [
        Message("user", "sq2"),
        Message("assistant", "sa2"),
        Message("user", "q"),
    ]


def test_bad_records_and_shot_counts_are_input_errors():
    with pytest.raises(InputError, match="no assistant turn"):
        evaluate_exact_match(None, None, [conv(("user", "q"))])
    with pytest.raises(InputError, match="k_shot=2"):
        evaluate_exact_match(None, None, [conv(("user", "q"), ("assistant", "a"))], k_shot=2, shots=[])


def test_no_records_scores_zero():
    assert evaluate_exact_match(None, None, []) == {"exact_match": 0.0, "n": 0, "samples": []}


def test_end_to_end_on_a_tiny_model():
    """The references are the tiny model's own greedy answer (padded with whitespace, which is
    normalised away) and a string it does not produce: exact match 1/2."""
    from tests.tiny import real_tokenizer, tiny_llama

    tokenizer = real_tokenizer()
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    model = tiny_llama(len(tokenizer), tie_word_embeddings=False, **ids)
    prompt = [Message("user", "Reply as name: NAME\nAda from Oslo ordered a lamp.")]
    own = instructkit.generation.generate(model, tokenizer, [prompt], max_new_tokens=6)[0]
    records = [
        Conversation(prompt + [Message("assistant", f"  {own.strip()} ")]),
        Conversation(prompt + [Message("assistant", "name: Ada")]),
    ]
    result = evaluate_exact_match(model, tokenizer, records, max_new_tokens=6, batch_size=2)
    assert result["exact_match"] == 0.5
    assert [s["response"] for s in result["samples"]] == [own, own]
