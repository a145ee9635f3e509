"""Records to encoder-decoder examples: the source text an encoder reads and the target ids a
decoder is trained to write.

Any instruction format we read (alpaca, messages, sharegpt, ...) becomes a
:class:`~instructkit.data.schema.Conversation`; its last assistant turn is the target and the
turns before it are the source. An encoder needs no chat template: the source is the turns'
contents joined by a blank line (alpaca's instruction and input come joined so already, see
``data/formats._alpaca_prompt``), which is also what generation and the server feed a seq2seq
model (:func:`source_text`), so training and inference read the same text.

The target is the tokenizer's target encoding (``text_target=``) with the decoder's start token
taken off the front when the tokenizer puts it there (BERT's ``[CLS]`` in a BERT2BERT) and eos
put at the end when it does not: the decoder reads ``[start] + labels[:-1]`` and learns to
write ``labels``, eos included, which is what stops generation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from instructkit.data.schema import Conversation, Message
from instructkit.errors import InputError

IGNORE_INDEX = -100  # losses.token_ce.IGNORE_INDEX (data/ imports no torch)
SOURCE_JOIN = "\n\n"


def source_text(messages: Sequence[Message | Mapping[str, Any]]) -> str:
    """The text an encoder reads for ``messages`` (the prompt turns, no answer): their contents
    joined by a blank line, empty ones left out."""
    contents = [m.content if isinstance(m, Message) else str(m.get("content", "")) for m in messages]
    return SOURCE_JOIN.join(c for c in contents if c.strip())


def source_and_target(record: Conversation, where: str | None = None, index: int | None = None) -> tuple[str, str]:
    """(source text, target text) of a conversation: the turns before its last assistant turn,
    and that turn's content."""
    messages = record.messages
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=None)
    if last is None:
        raise InputError("a seq2seq record needs an assistant turn (the target)", file=where, record=index)
    source = source_text(messages[:last])
    if not source:
        raise InputError("a seq2seq record needs a prompt before its answer (the source)", file=where, record=index)
    return source, messages[last].content


def check_records(records: Sequence[Any], where: str | None = None) -> None:
    """Every record is a conversation with a prompt and an answer: an InputError at the first that
    is not (checked before a model loads)."""
    for i, record in enumerate(records):
        if not isinstance(record, Conversation):
            raise InputError(
                f"a seq2seq stage reads instruction data (alpaca, messages, ...), not {type(record).__name__} records",
                file=where,
                record=i,
            )
        source_and_target(record, where, i)


def encode_source(tokenizer: Any, messages: Sequence[Message | Mapping[str, Any]]) -> list[int]:
    """Encoder input ids of a prompt (with the tokenizer's special tokens: ``[CLS] ... [SEP]``,
    ``... </s>``)."""
    return list(tokenizer(source_text(messages))["input_ids"])


def target_ids(tokenizer: Any, text: str, *, decoder_start_id: int, eos_id: int) -> list[int]:
    """The ids the decoder learns to write for ``text``: the target encoding without a leading
    ``decoder_start_id``, ending with ``eos_id``."""
    ids = list(tokenizer(text_target=text)["input_ids"])
    if ids and ids[0] == decoder_start_id:
        ids = ids[1:]
    if not ids or ids[-1] != eos_id:
        ids.append(eos_id)
    return ids


def encode_seq2seq(
    tokenizer: Any,
    records: Sequence[Any],
    *,
    decoder_start_id: int,
    eos_id: int,
    max_source_length: int,
    max_target_length: int,
    where: str | None = None,
) -> tuple[list[dict[str, list[int]]], int]:
    """``{"input_ids", "labels"}`` per record, and how many were left out because the source or
    the target (eos included) is longer than its limit; a record of another kind than a
    conversation (a preference pair, plain text) is an InputError at its index."""
    check_records(records, where)
    examples, dropped = [], 0
    for i, record in enumerate(records):
        source, target = source_and_target(record, where, i)
        input_ids = list(tokenizer(source)["input_ids"])
        labels = target_ids(tokenizer, target, decoder_start_id=decoder_start_id, eos_id=eos_id)
        if len(input_ids) > max_source_length or len(labels) > max_target_length:
            dropped += 1
            continue
        examples.append({"input_ids": input_ids, "labels": labels})
    return examples, dropped


def target_tokens(example: Mapping[str, Any]) -> int:
    """An example's share of the loss denominator: its target tokens (eos included)."""
    return len(example["labels"])


def real_tokens(example: Mapping[str, Any]) -> int:
    """Source and target tokens: what the encoder and the decoder both read (for tokens/s)."""
    return len(example["input_ids"]) + len(example["labels"])


def seq2seq_collate(pad_id: int, decoder_start_id: int) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """Right-pad a batch: ``input_ids`` (B, S) with ``pad_id`` and its ``attention_mask``;
    ``decoder_input_ids`` (B, T) = ``[decoder_start_id] + labels[:-1]`` padded with ``pad_id``,
    its ``decoder_attention_mask``, and ``labels`` (B, T) padded with -100 (what transformers'
    ``shift_tokens_right`` makes from ``labels=``)."""

    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        S = max(len(e["input_ids"]) for e in examples)
        T = max(len(e["labels"]) for e in examples)

        def pad(rows: list[list[int]], width: int, fill: int) -> torch.Tensor:
            return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.long)

        sources = [list(e["input_ids"]) for e in examples]
        labels = [list(e["labels"]) for e in examples]
        decoder_inputs = [[decoder_start_id, *y[:-1]] for y in labels]
        return {
            "input_ids": pad(sources, S, pad_id),
            "attention_mask": pad([[1] * len(s) for s in sources], S, 0),
            "decoder_input_ids": pad(decoder_inputs, T, pad_id),
            "decoder_attention_mask": pad([[1] * len(y) for y in labels], T, 0),
            "labels": pad(labels, T, IGNORE_INDEX),
        }

    return collate
