"""Make the shipped encoder-task data: instructed ticket classification (``classify``) and NER (``ner``).

``classify``: support tickets, each under two instructions (records ``{"instruction", "text",
"label"}``). The same ticket is labelled by topic (billing / shipping / account / technical) under
one instruction and by mood (satisfied / unsatisfied) under the other, so a model has to read the
instruction to know which label it owes. Neither label is one keyword away:

* a ticket names its real problem in one clause and, most of the time, dismisses another topic
  in a distractor clause ("This is not a billing problem: the parcel never arrived");
* the mood is decided by how the ticket ends (resolved and thankful, or still waiting), while
  an opening remark shared by both moods carries emotional words ("I was really upset when this
  happened"), and the verdicts use negations ("I am not disappointed at all", "I can't say I'm
  pleased", "Thanks for nothing").

``ner``: one-sentence news and shop snippets as ``{"tokens", "tags"}`` records, BIO tags over
PER, ORG, LOC and PRODUCT: multi-token entities, entities first and last in a sentence, and
first names that are also cities (Florence, Sydney, Austin...) whose type only the context
tells. The test split is also written as a CoNLL-2003 file (``ner_test.conll``: token, POS,
chunk, NER tag; POS and chunk are not computed and hold the placeholders ``X`` and ``O``).

Held out, so that test measures generalisation rather than memory: explicit lists of names,
product brands, organisations, places and ticket phrasings that never occur in train (see the
``*_HELD_OUT`` constants). Train draws only from the seen lists; val from all of them; test
draws every customer name and product brand of a ticket, 40% of its phrasings and about half
of its entities from the held-out lists. No text (ticket or sentence) occurs in two splits.

Pure Python and seeded: the same arguments always write byte-identical files.

    python scripts/make_task_datasets.py                   # into instructkit/datasets/
    python scripts/make_task_datasets.py --out /tmp/x --seed 1 --classify 2400 200 300 --ner 2000 150 250
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SPLITS = ("train", "val", "test")
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "instructkit" / "datasets"
CLASSIFY_SIZES = {"train": 1200, "val": 200, "test": 300}  # records: two per ticket
NER_SIZES = {"train": 1000, "val": 150, "test": 250}

# ---------------------------------------------------------------------------------------------
# Shared word lists: customer / person first names and product brands

NAMES_SEEN = [
    "Ada", "Ben", "Cara", "Dev", "Elif", "Finn", "Gia", "Hugo", "Ines", "Jon", "Kira", "Leo", "Mila",
    "Nils", "Omar", "Pia", "Quinn", "Rosa", "Sami", "Tara", "Uma", "Viktor", "Wren", "Yuki", "Zane",
    "Amir", "Bea", "Carl", "Dina", "Emil", "Hana", "Ivan", "Jade", "Karl", "Lena", "Marco", "Nora",
    "Olga", "Paul", "Rhea",
]  # fmt: skip
NAMES_HELD_OUT = ["Anouk", "Bruno", "Chiara", "Dmitri", "Esme", "Farid", "Greta", "Ilse", "Kofi", "Maren"]
BRANDS_SEEN = [
    "Zephyr", "Nimbus", "Aurora", "Quill", "Lumen", "Orbit", "Vertex", "Pebble", "Cobalt", "Halo",
    "Juniper", "Kestrel",
]  # fmt: skip
BRANDS_HELD_OUT = ["Tundra", "Mistral", "Sable"]
MODELS = ["X2", "Pro", "Mini", "S5", "Air", "Max", "One", "Go", "3", "Plus"]
CATEGORIES = [
    "router", "headphones", "blender", "smartwatch", "laptop", "e-reader", "kettle", "camera", "speaker",
    "thermostat", "vacuum", "tablet",
]  # fmt: skip

# ---------------------------------------------------------------------------------------------
# classify: the two instructed tasks

TOPIC_INSTRUCTION = "What is this support ticket about? Answer billing, shipping, account or technical."
MOOD_INSTRUCTION = "Is the customer satisfied? Answer satisfied or unsatisfied."
TOPICS = ("billing", "shipping", "account", "technical")
MOODS = ("satisfied", "unsatisfied")
TASKS = {TOPIC_INSTRUCTION: TOPICS, MOOD_INSTRUCTION: MOODS}

# The real problem, per topic. Slots: {product} {amount} {days} {hours} {order}.
ISSUES_SEEN = {
    "billing": [
        "I was charged twice for the {product}",
        "the invoice for my {product} shows {amount} instead of the price on your website",
        "my refund of {amount} for the {product} has still not reached my card",
        "you billed me {amount} for a {product} subscription that I cancelled",
        "the discount code was not applied to order {order} and I paid {amount} too much",
        "my card was debited {amount} but order {order} for the {product} still says unpaid",
        "I was refunded only half of the {amount} you owe me",
        "the monthly fee for the {product} went up without any notice",
    ],
    "shipping": [
        "the {product} I ordered {days} days ago has still not arrived",
        "the parcel with my {product} was delivered to the wrong address",
        "the tracking page for order {order} has not changed in {days} days",
        "the courier left the {product} in a crushed box on my doorstep",
        "the {product} was sent to my old address even though I updated it",
        "order {order} was marked as delivered but no {product} ever reached me",
        "only half of order {order} arrived and the {product} is missing",
        "the courier keeps rescheduling the delivery of my {product}",
    ],
    "account": [
        "I cannot log in to my account to register the {product}",
        "the password reset email never comes, so I cannot see the warranty for my {product}",
        "someone changed the email address on my account after I bought the {product}",
        "my account was locked after three attempts to sign in",
        "the two-factor code is rejected every time I sign in to my profile",
        "I want my account deleted but the settings page keeps failing to save",
        "I cannot change the email address linked to my account",
        "my saved details disappeared from my profile after I signed in",
    ],
    "technical": [
        "the {product} keeps restarting every few minutes",
        "the {product} will not connect to my wifi",
        "the screen of the {product} stays black since the last update",
        "the companion app for the {product} crashes as soon as I open it",
        "the battery of the {product} is empty after {hours} hours",
        "the {product} makes a loud buzzing noise and then switches off",
        "the {product} does not turn on any more",
        "the touch buttons on the {product} stopped responding",
    ],
}
ISSUES_HELD_OUT = {
    "billing": [
        "your shop took {amount} from my card a second time for the same {product}",
        "I owe you nothing, yet the invoice for order {order} asks me to pay {amount}",
    ],
    "shipping": [
        "the courier says the parcel with my {product} is lost somewhere",
        "my {product} is stuck at the depot and the parcel has not moved for {days} days",
    ],
    "account": [
        "I forgot my password and the account recovery form rejects my email address",
        "my profile shows somebody else's name and address since I signed in yesterday",
    ],
    "technical": [
        "the firmware update broke my {product} completely",
        "the {product} overheats and freezes whenever I use it",
    ],
}
# Another topic, dismissed: "{dismissal}: {issue}." or "{issue}; {fine}."
DISMISSALS = [
    "This is not a {noun} problem",
    "It is not a {noun} matter",
    "I first thought it was a {noun} issue, but no",
    "Before you ask, this has nothing to do with {thing}",
]
NOUNS = {"billing": "billing", "shipping": "delivery", "account": "login", "technical": "technical"}
THINGS = {"billing": "billing", "shipping": "the delivery", "account": "my login", "technical": "the hardware"}
FINE = {
    "billing": ["the payment itself went through fine", "I was charged the right amount"],
    "shipping": ["the parcel arrived on time", "the delivery was quick"],
    "account": ["I can log in to my account without trouble", "my account details are all correct"],
    "technical": ["the device itself works perfectly", "the app runs without any errors"],
}
# Openings shared by both moods: emotional words that do not decide the mood.
OPENERS = [
    "I was really upset when this happened.",
    "I have been a happy customer for years.",
    "I was quite angry at first.",
    "I love your products, usually.",
    "This has been a stressful week.",
    "",
    "",
    "",
]
MOOD_SEEN = {
    "satisfied": [
        "Your agent sorted it out within an hour, thank you so much.",
        "Support fixed it quickly and I am really happy with the help.",
        "I have no complaints, the team resolved everything.",
        "Honestly, I am not disappointed at all, you handled it well.",
        "It is solved now and I would gladly buy from you again.",
        "Thanks, everything works as it should now.",
        "Everything is fine now, many thanks to your team.",
        "Great job, the issue was fixed the same day.",
        "I am impressed by how fast you dealt with it.",
        "Not a single problem since your fix, well done.",
    ],
    "unsatisfied": [
        "Nobody has answered my emails and I am fed up.",
        "I am not happy with the way this has been handled.",
        "Thanks for nothing, this is the third time I write.",
        "If this is not fixed by Friday I will never order from you again.",
        "Your agent was friendly, but it is still not solved and I am annoyed.",
        "I can't say I'm pleased with the service so far.",
        "Still waiting for a fix and getting angrier by the day.",
        "Your so-called help made it worse.",
        "I am not impressed, nothing has been done.",
        "Great job, now I have two problems instead of one.",
    ],
}
MOOD_HELD_OUT = {
    "satisfied": [
        "The problem was solved on the first call and I am very happy.",
        "You went above and beyond, I am delighted with the outcome.",
    ],
    "unsatisfied": [
        "I have waited a week for a reply and I am losing patience.",
        "This is unacceptable and I want to speak to a manager.",
    ],
}
GREETINGS = ["Hi, this is {name}.", "{name} here.", "Hello.", "Hi there.", "Dear support team:", ""]
SIGNOFFS = ["Regards, {name}", "- {name}", "Thanks, {name}", "{name}", ""]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _product(rng: random.Random, brands: list[str]) -> str:
    return f"{rng.choice(brands)} {rng.choice(MODELS)} {rng.choice(CATEGORIES)}"


def _pick(rng: random.Random, seen: list[str], held_out: list[str], p_held_out: float) -> str:
    return rng.choice(held_out if rng.random() < p_held_out else seen)


def ticket(rng: random.Random, topic: str, mood: str, split: str) -> str:
    """One ticket whose topic and mood are ``topic`` and ``mood``, with ``split``'s surface forms."""
    # train: seen forms only; val: any; test: held-out names and brands, 40% of the phrasings.
    p_forms = {"train": 0.0, "val": 0.2, "test": 0.4}[split]
    if split == "train":
        names, brands = NAMES_SEEN, BRANDS_SEEN
    elif split == "val":
        names, brands = NAMES_SEEN + NAMES_HELD_OUT, BRANDS_SEEN + BRANDS_HELD_OUT
    else:
        names, brands = NAMES_HELD_OUT, BRANDS_HELD_OUT
    name = rng.choice(names)
    slots = {
        "product": _product(rng, brands),
        "amount": f"${rng.randint(5, 400)}",
        "days": str(rng.randint(3, 30)),
        "hours": str(rng.randint(2, 9)),
        "order": f"#{rng.randint(10000, 99999)}",
    }
    issue = _pick(rng, ISSUES_SEEN[topic], ISSUES_HELD_OUT[topic], p_forms).format(**slots)
    other = rng.choice([t for t in TOPICS if t != topic])
    shape = rng.random()
    if shape < 0.4:
        body = f"{rng.choice(DISMISSALS).format(noun=NOUNS[other], thing=THINGS[other])}: {issue}."
    elif shape < 0.75:
        # ", but" only where the issue has no "but" of its own
        link = rng.choice(["; the problem is that", ". However,"] + ([] if " but " in issue else [", but"]))
        body = f"{_cap(rng.choice(FINE[other]))}{link} {issue}."
    else:
        body = f"{_cap(issue)}."
    verdict = _pick(rng, MOOD_SEEN[mood], MOOD_HELD_OUT[mood], p_forms)
    parts = [rng.choice(GREETINGS).format(name=name), rng.choice(OPENERS)]
    parts += [verdict, body] if rng.random() < 0.2 else [body, verdict]
    parts.append(rng.choice(SIGNOFFS).format(name=name))
    return " ".join(p for p in parts if p)


def build_classify(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """The records of every split: each ticket twice, once per instruction, in a shuffled order.
    The (topic, mood) pairs are balanced in each split; no ticket occurs in two splits."""
    sizes = sizes or CLASSIFY_SIZES
    rng = random.Random(seed)
    used: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split in SPLITS:
        n_tickets = sizes[split] // 2
        pairs = [(TOPICS[i % len(TOPICS)], MOODS[i // len(TOPICS) % len(MOODS)]) for i in range(n_tickets)]
        rng.shuffle(pairs)
        records = []
        for topic, mood in pairs:
            text = ticket(rng, topic, mood, split)
            while text in used:
                text = ticket(rng, topic, mood, split)
            used.add(text)
            records.append({"instruction": TOPIC_INSTRUCTION, "text": text, "label": topic})
            records.append({"instruction": MOOD_INSTRUCTION, "text": text, "label": mood})
        rng.shuffle(records)
        out[split] = records
    return out


# ---------------------------------------------------------------------------------------------
# ner: PER, ORG, LOC, PRODUCT

SURNAMES_SEEN = [
    "Lindqvist", "Okafor", "Moreau", "Tanaka", "Novak", "Silva", "Haddad", "Kowalski", "Brennan",
    "Costa", "Fischer", "Mensah", "Petrov", "Quiroga", "Rossi", "Sato", "Varga", "Weber",
]  # fmt: skip
SURNAMES_HELD_OUT = ["Achterberg", "Eriksdottir", "Nakashima", "Oyelaran"]
ORG_BASES_SEEN = [
    "Norvik", "Altamira", "Brightwell", "Castellan", "Dunmore", "Everline", "Fairport", "Greyhaven",
    "Holloway", "Ironbridge", "Kingsley", "Larchmont",
]  # fmt: skip
ORG_BASES_HELD_OUT = ["Quorvex", "Stellarion", "Wexford"]
ORG_SUFFIXES = ["Labs", "Group", "Bank", "Airlines", "Motors", "Foods", "Data Systems", "Media", "Energy"]
CITIES_SEEN = [
    "Oslo", "Lima", "Cairo", "Porto", "Lyon", "Kyoto", "Hanoi", "Riga", "Dakar", "Quito", "Graz",
    "New York", "Cape Town", "Buenos Aires", "San Diego", "Hong Kong", "Rio de Janeiro", "Tel Aviv",
]  # fmt: skip
CITIES_HELD_OUT = ["Reykjavik", "Tbilisi", "Kigali", "Addis Ababa", "Port Moresby", "Kuala Lumpur"]
# Words that are a first name and a city: the sentence, not the word, says which.
AMBIGUOUS = ["Florence", "Sydney", "Austin", "Jordan", "Victoria", "Madison", "Charlotte", "Adelaide", "Regina"]
P_AMBIGUOUS = 0.2

# {PER} {ORG} {LOC} {PROD} expand to entities, {a|b|c} to one of its words; everything else is
# one O token. The sentences without entities have alternatives, so that they stay distinct.
SENTENCES = [
    "{PER} joined {ORG} as head of sales in {LOC} .",
    "{ORG} will open a new factory near {LOC} next year .",
    "Reviewers praised the {PROD} , which {ORG} released last month .",
    "{PER} bought a {PROD} in {LOC} .",
    "The {PROD} is made by {ORG} .",
    "Shares of {ORG} rose after {PER} presented the {PROD} .",
    "In {LOC} , {PER} met the founders of {ORG} .",
    "Police in {LOC} questioned {PER} on Monday .",
    "According to {PER} , the {PROD} sold out in {LOC}",
    "{PER} flew from {LOC} to {LOC} for the launch .",
    "Customers in {LOC} can now order the {PROD} from {ORG}",
    "{ORG} hired {PER}",
    "{PROD} owners in {LOC} reported battery problems .",
    "A spokesperson for {ORG} said {PER} would visit {LOC} .",
    "{PER} and {PER} founded {ORG} in {LOC} .",
    "{PER} of {ORG} said demand for the {PROD} was strong .",
    "The weather in {LOC} was cold and wet on Sunday .",
    "{PER} said the meeting went well .",
    "Visitors to {LOC} queued for hours to try the {PROD} .",
    "The {LOC} office of {ORG} closed early because of the storm .",
    "Thanks to {PER} , the team finished the {PROD} on time .",
    "{LOC} is where {PER} grew up .",
    "Last week {ORG} moved its headquarters to {LOC} .",
    "Nobody expected the price of the {PROD} to fall so quickly .",
    "The new {PROD} from {ORG} goes on sale in {LOC} on Friday .",
    "Our correspondent in {LOC} spoke to {PER}",
    "{ORG} recalled the {PROD} after complaints from {LOC} .",
    "Sales were {flat|up|down|steady} in the {first|second|third|fourth} quarter , {analysts|traders|officials|economists} said .",
    "Prices for {coffee|steel|wheat|copper|cotton} {rose|fell|climbed|dropped} again this {week|month|year|morning} .",
    "The {meeting|launch|vote|match|concert} was {postponed|cancelled|delayed|moved} because of the {rain|strike|heat|snow|floods} .",
    "{PER} left {LOC} for a job at {ORG} .",
    "Interview with {PER}",
]


def _person(rng: random.Random, firsts: list[str], surnames: list[str]) -> list[str]:
    first = rng.choice(AMBIGUOUS) if rng.random() < P_AMBIGUOUS else rng.choice(firsts)
    return [first, rng.choice(surnames)] if rng.random() < 0.6 else [first]


def _entity(rng: random.Random, kind: str, p_held_out: float) -> list[str]:
    held = rng.random() < p_held_out
    if kind == "PER":
        return _person(rng, NAMES_HELD_OUT if held else NAMES_SEEN, SURNAMES_HELD_OUT if held else SURNAMES_SEEN)
    if kind == "ORG":
        base = rng.choice(ORG_BASES_HELD_OUT if held else ORG_BASES_SEEN)
        return [base, *rng.choice(ORG_SUFFIXES).split()]
    if kind == "LOC":
        if rng.random() < P_AMBIGUOUS:
            return [rng.choice(AMBIGUOUS)]
        return rng.choice(CITIES_HELD_OUT if held else CITIES_SEEN).split()
    brand = rng.choice(BRANDS_HELD_OUT if held else BRANDS_SEEN)  # PROD
    return [brand, *rng.choice(MODELS).split()]


def sentence(rng: random.Random, split: str) -> tuple[list[str], list[str]]:
    """One sentence as tokens and BIO tags; ``split`` decides how often entities are held out."""
    p_held_out = {"train": 0.0, "val": 0.25, "test": 0.6}[split]
    tokens: list[str] = []
    tags: list[str] = []
    for word in rng.choice(SENTENCES).split():
        if word.startswith("{") and "|" in word:
            tokens.append(rng.choice(word[1:-1].split("|")))
            tags.append("O")
        elif word.startswith("{") and word.endswith("}"):
            kind = word[1:-1]
            label = "PRODUCT" if kind == "PROD" else kind
            entity = _entity(rng, kind, p_held_out)
            tokens += entity
            tags += [f"B-{label}"] + [f"I-{label}"] * (len(entity) - 1)
        else:
            tokens.append(word)
            tags.append("O")
    return tokens, tags


def build_ner(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """The records of every split; no token sequence occurs twice in the whole dataset."""
    sizes = sizes or NER_SIZES
    rng = random.Random(seed)
    used: set[tuple[str, ...]] = set()
    out: dict[str, list[dict]] = {}
    for split in SPLITS:
        records = []
        while len(records) < sizes[split]:
            tokens, tags = sentence(rng, split)
            if tuple(tokens) in used:
                continue
            used.add(tuple(tokens))
            records.append({"tokens": tokens, "tags": tags})
        out[split] = records
    return out


def conll(records: list[dict]) -> str:
    """CoNLL-2003 layout: ``-DOCSTART- -X- -X- O``, then one ``token POS chunk tag`` line per token
    (POS ``X`` and chunk ``O``: placeholders, not computed), a blank line after each sentence."""
    lines = ["-DOCSTART- -X- -X- O", ""]
    for rec in records:
        lines += [f"{token} X O {tag}" for token, tag in zip(rec["tokens"], rec["tags"], strict=True)]
        lines.append("")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Writing


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def write(out_dir: Path, seed: int, classify_sizes: dict[str, int], ner_sizes: dict[str, int]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    ner = build_ner(seed, ner_sizes)
    for name, splits in (("classify", build_classify(seed, classify_sizes)), ("ner", ner)):
        for split, records in splits.items():
            paths.append(out_dir / f"{name}_{split}.jsonl")
            _write_jsonl(paths[-1], records)
    paths.append(out_dir / "ner_test.conll")
    with open(paths[-1], "w", encoding="utf-8", newline="\n") as f:
        f.write(conll(ner["test"]))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--classify", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"), default=list(CLASSIFY_SIZES.values()),
        help="classify records per split (even: two per ticket)",
    )  # fmt: skip
    parser.add_argument(
        "--ner", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"), default=list(NER_SIZES.values()),
        help="ner sentences per split",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if any(n % 2 for n in args.classify):
        parser.error(f"--classify sizes must be even (each ticket is two records), got {args.classify}")
    classify_sizes = dict(zip(SPLITS, args.classify, strict=True))
    ner_sizes = dict(zip(SPLITS, args.ner, strict=True))
    for path in write(args.out, args.seed, classify_sizes, ner_sizes):
        print(path)


if __name__ == "__main__":
    main()
