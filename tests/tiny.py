"""Tiny models built from a config inside the tests, with the embedded model's real tokenizer."""

from __future__ import annotations

import functools
import json
from pathlib import Path


@functools.lru_cache(maxsize=1)
def real_tokenizer():
    """SmolLM2's tokenizer (ChatML template, eos == pad == <|im_end|>), from the embedded cache."""
    from instructkit.models.loading import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


TINY_LLAMA = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
    "attention_dropout": 0.0,
}
"""The 2-layer, 32-wide Llama every test builds; ``overrides`` change any of it."""


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY_LLAMA, "vocab_size": vocab_size, **overrides})


def tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab_size, **overrides))


def tiny_model_dir(path: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny random Llama with the real tokenizer into ``path`` (an HF folder)."""
    tokenizer = real_tokenizer()
    model = tiny_llama(len(tokenizer), seed=seed, **overrides)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def toy_conversations(n: int = 32) -> list[dict]:
    """Short conversations of varied length with a learnable pattern (answer = reversed words)."""
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird"]
    rows = []
    for i in range(n):
        k = 1 + i % 4
        ws = [words[(i * 3 + j) % len(words)] for j in range(k)]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": "reverse: " + " ".join(ws)},
                    {"role": "assistant", "content": " ".join(reversed(ws))},
                ]
            }
        )
    return rows


def toy_preferences(n: int = 32) -> list[dict]:
    """Preference pairs over :func:`toy_conversations`: the reversed words are chosen; the words
    in their original order followed by "wrong" are rejected (a signal a tiny model can learn)."""
    rows = []
    for conv in toy_conversations(n):
        prompt, answer = conv["messages"]
        words = prompt["content"].removeprefix("reverse: ")
        wrong = words + " wrong"
        rows.append({"prompt": [prompt], "chosen": [answer], "rejected": [{"role": "assistant", "content": wrong}]})
    return rows


def hf_greedy_alone(model, tokenizer, prompts, max_new_tokens: int) -> list[str]:
    """Each prompt (a list of messages) answered alone by the model's own HF ``generate``,
    greedy, cut at instructkit's stop tokens and strings: the reference batched paths must equal."""
    import torch

    from instructkit.data.templates import encode_prompt
    from instructkit.generation import decode_response, stop_tokens

    stop_ids, stop_strings = stop_tokens(model, tokenizer, None, None)
    out = []
    for prompt in prompts:
        ids = torch.tensor([encode_prompt(tokenizer, prompt, None)])
        with torch.no_grad():
            new = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
            )[0, ids.shape[1] :]
        out.append(decode_response(tokenizer, new.tolist(), stop_ids, stop_strings))
    return out


# ----------------------------------------------------------------------------------------------
# Encoder-decoders (tests/train/test_seq2seq.py, tests/serve/test_seq2seq_serve.py)


@functools.lru_cache(maxsize=1)
def encoder_tokenizer():
    """MiniLM's uncased WordPiece tokenizer ([CLS] 101, [SEP] 102, [PAD] 0), from the embedded package."""
    from instructkit.models.loading import load_tokenizer

    return load_tokenizer("minilm-l6")


def tiny_bart_dir(path: Path, seed: int = 0) -> Path:
    """A 2+2-layer, 32-wide BART (no dropout) over MiniLM's WordPiece tokenizer: the decoder
    starts from [CLS] and ends at [SEP]; saved as an HF folder with the tokenizer."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    tokenizer = encoder_tokenizer()
    config = BartConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        decoder_start_token_id=tokenizer.cls_token_id,
        forced_eos_token_id=None,
        init_std=0.2,  # varied greedy tokens from the untrained model (0.02 repeats one token)
    )
    torch.manual_seed(seed)
    BartForConditionalGeneration(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def tiny_t5_dir(path: Path, seed: int = 0) -> Path:
    """A 2+2-layer, 32-wide T5 (no dropout) over SmolLM2's BPE tokenizer (no special tokens added
    to a text; pad == eos == <|im_end|>, so the decoder starts from it, T5's pad-start convention)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = real_tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def tiny_bert_encoder_dir(path: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide plain BERT (``BertModel``, no dropout) with MiniLM's tokenizer: what a
    BERT2BERT warm start reads, as minilm-l6's folder is."""
    import torch
    from transformers import BertConfig, BertModel

    tokenizer = encoder_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
