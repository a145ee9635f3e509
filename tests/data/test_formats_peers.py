"""The data shapes of the newest peers (issue 15): LLaMA-Factory v1 ``{type, value}`` content
blocks with a per-message ``loss_weight`` and its ``chosen_messages`` / ``rejected_messages``
preference records; OpenAI ``{type: "text", text}`` parts in every message format; Dolly's
``instruction`` / ``context`` / ``response``; a ``.json`` holding one object; ``--columns`` on
``data inspect``; and the located errors of malformed blocks, through the CLI (exit 2).

The files are written here by hand in the peers' shapes (LLaMA-Factory's ``data/v1_sft_demo.jsonl``:
one user turn with ``loss_weight`` 0.0 and one assistant turn with 1.0 per line;
``data/v1_dpo_demo.jsonl``: system, user and assistant turns, 0.0 / 0.0 / 1.0, in both lists).
Trained tokens are derived independently of the span code in ``data/templates``: the tokenizer's
own template renders the conversation, the expected trained text is found in that rendering by
string search, and the trained positions are the tokens whose offsets overlap it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructkit.cli import main
from instructkit.data.formats import load_records
from instructkit.data.schema import IMAGE_PLACEHOLDER, Conversation, Message, Preference, Ranking, Unpaired
from instructkit.data.templates import IGNORE_INDEX, encode_conversation, encode_prompt, encode_prompt_response
from instructkit.errors import InputError
from instructkit.inspect import parse_columns

U, A, S = "user", "assistant", "system"
MARKER = "<|im_end|>"  # the end of an assistant turn in SmolLM2's own ChatML template


def block(text: str) -> list[dict]:
    return [{"type": "text", "value": text}]


def v1(role: str, text: str, weight: float) -> dict:
    """One LLaMA-Factory v1 message, as its converters write it."""
    return {"role": role, "content": block(text), "loss_weight": weight}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def load(tmp_path: Path, rows: list[dict], **kwargs):
    return load_records(write_jsonl(tmp_path / "data.jsonl", rows), **kwargs)


def error_of(tmp_path: Path, rows: list[dict], **kwargs) -> str:
    with pytest.raises(InputError) as caught:
        load(tmp_path, rows, **kwargs)
    return str(caught.value)


def trained_positions(enc) -> list[int]:
    return [i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX]


def positions_of(tokenizer, messages: list[Message], trained_texts: list[str]) -> list[int]:
    """The token positions the loss should see, found without data/templates' span code: render
    with the tokenizer's own template, find each trained text (content + end marker) from the
    end backwards, and take the tokens whose character range overlaps it."""
    text = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages], tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, end = [], len(text)
    for piece in reversed(trained_texts):
        start = text.rindex(piece, 0, end)
        spans.append((start, start + len(piece)))
        end = start
    return [t for t, (a, b) in enumerate(enc["offset_mapping"]) if any(a < e and b > s for s, e in spans)]


def decoded_runs(tokenizer, enc) -> list[str]:
    runs: list[list[int]] = []
    previous = False
    for tok, label in zip(enc.input_ids, enc.labels):
        if label != IGNORE_INDEX:
            if not previous:
                runs.append([])
            runs[-1].append(tok)
        previous = label != IGNORE_INDEX
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


# --- LLaMA-Factory v1 SFT records -------------------------------------------------------------

# The shape of data/v1_sft_demo.jsonl (500 such lines there), text written for this test
SFT_DEMO = [
    {"messages": [v1(U, "hi", 0.0), v1(A, "Hello! I am {{name}}, how can I help?", 1.0)]},
    {"messages": [v1(U, "Who are you?", 0.0), v1(A, "I am {{name}}, built by {{author}}.", 1.0)]},
    {"messages": [v1(U, "你好", 0.0), v1(A, "您好，我是 {{name}}。", 1.0)]},
    {"messages": [v1(U, "Describe crepes.", 0.0), v1(A, "Thin pancakes:\n\n1. Mix.\n2. Fry.", 1.0)]},
]


def test_v1_sft_demo_shape_loads_every_record_as_a_conversation(tmp_path):
    loaded = load(tmp_path, SFT_DEMO)
    assert loaded.format == "messages"
    assert len(loaded.records) == 4
    for row, record in zip(SFT_DEMO, loaded.records):
        user, assistant = row["messages"]
        assert record == Conversation(
            [Message(U, user["content"][0]["value"]), Message(A, assistant["content"][0]["value"])]
        )
        assert record.messages[1].trained


def test_v1_sft_demo_shape_trains_exactly_the_assistant_turn(tmp_path, tokenizer):
    for record in load(tmp_path, SFT_DEMO).records:
        enc = encode_conversation(tokenizer, record.messages)
        answer = record.messages[1].content + MARKER
        assert trained_positions(enc) == positions_of(tokenizer, record.messages, [answer])
        assert decoded_runs(tokenizer, enc) == [answer]


MULTI_TURN = {
    "messages": [
        {"role": S, "content": block("Answer briefly."), "loss_weight": 0.0},
        v1(U, "Capital of France?", 0.0),
        v1(A, "Paris.", 0.0),  # kept as context, not trained
        v1(U, "And of Spain?", 0.0),
        v1(A, "Madrid.", 1.0),
    ]
}


def test_loss_weight_zero_leaves_an_assistant_turn_untrained(tmp_path, tokenizer):
    (record,) = load(tmp_path, [MULTI_TURN]).records
    assert [m.trained for m in record.messages] == [True, True, False, True, True]  # only assistants count
    enc = encode_conversation(tokenizer, record.messages)
    assert trained_positions(enc) == positions_of(tokenizer, record.messages, ["Madrid." + MARKER])
    assert decoded_runs(tokenizer, enc) == ["Madrid." + MARKER]


def test_loss_weight_one_everywhere_trains_both_turns(tmp_path, tokenizer):
    row = {"messages": [*MULTI_TURN["messages"][:2], v1(A, "Paris.", 1.0), *MULTI_TURN["messages"][3:]]}
    (record,) = load(tmp_path, [row]).records
    enc = encode_conversation(tokenizer, record.messages)
    expected = ["Paris." + MARKER, "Madrid." + MARKER]
    assert trained_positions(enc) == positions_of(tokenizer, record.messages, expected)
    # and no loss_weight key at all is the same as 1 (LLaMA-Factory's default)
    plain = {"messages": [{k: v for k, v in m.items() if k != "loss_weight"} for m in row["messages"]]}
    assert load(tmp_path, [plain]).records == [record]


def test_truncation_keeps_whole_trained_turns_only(tmp_path, tokenizer):
    """Dropping trailing turns to fit never ends on an untrained turn. The text up to the trained
    turn's marker is ``last + 1`` tokens (``last``: the marker's position): that fits; one token
    less, and the only shorter ending is the untrained 'Paris.' turn, so the example is dropped."""
    (record,) = load(tmp_path, [MULTI_TURN]).records
    last = trained_positions(encode_conversation(tokenizer, record.messages))[-1]
    kept = encode_conversation(tokenizer, record.messages, max_length=last + 1)
    assert decoded_runs(tokenizer, kept) == ["Madrid." + MARKER]
    assert encode_conversation(tokenizer, record.messages, max_length=last) is None


@pytest.mark.parametrize("weight", [0.5, 2, -1, True, "1"])
def test_loss_weight_other_than_0_or_1_is_refused(tmp_path, weight):
    row = {"messages": [v1(U, "q", 0.0), v1(A, "a", 1.0)]}
    row["messages"][1]["loss_weight"] = weight
    message = error_of(tmp_path, [row])
    assert (
        f"data.jsonl:1, field 'messages[1].loss_weight': expected loss_weight 0 (not trained) or 1 (trained), got {weight!r}"
        in message
    )


def test_every_assistant_turn_untrained_is_an_error(tmp_path):
    message = error_of(tmp_path, [{"messages": [v1(U, "q", 0.0), v1(A, "a", 0.0)]}])
    assert "data.jsonl:1, field 'messages': every assistant turn has loss_weight 0 (nothing to learn from)" in message


def test_tool_call_blocks_become_the_turns_tool_calls(tmp_path):
    call = {"name": "get_weather", "arguments": {"city": "Oslo"}}
    row = {
        "messages": [
            v1(U, "Weather in Oslo?", 0.0),
            {"role": A, "content": [{"type": "tool_call", "value": json.dumps(call)}], "loss_weight": 1.0},
            v1("tool", "Snow", 0.0),
            v1(A, "It snows.", 1.0),
        ]
    }
    (record,) = load(tmp_path, [row]).records
    assert json.loads(record.messages[1].content) == [call]


# --- LLaMA-Factory v1 preference records ------------------------------------------------------

# The shape of data/v1_dpo_demo.jsonl (10 such lines there), text written for this test
DPO_DEMO = [
    {
        "chosen_messages": [v1(S, "You are terse.", 0.0), v1(U, "Translate 'chat' to English.", 0.0), v1(A, "Cat.", 1.0)],
        "rejected_messages": [v1(S, "You are terse.", 0.0), v1(U, "Translate 'chat' to English.", 0.0), v1(A, " Chat, a talk.", 1.0)],
    },
    {
        "chosen_messages": [v1(S, "Help.", 0.0), v1(U, "2 + 2?", 0.0), v1(A, "4", 1.0)],
        "rejected_messages": [v1(S, "Help.", 0.0), v1(U, "2 + 2?", 0.0), v1(A, " 5, I think.", 1.0)],
    },
    {
        "chosen_messages": [v1(U, "Say hi.", 0.0), v1(A, "Hi!", 1.0)],
        "rejected_messages": [v1(U, "Say hi.", 0.0), v1(A, "No.", 1.0)],
    },
]  # fmt: skip


def test_v1_dpo_demo_shape_loads_as_preference_pairs(tmp_path):
    """LLaMA-Factory renders each list with its last turn supervised, so its prompt is the turns
    before it; here that is also the turns the two lists share, instructkit's prompt."""
    loaded = load(tmp_path, DPO_DEMO)
    assert loaded.format == "preference"
    assert len(loaded.records) == 3
    for row, record in zip(DPO_DEMO, loaded.records):
        chosen, rejected = row["chosen_messages"], row["rejected_messages"]
        text = [[m["content"][0]["value"] for m in turns] for turns in (chosen, rejected)]
        roles = [m["role"] for m in chosen]
        assert record == Preference(
            [Message(r, t) for r, t in zip(roles[:-1], text[0][:-1])],
            [Message(A, text[0][-1])],
            [Message(A, text[1][-1])],  # the leading space kept: it is what was rated
        )


def test_v1_dpo_trained_tokens_are_each_response(tmp_path, tokenizer):
    record = load(tmp_path, DPO_DEMO[:1]).records[0]
    for response in (record.chosen, record.rejected):
        enc = encode_prompt_response(tokenizer, record.prompt, response)
        answer = response[0].content + MARKER
        assert trained_positions(enc) == positions_of(tokenizer, record.prompt + response, [answer])
        assert enc.input_ids[: enc.prompt_length] == encode_prompt(tokenizer, record.prompt)


def test_v1_dpo_response_with_loss_weight_zero_is_an_error(tmp_path):
    row = json.loads(json.dumps(DPO_DEMO[2]))
    row["rejected_messages"][1]["loss_weight"] = 0.0
    message = error_of(tmp_path, [row])
    assert "data.jsonl:1, field 'rejected_messages': the response's assistant turns all have loss_weight 0" in message


def test_v1_dpo_lists_that_share_no_prompt_are_an_error(tmp_path):
    row = {
        "chosen_messages": [v1(U, "a?", 0.0), v1(A, "x", 1.0)],
        "rejected_messages": [v1(U, "b?", 0.0), v1(A, "y", 1.0)],
    }
    assert "share no leading turns that could be the prompt" in error_of(tmp_path, [row])


# --- OpenAI content parts in every message format ---------------------------------------------


def parts(text: str) -> list[dict]:
    return [{"type": "text", "text": text}]


@pytest.mark.parametrize(
    "row,expected",
    [
        (
            {"messages": [{"role": U, "content": parts("hi")}, {"role": A, "content": parts("hello")}]},
            Conversation([Message(U, "hi"), Message(A, "hello")]),
        ),
        (
            {"conversations": [{"from": "human", "value": parts("hi")}, {"from": "gpt", "value": block("hello")}]},
            Conversation([Message(U, "hi"), Message(A, "hello")]),
        ),
        (
            {
                "prompt": [{"role": U, "content": parts("q")}],
                "chosen": [{"role": A, "content": parts("good")}],
                "rejected": [{"role": A, "content": parts("bad")}],
            },
            Preference([Message(U, "q")], [Message(A, "good")], [Message(A, "bad")]),
        ),
        (
            {
                "messages": [{"role": U, "content": parts("q")}],
                "responses": [[{"role": A, "content": parts("1st")}], [{"role": A, "content": parts("2nd")}]],
            },
            Ranking([Message(U, "q")], [[Message(A, "1st")], [Message(A, "2nd")]], [0, 1]),
        ),
        (
            {"messages": [{"role": U, "content": parts("q")}, {"role": A, "content": parts("a")}], "label": True},
            Unpaired([Message(U, "q")], [Message(A, "a")], True),
        ),
    ],
    ids=["messages", "sharegpt", "preference", "ranking", "kto"],
)
def test_openai_text_parts_in_every_message_format(tmp_path, row, expected):
    assert load(tmp_path, [row]).records == [expected]


def test_prompt_records_read_text_parts(tmp_path):
    (record,) = load(tmp_path, [{"prompt": [{"role": U, "content": parts("Sum 2 and 2.")}], "answer": "4"}]).records
    assert record.messages == [Message(U, "Sum 2 and 2.")]
    assert record.data == {"answer": "4"}


def test_a_list_of_parts_is_empty_only_when_every_text_part_is(tmp_path):
    """The bug issue 15 names: v1 blocks hold their text under 'value', which the old reader
    (looking for OpenAI's 'text') saw as empty."""
    row = {"messages": [{"role": U, "content": [*parts(""), *block("hi")]}, {"role": A, "content": parts("yo")}]}
    assert load(tmp_path, [row]).records[0].messages[0] == Message(U, "hi")
    empty = {"messages": [{"role": U, "content": [*parts(" "), *block("")]}, {"role": A, "content": "yo"}]}
    assert "field 'messages[0].content': empty content (no text in any of its blocks)" in error_of(tmp_path, [empty])


# --- images: read only when a stage asks -------------------------------------------------------


def image_row(value: str, key: str = "value") -> dict:
    image = {"type": "image_url", key: value}
    return {"messages": [{"role": U, "content": [image, *block("What is this?")]}, v1(A, "A cat.", 1.0)]}


def test_image_blocks_load_as_paths_when_asked(tmp_path):
    (tmp_path / "cat.png").write_bytes(b"\x89PNG fake")
    (record,) = load(tmp_path, [image_row("cat.png")], images=True).records
    user = record.messages[0]
    assert user.content == IMAGE_PLACEHOLDER + "What is this?"
    assert user.images == (str((tmp_path / "cat.png").resolve()),)
    assert record.messages[1].images == ()


def test_image_paths_fall_back_to_the_working_folder(tmp_path, monkeypatch):
    """LLaMA-Factory's demo names data/mllm_demo_data/1.jpg from its repository root."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "1.jpg").write_bytes(b"jpeg")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    (record,) = load(tmp_path / "sub", [image_row("data/1.jpg")], images=True).records
    assert record.messages[0].images == (str(tmp_path / "data" / "1.jpg"),)


def test_openai_image_url_parts_and_data_urls(tmp_path):
    url = "data:image/png;base64,iVBORw0KGgo="
    row = image_row("", key="value")
    row["messages"][0]["content"][0] = {"type": "image_url", "image_url": {"url": url}}
    (record,) = load(tmp_path, [row], images=True).records
    assert record.messages[0].images == (url,)


def test_an_image_block_in_a_text_stage_is_a_located_error(tmp_path):
    (tmp_path / "cat.png").write_bytes(b"png")
    message = error_of(tmp_path, [image_row("cat.png")])
    assert "data.jsonl:1, field 'messages[0].content[0]': an image block in a text-only stage" in message


def test_remote_image_urls_are_refused(tmp_path):
    message = error_of(tmp_path, [image_row("https://example.com/cat.png")], images=True)
    assert "field 'messages[0].content[0].value': only local image files and data: URLs are read" in message


# --- Dolly records and one-object files -------------------------------------------------------


def test_dolly_instruction_context_response(tmp_path):
    rows = [
        {"instruction": "Name a colour.", "context": "", "response": "Red.", "category": "open_qa"},
        {"instruction": "Summarise.", "context": "Cats sleep a lot.", "response": "Cats nap.", "category": "summarization"},
    ]  # fmt: skip
    loaded = load(tmp_path, rows)
    assert loaded.format == "alpaca"
    assert loaded.records == [
        Conversation([Message(U, "Name a colour."), Message(A, "Red.")]),
        Conversation([Message(U, "Summarise.\n\nCats sleep a lot."), Message(A, "Cats nap.")]),
    ]


def test_a_json_file_holding_one_object_is_one_record(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(DPO_DEMO[2], indent=2), encoding="utf-8")
    loaded = load_records(path)
    assert (loaded.format, len(loaded.records)) == ("preference", 1)
    assert loaded.records[0].chosen == [Message(A, "Hi!")]


# --- the CLI: --columns, and malformed blocks exit 2 at file, line and field ------------------


def run_inspect(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["data", "inspect", *args, "--no-color"])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_reports_untrained_turns_and_marks_only_trained_tokens(tmp_path, capsys):
    path = write_jsonl(tmp_path / "v1.jsonl", [MULTI_TURN, *SFT_DEMO[:2]])
    code, out, err = run_inspect(capsys, str(path))
    assert code == 0, err
    assert "format:   messages\nrecords:  3\n" in out
    assert "assistant turns not trained (loss_weight 0): 1 of 4\n" in out
    assert "Paris." + MARKER + "\n" in out  # shown, outside the marks
    assert "«Madrid." + MARKER + "»" in out


def test_inspect_columns_as_a_stage_config_maps_them(tmp_path, capsys):
    """--columns KEY=COLUMN,... is data.columns: the same records as load_records(columns=...)."""
    rows = [
        {"good": [v1(U, "q", 0.0), v1(A, "yes", 1.0)], "bad": [v1(U, "q", 0.0), v1(A, "no", 1.0)]},
        {"good": [v1(U, "r", 0.0), v1(A, "ok", 1.0)], "bad": [v1(U, "r", 0.0), v1(A, "hm", 1.0)]},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    code, out, err = run_inspect(capsys, str(path), "--columns", "chosen=good,rejected=bad")
    assert code == 0, err
    assert "format:   preference\nrecords:  2\n" in out
    assert load_records(path, columns=parse_columns("chosen=good,rejected=bad")).records[1] == Preference(
        [Message(U, "r")], [Message(A, "ok")], [Message(A, "hm")]
    )


GOOD = {"messages": [v1(U, "q", 0.0), v1(A, "a", 1.0)]}
BAD_BLOCKS = {
    "unknown type": (
        {"messages": [v1(U, "q", 0.0), {"role": A, "content": [{"type": "txt", "value": "a"}]}]},
        "field 'messages[1].content[0].type': unknown block type 'txt' (did you mean 'text'?)",
    ),
    "no value": (
        {"messages": [{"role": U, "content": [{"type": "text"}]}, v1(A, "a", 1.0)]},
        "field 'messages[0].content[0].value': missing field 'value' (or OpenAI's 'text')",
    ),
    "image not readable": (
        image_row("missing.jpg"),
        "field 'messages[0].content[0].value': image file not found or not readable: 'missing.jpg'",
    ),
    "block without type": (
        {"messages": [{"role": U, "content": [{"value": "q"}]}, v1(A, "a", 1.0)]},
        "field 'messages[0].content[0]': missing field 'type'",
    ),
    "preference list": (
        {
            "chosen_messages": [v1(U, "q", 0.0), {"role": A, "content": [{"type": "txet", "value": "a"}]}],
            "rejected_messages": [v1(U, "q", 0.0), v1(A, "b", 1.0)],
        },
        "field 'chosen_messages[1].content[0].type': unknown block type 'txet'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_BLOCKS))
def test_malformed_block_in_json_lines_exits_2_at_its_line(tmp_path, capsys, case):
    bad, expected = BAD_BLOCKS[case]
    good = DPO_DEMO[2] if "chosen_messages" in bad else GOOD
    path = write_jsonl(tmp_path / "data.jsonl", [good, bad])
    code, out, err = run_inspect(capsys, str(path))
    assert code == 2
    assert f"{path}:2, {expected}" in err
    assert out == ""


@pytest.mark.parametrize("case", list(BAD_BLOCKS))
def test_malformed_block_in_a_json_array_exits_2_at_its_line_and_record(tmp_path, capsys, case):
    bad, expected = BAD_BLOCKS[case]
    good = DPO_DEMO[2] if "chosen_messages" in bad else GOOD
    path = tmp_path / "data.json"
    path.write_text("[\n" + json.dumps(good) + ",\n" + json.dumps(bad) + "\n]\n", encoding="utf-8")  # bad: line 3
    code, out, err = run_inspect(capsys, str(path))
    assert code == 2
    assert f"{path}:3, record 1, {expected}" in err


# --- what the recipes read: the SFT and DPO encoders and the up-front data check -------------


def test_the_sft_encoder_trains_only_weighted_turns(tmp_path, tokenizer):
    """encoders.encode_records is what the sft recipe trains on: the same trained positions."""
    from instructkit.data.encoders import encode_records

    records = load(tmp_path, [MULTI_TURN]).records
    (example,), dropped = encode_records(tokenizer, records, template=None, max_length=512, where="data.jsonl")
    trained = [i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX]
    assert (dropped, trained) == (0, positions_of(tokenizer, records[0].messages, ["Madrid." + MARKER]))


def test_the_dpo_encoder_labels_each_v1_response(tmp_path, tokenizer):
    from instructkit.data.encoders import as_pairs, encode_preferences

    pairs = as_pairs(load(tmp_path, DPO_DEMO).records, "data.jsonl")
    encoded, dropped = encode_preferences(tokenizer, pairs, template=None, max_length=512, paired=True)
    assert (len(encoded), dropped) == (3, 0)
    for pair, example in zip(pairs, encoded):
        for response, (_ids, labels) in ((pair.chosen, example["chosen"]), (pair.rejected, example["rejected"])):
            trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
            assert trained == positions_of(tokenizer, pair.prompt + response, [response[0].content + MARKER])


def test_the_up_front_check_reads_v1_files_and_finds_bad_blocks(tmp_path):
    """instructkit run checks every stage's data file before the first stage trains."""
    from instructkit.data.check import check_data_file

    sft = write_jsonl(tmp_path / "sft.jsonl", SFT_DEMO)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", DPO_DEMO)
    assert check_data_file(str(sft), "demonstrations") == 4
    assert check_data_file(str(pairs), "pairs") == 3
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, BAD_BLOCKS["no value"][0]])
    with pytest.raises(InputError) as caught:
        check_data_file(str(bad), "demonstrations")
    assert str(caught.value).startswith(f"{bad}:2, field 'messages[0].content[0].value': missing field 'value'")
