"""Chat templates and loss masks: turning conversations into token ids and labels.

This module owns three decisions that every recipe, evaluation and server shares:

* **Which template.** The tokenizer's own chat template is the default, so training,
  evaluation and serving render conversations identically. A fallback (``chatml``,
  ``llama-3``, ``alpaca``) from :data:`FALLBACK_TEMPLATES` is used when the tokenizer has none
  or when the user names one (:func:`resolve_template`).
* **What is trained.** Every assistant turn, including its end-of-turn marker
  (``<|im_end|>``, ``<|eot_id|>``, eos...), unless the record marks it untrained
  (:attr:`Message.trained`, a file's ``loss_weight: 0``); nothing else (system, user and tool
  turns, template headers). Labels come from character spans of the rendered text, never from
  ``ids != pad_id``, so the final marker stays trained when pad == eos.
* **How it is cut.** ``max_length`` never cuts into a template silently: whole trailing turns
  are dropped (:class:`Truncation`), and an example whose first exchange does not fit is
  returned as None for the caller to drop and count.

Transformers is imported only through the tokenizer the caller passes; torch is not needed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from instructkit.data.schema import Message
from instructkit.errors import InputError, did_you_mean

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of a token that is not trained (what torch's cross-entropy skips)

# Fallback templates. Each writes BOS itself (text is tokenized with add_special_tokens=False),
# ends every assistant turn with one end-of-turn marker, and renders a prefix of a conversation
# as a prefix of its full rendering (the property the span labelling relies on).
_CHATML = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n' + (tools | tojson) + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (tools and loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_LLAMA3 = (
    "{%- if bos_token %}{{- bos_token }}{%- endif %}"
    "{%- if tools %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}{{- (messages[0]['content'] | trim) + '\\n\\n' }}{%- endif %}"
    "{{- 'You have access to these tools:\\n' + (tools | tojson) + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (tools and loop.first and message['role'] == 'system') %}"
    "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

_ALPACA = (
    "{%- if bos_token %}{{- bos_token }}{%- endif %}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] + '\\n\\n' }}"
    "{%- else %}"
    "{{- 'Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\\n\\n' }}"
    "{%- endif %}"
    "{%- if tools %}{{- '### Tools:\\n' + (tools | tojson) + '\\n\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{- '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
    "{%- elif message['role'] == 'tool' %}{{- '### Tool result:\\n' + message['content'] + '\\n\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### Response:\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class ChatTemplate:
    """A named fallback template and the marker strings it writes around turns."""

    name: str
    jinja: str
    markers: tuple[str, ...] = ()
    """Strings worth adding to a vocabulary as special tokens (see :func:`add_template_tokens`),
    so that each marker is one token the model can learn to emit and generation can stop on."""


FALLBACK_TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate("chatml", _CHATML, ("<|im_start|>", "<|im_end|>")),
        ChatTemplate("llama-3", _LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
        ChatTemplate("alpaca", _ALPACA),  # its end marker is the tokenizer's own eos
    )
}
"""Named chat templates, used when a tokenizer has none or when the user names one."""

DEFAULT_FALLBACK = "chatml"
"""The fallback used when the tokenizer has no chat template and the user named none."""

OWN_TEMPLATE = "tokenizer"
"""Name that asks for the tokenizer's own template and fails if it has none."""


class Truncation(str, Enum):
    """What :func:`encode_conversation` does when an example exceeds ``max_length``.

    Neither policy leaves a partial template: the kept text always ends with a complete
    assistant turn and its end-of-turn marker.
    """

    WHOLE_TURNS = "whole-turns"
    """Drop whole trailing turns until the rest fits (default)."""

    CUT_RESPONSE = "cut-response"
    """Keep the whole turns that fit, then fill the remaining room with the next assistant
    turn's content cut short, followed by its end-of-turn marker."""


@dataclass
class Encoded:
    """One tokenized training example.

    ``labels[i]`` is ``input_ids[i]`` where token i is trained, else :data:`IGNORE_INDEX`; the
    model shifts labels itself (logits at i predict ``labels[i + 1]``).
    """

    input_ids: list[int]
    labels: list[int]
    prompt_length: int = 0
    """Tokens before the first trained token (the prompt, for prompt/response pairs)."""
    dropped_messages: int = 0
    """Trailing messages removed by truncation (0 when the example fitted)."""
    cut: bool = False
    """True when :attr:`Truncation.CUT_RESPONSE` shortened an assistant turn."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


# ---------------------------------------------------------------------------------------------
# Choosing and rendering a template


def resolve_template(tokenizer: Any, name: str | None = None) -> str:
    """The Jinja chat template to use with ``tokenizer``.

    ``name`` is None (the tokenizer's own template, else :data:`DEFAULT_FALLBACK`),
    ``"tokenizer"`` (the tokenizer's own, required), a key of :data:`FALLBACK_TEMPLATES`, a path
    to a ``.jinja`` file, or a Jinja template string.
    """
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, Mapping):  # tokenizers that store several named templates
        own = own.get("default")
    if name is None or name == OWN_TEMPLATE:
        if own:
            return own
        if name == OWN_TEMPLATE:
            raise InputError(
                "the tokenizer has no chat template; name one of " + ", ".join(repr(n) for n in FALLBACK_TEMPLATES)
            )
        log.info("tokenizer has no chat template; using the '%s' fallback", DEFAULT_FALLBACK)
        return FALLBACK_TEMPLATES[DEFAULT_FALLBACK].jinja
    if name in FALLBACK_TEMPLATES:
        return FALLBACK_TEMPLATES[name].jinja
    if "{{" in name or "{%" in name:
        return name
    if name.endswith(".jinja"):
        path = Path(name)
        if not path.is_file():
            raise InputError(f"chat template file not found: {name}")
        return path.read_text()
    choices = [OWN_TEMPLATE, *FALLBACK_TEMPLATES]
    raise InputError(
        f"unknown chat template '{name}'{did_you_mean(name, choices)}; expected one of "
        + ", ".join(repr(c) for c in choices)
        + ", a .jinja file or a Jinja string"
    )


def add_template_tokens(tokenizer: Any, name: str) -> list[str]:
    """Add the markers of fallback template ``name`` to ``tokenizer`` as special tokens.

    Returns the markers that were new; when there are any, the caller must resize the model's
    embeddings (``model.resize_token_embeddings(len(tokenizer))``). Without this a fallback's
    markers are plain text: several tokens each, learnable but slower to emit, and generation
    has to stop on the string (:func:`end_of_turn`) rather than a token id.
    """
    if name not in FALLBACK_TEMPLATES:
        raise InputError(f"unknown chat template '{name}'{did_you_mean(name, FALLBACK_TEMPLATES)}")
    vocab = tokenizer.get_vocab()
    new = [m for m in FALLBACK_TEMPLATES[name].markers if m not in vocab]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)  # same call in transformers 4 and 5
    return new


def _as_dicts(messages: Sequence[Message | Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        if isinstance(m, Message):
            out.append({"role": m.role, "content": m.content})
        else:
            out.append(dict(m))
    return out


def _untrained(messages: Sequence[Message | Mapping[str, Any]]) -> frozenset[int]:
    """Indices of the assistant turns a record marks untrained (``loss_weight: 0``)."""
    return frozenset(i for i, m in enumerate(messages) if isinstance(m, Message) and not m.trained)


def _parse_tools(tools: str | Sequence[Mapping[str, Any]] | None) -> list[dict] | None:
    """Tools as the list of JSON schemas that chat templates expect (data files hold a string)."""
    if tools is None or tools == "":
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise InputError(f"tools is not valid JSON: {e.msg}", field="tools") from None
    if isinstance(tools, Mapping):
        tools = [tools]
    return [dict(t) for t in tools]


def _render(tokenizer: Any, template: str, messages: list[dict], tools, generation: bool) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tools=tools,
            add_generation_prompt=generation,
            tokenize=False,
        )
    except TemplateError as e:  # e.g. a template's own raise_exception("roles must alternate")
        raise InputError(f"the chat template refused this conversation: {e}") from None


def end_of_turn(tokenizer: Any, template: str | None = None) -> str:
    """The text a template writes after an assistant turn's content, e.g. ``<|im_end|>``.

    Found by rendering a probe conversation, so it works for any template. Generation stops on
    it (it is a plain string, not one token, when a fallback's marker is not in the vocabulary).
    """
    template = resolve_template(tokenizer, template)
    probe = "PROBE-3f9c1e"
    text = _render(
        tokenizer,
        template,
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": probe}],
        None,
        False,
    )
    return text[text.rindex(probe) + len(probe) :].rstrip()


@dataclass
class _Rendered:
    text: str
    spans: list[tuple[int, int]]  # character span of each trained assistant turn, marker included
    turns: list[int]  # index of the message each span renders
    prompt_end: int | None  # where the prompt of a prompt/response pair ends (tokenized apart)


def _render_spans(
    tokenizer: Any,
    template: str,
    messages: list[dict],
    tools,
    first_trained: int = 0,
    untrained: frozenset[int] = frozenset(),
) -> _Rendered:
    """Render ``messages`` and find the character span of each assistant turn from index
    ``first_trained`` on, except the turns in ``untrained``.

    An assistant turn i starts where ``render(messages[:i], add_generation_prompt=True)`` ends
    and ends where ``render(messages[:i + 1])`` ends, less trailing whitespace (the newline
    most templates write after the end marker belongs to no turn). Both renderings must be
    prefixes of the full text; templates that rewrite earlier turns (e.g. ones that drop the
    reasoning of past turns) break this and are refused rather than mislabelled.
    """
    full = _render(tokenizer, template, messages, tools, False)
    spans, turns = [], []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant" or i < first_trained or i in untrained:
            continue
        if i == 0:
            raise InputError("the conversation starts with an assistant turn; it needs a prompt first")
        before = _render(tokenizer, template, messages[:i], tools, True)
        upto = _render(tokenizer, template, messages[: i + 1], tools, False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise InputError(
                f"the chat template does not render message {i} (assistant) as a continuation of "
                "the messages before it, so its trained tokens cannot be located; "
                "choose a fallback template, e.g. template: chatml"
            )
        start, end = len(before), len(upto.rstrip())
        if end > start:
            spans.append((start, end))
            turns.append(i)
    return _Rendered(full, spans, turns, None)


# ---------------------------------------------------------------------------------------------
# Tokenizing and labelling


def _tokenize(tokenizer: Any, text: str, cuts: Sequence[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` and each token's character range.

    A fast tokenizer encodes the text in one pass with offsets, so the ids are exactly those of
    the rendered text, as evaluation and serving tokenize it. Without offsets (slow tokenizers)
    the text is encoded piece by piece between ``cuts`` (the span boundaries), each token
    getting its piece's range.
    """
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    bounds = sorted({0, len(text), *(c for c in cuts if 0 < c < len(text))})
    for a, b in zip(bounds, bounds[1:]):
        piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        ids += piece
        offsets += [(a, b)] * len(piece)
    return ids, offsets


def _label(
    tokenizer: Any, text: str, spans: Sequence[tuple[int, int]], prompt_end: int | None
) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Tokenize ``text`` and label the tokens that overlap a span.

    A token that straddles a span boundary (possible only where a template's markers are plain
    text, e.g. a fallback on a vocabulary without them) is trained: that keeps every response
    character and the whole end marker trained, as transformers' own assistant mask does.
    ``prompt_end`` splits tokenization there, so a prompt's ids never depend on its response.
    """
    cuts = [c for span in spans for c in span]
    if prompt_end is None:
        ids, offsets = _tokenize(tokenizer, text, cuts)
    else:
        ids, offsets = _tokenize(tokenizer, text[:prompt_end], [])
        rest_ids, rest_offsets = _tokenize(tokenizer, text[prompt_end:], [c - prompt_end for c in cuts])
        ids += rest_ids
        offsets += [(a + prompt_end, b + prompt_end) for a, b in rest_offsets]
    labels = [IGNORE_INDEX] * len(ids)
    k = 0
    for t, (a, b) in enumerate(offsets):
        while k < len(spans) and spans[k][1] <= a:
            k += 1
        if k < len(spans) and a < spans[k][1] and b > spans[k][0]:
            labels[t] = ids[t]
    return ids, labels, offsets


def _first_trained(labels: Sequence[int]) -> int:
    return next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), len(labels))


def _encode_rendered(
    tokenizer: Any,
    template: str,
    r: _Rendered,
    n_messages: int,
    max_length: int | None,
    truncation: Truncation,
    droppable: bool,
) -> Encoded | None:
    """Tokenize a rendering and apply ``max_length`` (see :class:`Truncation`)."""
    if not r.spans:
        raise InputError("the conversation has no assistant turn to train")
    ids, labels, _ = _label(tokenizer, r.text, r.spans, r.prompt_end)
    if max_length is None or len(ids) <= max_length:
        return Encoded(ids, labels, prompt_length=_first_trained(labels))

    # The longest prefix that ends with a whole assistant turn's end marker and fits. Each
    # candidate is tokenized as the text it is, so its length is exact, not estimated from the
    # full text's tokens.
    kept: Encoded | None = None
    kept_spans = 0
    candidates = range(len(r.spans) - 1, -1, -1) if droppable else [len(r.spans) - 1]
    for k in candidates:
        end = r.spans[k][1]
        k_ids, k_labels, _ = _label(tokenizer, r.text[:end], r.spans[: k + 1], r.prompt_end)
        if len(k_ids) <= max_length:
            dropped = n_messages - (r.turns[k] + 1)
            kept = Encoded(k_ids, k_labels, _first_trained(k_labels), dropped_messages=dropped)
            kept_spans = k + 1
            break

    if truncation is Truncation.CUT_RESPONSE and kept_spans < len(r.spans):
        cut = _cut_response(tokenizer, template, r, kept_spans, n_messages, max_length)
        if cut is not None:
            return cut
    return kept


def _cut_response(
    tokenizer: Any, template: str, r: _Rendered, k: int, n_messages: int, max_length: int
) -> Encoded | None:
    """Spans ``0..k-1`` whole, then span ``k`` with its content cut to fit and its marker kept."""
    start, end = r.spans[k]
    ids, labels, offsets = _label(tokenizer, r.text[:end], r.spans[: k + 1], r.prompt_end)
    marker_start = end - len(end_of_turn(tokenizer, template))
    first = next(t for t, (a, b) in enumerate(offsets) if b > start)  # first token of span k
    marker = [t for t in range(first, len(ids)) if offsets[t][0] >= marker_start]
    if not marker:
        return None
    content = range(first, marker[0])
    room = max_length - first - len(marker)
    if room < 1:
        return None
    keep = [*content[:room], *marker]
    new_ids = ids[:first] + [ids[t] for t in keep]
    new_labels = labels[:first] + [labels[t] for t in keep]
    return Encoded(
        new_ids,
        new_labels,
        _first_trained(new_labels),
        dropped_messages=n_messages - (r.turns[k] + 1),
        cut=True,
    )


# ---------------------------------------------------------------------------------------------
# Public encoders


def encode_conversation(
    tokenizer: Any,
    messages: Sequence[Message | Mapping[str, Any]],
    *,
    template: str | None = None,
    max_length: int | None = None,
    tools: str | Sequence[Mapping[str, Any]] | None = None,
    truncation: Truncation | str = Truncation.WHOLE_TURNS,
) -> Encoded | None:
    """Token ids and labels of a demonstration; every assistant turn is trained but those whose
    :attr:`Message.trained` is False.

    Trained: each assistant turn's content and its end-of-turn marker. Not trained: system,
    user and tool turns and the template's headers (``<|im_start|>assistant\\n``). With
    ``max_length``, whole trailing turns are dropped until the rest fits; returns None when not
    even the first exchange fits (the caller drops the example and counts it).
    """
    template = resolve_template(tokenizer, template)
    msgs = _as_dicts(messages)
    r = _render_spans(tokenizer, template, msgs, _parse_tools(tools), untrained=_untrained(messages))
    return _encode_rendered(tokenizer, template, r, len(msgs), max_length, Truncation(truncation), droppable=True)


def encode_prompt(
    tokenizer: Any,
    messages: Sequence[Message | Mapping[str, Any]],
    template: str | None = None,
    tools: str | Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """Token ids of a prompt followed by the generation prompt, ready to sample a response."""
    template = resolve_template(tokenizer, template)
    text = _render(tokenizer, template, _as_dicts(messages), _parse_tools(tools), True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt_response(
    tokenizer: Any,
    prompt_messages: Sequence[Message | Mapping[str, Any]],
    response_messages: Sequence[Message | Mapping[str, Any]],
    template: str | None = None,
    max_length: int | None = None,
    tools: str | Sequence[Mapping[str, Any]] | None = None,
    truncation: Truncation | str = Truncation.WHOLE_TURNS,
) -> Encoded | None:
    """A prompt and its response (for reward models, DPO, PPO); only the response is trained.

    The prompt is tokenized on its own, so ``input_ids[:prompt_length]`` equals
    :func:`encode_prompt` of the prompt, the same for every response to it. Too long: None
    under :attr:`Truncation.WHOLE_TURNS` (a response is never shortened by dropping turns);
    :attr:`Truncation.CUT_RESPONSE` cuts the last assistant turn's content instead.
    """
    template = resolve_template(tokenizer, template)
    prompt, response = _as_dicts(prompt_messages), _as_dicts(response_messages)
    if not prompt:
        raise InputError("the prompt is empty")
    if not response or response[0].get("role") != "assistant":
        raise InputError("the response must start with an assistant turn")
    tools = _parse_tools(tools)
    untrained = frozenset(len(prompt) + i for i in _untrained(response_messages))
    r = _render_spans(tokenizer, template, prompt + response, tools, first_trained=len(prompt), untrained=untrained)
    prompt_text = _render(tokenizer, template, prompt, tools, True)
    r.prompt_end = len(prompt_text)
    starts_at_prompt_end = len(prompt) in untrained or (r.spans and r.spans[0][0] == r.prompt_end)
    if not r.text.startswith(prompt_text) or not r.spans or not starts_at_prompt_end:
        raise InputError("the chat template does not render the response as a continuation of the prompt")
    return _encode_rendered(
        tokenizer,
        template,
        r,
        len(prompt) + len(response),
        max_length,
        Truncation(truncation),
        droppable=False,
    )


def encode_text(tokenizer: Any, text: str, max_length: int | None = None) -> Encoded:
    """Plain text (continued pre-training, the PPO-ptx term): every token trained, eos appended.

    The tokenizer adds BOS where its model expects one. Text longer than ``max_length`` is cut
    there, without eos (the document did not end).
    """
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    if max_length is not None and len(ids) > max_length:
        ids = ids[:max_length]
    return Encoded(ids, list(ids), prompt_length=0)


# ---------------------------------------------------------------------------------------------
# Inspection

_ANSI_TRAINED, _ANSI_RESET = "\x1b[32m", "\x1b[0m"


def render_trained(
    tokenizer: Any, encoded: Encoded, *, color: bool = False, marks: tuple[str, str] = ("«", "»")
) -> str:
    """The example's text with trained tokens marked: wrapped in ``marks``, or green if ``color``.

    What ``instructkit data inspect`` prints, so a user can see exactly what the loss sees.
    """
    open_, close = (_ANSI_TRAINED, _ANSI_RESET) if color else marks
    out: list[str] = []
    run: list[int] = []
    trained = False

    def flush() -> None:
        if run:
            text = tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            out.append(open_ + text + close if trained else text)

    for tok, label in zip(encoded.input_ids, encoded.labels):
        is_trained = label != IGNORE_INDEX
        if is_trained != trained:
            flush()
            run, trained = [], is_trained
        run.append(tok)
    flush()
    return "".join(out)
