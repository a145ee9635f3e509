"""instructkit.verifiers.ifeval: each check on hand-made cases, loose scoring, aggregate math,
the reward form, and the reader's errors.

Expected verdicts come from reading each rule (see the check's docstring), not from a run;
``test_ifeval_parity.py`` is where the reference implementation is consulted.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from instructkit.errors import InputError
from instructkit.verifiers import (
    INSTRUCTIONS,
    aggregate,
    evaluate_response,
    ifeval,
    ifeval_reward,
    loose_variants,
    read_ifeval_jsonl,
)


def check(instruction_id: str, response: str, **kwargs) -> bool:
    return INSTRUCTIONS[instruction_id](response, **kwargs)


def test_registry_has_the_25_benchmark_ids():
    prefixes = {
        "keywords": 4,
        "language": 1,
        "length_constraints": 4,
        "detectable_content": 2,
        "detectable_format": 6,
        "combination": 2,
        "startend": 2,
        "change_case": 3,
        "punctuation": 1,
    }
    assert len(INSTRUCTIONS) == 25
    for prefix, n in prefixes.items():
        assert sum(i.startswith(prefix + ":") for i in INSTRUCTIONS) == n, prefix


def test_import_is_light():
    """nltk and langdetect load on first use, never at import; torch and transformers never."""
    code = (
        "import sys, instructkit.verifiers, instructkit.rewards; "
        "print(sorted(m for m in ('torch', 'transformers', 'nltk', 'langdetect') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- keywords ----------------------------------------------------------------------------------


def test_keywords_existence_ignores_case_and_matches_inside_words():
    assert check("keywords:existence", "A RIVER of bread", keywords=["river", "bread"])
    assert check("keywords:existence", "riverbank", keywords=["river"])  # substring counts
    assert not check("keywords:existence", "A river", keywords=["river", "bread"])


def test_keywords_frequency_boundaries():
    """ "fake Fake FAKE fakery" holds 4 case-insensitive occurrences (fakery included)."""
    text = "fake Fake FAKE fakery"
    assert check("keywords:frequency", text, keyword="fake", frequency=4, relation="at least")
    assert not check("keywords:frequency", text, keyword="fake", frequency=5, relation="at least")
    assert check("keywords:frequency", text, keyword="fake", frequency=5, relation="less than")
    assert not check("keywords:frequency", text, keyword="fake", frequency=4, relation="less than")


def test_keywords_are_literal_text():
    """'C++' is three characters to find, not a broken regular expression."""
    assert check("keywords:existence", "I write C++ daily", keywords=["C++"])
    assert not check("keywords:existence", "I write C daily", keywords=["C++"])
    assert not check("keywords:forbidden_words", "I write C++ daily", forbidden_words=["c++"])


def test_forbidden_words_match_whole_words_only():
    assert not check("keywords:forbidden_words", "We ROCK!", forbidden_words=["rock"])
    assert check("keywords:forbidden_words", "A rocky road", forbidden_words=["rock"])
    assert not check("keywords:forbidden_words", "rock-solid", forbidden_words=["rock"])  # '-' is a boundary


def test_letter_frequency_counts_the_letter_in_either_case():
    """ "Quick quiet Q" has three q's."""
    assert check("keywords:letter_frequency", "Quick quiet Q", letter="q", let_frequency=3, let_relation="at least")
    assert not check(
        "keywords:letter_frequency", "Quick quiet Q", letter="Q", let_frequency=3, let_relation="less than"
    )
    assert check("keywords:letter_frequency", "# one ## two", letter="#", let_frequency=3, let_relation="at least")


# --- language and case ---------------------------------------------------------------------------


def test_response_language():
    german = "Das ist ein schöner Tag und wir gehen heute gemeinsam in den Park."
    assert check("language:response_language", german, language="de")
    assert not check("language:response_language", german, language="en")
    assert check("language:response_language", "12345 678", language="de")  # undetectable passes


def test_english_capital_and_lowercase():
    assert check("change_case:english_capital", "THIS IS AN ENGLISH SENTENCE ABOUT THE WEATHER.")
    assert not check("change_case:english_capital", "THIS IS An ENGLISH SENTENCE.")
    assert not check("change_case:english_capital", "DAS IST EIN DEUTSCHER SATZ ÜBER DAS WETTER HEUTE.")
    assert check("change_case:english_lowercase", "this is an english sentence about the weather.")
    assert not check("change_case:english_lowercase", "this is an English sentence.")
    assert not check("change_case:english_lowercase", "12345")  # no cased letter: not lower case


def test_language_verdicts_are_repeatable():
    """langdetect samples at random; ours is seeded, so a borderline text keeps its verdict."""
    text = "ok ja nein yes"
    assert len({ifeval.detect_language(text) for _ in range(20)}) == 1


def test_capital_word_frequency_counts_nltk_word_tokens():
    """Tokens: THE BIG dog ran . -> 2 capitals; "I'M" splits into I + 'M, both capital;
    "U.S." stays one token."""
    assert check(
        "change_case:capital_word_frequency", "THE BIG dog ran.", capital_frequency=2, capital_relation="at least"
    )
    assert not check(
        "change_case:capital_word_frequency", "THE BIG dog ran.", capital_frequency=3, capital_relation="at least"
    )
    assert check("change_case:capital_word_frequency", "I'M here", capital_frequency=2, capital_relation="at least")
    assert ifeval.word_tokens("I'M in the U.S. now.") == ["I", "'M", "in", "the", "U.S.", "now", "."]
    assert check("change_case:capital_word_frequency", "no caps", capital_frequency=1, capital_relation="less than")


# --- length --------------------------------------------------------------------------------------


def test_number_words_counts_word_character_runs():
    """ "don't stop-me now" -> don, t, stop, me, now: 5 words."""
    assert ifeval.count_words("don't stop-me now") == 5
    assert check("length_constraints:number_words", "don't stop-me now", num_words=5, relation="at least")
    assert not check("length_constraints:number_words", "don't stop-me now", num_words=5, relation="less than")
    assert check("length_constraints:number_words", "don't stop-me now", num_words=6, relation="less than")


def test_number_sentences_uses_punkt_abbreviations():
    """ "Dr." is a known abbreviation, so "Dr. Smith left. He ran." is two sentences, not three."""
    assert ifeval.count_sentences("Dr. Smith left. He ran.") == 2
    assert check("length_constraints:number_sentences", "Dr. Smith left. He ran.", num_sentences=2, relation="at least")
    assert not check(
        "length_constraints:number_sentences", "Dr. Smith left. He ran.", num_sentences=2, relation="less than"
    )
    assert check("length_constraints:number_sentences", "One. Two. Three.", num_sentences=4, relation="less than")


def test_number_paragraphs_splits_on_markdown_dividers():
    assert check("length_constraints:number_paragraphs", "a\n***\nb\n***\nc", num_paragraphs=3)
    assert check("length_constraints:number_paragraphs", "***\na\n***\nb\n***", num_paragraphs=2)  # blank ends ok
    assert not check("length_constraints:number_paragraphs", "a\n***\n***\nb", num_paragraphs=2)  # blank middle
    assert not check("length_constraints:number_paragraphs", "a\n\nb\n\nc", num_paragraphs=3)  # no dividers


def test_nth_paragraph_first_word():
    text = 'Intro.\n\n"Elm," she said.\n\nOutro.'
    assert check(
        "length_constraints:nth_paragraph_first_word", text, num_paragraphs=3, nth_paragraph=2, first_word="elm"
    )
    assert not check(
        "length_constraints:nth_paragraph_first_word", text, num_paragraphs=2, nth_paragraph=2, first_word="elm"
    )
    assert not check(
        "length_constraints:nth_paragraph_first_word",
        "A\n\nElmwood b\n\nC",
        num_paragraphs=3,
        nth_paragraph=2,
        first_word="elm",
    )
    # A blank paragraph before the n-th: counted out of the total, but still in the indexing.
    blank_first = "Intro.\n\n\n\nElm trees.\n\nOutro."
    assert not check(
        "length_constraints:nth_paragraph_first_word", blank_first, num_paragraphs=3, nth_paragraph=2, first_word="elm"
    )


# --- content and format --------------------------------------------------------------------------


def test_placeholders_postscript_and_constrained_response():
    assert check("detectable_content:number_placeholders", "Dear [name] at [address]", num_placeholders=2)
    assert not check("detectable_content:number_placeholders", "Dear [name]", num_placeholders=2)
    assert check("detectable_content:postscript", "Hi.\np. s. bye", postscript_marker="P.S.")
    assert not check("detectable_content:postscript", "Hi.\nPS bye", postscript_marker="P.S.")
    assert check("detectable_content:postscript", "Hi.\nP.P.S bye", postscript_marker="P.P.S")
    assert check("detectable_format:constrained_response", "Well. My answer is maybe.")
    assert not check("detectable_format:constrained_response", "my answer is yes.")


def test_bullets_highlights_sections():
    assert check("detectable_format:number_bullet_lists", "* one\n- two", num_bullets=2)
    assert not check("detectable_format:number_bullet_lists", "**bold**\n* one", num_bullets=2)
    # "*a* **b**": the italic *a* and the bold **b** (its stars pair up as two empty "**").
    assert check("detectable_format:number_highlighted_sections", "*a* **b**", num_highlights=2)
    assert not check("detectable_format:number_highlighted_sections", "*a* **b**", num_highlights=3)
    # "***x***": the italic *x* inside, and the bold **x** around it.
    assert check("detectable_format:number_highlighted_sections", "***x***", num_highlights=2)
    assert check(
        "detectable_format:multiple_sections", "SECTION 1\na\nSECTION 2\nb", section_spliter="SECTION", num_sections=2
    )
    assert not check(
        "detectable_format:multiple_sections", "Section 1\na\nSection 2\nb", section_spliter="SECTION", num_sections=2
    )


def test_json_title_two_responses_quotation():
    assert check("detectable_format:json_format", '```json\n{"a": 1}\n```')
    assert not check("detectable_format:json_format", 'Here: {"a": 1}')
    assert check("detectable_format:title", "<<Title>>\nBody")
    assert not check("detectable_format:title", "<< >>\nBody")
    assert check("combination:two_responses", "One.\n******\nTwo.")
    assert not check("combination:two_responses", "Same.\n******\nSame.")
    assert not check("combination:two_responses", "A\n******\n\n******\nB")  # blank middle part
    assert check("startend:quotation", '  "Wrapped."  ')
    assert not check("startend:quotation", '"')


def test_startend_repeat_prompt_and_no_comma():
    assert check("combination:repeat_prompt", "  WRITE A POEM. Roses...", prompt_to_repeat="Write a poem.")
    assert not check("combination:repeat_prompt", "Sure! Write a poem.", prompt_to_repeat="Write a poem.")
    assert check("startend:end_checker", 'Done. "Any other questions?"', end_phrase="Any other questions?")
    assert not check("startend:end_checker", "Any other questions? Bye.", end_phrase="Any other questions?")
    assert check("punctuation:no_comma", "No commas，only this one")
    assert not check("punctuation:no_comma", "One, two")


# --- scoring -------------------------------------------------------------------------------------


def test_loose_variants_drop_first_or_last_line_and_stars():
    assert loose_variants("Sure:\n**Hi**\nBye") == [
        "Sure:\n**Hi**\nBye",
        "**Hi**\nBye",
        "Sure:\n**Hi**",
        "**Hi**",
        "Sure:\nHi\nBye",
        "Hi\nBye",
        "Sure:\nHi",
        "Hi",
    ]


def test_evaluate_response_strict_and_loose():
    """The preamble line breaks strict quotation; dropping it (a loose variant) passes. The comma
    sits in the preamble too, so no_comma is also loose-only. The title is there either way."""
    ids = ["startend:quotation", "punctuation:no_comma", "detectable_format:title"]
    result = evaluate_response("p", 'Sure, here:\n"<<T>> done"', ids, [{}, {}, {}])
    assert result["strict"] == [False, False, True]
    assert result["loose"] == [True, True, True]
    assert (result["prompt_strict"], result["prompt_loose"]) == (False, True)


def test_blank_response_follows_nothing():
    """no_comma("") is vacuously true, but the benchmark scores a blank response as failing."""
    assert check("punctuation:no_comma", "")
    result = evaluate_response("p", "  \n", ["punctuation:no_comma"], [{}])
    assert result["strict"] == [False] and result["loose"] == [False]


def test_aggregate_math():
    """Prompt 1: 2 instructions, strict [T, F], loose [T, T]. Prompt 2: 1 instruction, strict
    [T], loose [T]. Prompt level: strict 1/2, loose 2/2. Instruction level: strict 2/3, loose
    3/3. no_comma: 2 seen, strict 2/2; title: 1 seen, strict 0/1, loose 1/1."""
    results = [
        {
            "instruction_id_list": ["punctuation:no_comma", "detectable_format:title"],
            "strict": [True, False],
            "loose": [True, True],
            "prompt_strict": False,
            "prompt_loose": True,
        },
        {
            "instruction_id_list": ["punctuation:no_comma"],
            "strict": [True],
            "loose": [True],
            "prompt_strict": True,
            "prompt_loose": True,
        },
    ]
    summary = aggregate(results)
    assert summary["num_prompts"] == 2 and summary["num_instructions"] == 3
    assert summary["prompt_level_strict"] == 0.5
    assert summary["prompt_level_loose"] == 1.0
    assert summary["instruction_level_strict"] == pytest.approx(2 / 3)
    assert summary["instruction_level_loose"] == 1.0
    assert summary["per_type"] == {
        "detectable_format:title": {"count": 1, "strict": 0.0, "loose": 1.0},
        "punctuation:no_comma": {"count": 2, "strict": 1.0, "loose": 1.0},
    }
    with pytest.raises(ValueError):
        aggregate([])


def test_ifeval_reward_is_the_strict_fraction():
    """Two of three instructions pass (no comma, a title; the quotation fails): 2/3."""
    record = {
        "key": 7,
        "instruction_id_list": ["punctuation:no_comma", "detectable_format:title", "startend:quotation"],
        "kwargs": [{}, {}, {}],
    }
    assert ifeval_reward("p", "<<T>> done", **record) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        ifeval_reward("p", "x", instruction_id_list=[], kwargs=[])


def test_evaluate_response_rejects_bad_arguments():
    with pytest.raises(InputError, match=r"did you mean 'punctuation:no_comma'"):
        evaluate_response("p", "r", ["punctuation:no_commas"], [{}])
    with pytest.raises(InputError, match=r"kwargs\[0\].num_word.*did you mean 'num_words'"):
        evaluate_response("p", "r", ["length_constraints:number_words"], [{"num_word": 3, "relation": "at least"}])
    with pytest.raises(InputError, match=r"needs num_words"):
        evaluate_response("p", "r", ["length_constraints:number_words"], [{"relation": "at least"}])
    with pytest.raises(InputError, match=r"unknown relation 'at most'"):
        evaluate_response("p", "r", ["length_constraints:number_words"], [{"num_words": 3, "relation": "at most"}])
    with pytest.raises(InputError, match=r"2 instruction ids but 1 kwargs"):
        evaluate_response("p", "r", ["punctuation:no_comma", "startend:quotation"], [{}])


# --- the reader ----------------------------------------------------------------------------------


def write_jsonl(path, *records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


GOOD = {
    "key": 1,
    "prompt": "Write.",
    "instruction_id_list": ["length_constraints:number_words"],
    "kwargs": [{"num_words": 10, "relation": "at least", "num_highlights": None}],
}


def test_reader_drops_null_arguments_and_keeps_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD, {**GOOD, "key": 2})
    prompts = read_ifeval_jsonl(path)
    assert [p.key for p in prompts] == [1, 2]
    assert prompts[0].kwargs == [{"num_words": 10, "relation": "at least"}]
    assert [p.line for p in prompts] == [1, 2]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"instruction_id_list": ["length_constraints:number_word"]},
            r"d.jsonl:2, field 'instruction_id_list\[0\]': unknown instruction id 'length_constraints:number_word' \(did you mean 'length_constraints:number_words'\?\)",
        ),
        ({"kwargs": [{"num_words": 10, "relaton": "at least"}]}, r"kwargs\[0\]\.relaton.*did you mean 'relation'"),
        ({"kwargs": [{"num_words": "ten", "relation": "at least"}]}, r"kwargs\[0\]\.num_words.*expected int, got str"),
        ({"kwargs": []}, r"field 'kwargs'.*one per instruction id"),
        ({"prompt": None}, r"field 'prompt'.*expected a string"),
        ({"instruction_id_list": []}, r"no instructions"),
    ],
)
def test_reader_errors_name_file_line_and_field(tmp_path, change, message):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD, {**GOOD, **change})
    with pytest.raises(InputError, match=message) as info:
        read_ifeval_jsonl(path)
    assert info.value.file == path and info.value.line == 2


def test_reader_missing_field(tmp_path):
    record = {k: v for k, v in GOOD.items() if k != "kwargs"}
    with pytest.raises(InputError, match=r"d.jsonl:1: missing field 'kwargs'"):
        read_ifeval_jsonl(write_jsonl(tmp_path / "d.jsonl", record))


def test_reader_loads_the_real_benchmark(shared_data):
    """All 541 prompts of Google's input_data.jsonl, 834 instructions in all."""
    prompts = read_ifeval_jsonl(shared_data / "ifeval" / "input_data.jsonl")
    assert len(prompts) == 541
    assert sum(len(p.instruction_id_list) for p in prompts) == 834
    assert {i for p in prompts for i in p.instruction_id_list} == set(INSTRUCTIONS)
