"""readers.read_rows: every file type, the place each row remembers, and every file-level error."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest

from instructkit.data.readers import Row, read_rows
from instructkit.errors import InputError


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


# --- what is read, and where each row says it came from ------------------------------------------


def test_jsonl_rows_carry_physical_line_numbers(tmp_path):
    """Blank lines are skipped but still counted: the records sit on lines 1, 3 and 4."""
    path = write(tmp_path / "d.jsonl", '{"a": 1}\n\n{"a": 2}\n{"a": 3}\n')
    rows = read_rows(path)
    assert [r.data["a"] for r in rows] == [1, 2, 3]
    assert [r.line for r in rows] == [1, 3, 4]
    assert all(r.record is None and r.file == str(path) for r in rows)


def test_jsonl_line_numbers_ignore_unicode_line_separators(tmp_path):
    """U+2028 is legal inside a JSON string; it must not count as a line break."""
    path = write(tmp_path / "d.jsonl", '{"a": "x\u2028y"}\n{"a": "z"}\n')
    rows = read_rows(path)
    assert [r.data["a"] for r in rows] == ["x\u2028y", "z"]
    assert [r.line for r in rows] == [1, 2]


def test_json_array_rows_carry_record_index_and_start_line(tmp_path):
    """Line 1 is '[', record 0 opens on line 2 and spans 3 lines; record 1 opens on line 5."""
    text = '[\n  {"a": 1,\n   "b": 2\n  },\n  {"a": 3}\n]\n'
    rows = read_rows(write(tmp_path / "d.json", text))
    assert [r.data for r in rows] == [{"a": 1, "b": 2}, {"a": 3}]
    assert [(r.record, r.line) for r in rows] == [(0, 2), (1, 5)]


def test_json_file_holding_json_lines(tmp_path):
    rows = read_rows(write(tmp_path / "d.json", '{"a": 1}\n{"a": 2}\n'))
    assert [(r.data["a"], r.line) for r in rows] == [(1, 1), (2, 2)]


def test_json_with_utf8_bom(tmp_path):
    (tmp_path / "d.json").write_bytes(b'\xef\xbb\xbf[{"a": "\xc3\xa9"}]')
    assert read_rows(tmp_path / "d.json")[0].data == {"a": "é"}


def test_csv_rows_start_lines_count_multiline_cells(tmp_path):
    """The header is line 1; the first record's quoted cell spans lines 2-3, so the second
    record starts on line 4; a blank line 5 pushes the third to line 6."""
    text = 'instruction,output\n"two\nlines",x\nb,y\n\nc,z\n'
    rows = read_rows(write(tmp_path / "d.csv", text))
    assert [r.data for r in rows] == [
        {"instruction": "two\nlines", "output": "x"},
        {"instruction": "b", "output": "y"},
        {"instruction": "c", "output": "z"},
    ]
    assert [r.line for r in rows] == [2, 4, 6]


def test_parquet_rows_carry_record_index_and_nested_values(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = [
        {"messages": [{"role": "user", "content": "hi"}], "n": 1},
        {"messages": [{"role": "assistant", "content": "yo"}], "n": 2},
    ]
    pq.write_table(pa.Table.from_pylist(data), tmp_path / "d.parquet")
    rows = read_rows(tmp_path / "d.parquet")
    assert [r.data for r in rows] == data
    assert [(r.record, r.line) for r in rows] == [(0, None), (1, None)]


def test_txt_is_one_text_record_per_non_blank_line(tmp_path):
    rows = read_rows(write(tmp_path / "d.txt", "first\n\nsecond\r\n"))
    assert [(r.data, r.line) for r in rows] == [({"text": "first"}, 1), ({"text": "second"}, 3)]


def test_row_error_names_file_line_record_and_field():
    row = Row({}, "d.json", line=7, record=3)
    assert str(row.error("bad", field="x[0]")) == "d.json:7, record 3, field 'x[0]': bad"


# --- file-level errors ------------------------------------------------------------------------


def assert_input_error(path, *fragments: str) -> InputError:
    with pytest.raises(InputError) as caught:
        read_rows(path)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return caught.value


def test_bad_json_in_jsonl_names_the_line(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"a": 1}\n{"a": 2}\n{"a": }\n')
    err = assert_input_error(path, f"{path}:3", "invalid JSON", "Expecting value")
    assert err.line == 3


def test_bad_json_in_array_names_the_line(tmp_path):
    path = write(tmp_path / "d.json", '[\n {"a": 1},\n {"a" 2}\n]')
    assert assert_input_error(path, "invalid JSON", "Expecting ':'").line == 3


def test_missing_comma_in_array_names_the_line(tmp_path):
    path = write(tmp_path / "d.json", '[\n {"a": 1}\n {"a": 2}\n]')
    assert assert_input_error(path, "expecting ',' or ']'").line == 3


def test_record_that_is_not_an_object(tmp_path):
    jsonl = write(tmp_path / "d.jsonl", '{"a": 1}\n["a", 1]\n')
    assert assert_input_error(jsonl, "expected a JSON object", "got an array").line == 2
    array = write(tmp_path / "d.json", '[{"a": 1}, "text"]')
    assert assert_input_error(array, "got a string").record == 1


def test_single_object_json_file_is_one_record(tmp_path):
    """Issue 15: a .json holding one object (pretty-printed here, after a blank line) is one
    record, placed at the line of its opening brace."""
    path = write(tmp_path / "d.json", '\n{\n "data": []\n}\n')
    assert [(r.data, r.line, r.record) for r in read_rows(path)] == [({"data": []}, 2, None)]


def test_json_file_holding_a_string_is_refused(tmp_path):
    assert_input_error(write(tmp_path / "d.json", '"text"\n'), "expected a JSON array of records", "got a string")


@pytest.mark.parametrize("name,text", [("a.jsonl", ""), ("b.json", "  \n"), ("c.json", "[]"), ("d.csv", "x,y\n")])
def test_empty_file_has_no_records(tmp_path, name, text):
    assert_input_error(write(tmp_path / name, text), name, "no records")


def test_non_utf8_bytes_name_line_and_byte_offset(tmp_path):
    """Line 1 is 9 bytes with its newline, so the 0xff after '{"a": "' on line 2 is at 9 + 7."""
    (tmp_path / "d.jsonl").write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    err = assert_input_error(tmp_path / "d.jsonl", "not valid UTF-8", "0xff", "byte offset 16")
    assert err.line == 2


def test_unsupported_extension_suggests_the_closest(tmp_path):
    path = write(tmp_path / "d.josnl", "{}")
    assert_input_error(path, "unsupported file type '.josnl'", "did you mean '.jsonl'")


def test_missing_file(tmp_path):
    assert_input_error(tmp_path / "nope.jsonl", "nope.jsonl", "no such file")


def test_csv_row_with_wrong_number_of_values(tmp_path):
    path = write(tmp_path / "d.csv", "a,b\n1,2\n3,4,5\n")
    assert assert_input_error(path, "3 values but the header has 2 columns").line == 3


def test_unreadable_parquet(tmp_path):
    (tmp_path / "d.parquet").write_bytes(b"not parquet at all")
    assert_input_error(tmp_path / "d.parquet", "not a readable Parquet file")


# --- Hugging Face Hub ids, from the local cache only --------------------------------------------


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty datasets cache of our own, so the tests neither see nor touch the user's."""
    import datasets

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return cache


def test_hub_id_not_in_cache_says_so(hub_cache):
    err = assert_input_error("someone/not-cached-anywhere", "someone/not-cached-anywhere", "local cache")
    assert "HF_DATASETS_OFFLINE" in str(err)


def test_hub_id_in_cache_is_read_offline(hub_cache, tmp_path):
    """Build the cache the way a `load_dataset('someone/tiny')` on a networked machine would:
    datasets' cache module finds `<cache>/someone___tiny/<config>/<version>/<hash>/` with
    `tiny-<split>.arrow` inside. We produce one from a local JSON file and move it there."""
    import datasets

    source = write(tmp_path / "src.jsonl", '{"text": "a"}\n{"text": "b"}\n')
    datasets.load_dataset("json", data_files=str(source), split="train", cache_dir=str(hub_cache))
    built = glob.glob(str(hub_cache / "json" / "*"))[0]
    shutil.copytree(built, hub_cache / "someone___tiny" / "default")
    for arrow in glob.glob(str(hub_cache / "someone___tiny" / "*" / "*" / "*" / "json-train*")):
        os.rename(arrow, arrow.replace("json-train", "tiny-train"))

    rows = read_rows("someone/tiny")
    assert [(r.data, r.record, r.file) for r in rows] == [
        ({"text": "a"}, 0, "someone/tiny"),
        ({"text": "b"}, 1, "someone/tiny"),
    ]


# --- light imports --------------------------------------------------------------------------------


def test_data_modules_import_without_ml_libraries():
    code = (
        "import sys\n"
        "import instructkit.data.readers, instructkit.data.formats, instructkit.data.split\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'pyarrow', 'pandas') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
