"""Records with images: reading them, and placing each image's tokens where the text says.

Three shapes are read, each into :class:`ImageRecord` (messages whose text holds one
:data:`IMAGE_TAG` per image, in order, and the images):

- LLaMA-Factory's ``mllm_demo.json``: ``messages`` (role/content) with ``<image>`` tags in the
  content and an ``images`` column of paths;
- OpenAI content parts: a message's ``content`` is a list of ``{type: text, text}`` and
  ``{type: image_url, image_url: {url}}`` parts; the url is a file path, ``file://`` URL or a
  ``data:image/...;base64,`` URL; each image part stands where it is in the list;
- torchtune's ``image`` column: one image per record, put before the first user turn's text
  when that text has no tag (torchtune's multimodal chat puts it first).

Relative image paths resolve against the data file's folder. Images are opened when read, so
an unreadable image is an error at its file, line and field before any model loads.

:func:`encode_image_conversation` turns a record into token ids: the chat template renders the
text with each tag as one ``<image>`` token, which is then expanded to ``tokens_per_image``
copies. Truncation never separates an image's tokens from its features: an example longer
than ``max_length`` is dropped whole (returned as None, for the caller to count). Torch is not
imported here.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instructkit.errors import InputError

IMAGE_TAG = "<image>"
ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}


@dataclass
class ImageRecord:
    """A conversation with images; ``messages[i]["content"]`` holds an :data:`IMAGE_TAG` per image."""

    messages: list[dict[str, str]]
    images: list[Any]  # PIL images, in the order of their tags
    line: int | None = None  # where the record is in its file (1-based line of a .jsonl, index + 1 of a .json list)
    extra: dict[str, Any] | None = None  # the record's other columns (e.g. "kind")


def open_image(ref: Any, base: Path | None, *, file: str | None, line: int | None, field: str):
    """A PIL image from a path (relative to ``base``), a ``file://`` URL or a ``data:`` URL."""
    from PIL import Image

    if isinstance(ref, dict):  # {"url": ...} as in an OpenAI image_url part, or {"path": ...}
        ref = ref.get("url", ref.get("path"))
    if not isinstance(ref, str) or not ref:
        raise InputError("an image must be a path or URL string", file=file, line=line, field=field)
    try:
        if ref.startswith("data:"):
            header, _, payload = ref.partition(",")
            if not header.endswith(";base64"):
                raise InputError(
                    "a data: image URL must be base64 (data:image/png;base64,...)", file=file, line=line, field=field
                )
            data = io.BytesIO(base64.b64decode(payload, validate=True))
            image = Image.open(data)
        else:
            path = Path(ref[len("file://") :] if ref.startswith("file://") else ref)
            if not path.is_absolute() and base is not None:
                path = base / path
            image = Image.open(path)
        image.load()
    except (OSError, ValueError, binascii.Error) as exc:
        raise InputError(f"cannot read the image {ref[:80]!r}: {exc}", file=file, line=line, field=field) from None
    return image.convert("RGB")


def _content_parts(parts: list[Any], where: dict[str, Any], field: str) -> tuple[str, list[Any]]:
    """OpenAI content parts -> (text with a tag at each image part, the image refs)."""
    text, refs = [], []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text.append(str(part.get("text", "")))
        elif kind in ("image_url", "image"):
            refs.append(part.get("image_url", part.get("image")))
            text.append(IMAGE_TAG)
        else:
            raise InputError(
                f"unknown content part type {kind!r} (expected text or image_url)", **where, field=f"{field}.{j}.type"
            )
    return "".join(text), refs


def parse_image_record(row: dict[str, Any], base: Path | None, *, file: str | None, line: int | None) -> ImageRecord:
    """One record of any of the three shapes (see the module docstring) -> :class:`ImageRecord`."""
    where = {"file": file, "line": line}
    key = "messages" if "messages" in row else "conversations" if "conversations" in row else None
    if key is None or not isinstance(row[key], list):
        raise InputError("an image record needs a 'messages' (or 'conversations') list", **where, field="messages")
    messages, refs = [], []
    for i, m in enumerate(row[key]):
        role = ROLES.get(str(m.get("role", m.get("from")))) if isinstance(m, dict) else None
        if role is None:
            raise InputError("unknown or missing role", **where, field=f"{key}.{i}.role")
        content = m.get("content", m.get("value"))
        if isinstance(content, list):
            content, part_refs = _content_parts(content, where, f"{key}.{i}.content")
            refs += part_refs
        elif not isinstance(content, str):
            raise InputError("content must be a string or a list of parts", **where, field=f"{key}.{i}.content")
        messages.append({"role": role, "content": content})
    column = "images" if "images" in row else "image" if "image" in row else None
    if column is not None:
        listed = row[column] if isinstance(row[column], list) else [row[column]]
        if refs:
            raise InputError("images both in content parts and in a column", **where, field=column)
        refs = listed
        tags = sum(m["content"].count(IMAGE_TAG) for m in messages)
        if column == "image" and tags == 0 and len(refs) == 1:  # torchtune: the image comes first
            first_user = next((m for m in messages if m["role"] == "user"), None)
            if first_user is not None:
                first_user["content"] = IMAGE_TAG + first_user["content"]
    tags = sum(m["content"].count(IMAGE_TAG) for m in messages)
    if tags != len(refs):
        raise InputError(
            f"{tags} {IMAGE_TAG} tag(s) in the text but {len(refs)} image(s)", **where, field=column or key
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise InputError("the record has no assistant turn", **where, field=key)
    images = [open_image(r, base, file=file, line=line, field=column or key) for r in refs]
    extra = {k: v for k, v in row.items() if k not in (key, column)}
    return ImageRecord(messages, images, line, extra)


def read_image_records(path: str | Path, limit: int | None = None) -> list[ImageRecord]:
    """The records of a .json (a list, or one object) or .jsonl file, images opened and checked."""
    from instructkit.datasets import resolve_data_path

    path = Path(resolve_data_path(path))
    if not path.is_file():
        raise InputError("no such data file", file=str(path))
    text = path.read_text(encoding="utf-8")
    rows: list[tuple[int, Any]] = []
    if path.suffix == ".jsonl":
        for n, raw in enumerate(text.splitlines(), 1):
            if raw.strip():
                try:
                    rows.append((n, json.loads(raw)))
                except json.JSONDecodeError as exc:
                    raise InputError(f"not JSON: {exc.msg}", file=str(path), line=n) from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"not JSON: {exc.msg}", file=str(path), line=exc.lineno) from None
        rows = list(enumerate(data if isinstance(data, list) else [data], 1))
    rows = rows[:limit] if limit else rows
    out = []
    for n, row in rows:
        if not isinstance(row, dict):
            raise InputError("a record must be a JSON object", file=str(path), line=n)
        out.append(parse_image_record(row, path.parent, file=str(path), line=n))
    return out


# ----------------------------------------------------------------------------------------------
# Token placement


def image_token_id(tokenizer: Any) -> int:
    """The id of :data:`IMAGE_TAG` in ``tokenizer``, adding it as a special token if absent.

    Its embedding row is never read (the model swaps in image features at its positions), so the
    id may lie past the decoder's embedding matrix and nothing is resized.
    """
    found = tokenizer.convert_tokens_to_ids(IMAGE_TAG)  # a dict look-up (get_vocab() would copy 50k entries)
    if found is None or found == tokenizer.unk_token_id:
        tokenizer.add_tokens([IMAGE_TAG], special_tokens=True)
        found = tokenizer.convert_tokens_to_ids(IMAGE_TAG)
    return found


def expand_image_tokens(
    ids: Sequence[int], labels: Sequence[int], image_id: int, n: int
) -> tuple[list[int], list[int]]:
    """Each ``image_id`` in ``ids`` becomes ``n`` copies of it (labels: ``n`` untrained -100s)."""
    out_ids, out_labels = [], []
    for t, lab in zip(ids, labels, strict=True):
        if t == image_id:
            out_ids += [image_id] * n
            out_labels += [-100] * n
        else:
            out_ids.append(t)
            out_labels.append(lab)
    return out_ids, out_labels


def encode_image_conversation(
    tokenizer: Any,
    record: ImageRecord,
    *,
    tokens_per_image: int,
    max_length: int | None,
    template: str | None = None,
) -> dict[str, Any] | None:
    """``{"input_ids", "labels", "images"}`` for training, or None when the expanded example is
    longer than ``max_length`` (dropped whole: its image tokens are never cut from their features).

    Trained tokens are those of :func:`instructkit.data.templates.encode_conversation` (every
    assistant turn and its end marker); the image tokens never train."""
    from instructkit.data.templates import encode_conversation

    image_id = image_token_id(tokenizer)
    enc = encode_conversation(tokenizer, record.messages, template=template)
    ids, labels = expand_image_tokens(enc.input_ids, enc.labels, image_id, tokens_per_image)
    if ids.count(image_id) != tokens_per_image * len(record.images):
        raise InputError(
            f"the rendered text holds {ids.count(image_id) // tokens_per_image} image token run(s) for "
            f"{len(record.images)} image(s) (does the chat template drop a turn?)",
            line=record.line,
            field="messages",
        )
    if max_length is not None and len(ids) > max_length:
        return None
    return {"input_ids": ids, "labels": labels, "images": record.images}


def encode_image_prompt(
    tokenizer: Any, messages: Sequence[dict[str, str]], *, tokens_per_image: int, template: str | None = None
) -> list[int]:
    """Token ids of a prompt (with the generation prompt), each image tag expanded."""
    from instructkit.data.templates import encode_prompt

    image_id = image_token_id(tokenizer)
    ids = encode_prompt(tokenizer, list(messages), template=template)
    out, _ = expand_image_tokens(ids, [-100] * len(ids), image_id, tokens_per_image)
    return out
