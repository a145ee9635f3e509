"""Batched text generation from chat prompts: the one place evaluation, PPO rollouts and the
CLI turn prompts into responses.

What it owns:

* **Padding.** Prompts are left-padded, so every row's next token is at the same column and
  the KV cache stays aligned; the attention mask tells the model where each row starts (HF
  derives position ids from it, so a padded row sees the same positions as the row alone).
* **Batching.** Prompts are sorted by length (longest first, so running out of memory happens
  at once, not at the end) and cut into batches, which keeps padding small; results come back
  in the caller's order. peft prompt-tuning and p-tuning models go one prompt at a time: peft
  puts their virtual tokens before the padding (:func:`prepends_virtual_tokens`).
* **Stopping.** A row stops at eos, at the template's end-of-turn marker, or at any ``stop``
  string; the returned text never contains them.
* **Decoding.** ``temperature == 0`` is greedy. Otherwise sampling with temperature and
  nucleus ``top_p`` (no top-k), seeded by ``seed`` in a forked RNG, so the same call gives the
  same text and the caller's random state is untouched.
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
) -> list[str]:
    """The response to each prompt, in the order given.

    A prompt is a list of messages (rendered with the chat template plus the generation
    prompt, see :func:`instructkit.data.templates.encode_prompt`) or a list of token ids used
    as is. ``template`` names the chat template as in ``resolve_template``.
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

    ids = [_prompt_ids(tokenizer, p, template) for p in prompts]
    for i, p in enumerate(ids):
        if not p:
            raise InputError("the prompt is empty", record=i)
    stop_ids, stop_strings = stop_tokens(model, tokenizer, stop, template)
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

    if prepends_virtual_tokens(model):
        batch_size = 1  # see prepends_virtual_tokens: a row alone has no padding to misplace them
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
                input_ids, attention_mask = left_pad([ids[i] for i in rows], pad_id, device)
                generated = model.generate(
                    input_ids=input_ids,  # (B, T)
                    attention_mask=attention_mask,  # (B, T), 0 on the left padding
                    max_new_tokens=max_new_tokens,
                    eos_token_id=stop_ids,
                    pad_token_id=pad_id,
                    repetition_penalty=1.0,
                    stop_strings=watch or None,
                    tokenizer=tokenizer if watch else None,
                    **sampling,
                )  # (B, T + new)
                new = generated[:, input_ids.shape[1] :].tolist()
                for i, row in zip(rows, new):
                    out[i] = decode_response(tokenizer, row, stop_ids, stop_strings)
    finally:
        model.train(was_training)
    return out


def prepends_virtual_tokens(model: Any) -> bool:
    """Whether ``model`` is a peft prompt-tuning or p-tuning model, whose ``generate`` puts the
    virtual tokens in front of the whole row, left padding included: in a padded row they sit
    further from the prompt than in the row alone, and greedy text changes with the batch.
    Prefix tuning's key/value prefix is outside the row (peft offsets the positions), so it
    batches as any model does."""
    config = getattr(model, "active_peft_config", None)
    prompt_learning = bool(getattr(config, "is_prompt_learning", False))
    return prompt_learning and getattr(config, "peft_type", None) not in ("PREFIX_TUNING", "CARTRIDGE")


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
