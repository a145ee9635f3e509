"""Encoder task data: records, CoNLL, label sets, instruction templates, sub-word label alignment.

Expected token ids and labels are derived by hand in each test from the sub-word split, which
the test checks first (so a tokenizer change shows as a changed split, not a wrong label).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import get_args

import pytest

from instructkit.data import tasks
from instructkit.data.tasks import (
    IGNORE_INDEX,
    ClassifiedText,
    LabelSet,
    TaggedTokens,
    encode_classification,
    encode_tagged,
    encode_tagged_record,
    read_classification,
    read_conll,
    read_tagged,
    render_input,
)
from instructkit.errors import InputError
from tests.tiny import real_tokenizer, write_jsonl

X = IGNORE_INDEX


@functools.lru_cache(maxsize=1)
def wordpiece():
    """The embedded encoder's tokenizer (all-MiniLM-L6-v2, uncased WordPiece)."""
    from transformers import AutoTokenizer

    from instructkit.models.loading import resolve

    return AutoTokenizer.from_pretrained(resolve("minilm-l6").base, local_files_only=True)


def tokens_of(tokenizer, encoded) -> list[str]:
    return tokenizer.convert_ids_to_tokens(encoded["input_ids"])


# ---------------------------------------------------------------------------------------------
# Classification records


def test_classification_records_read_with_their_instruction_and_place(tmp_path):
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"text": "The match ended 2-2.", "label": "sports", "instruction": "Topic of the news?"},
            {"text": "Stocks fell.", "label": "business"},
            {"text": "Five stars.", "label": 4, "instruction": ""},
        ],
    )
    records = read_classification(path)
    assert records == [
        ClassifiedText("The match ended 2-2.", "sports", "Topic of the news?"),
        ClassifiedText("Stocks fell.", "business"),
        ClassifiedText("Five stars.", "4"),  # an integer label as digits; a blank instruction is none
    ]
    assert [(r.place.file, r.place.line) for r in records] == [(str(path), 1), (str(path), 2), (str(path), 3)]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"text": "x", "lable": "a"}, "train.jsonl:2, field 'label': missing field 'label' (did you mean 'lable'?)"),
        ({"text": "  ", "label": "a"}, "train.jsonl:2, field 'text': empty text"),
        ({"label": "a"}, "train.jsonl:2, field 'text': missing field 'text'"),
        ({"text": "x", "label": ["a"]}, "train.jsonl:2, field 'label': expected a string or integer label, got a list"),
        ({"text": "x", "label": "a", "instruction": 3}, "train.jsonl:2, field 'instruction': expected a string"),
    ],
)
def test_bad_classification_records_are_located(tmp_path, row, message):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "fine", "label": "a"}, row])
    with pytest.raises(InputError) as err:
        read_classification(path)
    assert str(err.value).startswith(str(tmp_path / message))


# ---------------------------------------------------------------------------------------------
# Token tagging: JSONL records and CoNLL files


def test_tagged_records_from_jsonl(tmp_path):
    path = write_jsonl(
        tmp_path / "ner.jsonl",
        [{"tokens": ["Ada", "met", "Bob"], "tags": ["B-PER", "O", "B-PER"], "instruction": "Find people."}],
    )
    [record] = read_tagged(path)
    assert record == TaggedTokens(("Ada", "met", "Bob"), ("B-PER", "O", "B-PER"), "Find people.")
    assert record.place.line == 1


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"tokens": ["a", "b"], "tags": ["O"]}, "ner.jsonl:2, field 'tags': 1 tags for 2 tokens"),
        ({"tokens": [], "tags": []}, "ner.jsonl:2, field 'tokens': empty tokens"),
        (
            {"tokens": "a b", "tags": ["O", "O"]},
            "ner.jsonl:2, field 'tokens': expected a list of strings, got a string",
        ),
        ({"tokens": ["a", ""], "tags": ["O", "O"]}, "ner.jsonl:2, field 'tokens[1]': empty string"),
        ({"tokens": ["a"], "tags": [1]}, "ner.jsonl:2, field 'tags[0]': expected a string, got a number"),
        ({"tokens": ["a"], "tag": ["O"]}, "ner.jsonl:2, field 'tags': missing field 'tags' (did you mean 'tag'?)"),
    ],
)
def test_bad_tagged_records_are_located(tmp_path, row, message):
    path = write_jsonl(tmp_path / "ner.jsonl", [{"tokens": ["fine"], "tags": ["O"]}, row])
    with pytest.raises(InputError) as err:
        read_tagged(path)
    assert str(err.value).startswith(str(tmp_path / message))


CONLL_2003 = """\
-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER


-DOCSTART- -X- -X- O

BRUSSELS NNP B-NP B-LOC
"""


def test_conll_2003_sentences_tags_from_the_last_column(tmp_path):
    path = tmp_path / "train.conll"
    path.write_text(CONLL_2003)
    sentences = read_conll(path)
    assert [(s.tokens, s.tags) for s in sentences] == [
        (("EU", "rejects", "German", "call"), ("B-ORG", "O", "B-MISC", "O")),
        (("Peter", "Blackburn"), ("B-PER", "I-PER")),
        (("BRUSSELS",), ("B-LOC",)),
    ]
    # A sentence is placed at its first token line (-DOCSTART- and blank lines counted).
    assert [s.place.line for s in sentences] == [3, 8, 14]
    assert read_tagged(path) == sentences


def test_conll_with_tabs_two_columns_and_crlf(tmp_path):
    path = tmp_path / "tags.tsv"
    path.write_bytes(b"Ada\tB-PER\r\nsings\tO\r\n\r\nBob\tB-PER\r\n")
    assert [(s.tokens, s.tags) for s in read_conll(path)] == [
        (("Ada", "sings"), ("B-PER", "O")),
        (("Bob",), ("B-PER",)),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "EU NNP B-NP B-ORG\nrejects VBZ O\n",
            "x.conll:2, field 'columns': 3 columns, but the file's first token line (line 1) has 4",
        ),
        ("-DOCSTART- -X- -X- O\n\nEU\n", "x.conll:3, field 'columns': a token line needs at least two columns"),
        ("-DOCSTART- -X- -X- O\n\n\n", "x.conll: no sentences"),
    ],
)
def test_bad_conll_is_located(tmp_path, text, message):
    path = tmp_path / "x.conll"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        read_tagged(path)
    assert str(err.value).startswith(str(tmp_path / message))


def test_missing_conll_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_tagged(tmp_path / "absent.conll")


# ---------------------------------------------------------------------------------------------
# Label sets


def test_label_set_is_sorted_and_the_same_for_any_order_of_the_data(tmp_path):
    records = [ClassifiedText("t", label) for label in ["sports", "world", "business", "sports"]]
    labels = LabelSet.from_records(records)
    assert labels.labels == ("business", "sports", "world")
    assert labels == LabelSet.from_records(reversed(records))
    assert labels.id2label == {0: "business", 1: "sports", 2: "world"}
    assert labels.label2id == {"business": 0, "sports": 1, "world": 2}
    tags = LabelSet.from_records([TaggedTokens(("a", "b"), ("O", "B-PER")), TaggedTokens(("c",), ("I-PER",))])
    assert tags.labels == ("B-PER", "I-PER", "O")


def test_label_set_saves_and_loads(tmp_path):
    labels = LabelSet(("business", "sports"))
    path = labels.save(tmp_path / "labels.json")
    assert json.loads(path.read_text()) == {
        "labels": ["business", "sports"],
        "id2label": {"0": "business", "1": "sports"},
    }
    assert LabelSet.load(path) == labels
    (tmp_path / "bad.json").write_text('{"labels": ["a", "a"]}')
    with pytest.raises(InputError, match=r"bad.json, field 'labels': a label set names a label twice"):
        LabelSet.load(tmp_path / "bad.json")
    (tmp_path / "bad2.json").write_text('{"labels": "a"}')
    with pytest.raises(InputError, match=r"bad2.json, field 'labels': expected a list of label strings"):
        LabelSet.load(tmp_path / "bad2.json")


def test_unknown_label_at_validation_time_is_located_with_a_near_miss(tmp_path):
    labels = LabelSet.from_records(read_classification(write_jsonl(tmp_path / "train.jsonl", [
        {"text": "a", "label": "sports"}, {"text": "b", "label": "business"}, {"text": "c", "label": "world"},
    ])))  # fmt: skip
    test_rows = [{"text": f"t{i}", "label": "world"} for i in range(7)] + [{"text": "t7", "label": "sprts"}]
    test = read_classification(write_jsonl(tmp_path / "test.jsonl", test_rows))
    with pytest.raises(InputError) as err:
        labels.check(test, "test.jsonl")
    assert str(err.value) == (
        f"{tmp_path / 'test.jsonl'}:8, field 'label': unknown label 'sprts' "
        "(labels: business, sports, world) (did you mean 'sports'?)"
    )
    # Records that do not know their file are placed by ``where`` and their index.
    with pytest.raises(InputError, match=r"^data.test, record 1, field 'label': unknown label 'sprts'"):
        labels.check([ClassifiedText("x", "world"), ClassifiedText("y", "sprts")], "data.test")
    labels.check(test[:7], "test.jsonl")  # known labels pass


def test_unknown_tag_is_located_at_its_position(tmp_path):
    path = tmp_path / "dev.conll"
    path.write_text("Ada B-PER\n\nAcme B-ORG\nsells O\nhats B-PRODUCT\n")
    tags = LabelSet(("B-ORG", "B-PER", "I-PER", "O"))
    with pytest.raises(InputError) as err:
        tags.check(read_conll(path), "dev.conll")
    assert str(err.value).startswith(f"{path}:3, record 1, field 'tags[2]': unknown label 'B-PRODUCT' (labels: ")


# ---------------------------------------------------------------------------------------------
# Instruction templates (WordPiece: lower-cased; a newline is whitespace to BERT's pre-tokenizer)


def test_render_input_templates_on_the_encoders_tokenizer():
    tok = wordpiece()
    joined = render_input(tok, "Topic?", "The match ended.", "joined")
    assert tokens_of(tok, joined) == ["[CLS]", "topic", "?", "the", "match", "ended", ".", "[SEP]"]
    assert joined["token_type_ids"] == [0] * 8 and joined["attention_mask"] == [1] * 8
    pair = render_input(tok, "Topic?", "The match ended.", "pair")
    assert tokens_of(tok, pair) == ["[CLS]", "topic", "?", "[SEP]", "the", "match", "ended", ".", "[SEP]"]
    assert pair["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    alone = render_input(tok, None, "The match ended.", "pair")
    assert tokens_of(tok, alone) == ["[CLS]", "the", "match", "ended", ".", "[SEP]"]
    assert render_input(tok, "  ", "The match ended.", "joined") == alone  # blank: no instruction
    # max_length cuts the text, never the instruction.
    cut = render_input(tok, "Topic?", "The match ended.", "pair", max_length=7)
    assert tokens_of(tok, cut) == ["[CLS]", "topic", "?", "[SEP]", "the", "match", "[SEP]"]


def test_template_errors():
    assert set(tasks.TEMPLATES) == set(get_args(tasks.EncoderTemplate))
    with pytest.raises(InputError, match=r"field 'template': unknown template 'pairs' \(did you mean 'pair'\?\)"):
        render_input(wordpiece(), "i", "t", "pairs")
    # A decoder's BPE has no separator: its "pair" would be the two texts run together.
    bpe = real_tokenizer()
    assert bpe.sep_token is None
    with pytest.raises(InputError, match="pair template needs a tokenizer with a separator token"):
        render_input(bpe, "Topic?", "The match ended.", "pair")
    joined = render_input(bpe, "Topic?", "The match ended.", "joined")
    assert tokens_of(bpe, joined) == ["Topic", "?", "Ċ", "Ċ", "The", "Ġmatch", "Ġended", "."]


def test_encode_classification_gives_the_label_id():
    tok = wordpiece()
    labels = LabelSet(("business", "sports", "world"))
    record = ClassifiedText("The match ended.", "sports", "Topic?")
    encoded = encode_classification(tok, record, labels, template="pair")
    assert encoded["labels"] == 1
    assert tokens_of(tok, encoded) == ["[CLS]", "topic", "?", "[SEP]", "the", "match", "ended", ".", "[SEP]"]
    assert set(encoded) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    with pytest.raises(InputError, match="unknown label 'sprts'.*did you mean 'sports'"):
        encode_classification(tok, ClassifiedText("x", "sprts"), labels)


# ---------------------------------------------------------------------------------------------
# Sub-word label alignment

WORDS = ["Wolfgang", "visited", "Haarlemmermeer", "yesterday"]
TAGS = ["B-PER", "O", "B-LOC", "O"]
NER = LabelSet(("B-LOC", "B-PER", "I-LOC", "I-PER", "O"))  # ids 0 1 2 3 4
B_LOC, B_PER, I_LOC, I_PER, OUT = range(5)


def test_alignment_on_wordpiece():
    tok = wordpiece()
    first = encode_tagged(tok, WORDS, TAGS, NER, align="first")
    # The split, checked before the labels are derived from it: "haarlemmermeer" is six pieces.
    assert tokens_of(tok, first) == [
        "[CLS]", "wolfgang", "visited", "ha", "##ar", "##lem", "##mer", "##me", "##er", "yesterday", "[SEP]",
    ]  # fmt: skip
    assert first["labels"] == [X, B_PER, OUT, B_LOC, X, X, X, X, X, OUT, X]
    everywhere = encode_tagged(tok, WORDS, TAGS, NER, align="all")
    assert everywhere["input_ids"] == first["input_ids"]
    # Continuation pieces of a B-LOC word are I-LOC (label_all_tokens with b_to_i_label).
    assert everywhere["labels"] == [X, B_PER, OUT, B_LOC, I_LOC, I_LOC, I_LOC, I_LOC, I_LOC, OUT, X]
    assert len(first["labels"]) == len(first["input_ids"]) == len(first["attention_mask"])


def test_alignment_with_an_instruction_ignores_its_tokens():
    tok = wordpiece()
    encoded = encode_tagged(tok, WORDS, TAGS, NER, align="first", instruction="Find people and places.")
    assert tokens_of(tok, encoded)[:8] == ["[CLS]", "find", "people", "and", "places", ".", "[SEP]", "wolfgang"]
    assert encoded["token_type_ids"] == [0] * 7 + [1] * 10  # 10: the six pieces of the place name
    assert encoded["labels"] == [X] * 7 + [B_PER, OUT, B_LOC, X, X, X, X, X, OUT, X]
    blank = encode_tagged(tok, WORDS, TAGS, NER, instruction=" ")
    assert blank == encode_tagged(tok, WORDS, TAGS, NER)


def test_alignment_truncated_by_max_length():
    tok = wordpiece()
    encoded = encode_tagged(tok, WORDS, TAGS, NER, align="all", max_length=6)
    assert tokens_of(tok, encoded) == ["[CLS]", "wolfgang", "visited", "ha", "##ar", "[SEP]"]
    assert encoded["labels"] == [X, B_PER, OUT, B_LOC, I_LOC, X]


def test_b_stays_b_when_the_set_has_no_matching_i():
    tok = wordpiece()
    labels = LabelSet(("B-LOC", "B-PER", "O"))
    encoded = encode_tagged(tok, WORDS, TAGS, labels, align="all")
    assert encoded["labels"] == [X, 1, 2, 0, 0, 0, 0, 0, 0, 2, X]


def test_alignment_on_the_decoders_bpe():
    """Byte-level BPE pre-split: each word is encoded on its own, without the leading-space
    marker (Ġ) it gets in running text, and the tokenizer has no special tokens around it."""
    tok = real_tokenizer()
    first = encode_tagged(tok, WORDS, TAGS, NER, align="first")
    assert tokens_of(tok, first) == [
        "W",
        "olf",
        "gang",
        "visited",
        "Ha",
        "ar",
        "lem",
        "mer",
        "me",
        "er",
        "y",
        "esterday",
    ]
    assert first["labels"] == [B_PER, X, X, OUT, B_LOC, X, X, X, X, X, OUT, X]
    everywhere = encode_tagged(tok, WORDS, TAGS, NER, align="all")
    assert everywhere["labels"] == [B_PER, I_PER, I_PER, OUT, B_LOC, I_LOC, I_LOC, I_LOC, I_LOC, I_LOC, OUT, OUT]
    instructed = encode_tagged(tok, WORDS, TAGS, NER, instruction="Find people.")
    assert tokens_of(tok, instructed)[:4] == ["Find", "people", ".", "W"]
    assert instructed["labels"] == [X, X, X, *first["labels"]]


def test_tagged_record_errors_name_the_place(tmp_path):
    path = tmp_path / "dev.conll"
    path.write_text("Ada B-PER\nsings B-SONG\n")
    [record] = read_conll(path)
    with pytest.raises(InputError, match=re.escape(f"{path}:1, record 0, field 'tags[1]': unknown label 'B-SONG'")):
        encode_tagged_record(wordpiece(), record, NER)
    with pytest.raises(InputError, match=r"field 'tags': 1 tags for 2 tokens"):
        encode_tagged(wordpiece(), ["a", "b"], ["O"], NER)
    with pytest.raises(InputError, match=r"field 'align': unknown alignment 'firsts' \(did you mean 'first'\?\)"):
        encode_tagged(wordpiece(), ["a"], ["O"], NER, align="firsts")


def test_tokenizers_that_cannot_give_word_ids_get_a_clear_error():
    class Slow:
        is_fast = False

    with pytest.raises(InputError, match="field 'tokenizer': sub-word label alignment needs a fast tokenizer"):
        encode_tagged(Slow(), ["a"], ["O"], NER)

    class NoPreSplit:
        is_fast = True

        def __call__(self, *args, **kwargs):
            raise ValueError(
                "You need to instantiate it with add_prefix_space=True to use it with pretokenized inputs."
            )

    with pytest.raises(InputError, match="cannot encode pre-split words.*add_prefix_space=True"):
        encode_tagged(NoPreSplit(), ["a"], ["O"], NER)


def test_the_module_imports_no_ml_library():
    import subprocess
    import sys

    code = "import sys, instructkit.data.tasks; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2]
    )
    assert out.stdout.strip() == "[]"
