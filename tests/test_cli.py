"""The command line: bad input exits 2 with one line naming the place; inspect shows masks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "instructkit", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


BAD_FILES = {
    "bad_json": (
        lambda p: p.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + '\n{"messages": [\n'),
        ["bad.jsonl:3", "JSON"],
    ),
    "missing_field": (
        lambda p: p.write_text(json.dumps(GOOD) + "\n" + json.dumps({"instruction": "x"}) + "\n"),
        ["bad.jsonl:2", "missing field 'messages'"],
    ),
    "wrong_role": (
        lambda p: p.write_text(
            json.dumps(GOOD)
            + "\n"
            + json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]})
            + "\n"
        ),
        ["bad.jsonl:2", "messages[1].role", "bot"],
    ),
    "empty_file": (lambda p: p.write_text(""), ["bad.jsonl", "empty"]),
    "non_utf8": (
        lambda p: p.write_bytes(json.dumps(GOOD).encode() + b'\n{"text": "caf\xe9"}\n'),
        ["bad.jsonl:2", "UTF-8"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_data_exits_2_and_names_the_place(tmp_path, case):
    write, expected = BAD_FILES[case]
    path = tmp_path / "bad.jsonl"
    write(path)
    proc = run_cli("data", "inspect", str(path))
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    for text in expected:
        assert text.lower() in line.lower(), (text, line)


def test_sft_with_bad_data_writes_no_model_and_no_checkpoint(tmp_path):
    data = tmp_path / "bad.jsonl"
    BAD_FILES["wrong_role"][0](data)
    out = tmp_path / "run"
    proc = run_cli(
        "sft",
        "--config",
        str(REPO / "recipes" / "quickstart.yaml"),
        f"data.path={data}",
        "data.val_path=null",
        f"out={out}",
    )
    assert proc.returncode == 2 and "messages[1].role" in proc.stderr
    assert not (out / "final").exists() and not (out / "checkpoints").exists()


def test_data_inspect_marks_exactly_the_assistant_tokens():
    proc = run_cli("data", "inspect", "shipped:extract/test", "--no-color")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "format:   messages" in out and "records:  100" in out
    first = json.loads((REPO / "instructkit" / "datasets" / "extract_test.jsonl").read_text().splitlines()[0])
    answer = first["messages"][-1]["content"]
    assert f"«{answer}<|im_end|>»" in out
    rendered = out.split("as «…»:", 1)[1]
    assert rendered.count("«") == 1  # the system and user turns are not trained
