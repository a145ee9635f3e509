"""Batched text generation from chat prompts: the one place evaluation, PPO rollouts and the
CLI turn prompts into responses.

What it owns:

* **Encoder-decoders.** A BART, T5 or BERT2BERT reads the prompt's text (no chat template,
  :func:`instructkit.data.seq2seq.source_text`) right-padded into its encoder, and its decoder
  starts from ``decoder_start_token_id`` (:func:`generate_seq2seq_ids`); eos and ``stop``
  strings end an answer as for a decoder.
* **Padding.** Decoder-only prompts are left-padded, so every row's next token is at the same column and
  the KV cache stays aligned; the attention mask tells the model where each row starts (HF
  derives position ids from it, so a padded row sees the same positions as the row alone).
* **Batching.** Prompts are sorted by length (longest first, so running out of memory happens
  at once, not at the end) and cut into batches, which keeps padding small; results come back
  in the caller's order. peft prompt-tuning and p-tuning models batch too, through
  :func:`generate_new` (peft's own ``generate`` would count their left padding as positions).
* **Stopping.** A row stops at eos, at the template's end-of-turn marker, or at any ``stop``
  string; the returned text never contains them.
* **Decoding.** ``temperature == 0`` is greedy. Otherwise sampling with temperature and
  nucleus ``top_p`` (no top-k), seeded by ``seed`` in a forked RNG, so the same call gives the
  same text and the caller's random state is untouched. Plain causal LMs run the loop of
  :mod:`instructkit.decoding` (HF's tokens, greedy or sampled, without HF's per-step
  overhead); the other kinds go through HF ``generate``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from instructkit.data.schema import Message
from instructkit.data.templates import encode_prompt, end_of_turn
from instructkit.errors import InputError

Prompt = Sequence[Message | Mapping[str, Any]] | Sequence[int]


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    stop: Sequence[str] | None = None,
    template: str | None = None,
    compile: bool = False,
) -> list[str]:
    """The response to each prompt, in the order given.

    A prompt is a list of messages (rendered with the chat template plus the generation
    prompt, see :func:`instructkit.data.templates.encode_prompt`) or a list of token ids used
    as is. ``template`` names the chat template as in ``resolve_template``. ``compile`` runs the
    one-token step of a plain causal LM through ``torch.compile`` (:mod:`instructkit.decoding`;
    it pays only over many steps: see docs/decoding.md).
    """
    import torch

    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}", field="max_new_tokens")
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature}", field="temperature")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}", field="top_p")
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}", field="batch_size")

    if is_encoder_decoder(model):  # the prompt's text goes to the encoder, no chat template
        ids = [_source_ids(tokenizer, p) for p in prompts]
        rows = generate_seq2seq_ids(
            model, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            batch_size=batch_size, seed=seed, stop=stop,
        )  # fmt: skip
        stop_ids, stop_strings = seq2seq_stop_tokens(model, tokenizer, stop)
        return [decode_response(tokenizer, row, stop_ids, stop_strings) for row in rows]
    ids = [_prompt_ids(tokenizer, p, template) for p in prompts]
    stop_ids, stop_strings = stop_tokens(model, tokenizer, stop, template)
    watch, pad_id, device, sampling = _decoding_setup(model, tokenizer, ids, stop_ids, stop_strings, temperature, top_p)

    # Plain causal LMs decode through instructkit.decoding (the same tokens, less overhead per
    # step); prompt learning, sliding-window caches and extra logits processors go to HF.
    from instructkit.decoding import decode, unsupported_reason

    fast = unsupported_reason(model) is None
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out: list[str] = [""] * len(ids)
    was_training = model.training
    model.eval()
    fork_devices = [device] if device.type == "cuda" else []
    try:
        with torch.inference_mode(), torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed)
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                input_ids, attention_mask = left_pad([ids[i] for i in rows], pad_id, device)  # (B, T), 0 on padding
                if fast:
                    new = decode(
                        model, input_ids, attention_mask, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                        pad_id=pad_id, temperature=temperature, top_p=top_p, stop_strings=watch, tokenizer=tokenizer,
                        compile=compile,
                    ).tolist()  # fmt: skip
                else:
                    generated, width = generate_new(
                        model,
                        input_ids,
                        attention_mask,
                        max_new_tokens=max_new_tokens,
                        eos_token_id=stop_ids,
                        pad_token_id=pad_id,
                        repetition_penalty=1.0,
                        stop_strings=watch or None,
                        tokenizer=tokenizer if watch else None,
                        **sampling,
                    )
                    new = generated[:, width:].tolist()  # (B, new)
                for i, row in zip(rows, new):
                    out[i] = decode_response(tokenizer, row, stop_ids, stop_strings)
    finally:
        model.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------
# Encoder-decoders (BART, T5, BERT2BERT)


def is_encoder_decoder(model: Any) -> bool:
    """Whether ``model`` (possibly a peft wrapper) is an encoder-decoder, by its config."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _source_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Encoder input ids: token ids as given, or the messages' text (``data.seq2seq.source_text``)."""
    from instructkit.data.seq2seq import encode_source

    if len(prompt) and all(isinstance(t, int) for t in prompt):
        return list(prompt)  # type: ignore[arg-type]
    if len(prompt) and all(isinstance(m, (Message, Mapping)) for m in prompt):
        return encode_source(tokenizer, prompt)  # type: ignore[arg-type]
    raise InputError("a prompt must be a non-empty list of messages or of token ids")


def seq2seq_stop_tokens(model: Any, tokenizer: Any, stop: Sequence[str] | None) -> tuple[list[int], list[str]]:
    """What ends an encoder-decoder's answer: the model's and the tokenizer's eos ids (a
    BERT2BERT's ``[SEP]``), and the ``stop`` strings (one-token ones also as ids). No chat
    template, so no end-of-turn marker."""
    ids: list[int] = []
    for candidate in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        for i in candidate if isinstance(candidate, (list, tuple)) else [candidate]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    strings = list(dict.fromkeys(s for s in (stop or []) if s))
    for s in strings:
        i = _single_token(tokenizer, s)
        if i is not None and i not in ids:
            ids.append(i)
    if not ids:
        raise InputError("the model has no eos token and no stop string is one token; pass stop=[...]")
    return ids, strings


def generate_seq2seq_ids(
    model: Any,
    tokenizer: Any,
    sources: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    stop: Sequence[str] | None = None,
) -> list[list[int]]:
    """The ids an encoder-decoder writes for each source (encoder input ids), in the order given,
    without the decoder's start token and up to and including the token that stopped it (later
    columns of a finished row are padding: cut them with :func:`decode_response`).

    Sources are right-padded with the attention mask marking padding (the encoder is not causal,
    so no row's columns need to line up); the decoder starts every row from the model's
    ``decoder_start_token_id``. Longest first, in batches; sampling as in :func:`generate`.
    """
    import torch

    stop_ids, stop_strings = seq2seq_stop_tokens(model, tokenizer, stop)
    watch, pad_id, device, sampling = _decoding_setup(
        model, tokenizer, sources, stop_ids, stop_strings, temperature, top_p
    )
    order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))
    out: list[list[int]] = [[] for _ in sources]
    was_training = model.training
    model.eval()
    fork_devices = [device] if device.type == "cuda" else []
    try:
        with torch.inference_mode(), torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed)
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                width = max(len(sources[i]) for i in rows)
                input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
                for b, i in enumerate(rows):
                    input_ids[b, : len(sources[i])] = torch.tensor(list(sources[i]), dtype=torch.long)
                    attention_mask[b, : len(sources[i])] = 1
                generated = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    max_new_tokens=max_new_tokens,
                    eos_token_id=stop_ids,
                    pad_token_id=pad_id,
                    repetition_penalty=1.0,
                    stop_strings=watch or None,
                    tokenizer=tokenizer if watch else None,
                    **sampling,
                )  # (B, 1 + new): the decoder's start token first
                for i, row in zip(rows, generated[:, 1:].tolist()):
                    out[i] = row
    finally:
        model.train(was_training)
    return out


def _decoding_setup(
    model: Any,
    tokenizer: Any,
    ids: Sequence[Sequence[int]],
    stop_ids: list[int],
    stop_strings: list[str],
    temperature: float,
    top_p: float,
) -> tuple[list[str], int, Any, dict[str, Any]]:
    """What every decoding path needs before it starts: empty prompts refused, the stop strings
    to watch as text, the pad id, the device and HF's sampling arguments."""
    for i, p in enumerate(ids):
        if not p:
            raise InputError("the prompt is empty", record=i)
    # Added tokens (<|im_end|>) never hide inside another token, so their id is enough;
    # other strings can end mid-token and need the (slower) string criterion.
    added = set(tokenizer.get_added_vocab())
    watch = [s for s in stop_strings if s not in added]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    device = next(model.parameters()).device
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        if temperature > 0
        else {"do_sample": False}
    )
    return watch, pad_id, device, sampling


def prepends_virtual_tokens(model: Any) -> bool:
    """Whether ``model`` is an active peft prompt-tuning or p-tuning model (virtual tokens as
    embeddings before the input), the kind :func:`generate_new` generates through its base model.
    Prefix tuning's key/value prefix is outside the row (peft offsets the positions), so peft's
    own ``generate`` batches it as any model; inside ``disable_adapter()`` there are no virtual
    tokens (peft says so only in ``_adapters_disabled``)."""
    config = getattr(model, "active_peft_config", None)
    if not getattr(config, "is_prompt_learning", False) or getattr(model, "_adapters_disabled", False):
        return False
    return config.peft_type in ("PROMPT_TUNING", "P_TUNING")


def generate_new(model: Any, input_ids: Any, attention_mask: Any, **kwargs: Any) -> tuple[Any, int]:
    """``model.generate`` on left-padded (B, T) prompts, and the column where the new tokens
    start in what it returns (its ``sequences`` if ``return_dict_in_generate``).

    peft's ``generate`` for prompt and p-tuning puts the virtual tokens before the whole row,
    padding included, and drops position ids, so the model counts the padding as positions and a
    padded row's text changes with the batch. Here the base model gets the virtual tokens as
    embeddings with the mask extended by ones, and transformers derives the positions from the
    mask (``cumsum - 1``): virtual tokens 0..n-1, then the real tokens, what the row alone gets
    from peft. This is ``models.lm.virtual_token_inputs``'s 2-D case, written again because
    generation may not import models (the floors in pyproject.toml); the training pass reads
    through that one, and tests/models/test_prompt_learning.py checks that the two agree.
    Given only embeddings, transformers returns only the new tokens.
    """
    if not prepends_virtual_tokens(model):
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs), input_ids.shape[1]
    import torch

    n = model.active_peft_config.num_virtual_tokens
    embeds = model.word_embeddings(input_ids)  # (B, T, H)
    prompts = model.get_prompt(batch_size=input_ids.shape[0]).to(embeds.dtype)  # (B, n, H)
    mask = torch.cat((attention_mask.new_ones(attention_mask.shape[0], n), attention_mask), dim=1)  # (B, n + T)
    inputs_embeds = torch.cat((prompts, embeds), dim=1)
    return model.get_base_model().generate(inputs_embeds=inputs_embeds, attention_mask=mask, **kwargs), 0


def _prompt_ids(tokenizer: Any, prompt: Prompt, template: str | None) -> list[int]:
    if len(prompt) and all(isinstance(t, int) for t in prompt):
        return list(prompt)  # type: ignore[arg-type]
    if len(prompt) and all(isinstance(m, (Message, Mapping)) for m in prompt):
        return encode_prompt(tokenizer, prompt, template)  # type: ignore[arg-type]
    if not len(prompt):
        return []
    raise InputError("a prompt must be a list of messages or a list of token ids")


def _single_token(tokenizer: Any, text: str) -> int | None:
    """The id of ``text`` when the tokenizer encodes it as exactly one token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def stop_tokens(model: Any, tokenizer: Any, stop: Sequence[str] | None, template: str | None):
    """Token ids and strings that end a response.

    Ids: the tokenizer's and the model's eos, and every stop string (end-of-turn marker
    included) that is one token. Strings: the end-of-turn marker and ``stop``; checking them
    on the text as well catches markers that span several tokens.
    """
    ids: list[int] = []
    for candidate in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for i in candidate if isinstance(candidate, (list, tuple)) else [candidate]:
            if i is not None and i not in ids:
                ids.append(int(i))
    strings = [s for s in [end_of_turn(tokenizer, template), *(stop or [])] if s]
    strings = list(dict.fromkeys(strings))
    for s in strings:
        i = _single_token(tokenizer, s)
        if i is not None and i not in ids:
            ids.append(i)
    if not ids:
        raise InputError("the tokenizer has no eos token and no stop string is one token; pass stop=[...]")
    return ids, strings


def left_pad(rows: list[list[int]], pad_id: int, device: Any):
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        attention_mask[b, width - len(r) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def decode_response(tokenizer: Any, new_ids: list[int], stop_ids: list[int], stop_strings: list[str]) -> str:
    """Text of the generated ids up to the first stop token, cut at the first stop string.

    A stop string that is one token can also begin in the token before it ("\n" then "\n\n"
    holds "\n\n" from the first newline), so the text is first searched with the stop token
    included; only if no stop string is found there is the stop token simply dropped.
    """

    def first_stop(text: str) -> int:
        return min((j for j in (text.find(s) for s in stop_strings) if j >= 0), default=-1)

    for k, t in enumerate(new_ids):
        if t in stop_ids:
            with_stop = tokenizer.decode(new_ids[: k + 1], skip_special_tokens=True)
            cut = first_stop(with_stop)
            if cut >= 0:
                return with_stop[:cut]
            new_ids = new_ids[:k]
            break
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    cut = first_stop(text)
    return text[:cut] if cut >= 0 else text


def generate_with_images(
    model: Any,
    tokenizer: Any,
    prompts: list[tuple[list[dict[str, str]], list[Any]]],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    template: str | None = None,
) -> list[str]:
    """Greedy response of a vision-language model (:class:`instructkit.models.vision.VisionLM`)
    to each (messages with ``<image>`` tags, PIL images) prompt, in order.

    Rows are left-padded; the decoder generates from ``inputs_embeds`` (HF then returns only
    the new tokens), and each response is cut at its first stop token or string as
    :func:`generate` does. ``template`` defaults to the model's own. The recipe's held-out
    scores, ``instructkit generate --image`` and the server all answer through here."""
    import torch

    from instructkit.data.vision import encode_image_prompt, image_token_id

    was_training = model.training
    model.eval()
    template = template if template is not None else model.template
    image_id = image_token_id(tokenizer)
    stop_ids, stop_strings = stop_tokens(model.decoder, tokenizer, None, template)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    device = next(model.projector.parameters()).device
    answers = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        rows = [encode_image_prompt(tokenizer, m, tokens_per_image=model.grid**2, template=template) for m, _ in chunk]
        ids, mask = left_pad(rows, pad_id, device)
        images = [im for _, ims in chunk for im in ims]
        pixels = model.pixels(images) if images else None
        with torch.no_grad():
            embeds = model.input_embeddings(ids, ids == image_id, pixels=pixels)
            out = model.decoder.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop_ids,
                pad_token_id=pad_id,
            )
        answers += [decode_response(tokenizer, row.tolist(), stop_ids, stop_strings) for row in out]
    model.train(was_training)
    return answers
