"""`instructkit data inspect`: every shipped dataset by its shipped name, prompt records, the
--columns and --dataset-info options (and their Python twins), one-line errors, and the data
layer's report helpers that take a tokenizer object and import no model code."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from instructkit.cli import main
from instructkit.data.formats import load_records
from instructkit.data.templates import encode_prompt
from instructkit.datasets import SHIPPED, shipped_path
from instructkit.errors import InputError
from instructkit.inspect import inspect_data, parse_columns

REPO = Path(__file__).resolve().parents[2]


def run_inspect(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["data", "inspect", *args, "--no-color"])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name,split", [(n, s) for n, splits in SHIPPED.items() for s in splits])
def test_every_shipped_dataset_inspects_by_its_shipped_name(capsys, name, split):
    code, out, err = run_inspect(capsys, f"shipped:{name}/{split}")
    assert code == 0, err
    records = len(shipped_path(name, split).read_text(encoding="utf-8").splitlines())
    assert f"records:  {records}\n" in out


def test_prompt_records_show_the_rendered_prompts(capsys):
    """extract_prompts holds RL prompts (a message list and a reference answer): the report
    counts them, measures each prompt as sampling renders it and marks nothing as trained."""
    from tests.tiny import real_tokenizer

    code, out, err = run_inspect(capsys, "shipped:extract_prompts/test")
    assert code == 0, err
    assert "format:   prompts\n" in out and "other fields: answer (100 of 100)" in out
    tokenizer = real_tokenizer()
    records = load_records(shipped_path("extract_prompts", "test")).records
    lengths = sorted(len(encode_prompt(tokenizer, r.messages)) for r in records)
    assert f"min {lengths[0]}," in out and f"max {lengths[-1]}\n" in out
    first = tokenizer.decode(encode_prompt(tokenizer, records[0].messages))
    shown = out.split("(nothing is trained):\n", 1)[1]
    assert shown.rstrip("\n") == first.rstrip("\n") and "«" not in shown


def test_columns_map_a_file_and_match_the_python_function(tmp_path, capsys):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "Capital of France?", "answer": "Paris."}) + "\n", encoding="utf-8")
    code, out, err = run_inspect(capsys, str(path), "--columns", "prompt=question, response=answer")
    assert code == 0, err
    assert "format:   alpaca" in out and "«Paris.<|im_end|>»" in out
    assert out == inspect_data(str(path), columns={"prompt": "question", "response": "answer"}) + "\n"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("prompt", "expected KEY=COLUMN"),
        ("prompt=q,", "expected KEY=COLUMN"),
        ("=q", "expected KEY=COLUMN"),
        ("promt=q", "unknown column key 'promt' (did you mean 'prompt'?)"),
        ("prompt=a,prompt=b", "given twice"),
    ],
)
def test_bad_columns_is_one_line_naming_the_flag(tmp_path, capsys, text, expected):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n", encoding="utf-8")
    code, out, err = run_inspect(capsys, str(path), "--columns", text)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "field '--columns'" in err and expected in err, err
    with pytest.raises(InputError, match="--columns"):
        parse_columns(text)


def test_dataset_info_names_the_dataset(llama_factory_data, capsys):
    info = str(llama_factory_data / "dataset_info.json")
    code, out, err = run_inspect(capsys, "kto_en_demo", "--dataset-info", info)
    assert code == 0, err
    expected = load_records(dataset_info=info, name="kto_en_demo")
    assert "format:   kto" in out and f"records:  {len(expected.records)}\n" in out
    assert f"read:     {llama_factory_data / 'kto_en_demo.json'}" in out


def test_dataset_info_unknown_name_is_one_line(llama_factory_data, capsys):
    code, out, err = run_inspect(capsys, "kto_en_dem", "--dataset-info", str(llama_factory_data / "dataset_info.json"))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "no dataset named 'kto_en_dem' (did you mean 'kto_en_demo'?)" in err


def test_dataset_info_with_columns_overrides_the_entry(tmp_path, capsys):
    (tmp_path / "qa.json").write_text(json.dumps([{"q": "Why?", "a": "Because."}]), encoding="utf-8")
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({"qa": {"file_name": "qa.json", "columns": {"prompt": "q", "response": "x"}}}))
    code, out, err = run_inspect(capsys, "qa", "--dataset-info", str(info), "--columns", "response=a")
    assert code == 0, err
    assert "format:   alpaca" in out and "«Because.<|im_end|>»" in out


def test_unknown_format_and_missing_file_are_one_line(tmp_path, capsys):
    code, _, err = run_inspect(capsys, "shipped:extract/test", "--format", "promts")
    assert code == 2 and "unknown format 'promts' (did you mean 'prompts'?)" in err and err.count("\n") == 1
    code, _, err = run_inspect(capsys, str(tmp_path / "nope.jsonl"))
    assert code == 2 and "nope.jsonl" in err and err.count("\n") == 1


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_data_layer_report_loads_no_model_code():
    imported = _imported_modules(REPO / "instructkit" / "data" / "inspect.py")
    upper = ("instructkit.models", "instructkit.train", "instructkit.eval", "instructkit.serve", "instructkit.inspect")
    assert not [name for name in imported if name.startswith(upper)], imported
    # and importing it (with everything it imports) brings in no ML library
    code = (
        "import sys, instructkit.data.inspect; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert proc.stdout.strip() == "[]"
