"""Datasets shipped inside the package, so a demo or test needs no download.

``extract``: one-sentence orders to turn into ``name: ..; item: ..; count: ..; city: ..``
(messages format, train/val/test), a skill the default model lacks zero-shot and that exact
match scores. Made by ``scripts/make_extract_dataset.py``; see ``docs/dataset.md``.
``extract_prefs`` (preference format: the correct answer chosen, a plausible mistake rejected)
and ``extract_prompts`` (prompts format: the prompt and its reference ``answer``, for RL with a
reward function) are derived from it by ``scripts/make_extract_preferences.py``.
``label`` and ``keysort`` (the same orders, other answer formats) and ``generic_text`` (prose, for
perplexity) serve the continual recipe; ``scripts/make_continual_datasets.py`` makes them.
``classify`` (support tickets under two instructions: topic and mood, ``instruction`` + ``text`` +
``label``) and ``ner`` (``tokens`` + BIO ``tags`` over PER, ORG, LOC, PRODUCT; its test split also
as a CoNLL-2003 file, ``shipped:ner/test.conll``) are the encoder tasks' data, made by
``scripts/make_task_datasets.py``.
``refusal`` (harmful requests and benign look-alikes) and ``injection`` (task prompts with an
instruction hidden in their input) are the safety suites' prompts, made by
``scripts/make_safety_sets.py``.
``transform`` (alpaca: reverse, sort, extract the number, list the animals; short lowercase inputs)
is the seq2seq recipe's data, made by ``scripts/make_seq2seq_dataset.py``.
``orders_text`` (``{"text": ...}`` shop notes: the extract task's names, items, counts and cities as
prose, no order of extract's val/test) is the pretrain recipe's text domain, made by
``scripts/make_text_domain.py``.
``rlvr_prompts`` (IFEval-format prompts: short writing tasks with one or two of the 25 verifiable
constraint kinds, worded for this project) is the rlvr recipe's RL data and held-out check, made by
``scripts/make_rlvr_prompts.py``.

Every split is named ``shipped:NAME/SPLIT`` wherever a data path is taken (configs,
``instructkit data inspect``, ``label create --prompts``); :func:`resolve_data_path` turns the
name into the file.
"""

from __future__ import annotations

from pathlib import Path

from instructkit.errors import InputError, did_you_mean

SHIPPED: dict[str, tuple[str, ...]] = {
    "extract": ("train", "val", "test"),
    "extract_prefs": ("train", "val"),  # correct answer chosen, a plausible mistake rejected
    "extract_prompts": ("train", "test"),  # prompt + reference `answer`, for RL with a reward function
    "label": ("train", "val", "test"),  # the extract orders as shipping labels (the continual recipe)
    "keysort": ("train", "val", "test"),  # the extract fields, keys in alphabetical order (continual)
    "generic_text": ("test",),  # plain English prose: general-ability perplexity (continual)
    "classify": ("train", "val", "test"),  # support tickets: topic or mood, by instruction (encoders)
    "refusal": ("test",),  # harmful requests and benign look-alikes, prompts format (docs/safety.md)
    "injection": ("test",),  # shipped task prompts with an injected canary, prompts format (docs/safety.md)
    "transform": ("train", "val", "test"),  # instructed string transforms, alpaca (seq2seq; docs/seq2seq.md)
    "orders_text": ("train", "test"),  # shop notes as plain text, the extract task's domain (docs/pretrain.md)
    "rlvr_prompts": ("train", "test"),  # IFEval-format prompts, 25 constraint kinds (recipes/rlvr.yaml)
}
"""Each shipped dataset and its splits, in formats the instruction-data loader reads."""

SHIPPED_TAGGING: dict[str, tuple[str, ...]] = {
    "ner": ("train", "val", "test", "test.conll"),  # tokens + BIO tags; test also as a CoNLL-2003 file
}
"""Token-tagging datasets (``tokens`` + ``tags`` records, not an instruction format) and their
splits. A split that ends in ``.conll`` is a CoNLL file, ``NAME_SPLIT`` (no ``.jsonl``)."""

SHIPPED_FOLDERS: dict[str, tuple[str, ...]] = {
    "vision": ("train", "val", "test"),  # rendered scenes + questions with images (scripts/make_vision_dataset.py)
}
"""Datasets kept in a folder of their own, ``NAME/SPLIT.jsonl`` beside the files they point to
(images, relative to the split file)."""

_HERE = Path(__file__).resolve().parent


def shipped_path(name: str, split: str) -> Path:
    """Path of a shipped dataset's split, e.g. ``shipped_path("extract", "train")`` or
    ``shipped_path("ner", "test.conll")``."""
    datasets = {**SHIPPED, **SHIPPED_TAGGING, **SHIPPED_FOLDERS}
    if name not in datasets:
        raise InputError(
            f"no shipped dataset '{name}'{did_you_mean(name, datasets)}; expected one of "
            + ", ".join(repr(n) for n in datasets)
        )
    if split not in datasets[name]:
        raise InputError(
            f"dataset '{name}' has no split '{split}'{did_you_mean(split, datasets[name])}; "
            "expected one of " + ", ".join(repr(s) for s in datasets[name])
        )
    if name in SHIPPED_FOLDERS:
        return _HERE / name / f"{split}.jsonl"
    return _HERE / (f"{name}_{split}" if split.endswith(".conll") else f"{name}_{split}.jsonl")


def resolve_data_path(path: str | Path) -> str:
    """``shipped:NAME/SPLIT`` names a shipped split; anything else is returned unchanged."""
    text = str(path)
    if text.startswith("shipped:"):
        name, _, split = text[len("shipped:") :].partition("/")
        return str(shipped_path(name, split or "train"))
    return text
