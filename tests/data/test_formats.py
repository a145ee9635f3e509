"""formats: detection, normalisation of every format from every file type, LLaMA-Factory's demo
files and dataset_info.json, and validation errors that name the place."""

from __future__ import annotations

import csv
import json

import pytest

from instructkit.data import schema
from instructkit.data.formats import (
    FORMATS_BY_NAME,
    detect_format,
    load_dataset_info,
    load_from_dataset_info,
    load_records,
)
from instructkit.data.prompts import PromptRecord
from instructkit.data.readers import Row
from instructkit.data.schema import (
    Classification,
    Conversation,
    Message,
    Preference,
    Ranking,
    Text,
    Unpaired,
)
from instructkit.errors import InputError

U, A, S, T = "user", "assistant", "system", "tool"


def m(role: str, content: str) -> Message:
    return Message(role, content)


def write_rows(tmp_path, rows: list[dict], ext: str):
    """Write ``rows`` as a .json array, .jsonl, .csv (nested values JSON-encoded in their cell,
    as spreadsheets export them) or .parquet file."""
    path = tmp_path / f"data.{ext}"
    if ext == "json":
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    elif ext == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif ext == "csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in row.items()})
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def load_rows(tmp_path, rows, ext="jsonl", **kwargs):
    return load_records(write_rows(tmp_path, rows, ext), **kwargs)


def error_of(tmp_path, rows, ext="jsonl", **kwargs) -> str:
    with pytest.raises(InputError) as caught:
        load_rows(tmp_path, rows, ext, **kwargs)
    return str(caught.value)


def test_registry_covers_every_schema_format():
    # prompts are read into data.prompts.PromptRecord, the one prompt type PPO and labelling
    # use, not into a schema record
    assert tuple(FORMATS_BY_NAME) == (*schema.FORMATS, "prompts")


# --- every format, from every file type -----------------------------------------------------------

# One small example per format: rows as the file holds them, and the records expected, written
# out by hand from the rules (alpaca joins instruction and input with a blank line, etc.).
CASES = {
    "alpaca": (
        [
            {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be brief."},
            {"instruction": "Say hi", "input": "", "output": "hi", "system": ""},
        ],
        [
            Conversation([m(S, "Be brief."), m(U, "Add\n\n2 and 3"), m(A, "5")]),
            Conversation([m(U, "Say hi"), m(A, "hi")]),
        ],
    ),
    "messages": (
        [{"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"},
                       {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"},
                       {"role": "assistant", "content": "a2"}]}],
        [Conversation([m(S, "sys"), m(U, "q"), m(A, "a"), m(U, "q2"), m(A, "a2")])],
    ),
    "sharegpt": (
        [{"conversations": [{"from": "human", "value": "weather?"},
                            {"from": "function_call", "value": '{"name": "w"}'},
                            {"from": "observation", "value": '{"t": 20}'},
                            {"from": "gpt", "value": "20 C"}],
          "tools": '[{"name": "w"}]'}],
        [Conversation([m(U, "weather?"), m(A, '{"name": "w"}'), m(T, '{"t": 20}'), m(A, "20 C")],
                      tools='[{"name": "w"}]')],
    ),
    "preference": (
        [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}],
        [Preference([m(U, "2+2?")], [m(A, "4")], [m(A, "5")])],
    ),
    "ranking": (
        [{"prompt": "Name a color", "responses": ["red", "blue", "car"], "ranks": [0, 0, 1]}],
        [Ranking([m(U, "Name a color")], [[m(A, "red")], [m(A, "blue")], [m(A, "car")]], [0, 0, 1])],
    ),
    "kto": (
        [{"prompt": "Capital of France?", "completion": "Paris", "label": True},
         {"prompt": "Capital of France?", "completion": "Rome", "label": False}],
        [Unpaired([m(U, "Capital of France?")], [m(A, "Paris")], True),
         Unpaired([m(U, "Capital of France?")], [m(A, "Rome")], False)],
    ),
    "text": (
        [{"text": "Once upon a time."}, {"text": "The end."}],
        [Text("Once upon a time."), Text("The end.")],
    ),
    "classification": (
        [{"text": "great film", "label": "positive"}, {"text": "dull", "label": 0}],
        [Classification("great film", "positive"), Classification("dull", "0")],
    ),
    "prompts": (  # RL prompts: the other fields are what a reward function is given
        [{"prompt": "Capital of France?", "system": "", "answer": "Paris"},
         {"prompt": "2+2?", "system": "Be brief.", "answer": "4"}],
        [PromptRecord([m(U, "Capital of France?")], "Capital of France?", {"answer": "Paris"}),
         PromptRecord([m(S, "Be brief."), m(U, "2+2?")], "2+2?", {"answer": "4"})],
    ),
}  # fmt: skip


@pytest.mark.parametrize("ext", ["json", "jsonl", "csv", "parquet"])
@pytest.mark.parametrize("name", list(CASES))
def test_each_format_from_each_file_type(tmp_path, name, ext):
    rows, expected = CASES[name]
    if ext == "parquet" and name == "classification":
        rows = [{**r, "label": str(r["label"])} for r in rows]  # a Parquet column has one type
    loaded = load_rows(tmp_path, rows, ext)
    assert loaded.format == name
    assert loaded.records == expected
    assert loaded.path == str(tmp_path / f"data.{ext}")


def test_explicit_format_overrides_detection(tmp_path):
    rows = [{"text": "I like it", "label": "pos"}]
    assert load_rows(tmp_path, rows).format == "classification"
    assert load_rows(tmp_path, rows, format="text").records == [Text("I like it")]


# --- format details -----------------------------------------------------------------------------


def test_alpaca_history_becomes_earlier_turns(tmp_path):
    rows = [{"instruction": "And 3+3?", "output": "6", "history": [["1+1?", "2"], ["2+2?", "4"]]}]
    assert load_rows(tmp_path, rows).records == [
        Conversation([m(U, "1+1?"), m(A, "2"), m(U, "2+2?"), m(A, "4"), m(U, "And 3+3?"), m(A, "6")])
    ]


def test_alpaca_columns_mapping(tmp_path):
    rows = [{"question": "Why?", "answer": "Because.", "sys": "Be kind."}]
    columns = {"prompt": "question", "response": "answer", "system": "sys"}
    loaded = load_rows(tmp_path, rows, columns=columns)
    assert loaded.format == "alpaca"
    assert loaded.records == [Conversation([m(S, "Be kind."), m(U, "Why?"), m(A, "Because.")])]


def test_alpaca_with_a_formatted_text_column_is_still_alpaca(tmp_path):
    """tatsu-lab/alpaca carries a 'text' column beside instruction/output."""
    rows = [{"instruction": "Hi", "input": "", "output": "Hello", "text": "### Instruction: Hi ..."}]
    assert load_rows(tmp_path, rows).format == "alpaca"


def test_openai_tool_calls_and_tools_list(tmp_path):
    """An assistant turn with tool_calls and no content gets the calls' functions as JSON, as
    LLaMA-Factory's openai converter writes them; a tools list is stored as a JSON string."""
    call = {"name": "w", "arguments": '{"city": "Oslo"}'}
    tools = [{"type": "function", "function": {"name": "w"}}]
    rows = [{"messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": call}]},
        {"role": "tool", "content": "20 C"},
        {"role": "assistant", "content": "It is 20 C."},
    ], "tools": tools}]  # fmt: skip
    (record,) = load_rows(tmp_path, rows).records
    assert record.messages[1] == m(A, json.dumps([call]))
    assert [x.role for x in record.messages] == [U, A, T, A]
    assert json.loads(record.tools) == tools


def test_openai_content_parts_keep_the_text(tmp_path):
    """Text parts join with nothing between them, as chat templates write content lists; image
    parts (an error in a text stage) are tested in test_formats_peers.py."""
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "it?"}]
    rows = [{"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "A cat."}]}]
    assert load_rows(tmp_path, rows).records[0].messages[0] == m(U, "What is it?")


def test_empty_system_message_is_dropped(tmp_path):
    rows = [{"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a"}]}]  # fmt: skip
    assert load_rows(tmp_path, rows).records == [Conversation([m(U, "q"), m(A, "a")])]


def test_sharegpt_with_custom_tags(tmp_path):
    rows = [{"dialog": [{"speaker": "me", "text": "hi"}, {"speaker": "bot", "text": "hello"}]}]
    tags = {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"}
    loaded = load_rows(tmp_path, rows, columns={"messages": "dialog"}, tags=tags)
    assert loaded.format == "sharegpt"
    assert loaded.records == [Conversation([m(U, "hi"), m(A, "hello")])]


def test_preference_with_message_lists_and_system_column(tmp_path):
    rows = [{
        "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "q2"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": {"role": "assistant", "content": "bad"},
        "system": "sys",
    }]  # fmt: skip
    assert load_rows(tmp_path, rows).records == [
        Preference([m(S, "sys"), m(U, "q"), m(A, "a"), m(U, "q2")], [m(A, "good")], [m(A, "bad")])
    ]


def test_preference_in_alpaca_layout(tmp_path):
    rows = [{"instruction": "Summarise", "input": "A long text.", "chosen": "Short.", "rejected": "Long."}]
    assert load_rows(tmp_path, rows).records == [
        Preference([m(U, "Summarise\n\nA long text.")], [m(A, "Short.")], [m(A, "Long.")])
    ]


def test_preference_with_implicit_prompt(tmp_path):
    """No prompt column: the turns chosen and rejected share at the start are the prompt."""
    q = {"role": "user", "content": "q"}
    rows = [{"chosen": [q, {"role": "assistant", "content": "good"}],
             "rejected": [q, {"role": "assistant", "content": "bad"}]}]  # fmt: skip
    assert load_rows(tmp_path, rows).records == [Preference([m(U, "q")], [m(A, "good")], [m(A, "bad")])]


def test_ranking_defaults_ranks_to_list_order(tmp_path):
    rows = [{"prompt": "p", "responses": ["best", "middle", "worst"]}]
    assert load_rows(tmp_path, rows).records[0].ranks == [0, 1, 2]


def test_kto_label_spellings_from_csv(tmp_path):
    rows = [{"prompt": "p", "completion": "c", "label": label} for label in ("true", "0", "False")]
    assert [r.label for r in load_rows(tmp_path, rows, "csv").records] == [True, False, False]


def test_kto_messages_layout_last_turn_is_the_completion(tmp_path):
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
             {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]  # fmt: skip
    loaded = load_rows(tmp_path, [{"messages": turns, "label": False}])
    assert loaded.format == "kto"
    assert loaded.records == [Unpaired([m(U, "q"), m(A, "a"), m(U, "q2")], [m(A, "a2")], False)]


@pytest.mark.parametrize(
    "row,expected",
    [
        ({"instruction": "i", "output": "o"}, "alpaca"),
        ({"messages": [{"role": "user", "content": "x"}]}, "messages"),
        ({"conversations": [{"from": "human", "value": "x"}]}, "sharegpt"),
        ({"conversations": [{"role": "user", "content": "x"}]}, "messages"),
        ({"prompt": "p", "chosen": "c", "rejected": "r"}, "preference"),
        ({"conversations": [], "chosen": {}, "rejected": {}}, "preference"),
        ({"prompt": "p", "responses": ["a", "b"]}, "ranking"),
        ({"messages": [], "label": True}, "kto"),
        ({"prompt": "p", "completion": "c", "label": True}, "kto"),
        ({"text": "t"}, "text"),
        ({"text": "t", "url": "https://example.com"}, "text"),
        ({"text": "t", "label": 3}, "classification"),
        ({"prompt": "p", "answer": "a"}, "prompts"),
        ({"instruction": "i", "input": "x"}, "prompts"),
    ],
)
def test_detect_format_from_keys(row, expected):
    assert detect_format([Row(row, "f.jsonl", line=1)]) == expected


def test_ambiguous_keys_ask_for_format():
    row = Row({"instruction": "i", "output": "o", "messages": [{"role": "user"}]}, "f.jsonl", line=1)
    with pytest.raises(InputError, match=r"f.jsonl:1: .*fit several formats \(alpaca, messages\).*--format"):
        detect_format([row])


def test_a_prompt_with_a_response_column_is_not_a_bare_prompt():
    """A prompt + completion row without a label is no format instructkit reads; reading it as
    prompts would silently drop the completions."""
    with pytest.raises(InputError, match="cannot tell the format"):
        detect_format([Row({"prompt": "p", "completion": "c"}, "f.jsonl", line=1)])


def test_prompts_keep_alpaca_parts_and_the_unused_columns(tmp_path):
    rows = [{"instruction": "Add", "input": "2 and 3", "system": "Be brief.", "answer": "5", "id": 7}]
    (record,) = load_rows(tmp_path, rows).records
    assert record.messages == [m(S, "Be brief."), m(U, "Add\n\n2 and 3")]
    assert record.text == "Add\n\n2 and 3" and record.data == {"answer": "5", "id": 7}


def test_prompts_as_message_lists(tmp_path):
    rows = [
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], "answer": "4"}
    ]
    assert load_rows(tmp_path, rows).records == [
        PromptRecord([m(S, "Be brief."), m(U, "2+2?")], "2+2?", {"answer": "4"})
    ]


def test_prompts_columns_mapping(tmp_path):
    loaded = load_rows(tmp_path, [{"question": "Why?", "gold": "Because."}], columns={"prompt": "question"})
    assert loaded.format == "prompts"
    assert loaded.records == [PromptRecord([m(U, "Why?")], "Why?", {"gold": "Because."})]


def test_prompt_must_end_with_a_user_turn(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    assert "field 'prompt': the prompt must end with a user turn" in error_of(tmp_path, rows)


def test_unknown_keys_list_the_formats():
    with pytest.raises(InputError, match=r"cannot tell the format from the keys \['q'\].*alpaca \(instruction"):
        detect_format([Row({"q": 1}, "f.jsonl", line=1)])


# --- validation errors name the place ------------------------------------------------------------


def test_unknown_role_names_the_field_path(tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"}, {"role": "bot", "content": "x"}]}  # fmt: skip
    message = error_of(tmp_path, [good, bad])
    assert message == (
        f"{tmp_path / 'data.jsonl'}:2, field 'messages[3].role': unknown role 'bot'"
        " (expected one of system, user, assistant, tool)"
    )


def test_unknown_sharegpt_role_lists_sharegpt_names(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}]
    assert (
        "'conversations[1].from': unknown role 'bot' (expected one of system, human, gpt, function_call,"
        " observation)" in error_of(tmp_path, rows)
    )


def test_missing_field_names_the_line(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "", "output": "d"},
            {"instruction": "e", "input": "f"}]  # fmt: skip
    assert error_of(tmp_path, rows, format="alpaca").endswith("data.jsonl:3: missing field 'output'")


def test_missing_field_names_the_record_in_a_json_array(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "e", "input": "f"}]
    assert "data.json:6, record 1: missing field 'output'" in error_of(tmp_path, rows, "json", format="alpaca")


def test_empty_content_is_an_error(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}]
    assert "field 'messages[1].content': empty content" in error_of(tmp_path, rows)


def test_empty_alpaca_output_is_an_error(tmp_path):
    assert "field 'output': empty content" in error_of(tmp_path, [{"instruction": "i", "output": ""}])


def test_conversation_without_assistant_turn(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q"}]}]
    assert "field 'messages': the conversation has no assistant turn" in error_of(tmp_path, rows)


def test_wrong_types(tmp_path):
    assert "field 'output': expected a string, got a number" in error_of(tmp_path, [{"instruction": "i", "output": 5}])
    assert "field 'messages': expected a list, got an object" in error_of(
        tmp_path, [{"messages": {"role": "user"}}], format="messages"
    )
    assert "field 'messages[0]': expected a message object with 'role' and 'content', got a string" in error_of(
        tmp_path, [{"messages": ["hello"]}], format="messages"
    )
    assert "field 'history[0]': expected a [user, assistant] pair" in error_of(
        tmp_path, [{"instruction": "i", "output": "o", "history": ["just one"]}]
    )


def test_missing_content_and_role(tmp_path):
    rows = [{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}]
    assert "field 'messages[0]': missing field 'content'" in error_of(tmp_path, rows)
    rows = [{"messages": [{"role": "user", "content": "q"}, {"content": "a"}]}]
    assert "field 'messages[1]': missing field 'role'" in error_of(tmp_path, rows)


def test_system_turn_only_first(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                          {"role": "assistant", "content": "a"}]}]  # fmt: skip
    assert "field 'messages[1].role': a system turn may only come first" in error_of(tmp_path, rows)


def test_preference_response_must_be_assistant(tmp_path):
    rows = [{"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "r"}]
    assert "field 'chosen[0].role': expected a assistant or tool turn here, got user" in error_of(tmp_path, rows)


def test_preference_prompt_must_end_with_user(tmp_path):
    prompt = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    rows = [{"prompt": prompt, "chosen": "c", "rejected": "r"}]
    assert "field 'prompt': the prompt must end with a user turn" in error_of(tmp_path, rows)


def test_ranking_needs_two_responses_and_matching_ranks(tmp_path):
    assert "field 'responses': ranking needs at least 2 responses, got 1" in error_of(
        tmp_path, [{"prompt": "p", "responses": ["only"]}]
    )
    assert "field 'ranks': 3 ranks for 2 responses" in error_of(
        tmp_path, [{"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1, 2]}]
    )
    assert "field 'ranks[1]': expected a rank" in error_of(
        tmp_path, [{"prompt": "p", "responses": ["a", "b"], "ranks": [0, -1]}]
    )
    assert "no pair to learn from" in error_of(tmp_path, [{"prompt": "p", "responses": ["a", "b"], "ranks": [1, 1]}])


def test_kto_label_must_be_boolean(tmp_path):
    rows = [{"prompt": "p", "completion": "c", "label": "maybe"}]
    assert "field 'label': expected true or false, got 'maybe'" in error_of(tmp_path, rows)


def test_bad_tools_json(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "[{"}]
    assert "field 'tools': not valid JSON" in error_of(tmp_path, rows)


def test_unknown_format_name_suggests_the_closest(tmp_path):
    message = error_of(tmp_path, [{"instruction": "i", "output": "o"}], format="alpacca")
    assert "unknown format 'alpacca' (did you mean 'alpaca'?)" in message


def test_unknown_column_key_suggests_the_closest(tmp_path):
    message = error_of(tmp_path, [{"instruction": "i", "output": "o"}], columns={"respons": "output"})
    assert "field 'columns.respons': unknown column key 'respons' (did you mean 'response'?)" in message


def test_column_key_that_does_not_apply_to_the_format(tmp_path):
    message = error_of(tmp_path, [{"instruction": "i", "output": "o"}], columns={"chosen": "x"}, format="alpaca")
    assert "column key 'chosen' does not apply to the alpaca format" in message


# --- LLaMA-Factory demo files: auto-detection and dataset_info.json agree --------------------------

# file, the format detection finds, the dataset_info.json entry that names it
PEER_FILES = [
    ("alpaca_en_demo.json", "alpaca", "alpaca_en_demo"),
    ("identity.json", "alpaca", "identity"),
    ("c4_demo.jsonl", "text", "c4_demo"),
    ("dpo_en_demo.json", "preference", "dpo_en_demo"),
    ("glaive_toolcall_en_demo.json", "sharegpt", "glaive_toolcall_en_demo"),
    ("kto_en_demo.json", "kto", "kto_en_demo"),
    ("mllm_demo.json", "messages", "mllm_demo"),  # its entry says sharegpt with role/content tags
]


def raw_records(path) -> list[dict]:
    """The file's records, counted independently of instructkit."""
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return json.loads(path.read_text(encoding="utf-8"))


def test_every_peer_text_file_is_covered(llama_factory_data):
    data_files = {p.name for p in llama_factory_data.iterdir() if p.suffix in (".json", ".jsonl")}
    assert data_files - {"dataset_info.json"} == {name for name, _, _ in PEER_FILES}


@pytest.mark.parametrize("file,fmt,entry", PEER_FILES)
def test_peer_file_loads_by_detection_and_by_dataset_info(llama_factory_data, file, fmt, entry):
    path = llama_factory_data / file
    detected = load_records(path)
    via_info = load_from_dataset_info(llama_factory_data / "dataset_info.json", entry)
    assert detected.format == fmt
    assert len(detected.records) == len(raw_records(path))
    assert via_info.records == detected.records
    assert via_info.path == str(path)


def test_dataset_info_entry_found_by_file_name(llama_factory_data):
    loaded = load_records(
        llama_factory_data / "kto_en_demo.json", dataset_info=llama_factory_data / "dataset_info.json"
    )
    assert loaded.format == "kto"


def test_alpaca_demo_content(llama_factory_data):
    path = llama_factory_data / "alpaca_en_demo.json"
    raw = raw_records(path)
    records = load_records(path).records
    with_input = next(i for i, r in enumerate(raw) if r["input"])
    assert records[with_input].messages == [
        m(U, raw[with_input]["instruction"] + "\n\n" + raw[with_input]["input"]),
        m(A, raw[with_input]["output"]),
    ]
    assert records[0].messages == [m(U, raw[0]["instruction"]), m(A, raw[0]["output"])]


def test_identity_demo_content(llama_factory_data):
    first = load_records(llama_factory_data / "identity.json").records[0]
    assert first.messages[0] == m(U, "hi")
    assert first.messages[1].content.startswith("Hello! I am {{name}}")


def test_c4_demo_content(llama_factory_data):
    path = llama_factory_data / "c4_demo.jsonl"
    assert load_records(path).records[-1] == Text(raw_records(path)[-1]["text"])


def test_dpo_demo_content(llama_factory_data):
    """ShareGPT names map to roles; a leading 'system' turn stays the first prompt turn."""
    path = llama_factory_data / "dpo_en_demo.json"
    raw = raw_records(path)
    records = load_records(path).records
    names = {"system": S, "human": U, "gpt": A}
    for r, rec in zip(raw, records):
        assert [x.role for x in rec.prompt] == [names[t["from"]] for t in r["conversations"]]
        assert rec.chosen == [m(A, r["chosen"]["value"])]
        assert rec.rejected == [m(A, r["rejected"]["value"])]
    assert any(rec.prompt[0].role == S for rec in records)


def test_glaive_toolcall_demo_content(llama_factory_data):
    """function_call turns become assistant turns and observations tool turns; empty tools
    strings become None."""
    path = llama_factory_data / "glaive_toolcall_en_demo.json"
    raw = raw_records(path)
    records = load_records(path).records
    names = {"human": U, "gpt": A, "function_call": A, "observation": T}
    for r, rec in zip(raw, records):
        assert [(x.role, x.content) for x in rec.messages] == [
            (names[t["from"]], t["value"]) for t in r["conversations"]
        ]
        assert rec.tools == (r["tools"] or None)
    calls = sum(t["from"] == "function_call" for r in raw for t in r["conversations"])
    assert calls > 0
    assert sum(x.role == T for rec in records for x in rec.messages) == calls


def test_kto_demo_content(llama_factory_data):
    path = llama_factory_data / "kto_en_demo.json"
    raw = raw_records(path)
    for r, rec in zip(raw, load_records(path).records):
        assert rec.label is r["label"]
        assert rec.completion == [m(A, r["messages"][-1]["content"])]
        assert len(rec.prompt) == len(r["messages"]) - 1
    assert {r["label"] for r in raw} == {True, False}


def test_mllm_demo_text_loads_and_images_are_ignored(llama_factory_data):
    path = llama_factory_data / "mllm_demo.json"
    raw = raw_records(path)
    records = load_records(path).records
    assert [[(x.role, x.content) for x in rec.messages] for rec in records] == [
        [(t["role"], t["content"]) for t in r["messages"]] for r in raw
    ]


# --- dataset_info.json itself ---------------------------------------------------------------------


def test_dataset_info_unknown_name_suggests(llama_factory_data):
    with pytest.raises(InputError, match=r"no dataset named 'alpaca_en_dmo' \(did you mean 'alpaca_en_demo'\?\)"):
        load_dataset_info(llama_factory_data / "dataset_info.json", "alpaca_en_dmo")


def test_dataset_info_entry_keys_are_checked(tmp_path):
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({"mine": {"file_name": "d.jsonl", "formating": "sharegpt"}}))
    with pytest.raises(
        InputError, match=r"field 'mine.formating': unknown key 'formating' \(did you mean 'formatting'"
    ):
        load_dataset_info(info, "mine")


def test_dataset_info_alpaca_preference_and_text_entries(tmp_path):
    """ranking: true is a preference dataset; an alpaca entry mapping only 'prompt' is text."""
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"question": "q", "good": "g", "bad": "b"}) + "\n")
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"content": "Some text."}) + "\n")
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({
        "pairs": {"file_name": "pairs.jsonl", "ranking": True,
                  "columns": {"prompt": "question", "chosen": "good", "rejected": "bad"}},
        "corpus": {"file_name": "corpus.jsonl", "columns": {"prompt": "content"}},
    }))  # fmt: skip
    pairs = load_from_dataset_info(info, "pairs")
    assert (pairs.format, pairs.records) == ("preference", [Preference([m(U, "q")], [m(A, "g")], [m(A, "b")])])
    corpus = load_from_dataset_info(info, "corpus")
    assert (corpus.format, corpus.records) == ("text", [Text("Some text.")])


def test_dataset_info_hub_entry_not_cached(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({"remote": {"hf_hub_url": "someone/not-cached", "split": "train"}}))
    with pytest.raises(InputError, match="someone/not-cached: .*local cache"):
        load_from_dataset_info(info, "remote")
