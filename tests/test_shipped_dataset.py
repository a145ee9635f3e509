"""The shipped ``extract`` dataset: reproducible from its script, answers follow from the
prompts, held-out combinations, short enough for the CPU training budget."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from instructkit.datasets import SHIPPED, resolve_data_path, shipped_path
from instructkit.errors import InputError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_extract_dataset.py"
SIZES = {"train": 2000, "val": 100, "test": 100}


def _script():
    spec = importlib.util.spec_from_file_location("make_extract_dataset", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(split: str) -> list[list[dict]]:
    with open(shipped_path("extract", split), encoding="utf-8") as f:
        return [json.loads(line)["messages"] for line in f]


def test_script_regenerates_the_shipped_files_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], check=True, capture_output=True)
    for split in SHIPPED["extract"]:
        name = f"extract_{split}.jsonl"
        assert (tmp_path / name).read_bytes() == shipped_path("extract", split).read_bytes(), name


def test_sizes_and_shape():
    for split, n in SIZES.items():
        rows = _load(split)
        assert len(rows) == n
        for messages in rows:
            assert [m["role"] for m in messages] == ["system", "user", "assistant"]
            assert messages[1]["content"].startswith("Reply as name: NAME; item: ITEM; count: N; city: CITY")


def solve(user: str, script) -> str:
    """The answer, read off the sentence with nothing but the word lists: the one name, city
    and item (singular or plural) in it, and its count as digits or a number word."""
    sentence = user.split("\n", 1)[1]
    words = re.findall(r"[A-Za-z]+|\d+", sentence)
    lower = [w.lower() for w in words]
    (name,) = [w for w in words if w in script.NAMES]
    (city,) = [w for w in words if w in script.CITIES]
    (item,) = [s for s, p in script.ITEMS if s in lower or p in lower]
    numbers = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
    (count,) = [str(numbers.index(w) + 1) if w in numbers else w for w in lower if w in numbers or w.isdigit()]
    return f"name: {name}; item: {item}; count: {count}; city: {city}"


def test_every_answer_follows_from_its_prompt():
    script = _script()
    for split in SIZES:
        for messages in _load(split):
            assert solve(messages[1]["content"], script) == messages[2]["content"]


def test_test_and_val_hold_out_combinations_and_some_names_and_cities():
    train = {m[2]["content"] for m in _load("train")}
    train_text = " ".join(m[1]["content"] for m in _load("train"))
    for split in ("val", "test"):
        answers = [m[2]["content"] for m in _load(split)]
        assert not train & set(answers)
        assert len(set(answers)) == len(answers)
        unseen = [a for a in answers if re.search(r"name: (\w+)", a)[1] not in train_text]
        assert len(unseen) >= 5  # names train never shows: copying, not memorising


def test_shipped_path_and_errors():
    assert shipped_path("extract", "val").is_file()
    assert resolve_data_path("shipped:extract/test") == str(shipped_path("extract", "test"))
    assert resolve_data_path("data.jsonl") == "data.jsonl"
    with pytest.raises(InputError, match="did you mean 'extract'"):
        shipped_path("extrac", "train")
    with pytest.raises(InputError, match="no split 'dev'"):
        shipped_path("extract", "dev")


def test_examples_are_short_under_the_default_tokenizer():
    """The training budget (about 100 tokens/s on CPU) assumes short examples: the whole
    templated conversation stays under 96 tokens and the answer under 24."""
    from tests.tiny import real_tokenizer

    tokenizer = real_tokenizer()
    for messages in _load("test") + _load("train")[:100]:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) < 96
        assert len(tokenizer(messages[2]["content"], add_special_tokens=False)["input_ids"]) < 24


def test_derived_preferences_and_prompts_are_reproducible_and_well_formed(tmp_path):
    """The script rewrites the shipped derived files byte for byte; every pair's rejected answer
    differs from its chosen one; every RL prompt's answer is its extraction record's answer."""
    import importlib.util
    import json
    from pathlib import Path

    from instructkit.data.formats import load_records
    from instructkit.datasets import shipped_path
    from instructkit.rewards import exact_match

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_extract_preferences.py"
    spec = importlib.util.spec_from_file_location("make_prefs", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out", str(tmp_path)])
    for name, splits in (("extract_prefs", ("train", "val")), ("extract_prompts", ("train", "test"))):
        for split in splits:
            assert (tmp_path / f"{name}_{split}.jsonl").read_bytes() == shipped_path(name, split).read_bytes()
    pairs = load_records(shipped_path("extract_prefs", "train"))
    assert pairs.format == "preference" and len(pairs.records) == 400
    assert all(p.chosen[0].content != p.rejected[0].content for p in pairs.records)
    rows = [json.loads(line) for line in shipped_path("extract_prompts", "test").read_text().splitlines()]
    test = [json.loads(line) for line in shipped_path("extract", "test").read_text().splitlines()]
    assert [r["answer"] for r in rows] == [t["messages"][-1]["content"] for t in test]
    assert exact_match("p", "  " + rows[0]["answer"].upper() + "\n", answer=rows[0]["answer"]) == 1.0
    assert exact_match("p", rows[0]["answer"] + ".", answer=rows[0]["answer"]) == 0.0


# ----------------------------------------------------------------------------------------------
# The continual recipe's data: label, keysort (the extract orders, other formats), generic_text

CONTINUAL_SCRIPT = REPO / "scripts" / "make_continual_datasets.py"
CONTINUAL_SIZES = {"train": 400, "val": 50, "test": 100}


def _rows(name: str, split: str) -> list[dict]:
    with open(shipped_path(name, split), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_the_continual_script_regenerates_its_shipped_files_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, str(CONTINUAL_SCRIPT), "--out", str(tmp_path)], check=True, capture_output=True)
    for name in ("label", "keysort", "generic_text"):
        for split in SHIPPED[name]:
            made = tmp_path / f"{name}_{split}.jsonl"
            assert made.read_bytes() == shipped_path(name, split).read_bytes(), made.name


def test_label_and_keysort_answers_follow_from_the_sentence_in_their_format():
    """The extract answer read off the sentence (``solve``), rewritten by hand in each format."""
    script = _script()
    for split, n in CONTINUAL_SIZES.items():
        for name in ("label", "keysort"):
            rows = _rows(name, split)
            assert len(rows) == n
            for row in rows:
                system, user, answer = row["messages"]
                fields = dict(part.split(": ", 1) for part in solve(user["content"], script).split("; "))
                if name == "label":
                    expected = f"{fields['city']} / {fields['name']} / {fields['count']} x {fields['item']}"
                    assert user["content"].startswith("Reply as CITY / NAME / N x ITEM")
                else:
                    expected = "; ".join(f"{k}: {fields[k]}" for k in ("city", "count", "item", "name"))
                    assert user["content"].startswith("Reply as city: CITY; count: N; item: ITEM; name: NAME")
                assert answer["content"] == expected


def test_label_and_keysort_hold_out_combinations_and_some_names():
    names = set(_script().NAMES)
    for name in ("label", "keysort"):
        train = [r["messages"] for r in _rows(name, "train")]
        seen = {m[2]["content"] for m in train}
        train_names = {w for m in train for w in re.findall(r"[A-Z][a-z]+", m[1]["content"]) if w in names}
        for split in ("val", "test"):
            rows = [r["messages"] for r in _rows(name, split)]
            answers = [m[2]["content"] for m in rows]
            assert not seen & set(answers) and len(set(answers)) == len(answers)
            unseen = [
                m
                for m in rows
                if not {w for w in re.findall(r"[A-Z][a-z]+", m[1]["content"]) if w in names} <= train_names
            ]
            assert len(unseen) >= 3  # names train never shows: copying, not memorising


def test_generic_text_is_prose_not_the_tasks_format():
    rows = _rows("generic_text", "test")
    assert len(rows) == 40 and all(set(r) == {"text"} for r in rows)
    for r in rows:
        assert len(r["text"].split()) >= 30 and ": " not in r["text"] and " / " not in r["text"]
