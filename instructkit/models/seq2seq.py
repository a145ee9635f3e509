"""Encoder-decoder models: telling one from a decoder, the BERT2BERT warm start, and the loss.

* **Which kind.** A model is an encoder-decoder when its config says ``is_encoder_decoder``
  (BART, T5, a saved ``EncoderDecoderModel``); :func:`is_encoder_decoder` reads that from the
  folder's ``config.json`` (or the cached Hub config) before any weights load, and
  ``models.loading.load_model`` then loads it with ``AutoModelForSeq2SeqLM``.
* **BERT2BERT** (Rothe, Narayan and Severyn 2020, "Leveraging Pre-trained Checkpoints for
  Sequence Generation Tasks", section 3): encoder and decoder both start from one BERT
  checkpoint; the decoder is the same BERT with causal self-attention, a cross-attention block
  added to every layer (the checkpoint has none: here a copy of the layer's self-attention,
  where the paper draws it at random) and an LM head tied to its
  word embeddings. Built with transformers' ``EncoderDecoderModel``; decoding starts from
  ``[CLS]`` and ends at ``[SEP]``, padding is ``[PAD]``. :func:`warm_start` seeds the new weights
  with ``seed``, so the untrained model a run started from can be built again exactly (the eval
  stage's first row, :func:`starting_model`).
* **The loss** (:func:`seq2seq_cross_entropy`): token cross-entropy of the decoder's logits
  against the target ids, padding (-100) masked, returned as ``(loss_sum, count)`` so the
  engine's accumulation over micro-batches is exact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instructkit.errors import InputError

IGNORE_INDEX = -100
WARM_START_FILE = "instructkit_seq2seq.json"  # in final/: the encoder and seed a BERT2BERT was built from


def config_of(spec: str, *, trust_remote_code: bool = False) -> dict[str, Any] | None:
    """The model config of a spec as a dict (from ``config.json``, else the cached Hub config),
    or None when it cannot be read without weights (a GGUF file, an adapter folder)."""
    from instructkit.models.loading import model_config, resolve

    resolved = resolve(spec)
    return None if resolved.folder else model_config(resolved, trust_remote_code=trust_remote_code)


def is_encoder_decoder(spec_or_model: Any, *, trust_remote_code: bool = False) -> bool:
    """Whether a model (loaded, or a spec) is an encoder-decoder: its config's ``is_encoder_decoder``."""
    config = getattr(spec_or_model, "config", None)
    if config is not None:
        return bool(getattr(config, "is_encoder_decoder", False))
    found = config_of(str(spec_or_model), trust_remote_code=trust_remote_code)
    return bool(found and (found.get("is_encoder_decoder") or found.get("model_type") == "encoder-decoder"))


def special_ids(model: nn.Module) -> tuple[int, int, int]:
    """(decoder start, eos, pad) token ids of an encoder-decoder, from its config; an InputError
    when one is missing (a BART or T5 config has all three)."""
    config = model.config
    decoder = getattr(config, "decoder", None)
    out = []
    for name in ("decoder_start_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, name, None)
        if value is None and decoder is not None:
            value = getattr(decoder, name, None)
        if value is None:
            value = getattr(getattr(model, "generation_config", None), name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is None:
            raise InputError(f"the model config has no {name}; an encoder-decoder needs one", field="model")
        out.append(int(value))
    return out[0], out[1], out[2]


# ----------------------------------------------------------------------------------------------
# BERT2BERT


def warm_start(encoder: str, *, seed: int = 0, trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """A BERT2BERT ``EncoderDecoderModel`` from the BERT checkpoint ``encoder`` (a spec: embedded
    name or folder) and its tokenizer: encoder = the checkpoint, decoder = the checkpoint with
    ``is_decoder`` and cross-attention added, each layer's cross-attention a copy of its
    self-attention (:func:`copy_self_attention_into_cross_attention`); the weights the checkpoint
    lacks (the LM head's transform) are drawn after ``torch.manual_seed(seed)``."""
    import transformers
    from transformers import EncoderDecoderModel

    from instructkit.models.loading import load_tokenizer, resolve

    resolved = resolve(encoder)
    if resolved.folder:
        raise InputError(f"{encoder} is an adapter; a warm start needs a whole BERT checkpoint", field="model")
    tokenizer = load_tokenizer(encoder, trust_remote_code=trust_remote_code)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (("cls", "[CLS]"), ("sep", "[SEP]"))}
    if tokenizer.unk_token_id in ids.values() or None in ids.values() or tokenizer.pad_token_id is None:
        raise InputError(
            f"{encoder}'s tokenizer has no [CLS], [SEP] or [PAD]: a BERT2BERT warm start needs a BERT-style encoder",
            field="model",
        )
    torch.manual_seed(seed)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "newly initialized: crossattention..." is the point
    try:
        model = EncoderDecoderModel.from_encoder_decoder_pretrained(
            resolved.base, resolved.base, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id = ids["cls"]
        config.eos_token_id = ids["sep"]
        config.pad_token_id = tokenizer.pad_token_id
    model.config.vocab_size = model.config.decoder.vocab_size
    copy_self_attention_into_cross_attention(model.decoder)
    return model, tokenizer


def copy_self_attention_into_cross_attention(decoder: nn.Module) -> None:
    """Start every decoder layer's cross-attention as a copy of its self-attention.

    Rothe et al. draw the cross-attention at random. Copied, it starts as a pretrained attention
    over the encoder's states (which the same checkpoint made), so a decoder position already
    attends to the source tokens like it; measured on shipped:transform (docs/seq2seq.md), the
    random start sat at about 3 nats a token (the answers' word frequencies, the source ignored)
    for 150 steps, the copied one went below 2.2 within 90."""
    for layer in decoder.base_model.encoder.layer:
        layer.crossattention.load_state_dict(layer.attention.state_dict())


def save_warm_start_record(folder: Path, encoder: str, seed: int) -> None:
    (folder / WARM_START_FILE).write_text(json.dumps({"warm_start": encoder, "seed": seed}, indent=1) + "\n")


def warm_start_record(spec: str) -> dict[str, Any] | None:
    """What a BERT2BERT run's final/ (or the run folder) says it was built from, else None."""
    for folder in (Path(spec), Path(spec) / "final"):
        path = folder / WARM_START_FILE
        if path.is_file():
            return json.loads(path.read_text())
    return None


def starting_model(spec: str, later: list[str]) -> tuple[nn.Module, Any] | None:
    """The untrained BERT2BERT a later run in ``later`` was warm-started from, when ``spec`` is
    its encoder (the recipe's starting model): built again with the run's seed, so it is the
    model training began with. None when no later run is a warm start from ``spec``."""
    for other in later:
        record = warm_start_record(other)
        if record and record["warm_start"] == spec:
            model, tokenizer = warm_start(spec, seed=record["seed"])
            from instructkit.models.loading import default_device

            return model.to(default_device()).eval(), tokenizer
    return None


# ----------------------------------------------------------------------------------------------
# The loss


def seq2seq_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy of the decoder's outputs and the number of target tokens.

    Args:
        logits: (B, T, V), position t's scores for target token t (the decoder read the start
            token and targets < t: teacher forcing, inputs already shifted right).
        labels: (B, T) target ids, -100 on padding.

    Returns:
        (loss_sum, count): ``sum -log softmax(logits[b, t])[labels[b, t]]`` over non-padding
        targets, and their number; ``loss_sum / count`` is the mean transformers' models return
        for ``labels=``.
    """
    flat = logits.reshape(-1, logits.shape[-1]).float()  # (B*T, V)
    targets = labels.reshape(-1)  # (B*T,)
    loss_sum = nn.functional.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (targets != IGNORE_INDEX).sum()


class Seq2SeqLoss(nn.Module):
    """``forward(labels, **inputs)``: the model's logits given the source and the shifted
    targets (``decoder_input_ids``), then :func:`seq2seq_cross_entropy`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, labels: torch.Tensor, **inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return seq2seq_cross_entropy(self.model(**inputs).logits, labels)
