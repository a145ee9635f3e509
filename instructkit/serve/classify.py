"""Serving a classify run: ``POST /classify`` over a sequence classifier or a tagger.

The request and answer follow vLLM's classification API (``{"model", "input": str | [str]}`` ->
``{"id", "object": "list", "created", "model", "data": [{"index", "label", "probs",
"num_classes"}], "usage"}``), with two additions: an ``instruction`` (the classify stage renders
instruction + text through its template, so the served head must see the same), and for taggers
the words of each input with their tags and the entity spans, in character offsets.

What the input is rendered with comes from the run folder beside ``final/``: the template
(``data.template``) and the instructions of the training data. A request without ``instruction``
gets the run's one instruction when it trained under exactly one, the text alone when it trained
under none, and a 400 naming them when it trained under several (one encoder, several tasks: the
instruction says which). The encoding is the eval path's (:func:`instructkit.data.tasks.render_input`,
:func:`instructkit.data.tasks.encode_words`, :func:`instructkit.models.heads.classifier_collate`),
so a served probability is the softmax of the logits the held-out scores were read from; unlike
the eval path the server does not cut the text at ``data.max_length``: an input is read whole
up to the model's positions, and a longer one is a 400.

One request runs at a time, its inputs in batches of ``max_batch``; ``max_queue`` more may wait,
and another gets :class:`~instructkit.serve.engine.QueueFull` (a 503).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instructkit.errors import InputError
from instructkit.serve.engine import QueueFull

# A served tagger's words: runs of letters and digits (with inner apostrophes and hyphens:
# O'Neil, e-mail), and each other non-space character alone, as the shipped ner data splits them.
WORD = re.compile(r"\w+(?:['\u2019-]\w+)*|[^\w\s]")


@dataclass(frozen=True)
class Word:
    text: str
    start: int  # character offsets into the input: input[start:end] == text
    end: int


def split_words(text: str) -> list[Word]:
    """The words a served tagger tags (:data:`WORD`), with their character offsets."""
    return [Word(m.group(), m.start(), m.end()) for m in WORD.finditer(text)]


def bio_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entities of a BIO tag sequence as ``(type, first word, last word)``, by conlleval's rules
    (seqeval's default): ``B-X`` starts an entity, ``I-X`` continues an entity of type X and
    starts one after ``O`` or another type, ``O`` (or any tag without a ``B-``/``I-`` prefix)
    ends it."""
    spans: list[tuple[str, int, int]] = []
    current: list[Any] | None = None  # [type, first, last]
    for i, tag in enumerate(tags):
        prefix, _, kind = tag.partition("-")
        if prefix == "I" and kind and current is not None and current[0] == kind:
            current[2] = i
            continue
        if current is not None:
            spans.append(tuple(current))
            current = None
        if prefix in ("B", "I") and kind:
            current = [kind, i, i]
    if current is not None:
        spans.append(tuple(current))
    return spans


def model_task(model: Any) -> str | None:
    """The classify task of a loaded model (``seq_classification``, ``token_classification``), or
    None for a generator."""
    from instructkit.models.heads import task_from_architectures

    return task_from_architectures([type(model).__name__])


def classifier_task(spec: str) -> str | None:
    """The task a model spec's ``config.json`` names, read before any model loads; None for a
    generator (or a Hub id, whose config is not read here)."""
    from instructkit.models.heads import task_from_architectures
    from instructkit.models.loading import resolve

    resolved = resolve(spec)
    config = Path(resolved.base, "config.json")
    if resolved.folder or not config.is_file():
        return None
    return task_from_architectures(json.loads(config.read_text()).get("architectures"))


def load_classifier(spec: str, task: str) -> tuple[Any, Any]:
    """The classifier (or tagger) at ``spec`` with its head, fp32, in eval mode, and its tokenizer."""
    import torch
    import transformers

    from instructkit.models.heads import HEADS
    from instructkit.models.loading import load_tokenizer, resolve

    auto = getattr(transformers, HEADS[task].auto_class)
    model = auto.from_pretrained(resolve(spec).base, dtype=torch.float32, use_safetensors=True)
    return model.eval(), load_tokenizer(spec)


@dataclass(frozen=True)
class ServedInputs:
    """How a classify run renders its inputs: its template, and the training data's distinct
    instructions in order of first appearance (None: not known, the run folder was not found)."""

    template: str
    instructions: tuple[str, ...] | None

    def instruction(self, given: str | None) -> str | None:
        """The instruction a request's inputs go in with (see the module docstring)."""
        if given is not None:
            return given if given.strip() else None
        if not self.instructions:
            return None
        if len(self.instructions) == 1:
            return self.instructions[0]
        listed = "; ".join(repr(x) for x in self.instructions)
        raise InputError(
            f"this classifier was trained under {len(self.instructions)} instructions, which say what to "
            f"classify: give one as `instruction` ({listed})",
            field="instruction",
        )


def served_inputs(spec: str) -> ServedInputs:
    """The template and instructions of the classify run whose ``final/`` the spec names (its
    ``config.yaml`` and training data); the stage's default template where there is no run."""
    import yaml

    from instructkit.config import ClassifyDataConfig
    from instructkit.data.tasks import read_classification, read_tagged
    from instructkit.datasets import resolve_data_path
    from instructkit.models.loading import resolve

    default = ClassifyDataConfig()
    try:
        final = Path(resolve(spec).base)
    except InputError:  # a name that is no path (an app built in Python over a loaded model)
        return ServedInputs(default.template, None)
    config_file = final.parent / "config.yaml"
    if final.name != "final" or not config_file.is_file():
        return ServedInputs(default.template, None)
    data = (yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}).get("data") or {}
    template = data.get("template") or default.template
    try:
        read = read_tagged if _is_tagging(final) else read_classification
        records = read(resolve_data_path(data["path"]))
    except (InputError, KeyError, OSError):
        return ServedInputs(template, None)
    return ServedInputs(template, tuple(dict.fromkeys(r.instruction for r in records if r.instruction)))


def _is_tagging(final: Path) -> bool:
    from instructkit.models.heads import HEADS, task_from_architectures

    architectures = json.loads((final / "config.json").read_text()).get("architectures")
    task = task_from_architectures(architectures)
    return task is not None and HEADS[task].tagging


class ClassifyService:
    """Runs ``/classify`` requests on a classifier or tagger, one request at a time."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        task: str,
        inputs: ServedInputs,
        *,
        max_batch: int,
        max_queue: int,
        context: int | None,
    ) -> None:
        from instructkit.models.heads import HEADS

        self.model, self.tokenizer, self.task, self.inputs = model.eval(), tokenizer, task, inputs
        self.tagging = HEADS[task].tagging
        ids = model.config.id2label
        self.labels = [ids[i] for i in sorted(ids, key=int)]
        self.max_batch, self.max_queue, self.context = max_batch, max_queue, context
        self._admitted = 0  # requests with a place: running or waiting
        self._running = 0
        self._count = threading.Lock()
        self._compute = threading.Lock()  # one request's forward passes at a time

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return max(self._admitted - self.running, 0)

    def pause(self) -> None:
        """Hold the model: admitted requests wait (what the 503 test does)."""
        self._compute.acquire()

    def resume(self) -> None:
        self._compute.release()

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """A place for one request: :class:`QueueFull` when one runs and ``max_queue`` wait."""
        with self._count:
            if self._admitted >= 1 + self.max_queue:
                raise QueueFull(f"the classifier is busy and {self.max_queue} requests already wait; retry later")
            self._admitted += 1
        try:
            yield
        finally:
            with self._count:
                self._admitted -= 1

    def classify(self, texts: Sequence[str], instruction: str | None) -> tuple[list[dict[str, Any]], int]:
        """One answer item per text (vLLM's ``data``) and the prompt tokens read."""
        instruction = self.inputs.instruction(instruction)
        if self.tagging:
            words = [split_words(t) for t in texts]
            encoded = [self._encode_words(w, instruction, i) for i, w in enumerate(words)]
        else:
            encoded = [(self._encode_text(t, instruction, i), None) for i, t in enumerate(texts)]
        with self._compute:
            self._running += 1
            try:
                probs = self._probabilities([e for e, _ in encoded])
            finally:
                self._running -= 1
        items = []
        for index, ((_, first), p) in enumerate(zip(encoded, probs)):
            if self.tagging:
                items.append(self._tagged_item(index, texts[index], words[index], first, p))
            else:
                label = int(p.argmax())
                items.append(
                    {"index": index, "label": self.labels[label], "probs": p.tolist(), "num_classes": len(self.labels)}
                )
        return items, sum(len(e["input_ids"]) for e, _ in encoded)

    def _encode_text(self, text: str, instruction: str | None, index: int) -> dict[str, list[int]]:
        from instructkit.data.tasks import render_input

        encoded = render_input(self.tokenizer, instruction, text, self.inputs.template)
        self._check_length(len(encoded["input_ids"]), index)
        return encoded

    def _encode_words(self, words: list[Word], instruction: str | None, index: int):
        from instructkit.data.tasks import encode_words

        if not words:
            raise InputError("no words to tag (only spaces)", field=self._field(index))
        encoded, first = encode_words(self.tokenizer, [w.text for w in words], instruction)
        self._check_length(len(encoded["input_ids"]), index)
        return encoded, first

    def _field(self, index: int) -> str:
        return "input" if index == 0 else f"input[{index}]"

    def _check_length(self, n: int, index: int) -> None:
        if self.context is not None and n > self.context:
            raise InputError(
                f"this model reads at most {self.context} tokens, but the input has {n} (instruction included)",
                field=self._field(index),
            )

    def _probabilities(self, encoded: list[dict[str, list[int]]]) -> list[Any]:
        """Softmax of the head's logits: (C,) per text, or (T, C) per tagged input (unpadded)."""
        import torch

        from instructkit.models.heads import classifier_collate

        collate = classifier_collate(self.tokenizer.pad_token_id)
        device = next(self.model.parameters()).device
        out = []
        with torch.no_grad():
            for start in range(0, len(encoded), self.max_batch):
                chunk = encoded[start : start + self.max_batch]
                batch = {k: v.to(device) for k, v in collate(chunk).items()}
                probs = self.model(**batch).logits.float().softmax(-1).cpu()  # (B, C) or (B, T, C)
                out += [probs[i] if probs.dim() == 2 else probs[i, : len(e["input_ids"])] for i, e in enumerate(chunk)]
        return out

    def _tagged_item(self, index: int, text: str, words: list[Word], first: list[int | None], probs: Any) -> dict:
        """Each word with its tag and the tag's probability, and the entities (a score: the mean
        probability of its words' tags)."""
        rows = probs[[f for f in first if f is not None]]  # (words, C); no word is cut: nothing truncates
        ids = rows.argmax(-1).tolist()
        scores = rows.max(-1).values.tolist()
        tags = [self.labels[i] for i in ids]
        tokens = [
            {"text": w.text, "start": w.start, "end": w.end, "label": tag, "score": s}
            for w, tag, s in zip(words, tags, scores)
        ]
        entities = [
            {
                "entity": kind,
                "start": words[a].start,
                "end": words[b].end,
                "text": text[words[a].start : words[b].end],
                "score": sum(scores[a : b + 1]) / (b - a + 1),
            }
            for kind, a, b in bio_spans(tags)
        ]
        return {"index": index, "num_classes": len(self.labels), "tokens": tokens, "entities": entities}
