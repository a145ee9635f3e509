"""Chat templates and loss masks on the embedded model's real tokenizer (ChatML, pad == eos).

Expected values are written from the templates by hand: what is trained is each assistant
turn's content followed by its end marker (``<|im_end|>`` for the tokenizer's own ChatML and
for alpaca, whose marker is eos, which is ``<|im_end|>`` here; ``<|eot_id|>`` for llama-3).
"""

from __future__ import annotations

from dataclasses import asdict

import pytest

from instructkit.data.schema import Message
from instructkit.data.templates import (
    FALLBACK_TEMPLATES,
    IGNORE_INDEX,
    Encoded,
    Truncation,
    add_template_tokens,
    encode_conversation,
    encode_prompt,
    encode_prompt_response,
    encode_text,
    end_of_turn,
    render_trained,
    resolve_template,
)
from instructkit.errors import InputError

SINGLE = [
    Message("user", "What is the capital of France?"),
    Message("assistant", "Paris."),
]
MULTI = [
    Message("system", "Answer briefly."),
    Message("user", "Capital of France?"),
    Message("assistant", "Paris."),
    Message("user", "And of Spain?"),
    Message("assistant", "Madrid, of course!"),
    Message("user", "And of Italy?"),
    Message("assistant", "Rome, the eternal city"),
]
TOOLS = [
    Message("user", "Weather in Oslo?"),
    Message("assistant", 'call get_weather({"city": "Oslo"})'),
    Message("tool", "Snow, -3 C"),
    Message("assistant", "It is snowing in Oslo."),
]
MARKER = {None: "<|im_end|>", "llama-3": "<|eot_id|>", "alpaca": "<|im_end|>"}


def trained_runs(tokenizer, enc: Encoded) -> list[str]:
    """Decoded text of each maximal run of consecutive trained tokens."""
    runs: list[list[int]] = []
    previous = False
    for tok, label in zip(enc.input_ids, enc.labels):
        trained = label != IGNORE_INDEX
        if trained:
            assert label == tok  # a trained label is the token itself
            if not previous:
                runs.append([])
            runs[-1].append(tok)
        previous = trained
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


def expected_runs(messages, marker: str) -> list[str]:
    return [m.content + marker for m in messages if m.role == "assistant"]


@pytest.fixture(params=[None, "llama-3", "alpaca"], ids=["own-chatml", "llama-3", "alpaca"])
def template_and_tokenizer(request, tokenizer):
    """Each template on the same vocabulary; llama-3's markers are added as special tokens."""
    name = request.param
    if name == "llama-3":
        tok = request.getfixturevalue("fresh_tokenizer")
        assert add_template_tokens(tok, "llama-3") == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        return name, tok
    return name, tokenizer


# --- which template ------------------------------------------------------------------------


class _NoTemplate:
    chat_template = None


def test_own_template_is_the_default_and_fallbacks_are_named(tokenizer):
    assert "<|im_start|>" in tokenizer.chat_template
    assert resolve_template(tokenizer) == tokenizer.chat_template
    assert resolve_template(tokenizer, "tokenizer") == tokenizer.chat_template
    assert resolve_template(tokenizer, "alpaca") == FALLBACK_TEMPLATES["alpaca"].jinja
    assert resolve_template(_NoTemplate(), None) == FALLBACK_TEMPLATES["chatml"].jinja
    raw = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_template(tokenizer, raw) == raw


def test_unknown_or_missing_template_is_an_input_error(tokenizer):
    with pytest.raises(InputError, match="did you mean 'chatml'"):
        resolve_template(tokenizer, "chatlm")
    with pytest.raises(InputError, match="no chat template"):
        resolve_template(_NoTemplate(), "tokenizer")


def test_end_of_turn_is_found_from_the_template(template_and_tokenizer):
    name, tok = template_and_tokenizer
    assert end_of_turn(tok, name) == MARKER[name]


# --- what is trained -----------------------------------------------------------------------


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
def test_exactly_every_assistant_turn_and_its_marker_is_trained(template_and_tokenizer, messages):
    name, tok = template_and_tokenizer
    enc = encode_conversation(tok, messages, template=name)
    assert trained_runs(tok, enc) == expected_runs(messages, MARKER[name])
    # Same thing seen as one string: the assistant turns concatenated.
    trained_ids = [t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX]
    assert tok.decode(trained_ids, skip_special_tokens=False) == "".join(expected_runs(messages, MARKER[name]))


@pytest.mark.parametrize("name", [None, "alpaca"])
def test_final_end_marker_is_trained_when_pad_is_eos(tokenizer, name):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    enc = encode_conversation(tokenizer, MULTI, template=name)
    last = max(i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX)
    assert enc.input_ids[last] == tokenizer.pad_token_id
    assert enc.labels[last] == tokenizer.pad_token_id
    # Every <|im_end|> that closes an assistant turn is trained, the others (system, user) not.
    closing = [i for i, t in enumerate(enc.input_ids) if t == tokenizer.eos_token_id]
    trained = [enc.labels[i] != IGNORE_INDEX for i in closing]
    assert sum(trained) == 3


def test_system_prompt_and_tool_turns_are_not_trained(tokenizer):
    enc = encode_conversation(tokenizer, TOOLS)
    text = tokenizer.decode(enc.input_ids, skip_special_tokens=False)
    # No system message: this template writes its default system prompt, untrained.
    assert "named SmolLM" in text and "Snow, -3 C" in text
    runs = trained_runs(tokenizer, enc)
    assert runs == expected_runs(TOOLS, "<|im_end|>")
    assert not any("SmolLM" in r or "Snow" in r or "Weather" in r for r in runs)


def test_tools_are_rendered_by_a_template_that_takes_them_and_never_trained(tokenizer):
    tools = '[{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]'
    enc = encode_conversation(tokenizer, TOOLS, template="chatml", tools=tools)
    assert "get_weather" in tokenizer.decode(enc.input_ids[: enc.prompt_length])
    assert trained_runs(tokenizer, enc) == expected_runs(TOOLS, "<|im_end|>")
    with pytest.raises(InputError, match="tools is not valid JSON"):
        encode_conversation(tokenizer, TOOLS, template="chatml", tools="[{")


def test_plain_text_markers_that_merge_with_the_next_turn_stay_trained(tokenizer):
    """llama-3 on a vocabulary without its markers: ``<|eot_id|><|start_header_id|>`` is plain
    text, and a BPE token may straddle the end of a turn. Such a token is trained (the whole
    marker must be learned), so a run may carry a few characters of the next header, never
    fewer characters than content + marker."""
    enc = encode_conversation(tokenizer, MULTI, template="llama-3")
    runs = trained_runs(tokenizer, enc)
    expected = expected_runs(MULTI, "<|eot_id|>")
    assert len(runs) == len(expected)
    for run, want in zip(runs[:-1], expected[:-1]):
        assert run.startswith(want)
        assert "<|start_header_id|>".startswith(run[len(want) :])
    assert runs[-1] == expected[-1]


class _SlowTokenizer:
    """The real tokenizer seen as one without offsets (a 'slow', pure-Python tokenizer)."""

    is_fast = False

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, text, **kwargs):
        assert "return_offsets_mapping" not in kwargs
        return self._tokenizer(text, **kwargs)


def test_tokenizers_without_offsets_encode_piece_by_piece(tokenizer):
    """Without offsets the text is tokenized between span boundaries: with special-token
    markers that gives the same ids as one pass; with plain-text markers no token straddles."""
    slow = _SlowTokenizer(tokenizer)
    fast = encode_conversation(tokenizer, MULTI)
    assert encode_conversation(slow, MULTI) == fast
    assert trained_runs(tokenizer, encode_conversation(slow, MULTI, template="llama-3")) == expected_runs(
        MULTI, "<|eot_id|>"
    )


def test_prompt_tokens_match_encode_prompt(tokenizer):
    enc = encode_conversation(tokenizer, MULTI)
    prompt = encode_prompt(tokenizer, MULTI[:2])
    assert enc.prompt_length == len(prompt)
    assert enc.input_ids[: len(prompt)] == prompt
    assert tokenizer.decode(prompt, skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_prompt_response_trains_only_the_response_and_shares_the_prompt(tokenizer):
    prompt = MULTI[:4]
    chosen = encode_prompt_response(tokenizer, prompt, [Message("assistant", "Madrid.")])
    rejected = encode_prompt_response(tokenizer, prompt, [Message("assistant", "Lisbon, I think.")])
    ids = encode_prompt(tokenizer, prompt)
    for enc, answer in ((chosen, "Madrid."), (rejected, "Lisbon, I think.")):
        assert enc.prompt_length == len(ids) and enc.input_ids[: len(ids)] == ids
        assert trained_runs(tokenizer, enc) == [answer + "<|im_end|>"]
        assert all(label == IGNORE_INDEX for label in enc.labels[: enc.prompt_length])
    with pytest.raises(InputError, match="must start with an assistant turn"):
        encode_prompt_response(tokenizer, prompt, [Message("user", "?")])


def test_bad_conversations_are_input_errors(tokenizer):
    with pytest.raises(InputError, match="no assistant turn"):
        encode_conversation(tokenizer, [Message("user", "hi")])
    with pytest.raises(InputError, match="starts with an assistant turn"):
        encode_conversation(tokenizer, [Message("assistant", "hi"), Message("user", "?")])


def test_a_template_raising_its_own_error_is_an_input_error(tokenizer):
    strict = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('needs a system turn') }}{% endif %}"
    with pytest.raises(InputError, match="needs a system turn"):
        encode_conversation(tokenizer, SINGLE, template=strict)


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    # Writes the number of messages first, so no shorter conversation renders as a prefix.
    counting = "{{ messages | length }}{% for m in messages %}|{{ m['content'] }}{% endfor %}"
    with pytest.raises(InputError, match="continuation"):
        encode_conversation(tokenizer, SINGLE, template=counting)


# --- truncation ----------------------------------------------------------------------------


def _through_last_marker(enc: Encoded) -> list[int]:
    """The ids of an untruncated encoding up to its last trained token (its final marker)."""
    last = max(i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX)
    return enc.input_ids[: last + 1]


@pytest.mark.parametrize("name", [None, "alpaca"])
def test_truncation_drops_whole_trailing_exchanges(tokenizer, name):
    """For every max_length, the kept ids are exactly the ids of the first k exchanges (through
    the k-th end marker), for the largest k that fits; below the first exchange: None."""
    prefixes = [_through_last_marker(encode_conversation(tokenizer, MULTI[:n], template=name)) for n in (3, 5, 7)]
    full = encode_conversation(tokenizer, MULTI, template=name)
    assert len(prefixes[0]) < len(prefixes[1]) < len(prefixes[2]) <= len(full)
    for max_length in range(len(prefixes[0]) - 3, len(full) + 2):
        enc = encode_conversation(tokenizer, MULTI, template=name, max_length=max_length)
        fitting = [k for k, p in enumerate(prefixes) if len(p) <= max_length]
        if not fitting:
            assert enc is None, max_length
            continue
        if max_length >= len(full):
            assert enc.input_ids == full.input_ids and enc.dropped_messages == 0
            continue
        k = fitting[-1]
        assert enc.input_ids == prefixes[k], max_length
        assert enc.dropped_messages == 2 * (2 - k)
        assert trained_runs(tokenizer, enc) == expected_runs(MULTI[: 3 + 2 * k], MARKER[name])


def test_cut_response_keeps_the_end_marker(tokenizer):
    two = _through_last_marker(encode_conversation(tokenizer, MULTI[:5]))
    prompt3 = encode_prompt(tokenizer, MULTI[:6])  # through "<|im_start|>assistant\n" of turn 3
    max_length = len(prompt3) + 3  # room for 2 content tokens and the one-token marker
    whole = encode_conversation(tokenizer, MULTI, max_length=max_length)
    assert whole.input_ids == two
    cut = encode_conversation(tokenizer, MULTI, max_length=max_length, truncation=Truncation.CUT_RESPONSE)
    assert cut.cut and len(cut) == max_length and cut.dropped_messages == 0
    assert cut.input_ids[: len(prompt3)] == prompt3
    assert cut.input_ids[-1] == tokenizer.eos_token_id and cut.labels[-1] == tokenizer.eos_token_id
    runs = trained_runs(tokenizer, cut)
    assert runs[:2] == expected_runs(MULTI[:5], "<|im_end|>")
    content = runs[2].removesuffix("<|im_end|>")
    assert runs[2].endswith("<|im_end|>") and content and "Rome, the eternal city".startswith(content)
    assert content != "Rome, the eternal city"


def test_prompt_response_too_long(tokenizer):
    prompt, response = MULTI[:6], [MULTI[6]]
    ids = encode_prompt(tokenizer, prompt)
    assert encode_prompt_response(tokenizer, prompt, response, max_length=len(ids) + 2) is None

    def cut_to(max_length):
        return encode_prompt_response(tokenizer, prompt, response, max_length=max_length, truncation="cut-response")

    cut = cut_to(len(ids) + 2)  # room for one content token and the one-token marker
    assert cut.input_ids[: len(ids)] == ids and len(cut) == len(ids) + 2
    assert cut.labels[len(ids) :] == cut.input_ids[len(ids) :] and cut.input_ids[-1] == tokenizer.eos_token_id
    assert cut_to(len(ids) + 1) is None  # the marker alone: no content would be trained


# --- plain text, special tokens, inspection -------------------------------------------------


def test_encode_text_trains_everything_and_appends_eos(tokenizer):
    ids = tokenizer("The quick brown fox", add_special_tokens=True)["input_ids"]
    enc = encode_text(tokenizer, "The quick brown fox")
    assert enc.input_ids == ids + [tokenizer.eos_token_id]
    assert enc.labels == enc.input_ids
    cut = encode_text(tokenizer, "The quick brown fox", max_length=2)
    assert cut.input_ids == ids[:2] and cut.labels == ids[:2]


def test_add_template_tokens_makes_each_marker_one_token(fresh_tokenizer):
    assert add_template_tokens(fresh_tokenizer, "chatml") == []  # already in this vocabulary
    n = len(fresh_tokenizer)
    added = add_template_tokens(fresh_tokenizer, "llama-3")
    assert len(fresh_tokenizer) == n + 3
    assert add_template_tokens(fresh_tokenizer, "llama-3") == []
    for marker in added:
        assert len(fresh_tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1


def test_render_trained_marks_exactly_the_trained_text(tokenizer):
    enc = encode_conversation(tokenizer, SINGLE)
    text = tokenizer.apply_chat_template([asdict(m) for m in SINGLE], tokenize=False)
    assert render_trained(tokenizer, enc) == text.replace("Paris.<|im_end|>", "«Paris.<|im_end|>»")
    coloured = render_trained(tokenizer, enc, color=True)
    assert "\x1b[32mParis.<|im_end|>\x1b[0m" in coloured and "«" not in coloured
