"""Encoder task data: classification and token-tagging records, CoNLL files, label sets,
instruction templates for encoders, and records to token ids with sub-word label alignment.

Two record shapes, each read from JSON lines (or any file :func:`~instructkit.data.readers.read_rows`
reads) and kept with its place in the file, so that a label found wrong later (at validation
time, against the training label set) is still reported at its file and line:

- classification: ``{"text": ..., "label": ..., "instruction": optional}``;
- token tagging: ``{"tokens": [...], "tags": [...], "instruction": optional}``, or a CoNLL file
  (one token per line with its tag in the last column, a blank line between sentences,
  ``-DOCSTART-`` lines skipped; CoNLL-2003 has four columns: token, POS, chunk, NER tag).

The encoders take any Hugging Face *fast* tokenizer: an instruction goes in front of the text as
one segment (``"joined"``, ``"{instruction}\\n\\n{text}"``) or as the first of a pair
(``"pair"``, ``[CLS] instruction [SEP] text [SEP]`` with token_type_ids 0 / 1), so one encoder
can learn several instructed tasks. Tagging labels follow the words through the tokenizer's
``word_ids()``: the first sub-token of each word carries its tag (``align="first"``), or every
sub-token does, with ``B-`` turned into ``I-`` after the first (``align="all"``, as the
``label_all_tokens`` option of transformers' token-classification example).

Pure Python: the tokenizer is passed in, nothing here imports torch or transformers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from instructkit.data.formats import _type_name as _json_type  # one wording of JSON types
from instructkit.data.readers import Row, _read_text, read_rows
from instructkit.errors import InputError, did_you_mean
from instructkit.fileio import atomic_write_json

IGNORE_INDEX = -100  # the label torch's cross-entropy skips (special tokens, instruction, ...)
EncoderTemplate = Literal["joined", "pair"]
Alignment = Literal["first", "all"]
CONLL_SUFFIXES: tuple[str, ...] = (".conll", ".conll2003", ".iob", ".bio", ".tsv", ".txt")
DOCSTART = "-DOCSTART-"


# ---------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class Place:
    """Where a record came from: file, 1-based line, 0-based record index (what is known)."""

    file: str | None = None
    line: int | None = None
    record: int | None = None

    def error(self, problem: str, field: str | None = None) -> InputError:
        return InputError(problem, file=self.file, line=self.line, record=self.record, field=field)


@dataclass(frozen=True)
class ClassifiedText:
    """A text and its label, with the instruction that says which task it is (if any)."""

    text: str
    label: str
    instruction: str | None = None
    # Not in repr: the split orders records by a hash of their repr, which must not depend on
    # where the file happens to live (a fresh clone split differently).
    place: Place = field(default_factory=Place, compare=False, repr=False)


@dataclass(frozen=True)
class TaggedTokens:
    """A sentence as words, one tag per word (BIO tags such as ``B-PER``, or any tag set)."""

    tokens: tuple[str, ...]
    tags: tuple[str, ...]
    instruction: str | None = None
    # Not in repr: the split orders records by a hash of their repr, which must not depend on
    # where the file happens to live (a fresh clone split differently).
    place: Place = field(default_factory=Place, compare=False, repr=False)


def _place(row: Row) -> Place:
    return Place(row.file, row.line, row.record)


def _missing(row: Row, key: str) -> InputError:
    return row.error(f"missing field '{key}'{did_you_mean(key, row.data)}", field=key)


def _text(row: Row, key: str) -> str:
    value = row.data.get(key)
    if value is None:
        raise _missing(row, key)
    if not isinstance(value, str):
        raise row.error(f"expected a string, got {_json_type(value)}", field=key)
    if not value.strip():
        raise row.error("empty text", field=key)
    return value


def _instruction(row: Row) -> str | None:
    """The optional instruction; absent, null and blank all mean none."""
    value = row.data.get("instruction")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise row.error(f"expected a string, got {_json_type(value)}", field="instruction")
    return value


def _label(row: Row) -> str:
    """A label as a string: strings as written, integers as digits, booleans as true/false."""
    value = row.data.get("label")
    if value is None:
        raise _missing(row, "label")
    if isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, str):
        raise row.error(f"expected a string or integer label, got {_json_type(value)}", field="label")
    if not value.strip():
        raise row.error("empty label", field="label")
    return value


def classified_text(row: Row) -> ClassifiedText:
    """One classification record, validated (text, label, optional instruction)."""
    return ClassifiedText(_text(row, "text"), _label(row), _instruction(row), _place(row))


def _strings(row: Row, key: str) -> tuple[str, ...]:
    value = row.data.get(key)
    if value is None:
        raise _missing(row, key)
    if not isinstance(value, list):
        raise row.error(f"expected a list of strings, got {_json_type(value)}", field=key)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise row.error(f"expected a string, got {_json_type(item)}", field=f"{key}[{i}]")
        if not item.strip():
            raise row.error("empty string", field=f"{key}[{i}]")
    return tuple(value)


def tagged_tokens(row: Row) -> TaggedTokens:
    """One token-tagging record, validated: as many tags as tokens, at least one token."""
    tokens = _strings(row, "tokens")
    if not tokens:
        raise row.error("empty tokens (a sentence needs at least one word)", field="tokens")
    tags = _strings(row, "tags")
    if len(tags) != len(tokens):
        raise row.error(f"{len(tags)} tags for {len(tokens)} tokens (one tag per token)", field="tags")
    return TaggedTokens(tokens, tags, _instruction(row), _place(row))


def read_classification(path: str | Path) -> list[ClassifiedText]:
    """Every classification record of a data file (.jsonl, .json, .csv, .parquet)."""
    return [classified_text(row) for row in read_rows(path)]


def read_tagged(path: str | Path) -> list[TaggedTokens]:
    """Every tagged sentence of a CoNLL file (see :data:`CONLL_SUFFIXES`) or a records file."""
    source = Path(path)
    if source.suffix.lower() in CONLL_SUFFIXES:
        if not source.is_file():
            raise InputError("is a folder; give a data file" if source.is_dir() else "no such file", file=str(path))
        return read_conll(source)
    return [tagged_tokens(row) for row in read_rows(path)]


def read_conll(path: str | Path) -> list[TaggedTokens]:
    """Sentences of a CoNLL file: a token per line, its tag in the last whitespace-separated
    column, a blank line between sentences, ``-DOCSTART-`` lines skipped.

    Every token line must have as many columns as the file's first one (CoNLL-2003: four), and
    at least two; a sentence's place is the line of its first token.
    """
    file = str(path)
    columns: tuple[int, int] | None = None  # (count, line that set it)
    sentences: list[TaggedTokens] = []
    words: list[tuple[str, str]] = []
    start = 0

    def close() -> None:
        if words:
            tokens, tags = zip(*words)
            sentences.append(TaggedTokens(tokens, tags, None, Place(file, start, len(sentences))))
            words.clear()

    for number, line in enumerate(_read_text(Path(path)).split("\n"), start=1):
        cells = line.split()
        if not cells:
            close()
            continue
        if cells[0] == DOCSTART:
            close()
            continue
        if columns is None:
            if len(cells) < 2:
                raise InputError(
                    "a token line needs at least two columns (the token first, its tag last)",
                    file=file,
                    line=number,
                    field="columns",
                )
            columns = (len(cells), number)
        elif len(cells) != columns[0]:
            raise InputError(
                f"{len(cells)} columns, but the file's first token line (line {columns[1]}) has {columns[0]}"
                " (every token line has the same columns, the tag in the last)",
                file=file,
                line=number,
                field="columns",
            )
        if not words:
            start = number
        words.append((cells[0], cells[-1]))
    close()
    if not sentences:
        raise InputError("no sentences (no token lines)", file=file)
    return sentences


# ---------------------------------------------------------------------------------------------
# Label sets

LabelledRecord = ClassifiedText | TaggedTokens
_SHOWN_LABELS = 20  # an error lists this many labels at most


def _labels_of(record: LabelledRecord) -> tuple[str, ...]:
    return record.tags if isinstance(record, TaggedTokens) else (record.label,)


@dataclass(frozen=True)
class LabelSet:
    """The labels a head predicts, sorted, so that ids are the same for the same training data
    whatever its order. For tagging data the labels are the tag strings (``B-PER``, ``O``, ...)."""

    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.labels:
            raise InputError("a label set needs at least one label")
        if len(set(self.labels)) != len(self.labels):
            raise InputError(f"a label set names a label twice: {list(self.labels)}")

    @classmethod
    def from_records(cls, records: Iterable[LabelledRecord]) -> LabelSet:
        """The labels (or tags) the training records use."""
        return cls(tuple(sorted({label for record in records for label in _labels_of(record)})))

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    def __len__(self) -> int:
        return len(self.labels)

    def id(self, label: str, place: Place | None = None, field: str = "label") -> int:
        """The id of ``label``; a located InputError (with a near miss) when it is not in the set."""
        try:
            return self.label2id[label]
        except KeyError:
            raise (place or Place()).error(self._unknown(label), field=field) from None

    def _unknown(self, label: str) -> str:
        shown = ", ".join(self.labels[:_SHOWN_LABELS]) + (", ..." if len(self) > _SHOWN_LABELS else "")
        return f"unknown label {label!r} (labels: {shown}){did_you_mean(label, self.labels)}"

    def check(self, records: Iterable[LabelledRecord], where: str) -> None:
        """Raise a located InputError for the first label (or tag) not in the set.

        ``where`` names the data (a file name, ``data.test``) for records that do not know
        their own file; records read from a file are located at their file and line.
        """
        for index, record in enumerate(records):
            place = record.place if record.place.file is not None else Place(where, None, index)
            for i, label in enumerate(_labels_of(record)):
                if label not in self.label2id:
                    field = f"tags[{i}]" if isinstance(record, TaggedTokens) else "label"
                    raise place.error(self._unknown(label), field=field)

    def save(self, path: str | Path) -> Path:
        """Write ``{"labels": [...], "id2label": {...}}`` (keys as strings, as HF configs have them)."""
        path = Path(path)
        atomic_write_json(
            path, {"labels": list(self.labels), "id2label": {str(i): x for i, x in self.id2label.items()}}
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> LabelSet:
        file = str(path)
        try:
            data = json.loads(_read_text(Path(path)))
        except json.JSONDecodeError as err:
            raise InputError(f"invalid JSON: {err.msg}", file=file, line=err.lineno) from None
        except OSError as err:
            raise InputError(f"cannot read the label set ({err.strerror})", file=file) from None
        labels = data.get("labels") if isinstance(data, dict) else None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise InputError("expected a list of label strings", file=file, field="labels")
        try:
            return cls(tuple(labels))
        except InputError as err:
            raise InputError(err.problem, file=file, field="labels") from None


# ---------------------------------------------------------------------------------------------
# Instruction templates


def _joined(tokenizer: Any, instruction: str, text: str, max_length: int | None) -> Any:
    return tokenizer(f"{instruction}\n\n{text}", truncation=max_length is not None, max_length=max_length)


def _pair(tokenizer: Any, instruction: str, text: str, max_length: int | None) -> Any:
    if getattr(tokenizer, "sep_token", None) is None:
        # A tokenizer without a separator (a decoder's BPE) encodes a pair as the two texts run
        # together, which would silently lose the boundary the template is for.
        raise InputError(
            f"the pair template needs a tokenizer with a separator token; {type(tokenizer).__name__} has "
            "none (a decoder's tokenizer): use the joined template",
            field="template",
        )
    # Truncate the text, never the instruction: it says which task the text is for.
    truncation = "only_second" if max_length is not None else False
    return tokenizer(instruction, text, truncation=truncation, max_length=max_length)


TEMPLATES: dict[str, Callable[[Any, str, str, int | None], Any]] = {
    "joined": _joined,
    "pair": _pair,
}  # = EncoderTemplate


def _template(name: str) -> Callable[[Any, str, str, int | None], Any]:
    if name not in TEMPLATES:
        raise InputError(
            f"unknown template {name!r}{did_you_mean(name, TEMPLATES)}; expected one of {', '.join(TEMPLATES)}",
            field="template",
        )
    return TEMPLATES[name]


def render_input(
    tokenizer: Any,
    instruction: str | None,
    text: str,
    template: EncoderTemplate = "joined",
    max_length: int | None = None,
) -> dict[str, list[int]]:
    """Token ids of an instructed input: ``"joined"`` encodes ``"{instruction}\\n\\n{text}"`` as
    one segment, ``"pair"`` as the tokenizer's pair (BERT: ``[CLS] instruction [SEP] text [SEP]``,
    token_type_ids 0 then 1). Without an instruction, the text alone. ``max_length`` truncates
    the text (the pair form never cuts the instruction)."""
    render = _template(template)
    if instruction is None or not instruction.strip():
        encoded = tokenizer(text, truncation=max_length is not None, max_length=max_length)
    else:
        encoded = render(tokenizer, instruction, text, max_length)
    return {key: list(value) for key, value in encoded.items()}


def encode_classification(
    tokenizer: Any,
    record: ClassifiedText,
    label_set: LabelSet,
    template: EncoderTemplate = "joined",
    max_length: int | None = None,
) -> dict[str, Any]:
    """input_ids, attention_mask (and token_type_ids when the tokenizer gives them) of the
    rendered input, and ``labels``: the label's id in ``label_set``."""
    label = label_set.id(record.label, record.place)
    return {**render_input(tokenizer, record.instruction, record.text, template, max_length), "labels": label}


# ---------------------------------------------------------------------------------------------
# Token classification: sub-word label alignment


def _continuation_ids(label_set: LabelSet) -> list[int]:
    """For each label id, the id a word's later sub-tokens get under ``align="all"``: ``B-X``
    becomes ``I-X`` when the set has it (transformers' run_ner.py ``b_to_i_label``)."""
    ids = label_set.label2id
    return [ids.get("I-" + label[2:], i) if label.startswith("B-") else i for i, label in enumerate(label_set.labels)]


def _word_encoding(tokenizer: Any, tokens: Sequence[str], instruction: str | None, max_length: int | None) -> Any:
    if not getattr(tokenizer, "is_fast", False):
        raise InputError(
            f"sub-word label alignment needs a fast tokenizer (its word_ids()); {type(tokenizer).__name__} "
            "is not one: load the model's tokenizer.json (AutoTokenizer with use_fast=True)",
            field="tokenizer",
        )
    first: Any = list(tokens) if instruction is None else instruction.split()
    second: Any = None if instruction is None else list(tokens)
    truncation: Any = False if max_length is None else ("only_second" if second is not None else True)
    try:
        return tokenizer(first, second, is_split_into_words=True, truncation=truncation, max_length=max_length)
    except ValueError as err:  # e.g. a byte-level BPE that wants add_prefix_space=True for split words
        raise InputError(
            f"the tokenizer cannot encode pre-split words ({err}); for byte-level BPE tokenizers "
            "load it with add_prefix_space=True",
            field="tokenizer",
        ) from err


def encode_tagged(
    tokenizer: Any,
    tokens: Sequence[str],
    tags: Sequence[str],
    label_set: LabelSet,
    align: Alignment = "first",
    max_length: int | None = None,
    instruction: str | None = None,
) -> dict[str, list[int]]:
    """input_ids, attention_mask (token_type_ids when given) and ``labels``, one per token id.

    The words go through the tokenizer pre-split (``is_split_into_words``), after the
    instruction as the first segment of a pair when there is one. ``labels`` is -100 on special
    tokens and on the instruction; on a word's first sub-token it is the word's tag id; on its
    later sub-tokens -100 (``"first"``) or the tag id with ``B-`` turned into ``I-`` (``"all"``).
    Words cut off by ``max_length`` lose their labels with their tokens.
    """
    if align not in get_args(Alignment):
        raise InputError(
            f"unknown alignment {align!r}{did_you_mean(str(align), get_args(Alignment))}; expected first or all",
            field="align",
        )
    if len(tokens) != len(tags):
        raise InputError(f"{len(tags)} tags for {len(tokens)} tokens (one tag per token)", field="tags")
    tag_ids = [label_set.id(tag, field=f"tags[{i}]") for i, tag in enumerate(tags)]
    continuation = _continuation_ids(label_set)
    if instruction is not None and not instruction.split():
        instruction = None  # blank: none, as the readers take it
    encoded = _word_encoding(tokenizer, tokens, instruction, max_length)
    text_segment = 0 if instruction is None else 1
    labels, previous = [], None
    for word, segment in zip(encoded.word_ids(), encoded.sequence_ids()):
        if word is None or segment != text_segment:
            labels.append(IGNORE_INDEX)
            continue
        if word != previous:
            labels.append(tag_ids[word])
        else:
            labels.append(continuation[tag_ids[word]] if align == "all" else IGNORE_INDEX)
        previous = word
    return {**{key: list(value) for key, value in encoded.items()}, "labels": labels}


def encode_tagged_record(
    tokenizer: Any,
    record: TaggedTokens,
    label_set: LabelSet,
    align: Alignment = "first",
    max_length: int | None = None,
) -> dict[str, list[int]]:
    """:func:`encode_tagged` of a record, its unknown tags reported at the record's place."""
    label_set.check([record], record.place.file or "tagged data")
    return encode_tagged(tokenizer, record.tokens, record.tags, label_set, align, max_length, record.instruction)


def encode_words(
    tokenizer: Any, tokens: Sequence[str], instruction: str | None = None, max_length: int | None = None
) -> tuple[dict[str, list[int]], list[int | None]]:
    """Pre-split words encoded as :func:`encode_tagged` encodes them (after the instruction, as the
    first segment of a pair, when there is one), and the position of each word's first sub-token,
    where a tagger's head reads the word's tag (``align="first"``); None for a word that
    ``max_length`` cut off. What a served tagger runs on words that have no tags yet."""
    if instruction is not None and not instruction.split():
        instruction = None  # blank: none, as the readers take it
    encoded = _word_encoding(tokenizer, tokens, instruction, max_length)
    text_segment = 0 if instruction is None else 1
    first: list[int | None] = [None] * len(tokens)
    for position, (word, segment) in enumerate(zip(encoded.word_ids(), encoded.sequence_ids())):
        if word is not None and segment == text_segment and first[word] is None:
            first[word] = position
    return {key: list(value) for key, value in encoded.items()}, first


# ---------------------------------------------------------------------------------------------
# The same records as prompts for a decoder (the zero- and k-shot comparison line)


def prompt_text(record: ClassifiedText) -> str:
    """What a decoder is asked: ``"{instruction}\\n\\n{text}"`` (the joined template's text), or
    the text alone when the record has no instruction."""
    return record.text if record.instruction is None else f"{record.instruction}\n\n{record.text}"


def as_conversation(record: ClassifiedText) -> Any:
    """The record as a held-out conversation: one user turn (:func:`prompt_text`), the label as
    the reference answer."""
    from instructkit.data.schema import Conversation, Message

    return Conversation([Message("user", prompt_text(record)), Message("assistant", record.label)])


def label_shots(pool: Sequence[ClassifiedText], instruction: str | None, k: int) -> list[ClassifiedText]:
    """``k`` demonstrations for a prompt under ``instruction``: records of ``pool`` under the same
    instruction, taking the labels in turn (in order of first appearance, each label's records
    in file order), so 4 shots of a 4-label task show each label once and of a 2-label task each
    twice. Fewer when the pool has fewer such records."""
    by_label: dict[str, list[ClassifiedText]] = {}
    for record in pool:
        if record.instruction == instruction:
            by_label.setdefault(record.label, []).append(record)
    queues = list(by_label.values())
    shots: list[ClassifiedText] = []
    depth = 0
    while len(shots) < k and any(depth < len(q) for q in queues):
        shots += [q[depth] for q in queues if depth < len(q)][: k - len(shots)]
        depth += 1
    return shots
