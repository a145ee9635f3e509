"""The ``--responses`` contract: every row of the file is scored, several rows per prompt
included; rows that answer no held-out record are counted and warned about; a baseline must
have one response per prompt. Verdicts derived by hand in each docstring."""

from __future__ import annotations

import json

import pytest

import instructkit.eval.reward
import instructkit.generation
import instructkit.models.loading
from instructkit.errors import InputError
from instructkit.eval.run import evaluate
from tests.eval.test_run import held_out  # the same three labelled reviews
from tests.tiny import write_jsonl

NO_COMMA = {
    "key": 1,
    "prompt": "Say hi. Do not use any commas.",
    "instruction_id_list": ["punctuation:no_comma"],
    "kwargs": [{}],
}
END_WITH = {
    "key": 2,
    "prompt": "Greet me and end with the phrase 'Any other questions?'",
    "instruction_id_list": ["startend:end_checker"],
    "kwargs": [{"end_phrase": "Any other questions?"}],
}


@pytest.fixture(autouse=True)
def no_model(monkeypatch):
    """Given responses: nothing may load a model or generate."""

    def fail(*args, **kwargs):
        raise AssertionError("no model may be loaded when responses are given")

    monkeypatch.setattr(instructkit.models.loading, "load_model_and_tokenizer", fail)
    monkeypatch.setattr(instructkit.generation, "generate", fail)


def test_ifeval_scores_every_row_of_a_file_with_two_responses_per_prompt(tmp_path, capsys):
    """Two models' responses to two IFEval prompts, one row per response, and a stray row:

    line 1 (key 1, a) "hi, there": has a comma -> strict False; the loose variants drop the
        first or last line, leaving "" (a blank response follows nothing) -> loose False.
    line 2 (key 1, b) "hi there": no comma -> strict True, loose True.
    line 3 (by prompt, a) "Hello.\\nAny other questions?": ends with the phrase -> True, True.
    line 4 (key 2, b) "Hello. Any other questions?\\n(Bye.)": ends with "(bye.)" -> strict
        False; without its last line it ends with the phrase -> loose True.
    line 5 (key 3): no such prompt -> not scored, counted, warned.
    Prompt level (one instruction each, so instruction level too): strict 2/4, loose 3/4.
    Keeping one response per prompt (the last) would score lines 2 and 4 only: strict 1/2.
    """
    data = write_jsonl(tmp_path / "ifeval.jsonl", [NO_COMMA, END_WITH])
    responses = write_jsonl(
        tmp_path / "responses.jsonl",
        [
            {"key": 1, "model": "a", "response": "hi, there"},
            {"key": 1, "model": "b", "response": "hi there"},
            {"prompt": END_WITH["prompt"], "model": "a", "response": "Hello.\nAny other questions?"},
            {"key": 2, "model": "b", "response": "Hello. Any other questions?\n(Bye.)"},
            {"key": 3, "model": "a", "response": "stray"},
        ],
    )
    out = tmp_path / "ifeval.json"
    result = evaluate(suites=["ifeval"], data=str(data), responses=str(responses), out=str(out))
    m = result["metrics"]
    assert m["prompt_level_strict"] == pytest.approx(2 / 4) and m["prompt_level_loose"] == pytest.approx(3 / 4)
    assert m["instruction_level_strict"] == pytest.approx(2 / 4)
    assert m["instruction_level_loose"] == pytest.approx(3 / 4)
    assert m["per_type"]["punctuation:no_comma"] == {"count": 2, "strict": 0.5, "loose": 0.5}
    assert m["per_type"]["startend:end_checker"] == {"count": 2, "strict": 0.5, "loose": 1.0}
    assert m["num_prompts"] == 2 and m["n"] == 2
    assert m["coverage"] == {
        "rows": 4,
        "prompts_answered": 2,
        "rows_per_prompt": {"min": 2, "max": 2},
        "unmatched_rows": 1,
        "unmatched_lines": [5],
    }
    samples = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
    assert samples == result["samples"]
    assert [(s["line"], s["model"], s["key"]) for s in samples] == [(1, "a", 1), (2, "b", 1), (3, "a", 2), (4, "b", 2)]
    assert [(s["strict"], s["loose"]) for s in samples] == [
        ([False], [False]),
        ([True], [True]),
        ([True], [True]),
        ([False], [True]),
    ]
    err = capsys.readouterr().err
    assert "warning: 1 row of" in err and "(line 5)" in err and "unmatched_rows" in err


def test_conversation_suites_score_every_row_with_several_rows_per_prompt(tmp_path):
    """References positive, negative, positive (keys 0, 1, 2); seven rows:

    line  record  response       exact_match  label (normalised) correct
    1     0       "positive"     yes          yes
    2     0       " Positive."   no           yes ("positive")
    3     1       "negative"     yes          yes
    4     1       "positive"     no           no    (matched by its prompt text)
    5     2       "positive"     yes          yes
    6     2       "negative"     no           no
    7     2       "positive"     yes          yes
    exact_match 4/7, accuracy 5/7; rows per prompt 2, 2, 3. Line 7's own "reference" field
    is kept as row_reference, beside the held-out reference.
    """
    given = write_jsonl(
        tmp_path / "given.jsonl",
        [
            {"key": 0, "model": "a", "response": "positive"},
            {"key": 0, "model": "b", "response": " Positive."},
            {"key": 1, "model": "a", "response": "negative"},
            {"prompt": "review 1", "model": "b", "response": "positive"},
            {"key": 2, "model": "a", "response": "positive"},
            {"key": "2", "model": "b", "response": "negative"},
            {"key": 2, "model": "c", "sample": 1, "reference": "from the row", "response": "positive"},
        ],
    )
    result = evaluate(suites=["exact_match", "accuracy"], data=str(held_out(tmp_path)), responses=str(given))
    m, samples = result["metrics"], result["samples"]
    assert m["exact_match"] == pytest.approx(4 / 7) and m["accuracy"] == pytest.approx(5 / 7)
    assert m["n"] == 3 and m["coverage"]["rows"] == 7 and m["coverage"]["prompts_answered"] == 3
    assert m["coverage"]["rows_per_prompt"] == {"min": 2, "max": 3} and m["coverage"]["unmatched_rows"] == 0
    assert [s["line"] for s in samples] == [1, 2, 3, 4, 5, 6, 7]
    assert [s["key"] for s in samples] == ["0", "0", "1", "1", "2", "2", "2"]
    assert [s["correct"] for s in samples] == [True, False, True, False, True, False, True]
    assert [s["label_correct"] for s in samples] == [True, True, True, False, True, False, True]
    assert [s["model"] for s in samples] == ["a", "b", "a", "b", "a", "b", "c"]
    assert samples[6]["sample"] == 1 and samples[6]["row_reference"] == "from the row"
    assert samples[6]["reference"] == "positive"


def test_unmatched_rows_are_counted_and_warned_and_a_missing_record_is_still_an_error(tmp_path, capsys):
    data = str(held_out(tmp_path))
    given = write_jsonl(
        tmp_path / "given.jsonl",
        [{"key": k, "response": "positive"} for k in (0, 1, 2, 7)] + [{"prompt": "review 9", "response": "x"}],
    )
    m = evaluate(suites=["exact_match"], data=data, responses=str(given))["metrics"]
    assert (m["coverage"]["unmatched_rows"], m["coverage"]["unmatched_lines"]) == (2, [4, 5])
    assert m["exact_match"] == pytest.approx(2 / 3)  # positive is right for records 0 and 2
    err = capsys.readouterr().err
    assert "warning: 2 rows of" in err and "lines 4, 5" in err
    # With --limit 2, the row for record 2 answers nothing either.
    m = evaluate(suites=["exact_match"], data=data, responses=str(given), limit=2)["metrics"]
    assert m["n"] == 2 and m["coverage"]["unmatched_rows"] == 3
    partial = write_jsonl(tmp_path / "partial.jsonl", [{"key": 0, "response": "a"}, {"key": 0, "response": "b"}])
    with pytest.raises(InputError, match="no response for held-out record 1") as err:
        evaluate(suites=["exact_match"], data=data, responses=str(partial))
    assert err.value.file == str(partial) and err.value.field == "response"


def test_a_row_that_could_answer_two_records_is_an_error(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "same"}, {"role": "assistant", "content": ref}]} for ref in ("a", "b")
    ]
    data = write_jsonl(tmp_path / "dup.jsonl", rows)
    given = write_jsonl(tmp_path / "given.jsonl", [{"prompt": "same", "response": "a"}])
    with pytest.raises(InputError, match="answers both held-out record 0 .* and held-out record 1") as err:
        evaluate(suites=["exact_match"], data=str(data), responses=str(given))
    assert err.value.line == 1


def test_winrate_compares_every_row_with_the_one_baseline_response_to_its_prompt(tmp_path, monkeypatch):
    """The judge scores a response by its length. A has two rows for record 0; B one per record
    (and one stray row). Per row, A vs B: 8 vs 8 tie, 10 vs 8 win, 3 vs 8 loss, 8 vs 3 win ->
    W 2, T 1, L 1, win rate (2 + 1/2) / 4 = 0.625. reward_mean (8 + 10 + 3 + 8) / 4 = 7.25 and
    baseline_reward_mean over the same rows (8 + 8 + 8 + 3) / 4 = 6.75. B's three responses
    are judged once each. A baseline with two rows for one prompt is an error naming them,
    raised before any model loads."""
    judged: list[list[str]] = []

    def judge(self, prompts, responses):
        judged.append(list(responses))
        return [float(len(r)) for r in responses]

    monkeypatch.setattr(instructkit.eval.reward.RewardJudge, "__call__", judge)
    data = str(held_out(tmp_path))
    a = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"key": 0, "response": "positive"},
            {"key": 0, "sample": 2, "response": "positive!!"},
            {"key": 1, "response": "neg"},
            {"key": 2, "response": "positive"},
        ],
    )
    b = write_jsonl(
        tmp_path / "b.jsonl",
        [
            {"key": 0, "response": "positive"},
            {"key": 1, "response": "negative"},
            {"key": 2, "response": "pos"},
            {"key": 5, "response": "stray"},
        ],
    )
    result = evaluate(
        suites=["reward", "winrate"], data=data, responses=str(a), baseline_responses=str(b), reward_model="rm"
    )
    m = result["metrics"]
    assert (m["wins"], m["ties"], m["losses"]) == (2, 1, 1) and m["win_rate"] == pytest.approx(0.625)
    assert m["reward_mean"] == pytest.approx(7.25) and m["baseline_reward_mean"] == pytest.approx(6.75)
    assert [s["outcome"] for s in result["samples"]] == ["tie", "win", "loss", "win"]
    assert judged == [["positive", "positive!!", "neg", "positive"], ["positive", "negative", "pos"]]
    assert m["coverage"]["baseline"]["rows"] == 3 and m["coverage"]["baseline"]["unmatched_rows"] == 1

    doubled = write_jsonl(
        tmp_path / "doubled.jsonl",
        [
            {"key": 0, "response": "x"},
            {"key": 1, "response": "y"},
            {"key": 1, "response": "z"},
            {"key": 2, "response": "w"},
        ],
    )
    with pytest.raises(InputError, match=r"2 rows \(lines 2, 3\) answer held-out record 1") as err:
        evaluate(suites=["winrate"], data=data, responses=str(a), baseline_responses=str(doubled), reward_model="rm")
    assert err.value.file == str(doubled)
    with pytest.raises(InputError, match="2 rows"):  # before model A loads (the fixture forbids it)
        evaluate(model="A", suites=["winrate"], data=data, baseline_responses=str(doubled), reward_model="rm")
