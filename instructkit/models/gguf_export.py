"""Write a Llama-architecture model (SmolLM2, Llama, Mistral-shaped) and its tokenizer to one GGUF
file with the ``gguf`` package, as llama.cpp's converter lays it out, so llama.cpp, Ollama and
transformers (``from_pretrained(..., gguf_file=...)``) read it.

What is written:

- the hyper-parameters under ``llama.*`` (blocks, widths, heads, RoPE base, norm epsilon);
- the tensors under llama.cpp's names (``gguf.get_tensor_name_map``), the query and key
  projections permuted into llama.cpp's rotary layout (transformers undoes it when it reads);
  norms in F32, matrices in F16, or Q8_0 / Q4_0 blocks (``gguf.quants``) where a row is a whole
  number of 32-value blocks (others stay F16), or Q8_0 blocks chosen elsewhere (GPTQ,
  :mod:`instructkit.models.gptq`); tied output embeddings are not repeated;
- the BPE tokenizer (``tokenizer.ggml.model = gpt2``: tokens in id order, their types, merges),
  the special ids, and the chat template.

The file is written beside its destination and renamed into place, so a crash leaves no half file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from instructkit.errors import InputError

QUANTS = ("f16", "q8_0", "q4_0")
_ARCHITECTURES = {"llama": "llama", "mistral": "llama"}  # HF model_type -> GGUF architecture


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotary layout (halves) -> llama.cpp's (interleaved pairs), per head."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _tokenizer_fields(tokenizer: Any) -> dict[str, Any]:
    """Tokens in id order, their GGUF types, the merges, for a byte-level BPE tokenizer."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InputError("GGUF export needs a fast (tokenizers) tokenizer", field="tokenizer")
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE":
        raise InputError(f"GGUF export writes BPE tokenizers; this one is {model.get('type')}", field="tokenizer")
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def _tensor(weight: torch.Tensor, quant: str) -> tuple[np.ndarray, Any]:
    import gguf

    data = weight.detach().to(torch.float32).cpu().numpy()
    if data.ndim == 1:
        return data, None  # norms: F32
    if quant in ("q8_0", "q4_0") and data.shape[-1] % 32 == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0 if quant == "q8_0" else gguf.GGMLQuantizationType.Q4_0
        return gguf.quants.quantize(data, qtype), qtype
    return data.astype(np.float16), None


def write_gguf(
    model: Any,
    tokenizer: Any,
    path: str | os.PathLike,
    *,
    quant: str = "f16",
    blocks: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Path:
    """Write ``model`` (a transformers causal LM, adapters merged) and ``tokenizer`` to ``path``.
    ``blocks`` (q8_0 only): Q8_0 values and scales already chosen for some weights, by parameter
    name (:func:`instructkit.models.gptq.sequential_gptq`); they are written as they are, the
    other matrices rounded to nearest."""
    import gguf

    from instructkit.models.gptq import q8_0_bytes

    if quant not in QUANTS:
        raise InputError(f"unknown GGUF quantisation {quant!r} (one of {', '.join(QUANTS)})", field="quant")
    if blocks and quant != "q8_0":
        raise InputError(f"chosen Q8_0 blocks cannot be written as {quant}", field="quant")
    blocks = blocks or {}
    config = model.config
    arch = _ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise InputError(
            f"GGUF export writes Llama-architecture models; {config.model_type} is not one "
            f"(supported: {', '.join(_ARCHITECTURES)})",
            field="model",
        )
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope_theta = getattr(config, "rope_theta", None) or (config.rope_parameters or {}).get("rope_theta", 10000.0)
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name(Path(str(getattr(config, "_name_or_path", "") or "model")).name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    file_types = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types.get(quant, gguf.LlamaFileType.MOSTLY_Q4_0))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    fields = _tokenizer_fields(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    writer.add_token_merges(fields["merges"])
    for add, value in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, weight in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise InputError(f"no GGUF name for tensor {hf_name}", field="model")
        rows_of = {"self_attn.q_proj.weight": heads, "self_attn.k_proj.weight": kv_heads}
        permute_heads = next((n for suffix, n in rows_of.items() if hf_name.endswith(suffix)), None)
        if hf_name in blocks:  # llama.cpp's row order for q and k; a row's blocks move with it
            q, d = (t.cpu().numpy() for t in blocks[hf_name])
            if permute_heads is not None:
                q, d = _permute(q, permute_heads), _permute(d, permute_heads)
            array, qtype = q8_0_bytes(q, d), gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, array, raw_dtype=qtype)
            continue
        data = weight.detach().to(torch.float32)
        if permute_heads is not None:
            data = torch.from_numpy(_permute(data.numpy(), permute_heads))
        array, qtype = _tensor(data, quant)
        writer.add_tensor(name, array, raw_dtype=qtype)  # quantised bytes: gguf derives the shape
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, path)
    return path
