"""Instruction data formats: detecting them, validating records and normalising them.

Each format (alpaca, messages, sharegpt, preference, ranking, kto, text, classification, and
prompts) is one entry of :data:`FORMATS_BY_NAME`: a normaliser that turns a row into a record of
:mod:`instructkit.data.schema` (prompts: a :class:`~instructkit.data.prompts.PromptRecord`), the
columns it reads by default, and the test that recognises it. Column names follow
LLaMA-Factory's ``dataset_info.json`` (``prompt``, ``query``, ``response``, ``messages``,
``kto_tag``, ...), so its ``columns`` and ``tags`` work unchanged; :func:`load_from_dataset_info`
reads such a file directly.

The newer peers' shapes read through the same formats: a message's ``content`` may be a list of
blocks, LLaMA-Factory v1's ``{type, value}`` or OpenAI's ``{type: "text", text}`` parts, in every
message format; a per-message ``loss_weight`` (v1) of 0 leaves an assistant turn untrained;
v1 preference records (``chosen_messages`` / ``rejected_messages``, whole conversations) are
preference data whose prompt is the turns the two share; Dolly's ``instruction`` / ``context``
/ ``response`` records are alpaca data.

Every problem is an :class:`~instructkit.errors.InputError` naming the file, line or record and
the field path, e.g. ``chat.jsonl:4, field 'messages[3].role': unknown role 'bot' (expected one
of system, user, assistant, tool)``. Pure Python: importing this module imports no ML library.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instructkit.data.prompts import PromptRecord
from instructkit.data.readers import Row, read_rows
from instructkit.data.schema import (
    IMAGE_PLACEHOLDER,
    Classification,
    Conversation,
    Message,
    Preference,
    Ranking,
    Record,
    Text,
    Unpaired,
)
from instructkit.errors import InputError, did_you_mean

# ---------------------------------------------------------------------------------------------
# Columns and message tags


# The keys a ``columns`` mapping may use: LLaMA-Factory's, plus instructkit's own for ranking and
# classification data. The value is the name of the column in the file.
COLUMN_KEYS: tuple[str, ...] = (
    "prompt", "query", "response", "system", "history", "messages", "tools",
    "chosen", "rejected", "kto_tag", "responses", "ranks", "text", "label",
)  # fmt: skip
# Media columns are accepted so LLaMA-Factory entries load, and ignored: records are text only.
MEDIA_KEYS: tuple[str, ...] = ("images", "videos", "audios")


@dataclass(frozen=True)
class Tags:
    """How a message object names its role and content, as in LLaMA-Factory's ``tags``.

    ``function_tag`` turns (a tool call) become assistant turns; ``observation_tag`` turns (the
    tool's answer) become tool turns.
    """

    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    observation_tag: str = "observation"
    function_tag: str | None = "function_call"
    system_tag: str = "system"

    @functools.cached_property
    def roles(self) -> dict[str, str]:
        """Role name in the file -> canonical role, in the order error messages list them."""
        pairs = [
            (self.system_tag, "system"),
            (self.user_tag, "user"),
            (self.assistant_tag, "assistant"),
            (self.function_tag, "assistant"),
            (self.observation_tag, "tool"),
        ]
        return {name: role for name, role in pairs if name is not None}


SHAREGPT_TAGS = Tags()
OPENAI_TAGS = Tags("role", "content", "user", "assistant", "tool", None, "system")
TAG_KEYS: tuple[str, ...] = tuple(Tags.__dataclass_fields__)


def make_tags(tags: Mapping[str, str] | None, *, file: str | None = None) -> Tags | None:
    """Tags from a LLaMA-Factory style mapping; keys it leaves out keep the ShareGPT defaults."""
    if tags is None:
        return None
    for key, value in tags.items():
        if key not in TAG_KEYS:
            raise InputError(
                f"unknown tag '{key}'{did_you_mean(key, TAG_KEYS)}; expected one of " + ", ".join(TAG_KEYS),
                file=file,
                field=f"tags.{key}",
            )
        if not isinstance(value, str):
            raise InputError("expected a string", file=file, field=f"tags.{key}")
    return Tags(**tags)


@dataclass(frozen=True)
class _Fields:
    """One row seen through a format's column names (and the user's overrides of them)."""

    row: Row
    defaults: Mapping[str, tuple[str, ...]]  # key -> candidate columns; the first present wins
    columns: Mapping[str, str]  # the user's mapping, key -> column
    tags: Tags | None  # the user's tags; None: each message list shows its own style
    style: Tags  # the style of a message list that shows none
    images: bool = False  # image blocks are read (a vision stage); else each is a located error

    def column(self, key: str) -> str:
        if key in self.columns:
            return self.columns[key]
        candidates = self.defaults.get(key, (key,))
        return next((name for name in candidates if name in self.row.data), candidates[0])

    def present(self, key: str) -> bool:
        return self.row.data.get(self.column(key)) is not None

    def get(self, key: str) -> Any:
        """The value, or None when the column is absent, null or an empty string."""
        value = self.row.data.get(self.column(key))
        return None if value == "" else value

    def require(self, key: str) -> Any:
        value = self.row.data.get(self.column(key))
        if value is None:
            raise self.error(f"missing field '{self.column(key)}'")
        return value

    def error(self, problem: str, field: str | None = None) -> InputError:
        return self.row.error(problem, field=field)


# ---------------------------------------------------------------------------------------------
# Values: strings, lists, messages


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    names = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def _string(value: Any, path: str, f: _Fields, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise f.error(f"expected a string, got {_type_name(value)}", path)
    if not empty_ok and not value.strip():
        raise f.error("empty content", path)
    return value


def _list(value: Any, path: str, f: _Fields) -> list[Any]:
    """A list; a CSV cell holding a JSON-encoded list counts as one."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise f.error(f"expected a list; the cell is not valid JSON: {err.msg}", path) from None
    if not isinstance(value, (list, tuple)):
        raise f.error(f"expected a list, got {_type_name(value)}", path)
    return list(value)


def _style(items: list[Any], f: _Fields) -> Tags:
    """The user's tags, else the style the first message shows (ShareGPT 'from' or 'role')."""
    if f.tags is not None:
        return f.tags
    first = next((item for item in items if isinstance(item, dict)), {})
    if "from" in first:
        return SHAREGPT_TAGS
    if "role" in first:
        return OPENAI_TAGS
    return f.style


def _message(item: Any, path: str, f: _Fields, tags: Tags) -> Message | None:
    """One message object; None for an empty system message, which is dropped."""
    if not isinstance(item, dict):
        raise f.error(
            f"expected a message object with '{tags.role_tag}' and '{tags.content_tag}', got {_type_name(item)}",
            path,
        )
    name = item.get(tags.role_tag)
    if name is None:
        raise f.error(f"missing field '{tags.role_tag}'", path)
    roles = tags.roles
    if not isinstance(name, str) or name not in roles:
        expected = ", ".join(roles)
        raise f.error(f"unknown role {name!r} (expected one of {expected})", f"{path}.{tags.role_tag}")
    role = roles[name]
    content, images = _message_content(item, role, path, f, tags)
    if role == "system" and not content.strip():
        return None
    return Message(role, content, trained=_trained(item, role, path, f), images=images)


def _trained(item: dict, role: str, path: str, f: _Fields) -> bool:
    """LLaMA-Factory v1's per-message ``loss_weight``: 0 leaves an assistant turn untrained, 1
    (or no key) trains it. Other weights are refused: the loss mask is 0/1, so a weight of 0.5
    could only be rounded, and rounding would train what the file asked to down-weight. Only
    assistant turns are ever trained, so on other turns the key is checked and changes nothing."""
    weight = item.get("loss_weight")
    if weight is None:
        return True
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
        raise f.error(
            f"expected loss_weight 0 (not trained) or 1 (trained), got {weight!r}; the loss mask is 0/1,"
            " so other weights are not honoured",
            f"{path}.loss_weight",
        )
    return role != "assistant" or weight == 1


def _message_content(item: dict, role: str, path: str, f: _Fields, tags: Tags) -> tuple[str, tuple[str, ...]]:
    """The text of the message at ``path`` and its images; may be empty only for a system message."""
    content = item.get(tags.content_tag)
    if role == "assistant" and item.get("tool_calls") and not content:
        return _tool_calls(item["tool_calls"], f"{path}.tool_calls", f), ()
    if content is None:
        raise f.error(f"missing field '{tags.content_tag}'", path)
    where = f"{path}.{tags.content_tag}"
    if isinstance(content, list):
        text, images = _blocks(content, where, f)
        if not images and not text.strip() and role != "system":
            raise f.error("empty content (no text in any of its blocks)", where)
        return text, images
    return _string(content, where, f, empty_ok=role == "system"), ()


# ---------------------------------------------------------------------------------------------
# Content blocks: LLaMA-Factory v1 {type, value} and OpenAI {type: text, text} / image_url parts

_IMAGE_BLOCKS = ("image_url", "image")
_BLOCK_TYPES = ("text", *_IMAGE_BLOCKS, "tool_call", "video_url", "video", "audio_url", "audio", "reasoning")
# Types LLaMA-Factory defines that instructkit does not read yet; refused rather than dropped,
# so a turn never trains on what is left of it.
_UNREAD_BLOCKS = ("video_url", "video", "audio_url", "audio", "reasoning")


def _blocks(parts: list[Any], path: str, f: _Fields) -> tuple[str, tuple[str, ...]]:
    """A message's content blocks -> its text and its image paths.

    Text blocks are joined with nothing between them, as LLaMA-Factory and the chat templates
    that take content lists write them. With ``images``, an image block stands in the text as
    :data:`IMAGE_PLACEHOLDER`; without, it is an error (a text-only stage cannot see it).
    ``tool_call`` blocks (a JSON ``{name, arguments}`` each) become the turn's tool-call list.
    """
    texts: list[str] = []
    images: list[str] = []
    calls: list[Any] = []
    for j, part in enumerate(parts):
        where = f"{path}[{j}]"
        if not isinstance(part, dict):
            raise f.error(f"expected a content block {{type, value}}, got {_type_name(part)}", where)
        kind = part.get("type")
        if kind is None:
            raise f.error("missing field 'type'", where)
        if kind not in _BLOCK_TYPES:
            raise f.error(
                f"unknown block type {kind!r}{did_you_mean(str(kind), _BLOCK_TYPES)}; expected one of "
                + ", ".join(_BLOCK_TYPES),
                f"{where}.type",
            )
        if kind in _UNREAD_BLOCKS:
            raise f.error(
                f"'{kind}' blocks are not read by instructkit (text, image and tool_call are)", f"{where}.type"
            )
        value = _block_value(part, kind, where, f)
        if kind == "text":
            texts.append(value)
        elif kind == "tool_call":
            calls.append(_tool_call_block(value, f"{where}.value", f))
        else:
            image = _image_file(value, f"{where}.value", f)
            if not f.images:
                raise f.error(
                    "an image block in a text-only stage (images are read by a vision stage only;"
                    " remove the block or train a vision model)",
                    where,
                )
            images.append(image)
            texts.append(IMAGE_PLACEHOLDER)
    if calls:
        if "".join(texts).strip():
            raise f.error("a turn with tool_call blocks holds no text (its content is the tool calls)", path)
        return json.dumps(calls, ensure_ascii=False), tuple(images)
    return "".join(texts), tuple(images)


def _block_value(part: dict, kind: str, where: str, f: _Fields) -> str:
    """A block's value: LLaMA-Factory's ``value``; OpenAI's ``text`` or ``image_url.url``."""
    value = part.get("value")
    if value is None and kind == "text":
        value = part.get("text")
    elif value is None and kind in _IMAGE_BLOCKS:
        value = part.get(kind)
        if isinstance(value, dict):
            value = value.get("url")
    if value is None:
        openai = {"text": "'text'", "image_url": "'image_url': {'url': ...}"}.get(kind)
        problem = "missing field 'value'" + (f" (or OpenAI's {openai})" if openai else "")
        raise f.error(problem, f"{where}.value")
    if not isinstance(value, str):
        raise f.error(f"expected a string, got {_type_name(value)}", f"{where}.value")
    return value


def _image_file(value: str, where: str, f: _Fields) -> str:
    """The image a block names: a ``data:image/...;base64,`` URL as it is, or a readable file (a
    path or a ``file://`` URL), looked for beside the data file and then in the working folder
    (LLaMA-Factory's demo files name ``data/mllm_demo_data/1.jpg`` from its repository root).
    Returns the resolved path. The file is not decoded here: the data layer imports no PIL."""
    if value.startswith("data:"):
        if value.startswith("data:image/") and ";base64," in value:
            return value
        raise f.error("a data: URL must be data:image/...;base64,...", where)
    if value.startswith("file://"):
        value = value[len("file://") :]
    elif "://" in value:
        raise f.error(f"only local image files and data: URLs are read, not {value!r}", where)
    try:
        path = Path(value).expanduser()
    except RuntimeError as exc:  # "~name" of no such user
        raise f.error(f"cannot expand the '~' of {value!r} ({exc})", where) from None
    candidates = [path] if path.is_absolute() else [Path(f.row.file).parent / path, Path.cwd() / path]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.R_OK):
            return str(candidate.resolve())
    looked = "" if path.is_absolute() else " (looked beside the data file and in the working folder)"
    raise f.error(f"image file not found or not readable: {value!r}{looked}", where)


def _tool_call_block(value: str, where: str, f: _Fields) -> Any:
    try:
        call = json.loads(value)
    except json.JSONDecodeError as err:
        raise f.error(f"a tool_call value must be JSON: {err.msg} (column {err.colno})", where) from None
    if not isinstance(call, dict) or "name" not in call or "arguments" not in call:
        raise f.error("a tool_call value must be a JSON object with 'name' and 'arguments'", where)
    return call


def _tool_calls(calls: Any, path: str, f: _Fields) -> str:
    """OpenAI ``tool_calls`` as the content of the assistant turn, as LLaMA-Factory writes it:
    a JSON list of ``{"name": ..., "arguments": ...}``."""
    if not isinstance(calls, list) or not all(isinstance(call, dict) for call in calls):
        raise f.error("expected a list of tool call objects", path)
    return json.dumps([call.get("function", call) for call in calls], ensure_ascii=False)


def _turns(items: list[Any], path: str, f: _Fields, *, roles: tuple[str, ...] = ()) -> list[Message]:
    """Parse a list of message objects; a system turn may only come first. ``roles``, when
    given, are the only canonical roles allowed."""
    tags = _style(items, f)
    messages = []
    for i, item in enumerate(items):
        message = _message(item, f"{path}[{i}]", f, tags)
        if message is None:
            continue
        if message.role == "system" and i > 0:
            raise f.error("a system turn may only come first", f"{path}[{i}].{tags.role_tag}")
        if roles and message.role not in roles:
            raise f.error(
                f"expected a {' or '.join(roles)} turn here, got {message.role}",
                f"{path}[{i}].{tags.role_tag}",
            )
        messages.append(message)
    return messages


def _with_system(messages: list[Message], f: _Fields) -> list[Message]:
    """Put the ``system`` column in front, unless the turns already start with a system turn."""
    system = f.get("system")
    if system is None or (messages and messages[0].role == "system"):
        return messages
    system = _string(system, f.column("system"), f, empty_ok=True)
    return [Message("system", system), *messages] if system.strip() else messages


def _messages_column(f: _Fields) -> tuple[list[Message], str]:
    """The ``messages`` column parsed, the ``system`` column in front; and the column's name."""
    path = f.column("messages")
    return _with_system(_turns(_list(f.require("messages"), path, f), path, f), f), path


def _require_assistant(messages: list[Message], path: str, f: _Fields) -> None:
    if not any(m.role == "assistant" for m in messages):
        raise f.error("the conversation has no assistant turn (nothing to learn from)", path)
    if not any(m.role == "assistant" and m.trained for m in messages):
        raise f.error("every assistant turn has loss_weight 0 (nothing to learn from)", path)


def _check_prompt(prompt: list[Message], path: str, f: _Fields) -> None:
    turns = [m for m in prompt if m.role != "system"]
    if not turns:
        raise f.error("the prompt has no user turn", path)
    if turns[-1].role not in ("user", "tool"):
        raise f.error(f"the prompt must end with a user turn, not an {turns[-1].role} turn", path)


def _tools(f: _Fields) -> str | None:
    """The ``tools`` column as a JSON string (lists and objects are encoded)."""
    tools = f.get("tools")
    if tools is None:
        return None
    if isinstance(tools, (list, dict)):
        return json.dumps(tools, ensure_ascii=False)
    tools = _string(tools, f.column("tools"), f)
    try:
        json.loads(tools)
    except json.JSONDecodeError as err:
        raise f.error(f"not valid JSON: {err.msg} (column {err.colno})", f.column("tools")) from None
    return tools


# ---------------------------------------------------------------------------------------------
# Prompts and responses shared by the formats


def _alpaca_prompt(f: _Fields) -> list[Message]:
    """System, history pairs, then one user turn: the instruction and the input, a blank line
    between them when the input is not empty."""
    instruction = _string(f.require("prompt"), f.column("prompt"), f, empty_ok=True)
    query = f.get("query")
    parts = [instruction, "" if query is None else _string(query, f.column("query"), f, empty_ok=True)]
    user = "\n\n".join(part for part in parts if part.strip())
    if not user:
        raise f.error("empty content (the instruction and the input are both empty)", f.column("prompt"))
    return _with_system([*_history(f), Message("user", user)], f)


def _history(f: _Fields) -> list[Message]:
    """Alpaca ``history``: earlier turns as a list of [user, assistant] pairs."""
    history = f.get("history")
    if history is None:
        return []
    path = f.column("history")
    messages = []
    for i, pair in enumerate(_list(history, path, f)):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise f.error(f"expected a [user, assistant] pair, got {_type_name(pair)}", f"{path}[{i}]")
        messages.append(Message("user", _string(pair[0], f"{path}[{i}][0]", f)))
        messages.append(Message("assistant", _string(pair[1], f"{path}[{i}][1]", f)))
    return messages


def _prompt(f: _Fields, *, required: bool = True) -> list[Message] | None:
    """The prompt of preference, ranking and KTO data: a ``messages`` list, or ``prompt`` as a
    string (with alpaca's system, history and input) or as a list of messages."""
    if f.present("messages"):
        prompt, path = _messages_column(f)
    elif f.present("prompt"):
        path = f.column("prompt")
        value = f.require("prompt")
        if isinstance(value, str):
            prompt = _alpaca_prompt(f)
        else:
            prompt = _with_system(_turns(_list(value, path, f), path, f), f)
    elif required:
        raise f.error(f"missing field '{f.column('prompt')}'")
    else:
        return None
    _check_prompt(prompt, path, f)
    return prompt


def _response(value: Any, path: str, f: _Fields) -> list[Message]:
    """A response: a string, one message object, or a list of assistant (and tool) turns."""
    if isinstance(value, str):
        return [Message("assistant", _string(value, path, f))]
    if isinstance(value, dict):
        message = _message(value, path, f, _style([value], f))
        messages = [] if message is None else [message]
    else:
        messages = _turns(_list(value, path, f), path, f, roles=("assistant", "tool"))
    if not messages or messages[0].role != "assistant":
        raise f.error("a response must start with an assistant turn", path)
    _require_trained(messages, path, f)
    return messages


def _require_trained(response: list[Message], path: str, f: _Fields) -> None:
    """A response the loss compares must have a trained assistant turn."""
    if not any(m.role == "assistant" and m.trained for m in response):
        raise f.error("the response's assistant turns all have loss_weight 0, so there is nothing to score", path)


def _label(f: _Fields) -> bool:
    """KTO's desirable / undesirable label: a boolean (0/1 and 'true'/'false' from CSV too)."""
    value = f.require("kto_tag")
    spellings = {"true": True, "false": False, "1": True, "0": False}
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in spellings:
        return spellings[value.strip().lower()]
    raise f.error(f"expected true or false, got {value!r}", f.column("kto_tag"))


# ---------------------------------------------------------------------------------------------
# Normalisers: one per format, row -> record


def _alpaca(f: _Fields) -> Conversation:
    response = _string(f.require("response"), f.column("response"), f)
    return Conversation([*_alpaca_prompt(f), Message("assistant", response)])


def _conversation(f: _Fields) -> Conversation:
    """OpenAI ``messages`` and ShareGPT ``conversations`` alike; the tags decide the names."""
    messages, path = _messages_column(f)
    _require_assistant(messages, path, f)
    return Conversation(messages, tools=_tools(f))


def _preference(f: _Fields) -> Preference:
    prompt = _prompt(f, required=False)
    if prompt is None:
        return _implicit_preference(f)
    chosen = _response(f.require("chosen"), f.column("chosen"), f)
    rejected = _response(f.require("rejected"), f.column("rejected"), f)
    return Preference(prompt, chosen, rejected)


def _implicit_preference(f: _Fields) -> Preference:
    """No prompt column: chosen and rejected are whole conversations, and the prompt is the turns
    they share at the start (TRL's "implicit prompt" layout)."""
    chosen_path, rejected_path = f.column("chosen"), f.column("rejected")
    if isinstance(f.require("chosen"), (str, dict)):
        raise f.error(f"missing field '{f.column('prompt')}'")
    chosen = _turns(_list(f.require("chosen"), chosen_path, f), chosen_path, f)
    rejected = _turns(_list(f.require("rejected"), rejected_path, f), rejected_path, f)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise f.error(
            f"missing field '{f.column('prompt')}' (and chosen and rejected share no leading"
            " turns that could be the prompt)"
        )
    prompt = chosen[:shared]
    _check_prompt(prompt, chosen_path, f)
    for path, turns in ((chosen_path, chosen), (rejected_path, rejected)):
        if shared == len(turns) or turns[shared].role != "assistant":
            raise f.error("after the shared prompt a response must start with an assistant turn", path)
        _require_trained(turns[shared:], path, f)
    return Preference(prompt, chosen[shared:], rejected[shared:])


def _ranking(f: _Fields) -> Ranking:
    prompt = _prompt(f)
    path = f.column("responses")
    items = _list(f.require("responses"), path, f)
    if len(items) < 2:
        raise f.error(f"ranking needs at least 2 responses, got {len(items)}", path)
    responses = [_response(item, f"{path}[{i}]", f) for i, item in enumerate(items)]
    return Ranking(prompt, responses, _ranks(f, len(items)))


def _ranks(f: _Fields, count: int) -> list[int]:
    """``ranks[i]`` is the rank of response i, 0 = best; without the column, list order."""
    value = f.get("ranks")
    if value is None:
        return list(range(count))
    path = f.column("ranks")
    ranks = _list(value, path, f)
    if len(ranks) != count:
        raise f.error(f"{len(ranks)} ranks for {count} responses", path)
    for i, rank in enumerate(ranks):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise f.error(f"expected a rank 0, 1, 2, ... (0 = best), got {rank!r}", f"{path}[{i}]")
    if len(set(ranks)) == 1:
        raise f.error("all responses have the same rank, so there is no pair to learn from", path)
    return ranks


def _kto(f: _Fields) -> Unpaired:
    """KTO: a ``messages`` list whose last turn is the labelled response (LLaMA-Factory), or
    ``prompt`` + ``completion`` (TRL)."""
    label = _label(f)
    if not f.present("messages"):
        completion = _response(f.require("response"), f.column("response"), f)
        return Unpaired(_prompt(f), completion, label)
    turns, path = _messages_column(f)
    if not turns or turns[-1].role != "assistant":
        raise f.error("the last turn must be the assistant response that the label judges", path)
    _require_trained(turns[-1:], path, f)
    _check_prompt(turns[:-1], path, f)
    return Unpaired(turns[:-1], turns[-1:], label)


def _text(f: _Fields) -> Text:
    return Text(_string(f.require("text"), f.column("text"), f))


def _prompt_only(f: _Fields) -> PromptRecord:
    """A prompt to sample a response to (PPO, ``label create``): ``prompt`` as a string (with
    alpaca's system, history and input around it) or as a list of messages ending with a user
    turn. Every column the prompt does not use is kept in ``data``: reward functions read it."""
    path = f.column("prompt")
    value = f.require("prompt")
    if isinstance(value, str):
        messages = _alpaca_prompt(f)
    else:
        messages = _with_system(_turns(_list(value, path, f), path, f), f)
    _check_prompt(messages, path, f)
    used = {f.column(key) for key in ("prompt", "query", "system", "history")}
    text = next((m.content for m in reversed(messages) if m.role == "user"), messages[-1].content)
    return PromptRecord(messages, text, {k: v for k, v in f.row.data.items() if k not in used})


def _classification(f: _Fields) -> Classification:
    text = _string(f.require("text"), f.column("text"), f)
    label = f.require("label")
    path = f.column("label")
    if isinstance(label, bool):
        label = json.dumps(label)  # true / false, as the file spells it
    elif isinstance(label, int):
        label = str(label)
    elif not isinstance(label, str):
        raise f.error(f"expected a string or integer label, got {_type_name(label)}", path)
    return Classification(text, _string(label, path, f))


# ---------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Format:
    """One data format: how to recognise a row of it and how to normalise one."""

    name: str
    normalise: Callable[[_Fields], Record]
    columns: Mapping[str, tuple[str, ...]]  # key -> default column names, first present wins
    recognise: Callable[[_Fields], bool]
    # Detection tries tier 1 first: formats whose keys are more specific win over general ones
    # (a KTO row also has 'messages'; an alpaca row may also carry a 'text' column).
    tier: int
    signature: str  # the keys that identify it, for messages
    style: Tags = OPENAI_TAGS


def _first_turn(f: _Fields) -> dict:
    """The first message of the ``messages`` column ({} when there is none to look at)."""
    value = f.get("messages")
    if isinstance(value, str):  # CSV
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return {}
    first = value[0] if isinstance(value, list) and value else None
    return first if isinstance(first, dict) else {}


def _is_openai_messages(f: _Fields) -> bool:
    return f.tags is None and "role" in _first_turn(f)


def _is_sharegpt(f: _Fields) -> bool:
    # tags are a ShareGPT notion in LLaMA-Factory: with them, the role key is theirs
    return (f.tags.role_tag if f.tags else "from") in _first_turn(f)


# Columns that hold a response: a row with one of them is not a bare prompt, even when no
# format that reads it matches (TRL's prompt + completion without a label, say).
_RESPONSE_COLUMNS = (
    "output", "completion", "response", "chosen", "rejected", "responses", "chosen_messages", "rejected_messages",
)  # fmt: skip


def _is_prompt_only(f: _Fields) -> bool:
    return f.present("prompt") and not any(name in f.row.data for name in _RESPONSE_COLUMNS)


_PROMPT_COLUMNS = {
    "prompt": ("prompt", "instruction"),
    "query": ("input", "context"),
    "system": ("system",),
    "history": ("history",),
    "messages": ("messages", "conversations"),
}
_CONVERSATION_COLUMNS = {"system": ("system",), "tools": ("tools",)}

FORMATS_BY_NAME: dict[str, Format] = {
    fmt.name: fmt
    for fmt in (
        Format(
            "alpaca",
            _alpaca,
            {
                "prompt": ("instruction",),
                "query": ("input", "context"),  # context: Dolly's (databricks-dolly-15k)
                "response": ("output", "response"),  # response: Dolly's and torchtune's
                "system": ("system",),
                "history": ("history",),
            },
            lambda f: f.present("prompt") and f.present("response"),
            tier=2,
            signature="instruction, output (or Dolly's instruction, context, response)",
        ),
        Format(
            "messages",
            _conversation,
            {"messages": ("messages", "conversations"), **_CONVERSATION_COLUMNS},
            _is_openai_messages,
            tier=2,
            signature="messages: [{role, content}]",
        ),
        Format(
            "sharegpt",
            _conversation,
            {"messages": ("conversations", "messages"), **_CONVERSATION_COLUMNS},
            _is_sharegpt,
            tier=2,
            signature="conversations: [{from, value}]",
            style=SHAREGPT_TAGS,
        ),
        Format(
            "preference",
            _preference,
            {
                **_PROMPT_COLUMNS,
                # chosen_messages / rejected_messages: LLaMA-Factory v1's whole conversations
                "chosen": ("chosen", "chosen_messages"),
                "rejected": ("rejected", "rejected_messages"),
            },
            lambda f: f.present("chosen") and f.present("rejected"),
            tier=1,
            signature="prompt, chosen, rejected (or chosen_messages, rejected_messages)",
        ),
        Format(
            "ranking",
            _ranking,
            {**_PROMPT_COLUMNS, "responses": ("responses",), "ranks": ("ranks",)},
            lambda f: f.present("responses"),
            tier=1,
            signature="prompt, responses",
        ),
        Format(
            "kto",
            _kto,
            {**_PROMPT_COLUMNS, "response": ("completion",), "kto_tag": ("label",)},
            lambda f: f.present("kto_tag") and (f.present("messages") or f.present("response")),
            tier=1,
            signature="messages or prompt + completion, label: true/false",
        ),
        Format(
            "text",
            _text,
            {"text": ("text",)},
            lambda f: f.present("text") and not f.present("label"),
            tier=3,
            signature="text",
        ),
        Format(
            "classification",
            _classification,
            {"text": ("text",), "label": ("label",)},
            lambda f: f.present("text") and f.present("label"),
            tier=3,
            signature="text, label",
        ),
        Format(
            "prompts",
            _prompt_only,
            {
                "prompt": ("prompt", "instruction"),
                "query": ("input", "context"),
                "system": ("system",),
                "history": ("history",),
            },
            _is_prompt_only,
            tier=4,  # last: a prompt column alone says least, so any other match wins
            signature="prompt, no response",
        ),
    )
}


def get_format(name: str) -> Format:
    """The registered format called ``name``; InputError with a suggestion for a misspelling."""
    if name not in FORMATS_BY_NAME:
        raise InputError(
            f"unknown format '{name}'{did_you_mean(name, FORMATS_BY_NAME)}; expected one of "
            + ", ".join(FORMATS_BY_NAME)
        )
    return FORMATS_BY_NAME[name]


def _fields(row: Row, fmt: Format, columns: Mapping[str, str], tags: Tags | None, images: bool = False) -> _Fields:
    return _Fields(row, fmt.columns, columns, tags, fmt.style, images)


# ---------------------------------------------------------------------------------------------
# Detection


def detect_format(
    rows: list[Row], columns: Mapping[str, str] | None = None, tags: Mapping[str, str] | None = None
) -> str:
    """The format of ``rows``, from the keys of the first record (after the ``columns`` mapping).

    More specific formats are tried first: preference, ranking and KTO; then alpaca, messages
    and ShareGPT; then classification and plain text; last, prompts without a response. Two
    matches in one tier, or none, is an InputError that asks for an explicit ``--format``.
    """
    if not rows:
        raise InputError("no records")
    first = rows[0]
    columns = dict(columns or {})
    tag_set = make_tags(tags)
    for tier in sorted({fmt.tier for fmt in FORMATS_BY_NAME.values()}):
        matches = [
            fmt.name
            for fmt in FORMATS_BY_NAME.values()
            if fmt.tier == tier and fmt.recognise(_fields(first, fmt, columns, tag_set))
        ]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise first.error(
                f"the keys {sorted(first.data)} fit several formats ({', '.join(matches)}); choose one with --format"
            )
    known = "; ".join(f"{fmt.name} ({fmt.signature})" for fmt in FORMATS_BY_NAME.values())
    raise first.error(
        f"cannot tell the format from the keys {sorted(first.data)}; expected one of: {known}."
        " Rename the columns, map them with columns=..., or choose --format"
    )


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedData:
    """Normalised records of one source, and the format they were read as."""

    format: str
    records: list[Record]
    path: str


def load_records(
    path: str | Path | None = None,
    format: str | None = None,
    columns: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
    dataset_info: str | Path | None = None,
    name: str | None = None,
    images: bool = False,
) -> LoadedData:
    """Read, validate and normalise one data source.

    ``format`` overrides detection. ``columns`` maps keys (``prompt``, ``response``,
    ``messages``, ``chosen``, ``kto_tag``, ...; see :data:`COLUMN_KEYS`) to the file's column
    names; ``tags`` names the role and content keys of messages, as in LLaMA-Factory.

    With ``dataset_info`` (a LLaMA-Factory ``dataset_info.json``), the entry ``name`` supplies
    the file, format, columns and tags; without ``name`` the entry whose ``file_name`` is
    ``path`` does. Arguments given here override the entry's.

    ``images`` is for a stage that reads images: image content blocks then load into
    :attr:`Message.images` (each file checked readable), with a placeholder in the text; for
    every other stage (the default) an image block is an error at its record and field.
    """
    if dataset_info is not None:
        return _load_with_info(Path(dataset_info), name, path, format, columns, tags, images)
    if name is not None:
        raise InputError(f"name '{name}' needs a dataset_info file to look it up in")
    if path is None:
        raise InputError("no data file given")
    return _load(read_rows(path), str(path), format, columns, tags, images)


def _load(
    rows: list[Row],
    source: str,
    format: str | None,
    columns: Mapping[str, str] | None,
    tags: Mapping[str, str] | None,
    images: bool = False,
) -> LoadedData:
    columns = _check_column_keys(columns, source)
    tag_set = make_tags(tags, file=source)
    fmt = get_format(format or detect_format(rows, columns, tags))
    _check_columns_apply(columns, fmt, source)
    records = [fmt.normalise(_fields(row, fmt, columns, tag_set, images)) for row in rows]
    return LoadedData(fmt.name, records, source)


def _check_column_keys(columns: Mapping[str, str] | None, source: str) -> dict[str, str]:
    columns = dict(columns or {})
    for key, column in columns.items():
        if key not in COLUMN_KEYS + MEDIA_KEYS:
            raise InputError(
                f"unknown column key '{key}'{did_you_mean(key, COLUMN_KEYS)}; expected one of "
                + ", ".join(COLUMN_KEYS),
                file=source,
                field=f"columns.{key}",
            )
        if not isinstance(column, str):
            raise InputError("expected a column name (a string)", file=source, field=f"columns.{key}")
    return {key: column for key, column in columns.items() if key not in MEDIA_KEYS}


def _check_columns_apply(columns: Mapping[str, str], fmt: Format, source: str) -> None:
    for key in columns:
        if key not in fmt.columns:
            raise InputError(
                f"column key '{key}' does not apply to the {fmt.name} format (it reads " + ", ".join(fmt.columns) + ")",
                file=source,
                field=f"columns.{key}",
            )


# ---------------------------------------------------------------------------------------------
# LLaMA-Factory dataset_info.json

_ENTRY_KEYS = (
    "file_name", "file_sha1", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url",
    "cloud_file_name", "subset", "split", "folder", "num_samples", "revision", "ranking",
    "formatting", "columns", "tags",
)  # fmt: skip
_UNSUPPORTED_ENTRY_KEYS = ("folder", "num_samples", "revision")
_FORMATTINGS = {"alpaca": "alpaca", "sharegpt": "sharegpt", "openai": "messages"}


def load_dataset_info(info_path: str | Path, name: str) -> dict[str, Any]:
    """The entry ``name`` of a LLaMA-Factory ``dataset_info.json``, with its keys checked."""
    file = str(info_path)
    info = _read_json_object(Path(info_path))
    if name not in info:
        raise InputError(f"no dataset named '{name}'{did_you_mean(name, info)}", file=file)
    entry = info[name]
    if not isinstance(entry, dict):
        raise InputError(f"expected an object, got {_type_name(entry)}", file=file, field=name)
    for key in entry:
        if key not in _ENTRY_KEYS:
            problem = f"unknown key '{key}'{did_you_mean(key, _ENTRY_KEYS)}"
            raise InputError(problem, file=file, field=f"{name}.{key}")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in _FORMATTINGS:
        problem = f"unknown formatting '{formatting}'{did_you_mean(str(formatting), _FORMATTINGS)}"
        raise InputError(problem, file=file, field=f"{name}.formatting")
    return dict(entry)


def load_from_dataset_info(info_path: str | Path, name: str) -> LoadedData:
    """Load the dataset ``name`` exactly as its ``dataset_info.json`` entry describes it."""
    return load_records(dataset_info=info_path, name=name)


def _load_with_info(
    info_path: Path,
    name: str | None,
    path: str | Path | None,
    format: str | None,
    columns: Mapping[str, str] | None,
    tags: Mapping[str, str] | None,
    images: bool = False,
) -> LoadedData:
    if name is None:
        if path is None:
            raise InputError("give the dataset name to load from dataset_info", file=str(info_path))
        name = _entry_name_for_file(info_path, Path(path))
    entry = load_dataset_info(info_path, name)
    entry_format, entry_columns, entry_tags = _entry_options(entry)
    if path is None:
        rows, path = _read_entry_source(entry, info_path, name)
    else:
        rows = read_rows(path)
    return _load(
        rows,
        str(path),
        format or entry_format,
        {**entry_columns, **(columns or {})},
        None if entry_tags is None and tags is None else {**(entry_tags or {}), **(tags or {})},
        images,
    )


def _entry_options(entry: Mapping[str, Any]) -> tuple[str, dict[str, str], dict[str, str] | None]:
    """Format, columns and tags of a LLaMA-Factory entry, in instructkit's terms.

    ``ranking: true`` means preference pairs; a ``kto_tag`` column means KTO; an alpaca entry
    whose only column is ``prompt`` is pre-training text (LLaMA-Factory reads only the prompt
    column in its pre-training stage).
    """
    columns = dict(entry.get("columns", {}))
    formatting = entry.get("formatting", "alpaca")
    tags = dict(entry["tags"]) if formatting != "alpaca" and "tags" in entry else None
    if entry.get("ranking"):
        return "preference", columns, tags
    if "kto_tag" in columns:
        return "kto", columns, tags
    if formatting != "alpaca":
        return _FORMATTINGS[formatting], columns, tags
    if set(columns) - set(MEDIA_KEYS) == {"prompt"}:
        return "text", {"text": columns["prompt"]}, None
    return "alpaca", columns, None


def _read_entry_source(entry: Mapping[str, Any], info_path: Path, name: str) -> tuple[list[Row], str]:
    """Rows of the entry's data: a Hub dataset (from the cache) or a file beside the info file."""
    file = str(info_path)
    for key in _UNSUPPORTED_ENTRY_KEYS:
        if key in entry:
            raise InputError(f"'{key}' is not supported by instructkit", file=file, field=f"{name}.{key}")
    if "hf_hub_url" in entry:  # LLaMA-Factory prefers the Hub over file_name too
        source = entry["hf_hub_url"]
        return read_rows(source, split=entry.get("split", "train"), subset=entry.get("subset")), source
    if "file_name" in entry:
        source = str(info_path.parent / entry["file_name"])
        return read_rows(source), source
    raise InputError(
        "no 'file_name' or 'hf_hub_url' (ModelScope, Modelers, scripts and cloud files are not supported)",
        file=file,
        field=name,
    )


def _entry_name_for_file(info_path: Path, path: Path) -> str:
    info = _read_json_object(info_path)
    target = path.resolve()
    for name, entry in info.items():
        if (
            isinstance(entry, dict)
            and "file_name" in entry
            and (info_path.parent / entry["file_name"]).resolve() == target
        ):
            return name
    raise InputError(f"no entry has file_name '{path.name}'; name one", file=str(info_path))


def _read_json_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError("no such file", file=str(path))
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"invalid JSON: {err.msg} (column {err.colno})", file=str(path), line=err.lineno) from None
    except UnicodeDecodeError as err:
        raise InputError(f"not valid UTF-8 at byte offset {err.start}", file=str(path)) from None
    if not isinstance(value, dict):
        raise InputError(f"expected a JSON object, got {_type_name(value)}", file=str(path))
    return value
