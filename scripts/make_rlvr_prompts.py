"""Make the shipped ``rlvr_prompts`` set: instructions with verifiable constraints, for RL with
verifier rewards (recipes/rlvr.yaml) and for its held-out check.

Each record is an IFEval-format prompt (``key``, ``prompt``, ``instruction_id_list``, ``kwargs``)
that the ``ifeval`` suite scores and ``instructkit.verifiers:ifeval_reward`` rewards. A prompt is a
short writing task written for this project ("Describe a quiet morning in a harbour town.") and
one or two constraints, each of the 25 kinds the IFEval checkers verify, worded here in two or
three phrasings of our own (none taken from IFEval; ``tests/test_rlvr_prompts.py`` checks that no
IFEval prompt and no long run of IFEval's words occurs in them). The numbers are small enough for
a short answer: at most 5 sentences, 80 words, 3 bullets, so the constraint and not the length
budget decides the reward at ``max_new_tokens`` 96 to 128.

``train``: 600 prompts, 24 per kind as the first constraint, a third of them with a second,
compatible constraint; ``test``: 100 (4 per kind), from tasks the train split does not use. The
kinds rotate, so every prefix of a split covers them evenly.

Pure Python, seeded: the same script always writes byte-identical files.

    python scripts/make_rlvr_prompts.py               # into instructkit/datasets/
    python scripts/make_rlvr_prompts.py --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATASETS = HERE.parent / "instructkit" / "datasets"

# Short writing tasks, written for this project. The last 20 are held out for the test split.
TASKS = (
    "Describe a quiet morning in a harbour town.",
    "Explain how a bicycle gear works to a ten-year-old.",
    "Write a short note to a neighbour whose cat keeps visiting your kitchen.",
    "Give advice to someone starting to grow tomatoes on a balcony.",
    "Describe the taste of fresh bread to someone who has never eaten it.",
    "Write a product description for a waterproof hiking boot.",
    "Tell a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain why the sky looks blue during the day.",
    "Write a thank-you message to a teacher at the end of the school year.",
    "Describe your ideal weekend in the mountains.",
    "Explain what a budget is and why a student might keep one.",
    "Write a short review of an imaginary pizza restaurant.",
    "Give three reasons to learn a second language.",
    "Describe how to make a cup of green tea.",
    "Write an invitation to a small garden party.",
    "Explain how rain forms.",
    "Write a welcome message for new members of a chess club.",
    "Describe a busy train station at rush hour.",
    "Explain the rules of hide and seek.",
    "Write a short poem about autumn leaves.",
    "Give tips for staying focused while studying at home.",
    "Describe a robot that helps in a library.",
    "Write a message to a friend who just moved to a new city.",
    "Explain how to plant a tree.",
    "Describe the sound of a thunderstorm at night.",
    "Write an announcement that the office kitchen will be closed on Friday.",
    "Explain why people keep houseplants.",
    "Tell a short story about a dog who learns to surf.",
    "Describe a market selling spices and fruit.",
    "Give advice to someone preparing for their first job interview.",
    "Write a short speech for the opening of a community bakery.",
    "Explain how a compass helps hikers.",
    "Describe a winter festival in a small village.",
    "Write a note asking a colleague to review a report.",
    "Explain what recycling is and why it matters.",
    "Describe an old bookshop on a rainy afternoon.",
    "Write a short biography of an imaginary inventor named Lena Ortiz.",
    "Give instructions for packing a suitcase for a beach holiday.",
    "Explain how bees make honey.",
    "Write a short apology for arriving late to a meeting.",
    "Describe the view from the top of a tall tower.",
    "Write a riddle whose answer is a clock.",
    "Explain how to take care of a goldfish.",
    "Describe a picnic by a lake.",
    "Write a short motivational message for a running club.",
    "Explain what happens when water boils.",
    "Write a postcard from a holiday in a fishing village.",
    "Describe a kitchen at dinner time in a large family.",
    "Give advice for a first visit to a museum.",
    "Explain why exercise is good for sleep.",
    "Write a short story about a snowman who wants to see summer.",
    "Describe the job of a park ranger.",
    "Write a note for a lost umbrella found on a bus.",
    "Explain how a library lends books.",
    "Describe a sunrise over the desert.",
    # held out for the test split
    "Describe a night market in a coastal city.",
    "Explain how a kite stays in the air.",
    "Write a short note thanking a bus driver.",
    "Give advice for keeping a room tidy.",
    "Describe a field of sunflowers in July.",
    "Write a product description for a reusable water bottle.",
    "Tell a short story about a clockmaker and a broken watch.",
    "Explain why leaves change colour in autumn.",
    "Write an invitation to a neighbourhood clean-up day.",
    "Describe a bakery early in the morning.",
    "Explain how to fold a paper boat.",
    "Write a short welcome for visitors to a botanical garden.",
    "Describe a ferry crossing on a windy day.",
    "Give tips for learning to play the guitar.",
    "Write a message congratulating a friend on a new job.",
    "Explain what a map legend is.",
    "Describe a street musician playing in the evening.",
    "Write a short story about a turtle who enters a race.",
    "Explain how to save energy at home.",
    "Describe a school playground after the last bell.",
)
HELD_OUT = 20

# Yes-or-no questions for the fixed-answer kind (detectable_format:constrained_response).
QUESTIONS = (
    "Is it a good idea to water plants at noon in hot weather?",
    "Can a bicycle be faster than a car in city traffic?",
    "Should a beginner run a marathon in their first month of training?",
    "Is reading before bed a good habit?",
    "Do cats need to drink water every day?",
    "Is it safe to swim right after eating a big meal?",
    "Can music help people concentrate?",
    "Should children learn to cook?",
    "Is a library card useful in the age of the internet?",
    "Can plants grow without sunlight?",
    "Is it worth learning to touch type?",
    "Should a city build more bicycle lanes?",
    # held out for the test split
    "Is breakfast the most important meal of the day?",
    "Can a houseplant improve a room's air?",
    "Should people take a walk after lunch?",
    "Is it easier to learn a language as a child?",
)
HELD_OUT_QUESTIONS = 4

WORDS = ("river", "lantern", "orange", "garden", "window", "silver", "journey", "candle", "meadow", "bridge")
FORBIDDEN = ("very", "really", "thing", "good", "nice", "just", "great", "also", "many", "always")
LETTERS = "bcdfgkmprtw"
END_PHRASES = ("That is all for today.", "Thanks for reading.", "See you soon.", "Have a lovely day.")
LANGUAGES = {"de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "pt": "Portuguese"}
SPLITTERS = ("Section", "Part")
FIRST_WORDS = ("today", "first", "finally", "sometimes", "imagine")


def _relation(rng: random.Random) -> str:
    return rng.choice(("less than", "at least"))


def _pick(rng: random.Random, *phrasings: str) -> str:
    return rng.choice(phrasings)


# Each kind: rng -> (constraint text, kwargs). The texts are this project's own wording.
Constraint = Callable[[random.Random], tuple[str, dict]]


def _keywords_existence(rng):
    a, b = rng.sample(WORDS, 2)
    return _pick(
        rng,
        f"Use the words '{a}' and '{b}' somewhere in your answer.",
        f"Your reply has to mention both '{a}' and '{b}'.",
    ), {"keywords": [a, b]}


def _keywords_frequency(rng):
    word, n = rng.choice(WORDS), rng.randint(2, 3)
    return _pick(
        rng, f"Say the word '{word}' at least {n} times.", f"The word '{word}' should come up {n} or more times."
    ), {"keyword": word, "frequency": n, "relation": "at least"}


def _forbidden(rng):
    a, b = rng.sample(FORBIDDEN, 2)
    return _pick(rng, f"Never use the words '{a}' or '{b}'.", f"Avoid the words '{a}' and '{b}' entirely."), {
        "forbidden_words": [a, b]
    }


def _letter_frequency(rng):
    letter, relation = rng.choice(LETTERS), _relation(rng)
    n = rng.randint(2, 4) if relation == "less than" else rng.randint(3, 6)
    text = (
        f"The letter '{letter}' may appear fewer than {n} times."
        if relation == "less than"
        else f"Make sure the letter '{letter}' appears {n} or more times."
    )
    return text, {"letter": letter, "let_frequency": n, "let_relation": relation}


def _language(rng):
    code = rng.choice(sorted(LANGUAGES))
    return _pick(
        rng, f"Write the whole answer in {LANGUAGES[code]}, with no English.", f"Reply only in {LANGUAGES[code]}."
    ), {"language": code}


def _sentences(rng):
    relation = _relation(rng)
    n = rng.randint(3, 5) if relation == "less than" else rng.randint(2, 4)
    text = f"Keep it to fewer than {n} sentences." if relation == "less than" else f"Write {n} sentences or more."
    return text, {"num_sentences": n, "relation": relation}


def _paragraphs(rng):
    n = rng.randint(2, 3)
    return _pick(
        rng,
        f"Split the answer into exactly {n} paragraphs with the divider *** between them.",
        f"Give {n} paragraphs, no more and no fewer, separated by a line with ***.",
    ), {"num_paragraphs": n}


def _words(rng):
    relation = _relation(rng)
    n = rng.choice((30, 40, 50, 60, 80)) if relation == "less than" else rng.choice((20, 30, 40))
    text = (
        f"Use fewer than {n} words."
        if relation == "less than"
        else f"The answer should be {n} words long at the very least."
    )
    return text, {"num_words": n, "relation": relation}


def _nth_paragraph(rng):
    n, word = 2, rng.choice(FIRST_WORDS)
    nth = rng.randint(1, 2)
    ordinal = {1: "first", 2: "second"}[nth]
    return (
        f"Write exactly {n} paragraphs separated by a blank line, and begin the {ordinal} paragraph with the word '{word}'.",
        {"num_paragraphs": n, "nth_paragraph": nth, "first_word": word},
    )


def _placeholders(rng):
    n = rng.randint(1, 3)
    return _pick(
        rng,
        f"Leave at least {n} blanks in square brackets, such as [place] or [date].",
        f"Put {n} or more placeholders in square brackets in the text, like [name].",
    ), {"num_placeholders": n}


def _postscript(rng):
    marker = rng.choice(("P.S.", "P.P.S"))
    return _pick(
        rng,
        f"Finish with a short note that starts with {marker}",
        f"Add a postscript at the end beginning with {marker}",
    ), {"postscript_marker": marker}


def _bullets(rng):
    n = rng.randint(2, 4)
    return _pick(
        rng,
        f"Answer as a markdown list of exactly {n} bullet points starting with *.",
        f"Format the answer as {n} bullet points (lines starting with '* '), no more and no fewer.",
    ), {"num_bullets": n}


def _constrained(rng):
    return (
        "Reply with one of these exact sentences: 'My answer is yes.', 'My answer is no.' or 'My answer is maybe.'",
        {},
    )


def _highlights(rng):
    n = rng.randint(1, 3)
    return _pick(
        rng,
        f"Highlight at least {n} phrases with markdown, like *this phrase*.",
        f"Mark {n} or more parts of the text in italics with single asterisks.",
    ), {"num_highlights": n}


def _sections(rng):
    splitter, n = rng.choice(SPLITTERS), rng.randint(2, 3)
    return (
        f"Organise the answer in {n} parts, each starting with a header line '{splitter} 1', '{splitter} 2' and so on.",
        {"section_spliter": splitter, "num_sections": n},
    )


def _json(rng):
    return _pick(
        rng, "Give the whole reply as valid JSON.", "Return your answer as a JSON object and nothing else."
    ), {}


def _title(rng):
    return _pick(
        rng,
        "Start with a title inside double angle brackets, for example <<My Title>>.",
        "Give the answer a title written like <<a title>>.",
    ), {}


def _two_responses(rng):
    return "Write two different answers, separated by a line of six asterisks: ******", {}


def _repeat(rng):
    return "", {}  # the task itself is the text to repeat (see _prompt)


def _end(rng):
    phrase = rng.choice(END_PHRASES)
    return _pick(
        rng,
        f"End the reply with the exact words '{phrase}' and nothing after them.",
        f"Your last words must be: {phrase}",
    ), {"end_phrase": phrase}


def _capital_words(rng):
    relation = _relation(rng)
    n = rng.randint(2, 4)
    text = (
        f"Use fewer than {n} words written in all capital letters."
        if relation == "less than"
        else f"Write at least {n} words in ALL CAPITALS for emphasis."
    )
    return text, {"capital_frequency": n, "capital_relation": relation}


def _all_capitals(rng):
    return _pick(
        rng,
        "Write everything in capital letters, in English.",
        "Your whole answer must be in English and in upper case.",
    ), {}


def _all_lowercase(rng):
    return _pick(
        rng,
        "Write everything in lowercase English letters; no capitals at all.",
        "Use only lowercase letters in your English answer.",
    ), {}


def _no_comma(rng):
    return _pick(rng, "Do not put a single comma in the answer.", "Avoid commas completely."), {}


def _quotation(rng):
    return _pick(
        rng, "Put the entire reply inside double quotation marks.", "Wrap your whole answer in double quotes."
    ), {}


KINDS: dict[str, Constraint] = {
    "keywords:existence": _keywords_existence,
    "keywords:frequency": _keywords_frequency,
    "keywords:forbidden_words": _forbidden,
    "keywords:letter_frequency": _letter_frequency,
    "language:response_language": _language,
    "length_constraints:number_sentences": _sentences,
    "length_constraints:number_paragraphs": _paragraphs,
    "length_constraints:number_words": _words,
    "length_constraints:nth_paragraph_first_word": _nth_paragraph,
    "detectable_content:number_placeholders": _placeholders,
    "detectable_content:postscript": _postscript,
    "detectable_format:number_bullet_lists": _bullets,
    "detectable_format:constrained_response": _constrained,
    "detectable_format:number_highlighted_sections": _highlights,
    "detectable_format:multiple_sections": _sections,
    "detectable_format:json_format": _json,
    "detectable_format:title": _title,
    "combination:two_responses": _two_responses,
    "combination:repeat_prompt": _repeat,
    "startend:end_checker": _end,
    "change_case:capital_word_frequency": _capital_words,
    "change_case:english_capital": _all_capitals,
    "change_case:english_lowercase": _all_lowercase,
    "punctuation:no_comma": _no_comma,
    "startend:quotation": _quotation,
}

# Second constraints that go with any first one except those listed against them.
SECOND = (
    "punctuation:no_comma",
    "keywords:existence",
    "keywords:forbidden_words",
    "detectable_content:postscript",
    "detectable_format:title",
    "startend:end_checker",
    "detectable_content:number_placeholders",
    "change_case:english_lowercase",
)
CLASHES = {
    "change_case:english_lowercase": {
        "change_case:english_capital",
        "change_case:capital_word_frequency",
        "detectable_format:title",
        "language:response_language",
        "detectable_format:constrained_response",
        "startend:end_checker",
        "detectable_format:multiple_sections",
        "combination:repeat_prompt",
    },
    "startend:end_checker": {
        "startend:quotation",
        "detectable_format:json_format",
        "combination:two_responses",
        "detectable_format:constrained_response",
        "change_case:english_capital",
        "language:response_language",
        "detectable_content:postscript",
    },
    "detectable_content:postscript": {
        "detectable_format:json_format",
        "startend:quotation",
        "detectable_format:constrained_response",
        "language:response_language",
    },
    "detectable_format:title": {
        "detectable_format:json_format",
        "startend:quotation",
        "detectable_format:constrained_response",
        "combination:repeat_prompt",
        "length_constraints:nth_paragraph_first_word",
    },
    "detectable_content:number_placeholders": {
        "detectable_format:constrained_response",
        "detectable_format:json_format",
    },
    "keywords:existence": {
        "detectable_format:constrained_response",
        "language:response_language",
        "keywords:frequency",
    },
    "keywords:forbidden_words": {"detectable_format:constrained_response"},
    "punctuation:no_comma": {"detectable_format:json_format"},
}


def _prompt(rng: random.Random, kinds: list[str], task: str) -> dict:
    texts, kwargs = [], []
    for kind in kinds:
        text, kw = KINDS[kind](rng)
        texts.append(text)
        kwargs.append(kw)
    if "combination:repeat_prompt" in kinds:  # the request, then how to repeat it
        index = kinds.index("combination:repeat_prompt")
        request = " ".join([task, *(t for t in texts if t)])
        kwargs[index] = {"prompt_to_repeat": request}
        return {
            "prompt": f"{request}\nBefore you answer, copy the request above word for word, with nothing in front of it; then answer it.",
            "instruction_id_list": kinds,
            "kwargs": kwargs,
        }
    return {"prompt": " ".join([task, *texts]), "instruction_id_list": kinds, "kwargs": kwargs}


def make(seed: int, n_train: int, n_test: int) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    pools = {
        "train": (TASKS[:-HELD_OUT], QUESTIONS[:-HELD_OUT_QUESTIONS]),
        "test": (TASKS[-HELD_OUT:], QUESTIONS[-HELD_OUT_QUESTIONS:]),
    }
    kinds = list(KINDS)
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        tasks, questions = pools[split]
        rows = []
        for i in range(n):
            first = kinds[i % len(kinds)]
            chosen = [first]
            if rng.random() < 1 / 3:
                options = [
                    k
                    for k in SECOND
                    if k != first and first not in CLASHES.get(k, ()) and k not in CLASHES.get(first, ())
                ]
                if options:
                    chosen.append(rng.choice(options))
            task = rng.choice(questions if first == "detectable_format:constrained_response" else tasks)
            rows.append({"key": f"{split}-{i}", **_prompt(rng, chosen, task)})
        splits[split] = rows
    return splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATASETS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--test", type=int, default=100)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for split, rows in make(args.seed, args.train, args.test).items():
        path = args.out / f"rlvr_prompts_{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"{path}: {len(rows)} prompts")


if __name__ == "__main__":
    main()
