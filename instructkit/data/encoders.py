"""Records to token ids: what every training stage and evaluation suite feeds a model.

Each stage's records are converted to the shape its loss reads (demonstrations, pairs,
rankings, unpaired examples) and encoded with the chat template, here and only here, so the
SFT recipe, the DPO recipe and the `preference` eval suite see a pair the same way. Examples
that do not fit are dropped and counted, never silently.

Shapes:

* LM example: ``{"input_ids": [T], "labels": [T]}``, labels -100 where nothing trains.
* Ranking: ``{"input_ids": [K sequences], "ranks": [K]}`` (0 = best).
* Pair: ``{"chosen": (ids, labels), "rejected": (ids, labels)}``; unpaired (KTO):
  ``{"completion": (ids, labels), "label": bool}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from instructkit.data.schema import Conversation, Preference, Ranking, Text, Unpaired
from instructkit.errors import InputError

# ----------------------------------------------------------------------------------------------
# Conversions between record kinds


def as_rankings(records: Sequence[Any], where: str) -> list[Ranking]:
    """Rankings from preference pairs (chosen ranks 0, rejected 1) or rankings as they are."""
    out = []
    for i, record in enumerate(records):
        if isinstance(record, Ranking):
            ranks = record.ranks or list(range(len(record.responses)))
            out.append(Ranking(record.prompt, record.responses, ranks))
        elif isinstance(record, Preference):
            out.append(Ranking(record.prompt, [record.chosen, record.rejected], [0, 1]))
        else:
            raise InputError(
                f"a reward model trains on preference pairs or rankings, not {type(record).__name__} records",
                file=where,
                record=i,
            )
    return out


def as_pairs(records: Sequence[Any], where: str) -> list[Preference]:
    """Preference pairs; a K-wise ranking gives every untied pair of its responses."""
    out = []
    for i, record in enumerate(records):
        if isinstance(record, Preference):
            out.append(record)
        elif isinstance(record, Ranking):
            ranks = record.ranks or list(range(len(record.responses)))
            for a in range(len(ranks)):
                for b in range(len(ranks)):
                    if ranks[a] < ranks[b]:
                        out.append(Preference(record.prompt, record.responses[a], record.responses[b]))
        else:
            raise InputError(
                f"DPO trains on preference pairs or rankings, not {type(record).__name__} records "
                f"(KTO takes unpaired examples: set loss: kto)",
                file=where,
                record=i,
            )
    return out


def as_unpaired(records: Sequence[Any], where: str) -> list[Unpaired]:
    """KTO examples: unpaired as given, or each pair split into a desirable and an undesirable one."""
    out = []
    for i, record in enumerate(records):
        if isinstance(record, Unpaired):
            out.append(record)
        elif isinstance(record, (Preference, Ranking)):
            for pair in as_pairs([record], where):
                out += [Unpaired(pair.prompt, pair.chosen, True), Unpaired(pair.prompt, pair.rejected, False)]
        else:
            raise InputError(
                f"KTO trains on labelled (unpaired) examples or pairs, not {type(record).__name__} records",
                file=where,
                record=i,
            )
    return out


# ----------------------------------------------------------------------------------------------
# Encoders


def encode_records(
    tokenizer,
    records: list[Any],
    *,
    template: str | None,
    max_length: int,
    where: str,
    truncation: str = "whole-turns",
    counts: dict[str, int] | None = None,
) -> tuple[list[dict[str, list[int]]], int]:
    """Encode conversations (assistant turns trained) or plain text; count dropped examples.
    ``truncation`` (:class:`instructkit.data.templates.Truncation`) says what a conversation over
    ``max_length`` loses; ``counts["cut"]``, when given, counts those whose assistant turn was cut."""
    from instructkit.data.templates import encode_conversation, encode_text

    encoded, dropped = [], 0
    for i, record in enumerate(records):
        if isinstance(record, Conversation):
            enc = encode_conversation(
                tokenizer,
                record.messages,
                template=template,
                max_length=max_length,
                tools=record.tools,
                truncation=truncation,
            )
            if counts is not None and enc is not None and enc.cut:
                counts["cut"] = counts.get("cut", 0) + 1
        elif isinstance(record, Text):
            enc = encode_text(tokenizer, record.text, max_length=max_length)
        else:
            raise InputError(
                f"SFT trains on demonstrations or plain text, not {type(record).__name__} records", file=where, record=i
            )
        if enc is None or not any(label != -100 for label in enc.labels):
            dropped += 1
            continue
        encoded.append({"input_ids": list(enc.input_ids), "labels": list(enc.labels)})
    return encoded, dropped


def encode_rankings(
    tokenizer, rankings: Sequence[Ranking], *, template: str | None, max_length: int
) -> tuple[list[dict[str, Any]], int]:
    """Each ranking as {"input_ids": [K sequences], "ranks": [K]}; responses that do not fit are
    cut (never their end-of-turn, where the score is read); a ranking left without an untied
    pair is dropped and counted."""
    from instructkit.data.templates import Truncation, encode_prompt_response

    encoded, dropped = [], 0
    for ranking in rankings:
        ids, ranks = [], []
        for response, rank in zip(ranking.responses, ranking.ranks):
            enc = encode_prompt_response(
                tokenizer,
                ranking.prompt,
                response,
                template=template,
                max_length=max_length,
                truncation=Truncation.CUT_RESPONSE,
            )
            if enc is not None:
                ids.append(list(enc.input_ids))
                ranks.append(rank)
        if len(set(ranks)) < 2:
            dropped += 1
            continue
        encoded.append({"input_ids": ids, "ranks": ranks})
    return encoded, dropped


def encode_preferences(
    tokenizer, records: Sequence[Any], *, template: str | None, max_length: int, paired: bool
) -> tuple[list[dict[str, Any]], int]:
    """Pairs as {"chosen": (ids, labels), "rejected": (ids, labels)}; unpaired examples as
    {"completion": (ids, labels), "label": bool}. Only response tokens are labelled; a response
    that does not fit is cut (keeping its end-of-turn)."""
    from instructkit.data.templates import Truncation, encode_prompt_response

    def encode(prompt, response):
        enc = encode_prompt_response(
            tokenizer, prompt, response, template=template, max_length=max_length, truncation=Truncation.CUT_RESPONSE
        )
        return None if enc is None else (list(enc.input_ids), list(enc.labels))

    out, dropped = [], 0
    for record in records:
        if paired:
            chosen, rejected = encode(record.prompt, record.chosen), encode(record.prompt, record.rejected)
            example = {"chosen": chosen, "rejected": rejected} if chosen and rejected else None
        else:
            completion = encode(record.prompt, record.completion)
            example = {"completion": completion, "label": record.label} if completion else None
        if example is None:
            dropped += 1
        else:
            out.append(example)
    return out, dropped


# ----------------------------------------------------------------------------------------------
# Token counts


def _field(example: Any, name: str) -> list[int]:
    return example[name] if isinstance(example, dict) else getattr(example, name)


def trained_tokens(example: Any) -> int:
    """Targets that count in the loss: labels at positions 1.. that are not -100."""
    return sum(1 for label in _field(example, "labels")[1:] if label != -100)


def real_tokens(example: Any) -> int:
    """Tokens of an LM example (or packed row), padding excluded: it has none yet."""
    return len(_field(example, "input_ids"))


def preference_rows(example: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
    """The (ids, labels) rows of a pair (chosen, rejected) or of an unpaired example."""
    return [example["chosen"], example["rejected"]] if "chosen" in example else [example["completion"]]
