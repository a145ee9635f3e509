"""`generate` and `chat` sample from a model folder with its chat template."""

from __future__ import annotations

from instructkit.chat import chat, generate_text
from tests.tiny import tiny_model_dir


def test_generate_and_chat_keep_the_conversation(tmp_path):
    folder = tiny_model_dir(tmp_path / "tiny")
    greedy = generate_text(str(folder), "hello", max_new_tokens=5, temperature=0.0)
    assert isinstance(greedy, str) and greedy == generate_text(str(folder), "hello", max_new_tokens=5, temperature=0.0)
    inputs = iter(["hi there", "/reset", "second", "/exit"])
    printed: list[str] = []
    turns = chat(
        str(folder), max_new_tokens=4, temperature=0.0, input_fn=lambda _: next(inputs), print_fn=printed.append
    )
    # /reset dropped the first exchange; the conversation holds the second one only
    assert [m.role for m in turns] == ["user", "assistant"] and turns[0].content == "second"
    assert sum(p.startswith("assistant> ") for p in printed) == 2
