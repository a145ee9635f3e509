"""The shipped ``rlvr_prompts`` set (the rlvr recipe's RL prompts): reproducible from its script,
valid IFEval-format records over all 25 constraint kinds, prompts that state what their checkers
check, a held-out split of unseen tasks, and no IFEval prompt in it."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from instructkit.datasets import shipped_path
from instructkit.verifiers import INSTRUCTIONS, read_ifeval_jsonl

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_rlvr_prompts.py"
IFEVAL = REPO.parent / "shared" / "data" / "ifeval" / "input_data.jsonl"


def _script():
    spec = importlib.util.spec_from_file_location("make_rlvr_prompts", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(split: str) -> list[dict]:
    return [json.loads(line) for line in shipped_path("rlvr_prompts", split).read_text().splitlines()]


def test_script_regenerates_the_shipped_files_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], check=True, capture_output=True)
    for split in ("train", "test"):
        name = f"rlvr_prompts_{split}.jsonl"
        assert (tmp_path / name).read_bytes() == shipped_path("rlvr_prompts", split).read_bytes(), name


@pytest.mark.parametrize(("split", "per_kind"), [("train", 24), ("test", 4)])
def test_every_kind_leads_equally_often_and_every_record_reads(split, per_kind):
    prompts = read_ifeval_jsonl(shipped_path("rlvr_prompts", split))  # checks ids and kwargs
    first = Counter(p.instruction_id_list[0] for p in prompts)
    assert set(first) == set(INSTRUCTIONS) and len(INSTRUCTIONS) == 25
    assert set(first.values()) == {per_kind}
    # the kinds rotate, so the first 25 records hold each once
    assert {p.instruction_id_list[0] for p in prompts[:25]} == set(INSTRUCTIONS)
    seconds = [p.instruction_id_list for p in prompts if len(p.instruction_id_list) == 2]
    assert 0.2 < len(seconds) / len(prompts) < 0.45
    assert all(a != b for a, b in seconds)


def _mentions(prompt: str, instruction_id: str, kwargs: dict) -> None:
    """Every argument the checker uses is stated in the prompt."""
    for name, value in kwargs.items():
        if name == "prompt_to_repeat":
            assert prompt.startswith(value + "\n"), (prompt, value)
        elif name in ("relation", "let_relation", "capital_relation"):
            said = {"less than": ("fewer than",), "at least": ("or more", "at least", "at the very least")}[value]
            assert any(s in prompt for s in said), (prompt, name, value)
        elif name == "language":
            names = {"de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "pt": "Portuguese"}
            assert names[value] in prompt
        elif isinstance(value, list):
            assert all(f"'{v}'" in prompt for v in value), (prompt, value)
        elif name == "nth_paragraph":
            assert {1: "first paragraph", 2: "second paragraph"}[value] in prompt
        elif isinstance(value, int):
            assert re.search(rf"(?<!\d){value}(?!\d)", prompt), (prompt, name, value)
        else:
            assert value in prompt, (prompt, name, value)


def test_prompts_state_what_their_checkers_check():
    for row in _rows("train") + _rows("test"):
        for instruction_id, kwargs in zip(row["instruction_id_list"], row["kwargs"], strict=True):
            _mentions(row["prompt"], instruction_id, kwargs)
        if "detectable_format:constrained_response" in row["instruction_id_list"]:
            assert "My answer is yes." in row["prompt"] and row["prompt"].split(" ")[0] in ("Is", "Can", "Should", "Do")


def test_held_out_tasks_are_not_in_the_training_prompts():
    module = _script()
    held_tasks = module.TASKS[-module.HELD_OUT :] + module.QUESTIONS[-module.HELD_OUT_QUESTIONS :]
    train_text = "\n".join(r["prompt"] for r in _rows("train"))
    assert not [t for t in held_tasks if t in train_text]
    test_rows = _rows("test")
    assert all(any(r["prompt"].startswith(t) for t in held_tasks) for r in test_rows)


@pytest.mark.skipif(not IFEVAL.exists(), reason="IFEval's input_data.jsonl is not beside the checkout")
def test_no_ifeval_prompt_or_long_run_of_its_words_is_in_the_set():
    """No IFEval prompt text, and no run of 8 consecutive words shared with one, other than the
    three fixed answers that the constrained-response kind has to quote."""
    ifeval = [json.loads(line) for line in IFEVAL.read_text().splitlines() if line.strip()]
    ifeval_text = {r["prompt"].strip() for r in ifeval}
    ours = _rows("train") + _rows("test")
    assert not [r for r in ours if r["prompt"].strip() in ifeval_text]
    runs = set()
    for r in ifeval:
        words = re.findall(r"\w+", r["prompt"].lower())
        runs.update(tuple(words[i : i + 8]) for i in range(len(words) - 7))
    fixed = re.compile(r"'My answer is yes\.', 'My answer is no\.' or 'My answer is maybe\.'")
    for r in ours:
        words = re.findall(r"\w+", fixed.sub(" ", r["prompt"]).lower())
        shared = [words[i : i + 8] for i in range(len(words) - 7) if tuple(words[i : i + 8]) in runs]
        assert not shared, (r["prompt"], shared)


def test_the_ifeval_reader_takes_the_shipped_name():
    by_name = read_ifeval_jsonl("shipped:rlvr_prompts/test")
    by_path = read_ifeval_jsonl(shipped_path("rlvr_prompts", "test"))
    assert [p.prompt for p in by_name] == [p.prompt for p in by_path] and len(by_name) == 100
