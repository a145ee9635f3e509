"""The shipped ``extract`` dataset: reproducible from its script, answers follow from the
prompts, held-out combinations, short enough for the CPU training budget."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from instructkit.datasets import SHIPPED, resolve_data_path, shipped_path
from instructkit.errors import InputError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_extract_dataset.py"
SIZES = {"train": 2000, "val": 100, "test": 100}


def _script():
    spec = importlib.util.spec_from_file_location("make_extract_dataset", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(split: str) -> list[list[dict]]:
    with open(shipped_path("extract", split), encoding="utf-8") as f:
        return [json.loads(line)["messages"] for line in f]


def test_script_regenerates_the_shipped_files_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], check=True, capture_output=True)
    for split in SHIPPED["extract"]:
        name = f"extract_{split}.jsonl"
        assert (tmp_path / name).read_bytes() == shipped_path("extract", split).read_bytes(), name


def test_sizes_and_shape():
    for split, n in SIZES.items():
        rows = _load(split)
        assert len(rows) == n
        for messages in rows:
            assert [m["role"] for m in messages] == ["system", "user", "assistant"]
            assert messages[1]["content"].startswith("Reply as name: NAME; item: ITEM; count: N; city: CITY")


def solve(user: str, script) -> str:
    """The answer, read off the sentence with nothing but the word lists: the one name, city
    and item (singular or plural) in it, and its count as digits or a number word."""
    sentence = user.split("\n", 1)[1]
    words = re.findall(r"[A-Za-z]+|\d+", sentence)
    lower = [w.lower() for w in words]
    (name,) = [w for w in words if w in script.NAMES]
    (city,) = [w for w in words if w in script.CITIES]
    (item,) = [s for s, p in script.ITEMS if s in lower or p in lower]
    numbers = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
    (count,) = [str(numbers.index(w) + 1) if w in numbers else w for w in lower if w in numbers or w.isdigit()]
    return f"name: {name}; item: {item}; count: {count}; city: {city}"


def test_every_answer_follows_from_its_prompt():
    script = _script()
    for split in SIZES:
        for messages in _load(split):
            assert solve(messages[1]["content"], script) == messages[2]["content"]


def test_test_and_val_hold_out_combinations_and_some_names_and_cities():
    train = {m[2]["content"] for m in _load("train")}
    train_text = " ".join(m[1]["content"] for m in _load("train"))
    for split in ("val", "test"):
        answers = [m[2]["content"] for m in _load(split)]
        assert not train & set(answers)
        assert len(set(answers)) == len(answers)
        unseen = [a for a in answers if re.search(r"name: (\w+)", a)[1] not in train_text]
        assert len(unseen) >= 5  # names train never shows: copying, not memorising


def test_shipped_path_and_errors():
    assert shipped_path("extract", "val").is_file()
    assert resolve_data_path("shipped:extract/test") == str(shipped_path("extract", "test"))
    assert resolve_data_path("data.jsonl") == "data.jsonl"
    with pytest.raises(InputError, match="did you mean 'extract'"):
        shipped_path("extrac", "train")
    with pytest.raises(InputError, match="no split 'dev'"):
        shipped_path("extract", "dev")


def test_examples_are_short_under_the_default_tokenizer():
    """The training budget (about 100 tokens/s on CPU) assumes short examples: the whole
    templated conversation stays under 96 tokens and the answer under 24."""
    from tests.tiny import real_tokenizer

    tokenizer = real_tokenizer()
    for messages in _load("test") + _load("train")[:100]:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) < 96
        assert len(tokenizer(messages[2]["content"], add_special_tokens=False)["input_ids"]) < 24


def test_derived_preferences_and_prompts_are_reproducible_and_well_formed(tmp_path):
    """The script rewrites the shipped derived files byte for byte; every pair's rejected answer
    differs from its chosen one; every RL prompt's answer is its extraction record's answer."""
    import importlib.util
    import json
    from pathlib import Path

    from instructkit.data.formats import load_records
    from instructkit.datasets import shipped_path
    from instructkit.rewards import exact_match

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_extract_preferences.py"
    spec = importlib.util.spec_from_file_location("make_prefs", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out", str(tmp_path)])
    for name, splits in (("extract_prefs", ("train", "val")), ("extract_prompts", ("train", "test"))):
        for split in splits:
            assert (tmp_path / f"{name}_{split}.jsonl").read_bytes() == shipped_path(name, split).read_bytes()
    pairs = load_records(shipped_path("extract_prefs", "train"))
    assert pairs.format == "preference" and len(pairs.records) == 400
    assert all(p.chosen[0].content != p.rejected[0].content for p in pairs.records)
    rows = [json.loads(line) for line in shipped_path("extract_prompts", "test").read_text().splitlines()]
    test = [json.loads(line) for line in shipped_path("extract", "test").read_text().splitlines()]
    assert [r["answer"] for r in rows] == [t["messages"][-1]["content"] for t in test]
    assert exact_match("p", "  " + rows[0]["answer"].upper() + "\n", answer=rows[0]["answer"]) == 1.0
    assert exact_match("p", rows[0]["answer"] + ".", answer=rows[0]["answer"]) == 0.0


# ----------------------------------------------------------------------------------------------
# The continual recipe's data: label, keysort (the extract orders, other formats), generic_text

CONTINUAL_SCRIPT = REPO / "scripts" / "make_continual_datasets.py"
CONTINUAL_SIZES = {"train": 400, "val": 50, "test": 100}


def _rows(name: str, split: str) -> list[dict]:
    with open(shipped_path(name, split), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_the_continual_script_regenerates_its_shipped_files_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, str(CONTINUAL_SCRIPT), "--out", str(tmp_path)], check=True, capture_output=True)
    for name in ("label", "keysort", "generic_text"):
        for split in SHIPPED[name]:
            made = tmp_path / f"{name}_{split}.jsonl"
            assert made.read_bytes() == shipped_path(name, split).read_bytes(), made.name


def test_label_and_keysort_answers_follow_from_the_sentence_in_their_format():
    """The extract answer read off the sentence (``solve``), rewritten by hand in each format."""
    script = _script()
    for split, n in CONTINUAL_SIZES.items():
        for name in ("label", "keysort"):
            rows = _rows(name, split)
            assert len(rows) == n
            for row in rows:
                system, user, answer = row["messages"]
                fields = dict(part.split(": ", 1) for part in solve(user["content"], script).split("; "))
                if name == "label":
                    expected = f"{fields['city']} / {fields['name']} / {fields['count']} x {fields['item']}"
                    assert user["content"].startswith("Reply as CITY / NAME / N x ITEM")
                else:
                    expected = "; ".join(f"{k}: {fields[k]}" for k in ("city", "count", "item", "name"))
                    assert user["content"].startswith("Reply as city: CITY; count: N; item: ITEM; name: NAME")
                assert answer["content"] == expected


def test_label_and_keysort_hold_out_combinations_and_some_names():
    names = set(_script().NAMES)
    for name in ("label", "keysort"):
        train = [r["messages"] for r in _rows(name, "train")]
        seen = {m[2]["content"] for m in train}
        train_names = {w for m in train for w in re.findall(r"[A-Z][a-z]+", m[1]["content"]) if w in names}
        for split in ("val", "test"):
            rows = [r["messages"] for r in _rows(name, split)]
            answers = [m[2]["content"] for m in rows]
            assert not seen & set(answers) and len(set(answers)) == len(answers)
            unseen = [
                m
                for m in rows
                if not {w for w in re.findall(r"[A-Z][a-z]+", m[1]["content"]) if w in names} <= train_names
            ]
            assert len(unseen) >= 3  # names train never shows: copying, not memorising


def test_generic_text_is_prose_not_the_tasks_format():
    rows = _rows("generic_text", "test")
    assert len(rows) == 40 and all(set(r) == {"text"} for r in rows)
    for r in rows:
        assert len(r["text"].split()) >= 30 and ": " not in r["text"] and " / " not in r["text"]


# ----------------------------------------------------------------------------------------------
# The encoder tasks' data: classify (instructed ticket classification) and ner (BIO tagging)

TASK_SCRIPT = REPO / "scripts" / "make_task_datasets.py"
CLASSIFY_SIZES = {"train": 1200, "val": 200, "test": 300}
NER_SIZES = {"train": 1000, "val": 150, "test": 250}
TOPIC_LABELS = {"billing", "shipping", "account", "technical"}
MOOD_LABELS = {"satisfied", "unsatisfied"}
ENTITY_TYPES = {"PER", "ORG", "LOC", "PRODUCT"}


def _task_script():
    spec = importlib.util.spec_from_file_location("make_task_datasets", TASK_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _task_files() -> list[Path]:
    from instructkit.datasets import SHIPPED_TAGGING

    return [shipped_path("classify", s) for s in SHIPPED["classify"]] + [
        shipped_path("ner", s) for s in SHIPPED_TAGGING["ner"]
    ]


def test_the_task_script_regenerates_its_shipped_files_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, str(TASK_SCRIPT), "--out", str(tmp_path)], check=True, capture_output=True)
    shipped = _task_files()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in shipped)
    for path in shipped:
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
    # another seed writes other data: the files come from the seeded generator, not a copy
    subprocess.run([sys.executable, str(TASK_SCRIPT), "--out", str(tmp_path), "--seed", "1"], check=True)
    assert (tmp_path / "classify_train.jsonl").read_bytes() != shipped_path("classify", "train").read_bytes()


def test_the_task_script_refuses_odd_classify_sizes(tmp_path):
    with pytest.raises(SystemExit):
        _task_script().main(["--out", str(tmp_path), "--classify", "3", "2", "2"])
    assert not list(tmp_path.iterdir())


def test_classify_records_each_ticket_once_per_instruction():
    """Two instructions; every ticket occurs exactly twice in its split, once under each, with a
    topic label under one and a mood label under the other, so the instruction decides."""
    instructions = set()
    for split, n in CLASSIFY_SIZES.items():
        rows = _rows("classify", split)
        assert len(rows) == n
        assert all(set(r) == {"instruction", "text", "label"} for r in rows)
        by_text: dict[str, dict[str, str]] = {}
        for r in rows:
            assert r["instruction"] not in by_text.setdefault(r["text"], {})
            by_text[r["text"]][r["instruction"]] = r["label"]
        assert len(by_text) == n // 2
        for labels in by_text.values():
            assert len(labels) == 2 and {
                len({*labels.values()} & TOPIC_LABELS),
                len({*labels.values()} & MOOD_LABELS),
            } == {1}
        instructions |= {r["instruction"] for r in rows}
    assert len(instructions) == 2
    (topic,) = [i for i in instructions if "about" in i]
    assert all(label in topic for label in TOPIC_LABELS)  # the prompt names its labels: a fair 0-shot line


def test_classify_every_label_is_at_least_a_tenth_of_its_task_in_every_split():
    for split in CLASSIFY_SIZES:
        rows = _rows("classify", split)
        for instruction in {r["instruction"] for r in rows}:
            labels = [r["label"] for r in rows if r["instruction"] == instruction]
            expected = TOPIC_LABELS if set(labels) & TOPIC_LABELS else MOOD_LABELS
            assert set(labels) == expected, (split, instruction)
            assert min(labels.count(label) for label in expected) >= 0.1 * len(labels), (split, instruction)


def test_classify_texts_are_short_and_varied():
    """Short enough for an encoder's 128-token window (80 words at most), and varied: the 600
    train tickets are made of at least 500 distinct sentences."""
    texts = {r["text"] for r in _rows("classify", "train")}
    assert len(texts) == 600
    assert max(len(t.split()) for s in CLASSIFY_SIZES for t in {r["text"] for r in _rows("classify", s)}) <= 80
    assert len({sentence for t in texts for sentence in re.split(r"(?<=[.:]) ", t)}) >= 500


def _literal_parts(template: str) -> list[str]:
    """A phrasing template's fixed text between its slots: "the {product} will not" -> ["the ", " will not"]."""
    return [part for part in re.split(r"\{\w+\}", template) if len(part.strip()) >= 12]


def test_classify_test_uses_held_out_names_brands_and_phrasings():
    """The held-out names, product brands and phrasings never occur in train; test tickets name
    no seen customer or brand, and a good share of them use a held-out phrasing."""
    script = _task_script()
    train = "\n".join(r["text"] for r in _rows("classify", "train"))
    test = sorted({r["text"] for r in _rows("classify", "test")})
    held_out_words = script.NAMES_HELD_OUT + script.BRANDS_HELD_OUT
    held_out_phrasings = [t for d in (script.ISSUES_HELD_OUT, script.MOOD_HELD_OUT) for ts in d.values() for t in ts]
    assert len(held_out_words) >= 10 and len(held_out_phrasings) >= 8
    for word in held_out_words:
        assert not re.search(rf"\b{word}\b", train), word
    for template in held_out_phrasings:
        parts = _literal_parts(template)
        assert parts, template
        assert not any(part in train for part in parts), template
    for word in script.NAMES_SEEN + script.BRANDS_SEEN:
        assert not any(re.search(rf"\b{word}\b", t) for t in test), word
    with_name = [t for t in test if any(re.search(rf"\b{w}\b", t) for w in held_out_words)]
    assert len(with_name) >= 0.8 * len(test)
    with_phrasing = [t for t in test if any(p in t for tm in held_out_phrasings for p in _literal_parts(tm))]
    assert 0.2 * len(test) <= len(with_phrasing) <= 0.8 * len(test)


def test_task_splits_share_no_text():
    classify = {s: {r["text"] for r in _rows("classify", s)} for s in CLASSIFY_SIZES}
    ner = {s: [tuple(r["tokens"]) for r in _rows("ner", s)] for s in NER_SIZES}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not classify[a] & classify[b], (a, b)
        assert not set(ner[a]) & set(ner[b]), (a, b)
    assert all(len(set(rows)) == len(rows) for rows in ner.values())


def bio_problems(tags: list[str]) -> list[str]:
    """Where ``tags`` break BIO: a tag that is not O, B-TYPE or I-TYPE of a known type, or an
    I-TYPE that does not continue a B-TYPE or I-TYPE of the same type."""
    problems, previous = [], "O"
    for i, tag in enumerate(tags):
        if tag != "O" and (tag[:2] not in ("B-", "I-") or tag[2:] not in ENTITY_TYPES):
            problems.append(f"{i}: unknown tag {tag}")
        elif tag.startswith("I-") and previous[2:] != tag[2:]:
            problems.append(f"{i}: {tag} after {previous}")
        previous = tag
    return problems


def test_bio_problems_finds_broken_sequences():
    assert bio_problems(["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC"]) == []
    assert bio_problems(["O", "I-PER"]) == ["1: I-PER after O"]
    assert bio_problems(["I-ORG"]) == ["0: I-ORG after O"]
    assert bio_problems(["B-PER", "I-ORG"]) == ["1: I-ORG after B-PER"]
    assert bio_problems(["B-MISC"]) == ["0: unknown tag B-MISC"]


def _entities(tokens: list[str], tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, start, end) spans of a BIO-valid sentence."""
    spans = []
    for i, tag in enumerate(tags):
        if tag.startswith("B-"):
            spans.append((tag[2:], i, i + 1))
        elif tag.startswith("I-"):
            spans[-1] = (spans[-1][0], spans[-1][1], i + 1)
    return spans


def test_ner_records_are_valid_bio_with_the_features_the_task_needs():
    """Same-length tokens and tags, valid BIO over four types, and in every split: each type,
    multi-token entities, entities first and last in a sentence, sentences with no entity."""
    for split, n in NER_SIZES.items():
        rows = _rows("ner", split)
        assert len(rows) == n
        types, multi, first, last, empty = set(), 0, 0, 0, 0
        for r in rows:
            assert set(r) == {"tokens", "tags"}
            tokens, tags = r["tokens"], r["tags"]
            assert tokens and len(tokens) == len(tags)
            assert all(t and not re.search(r"\s", t) for t in tokens)  # one CoNLL column each
            assert bio_problems(tags) == [], (split, tokens, tags)
            spans = _entities(tokens, tags)
            types |= {kind for kind, _, _ in spans}
            multi += sum(end - start > 1 for _, start, end in spans)
            first += tags[0] != "O"
            last += tags[-1] != "O"
            empty += not spans
        assert types == ENTITY_TYPES, split
        assert multi >= 0.2 * n and first >= 0.1 * n and last >= 0.02 * n and empty >= 1, split


def test_ner_ambiguous_words_are_people_and_places_by_context():
    """Each first-name-and-city word is tagged PER in some train sentences and LOC in others,
    so the context, not the word, decides."""
    script = _task_script()
    seen: dict[str, set[str]] = {w: set() for w in script.AMBIGUOUS}
    for r in _rows("ner", "train"):
        for kind, start, _ in _entities(r["tokens"], r["tags"]):
            if r["tokens"][start] in seen:
                seen[r["tokens"][start]].add(kind)
    assert len(seen) >= 5
    assert all(kinds == {"PER", "LOC"} for kinds in seen.values()), seen


def test_ner_test_holds_out_entity_names():
    """No held-out name, surname, organisation, brand or city occurs in train (as a token run),
    and a good share of the test entities contain one."""
    script = _task_script()
    held_out = [
        n.split()
        for n in script.NAMES_HELD_OUT
        + script.SURNAMES_HELD_OUT
        + script.ORG_BASES_HELD_OUT
        + script.BRANDS_HELD_OUT
        + script.CITIES_HELD_OUT
    ]
    assert len(held_out) >= 20

    def contains(tokens: list[str], run: list[str]) -> bool:
        return any(tokens[i : i + len(run)] == run for i in range(len(tokens) - len(run) + 1))

    for r in _rows("ner", "train"):
        assert not any(contains(r["tokens"], run) for run in held_out), r["tokens"]
    entities = [r["tokens"][s:e] for r in _rows("ner", "test") for _, s, e in _entities(r["tokens"], r["tags"])]
    unseen = [e for e in entities if any(contains(e, run) for run in held_out)]
    assert len(unseen) >= 0.3 * len(entities)


def test_ner_conll_file_is_the_test_split():
    """An independent reader of the CoNLL-2003 layout: a -DOCSTART- line first, then four columns
    (token, POS, chunk, NER tag) per line, a blank line after each sentence."""
    text = shipped_path("ner", "test.conll").read_text(encoding="utf-8")
    lines = text.split("\n")
    assert lines[0] == "-DOCSTART- -X- -X- O" and lines[1] == ""
    assert text.endswith("\n\n")
    sentences, current = [], []
    for line in lines[2:]:
        if not line:
            if current:
                sentences.append(current)
            current = []
            continue
        columns = line.split()
        assert len(columns) == 4, line
        assert columns[1:3] == ["X", "O"], line  # placeholders: POS and chunk are not computed
        current.append((columns[0], columns[3]))
    assert not current
    rows = _rows("ner", "test")
    assert [[t for t, _ in s] for s in sentences] == [r["tokens"] for r in rows]
    assert [[g for _, g in s] for s in sentences] == [r["tags"] for r in rows]


def test_task_data_shipped_names_and_package_data():
    import tomllib

    datasets = REPO / "instructkit" / "datasets"
    assert resolve_data_path("shipped:classify/val") == str(datasets / "classify_val.jsonl")
    assert resolve_data_path("shipped:ner/test") == str(datasets / "ner_test.jsonl")
    assert resolve_data_path("shipped:ner/test.conll") == str(datasets / "ner_test.conll")
    with pytest.raises(InputError, match="did you mean 'test.conll'"):
        shipped_path("ner", "test.conl")
    with pytest.raises(InputError, match="did you mean 'ner'"):
        shipped_path("nre", "train")
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert {"datasets/*.jsonl", "datasets/*.conll"} <= set(package_data["instructkit"])


def test_the_task_data_reader_reads_the_shipped_task_data():
    """The encoder task data layer reads every split by its shipped name, the instruction kept,
    and the CoNLL copy as the same sentences as the JSONL test split."""
    from instructkit.data.tasks import read_classification, read_tagged

    records = read_classification(resolve_data_path("shipped:classify/test"))
    assert len(records) == 300 and all(r.instruction for r in records)
    jsonl = read_tagged(resolve_data_path("shipped:ner/test"))
    conll = read_tagged(resolve_data_path("shipped:ner/test.conll"))
    assert [(r.tokens, r.tags) for r in conll] == [(r.tokens, r.tags) for r in jsonl]
    assert len(read_tagged(resolve_data_path("shipped:ner/train"))) == 1000


def test_task_data_fits_a_short_encoder_window():
    """Under the embedded encoder's WordPiece tokenizer an instruction + ticket pair stays under
    96 tokens and a tagged sentence under 32, so a 128-token window never truncates either."""
    from transformers import AutoTokenizer

    from instructkit.models.loading import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve("minilm-l6").base)
    for split in CLASSIFY_SIZES:
        rows = _rows("classify", split)
        pairs = tokenizer([r["instruction"] for r in rows], [r["text"] for r in rows])["input_ids"]
        assert max(len(ids) for ids in pairs) < 96, split
        sentences = tokenizer([r["tokens"] for r in _rows("ner", split)], is_split_into_words=True)["input_ids"]
        assert max(len(ids) for ids in sentences) < 32, split
