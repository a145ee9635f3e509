"""The label store: prompts, K sampled responses each, and the rankings people give them.

One SQLite file in WAL mode (readers never block the one writer), ``synchronous=FULL`` (a
committed ranking survives a crash of the process and of the machine). Tables:

* ``meta``: how the store was made (model, k, seed, sampling) and the schema version;
* ``prompts``: one row per prompt, its messages as JSON;
* ``responses``: K rows per prompt, ``idx`` 0..K-1;
* ``rankings``: one row per submitted ranking or skip: who, when, ``ranks`` (JSON list,
  ``ranks[i]`` is the rank of response ``i``, 0 = best, equal ranks are ties; NULL for a skip),
  and the client's ``submission_id``;
* ``claims``: the prompt each annotator was last handed and has not answered yet.

Semantics when several people rank at once:

* an annotator ranks (or skips) a prompt at most once: ``UNIQUE(prompt_id, annotator)``; several
  annotators may rank the same prompt (InstructGPT overlapped labelers to measure agreement);
* each submission carries a client-made ``submission_id`` (``UNIQUE``): sending it again (a
  retry after a lost answer) returns the stored ranking instead of adding a second one;
* every write is one ``BEGIN IMMEDIATE`` transaction, so concurrent writers queue on SQLite's
  lock (``busy_timeout``) rather than failing, and a ranking is either wholly stored or absent;
* :meth:`LabelStore.next_prompt` hands each annotator a prompt they have not answered, preferring
  prompts with the fewest rankings and no fresh claim by someone else, so people working at the
  same time get different prompts while any are left.

Stdlib only: importing this module imports no ML library (``create_label_store`` loads the model
when called).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from instructkit.errors import InputError
from instructkit.fileio import atomic_write_text

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 30_000
CLAIM_SECONDS = 600.0  # after this a prompt handed to someone who went quiet is offered again
MAX_ANNOTATOR_LENGTH = 64
MAX_SUBMISSION_ID_LENGTH = 128

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE prompts (
    id INTEGER PRIMARY KEY,
    messages TEXT NOT NULL,            -- JSON [{role, content}, ...], ending with a user turn
    source TEXT                        -- file:line it was read from
);
CREATE TABLE responses (
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    idx INTEGER NOT NULL,
    text TEXT NOT NULL,
    PRIMARY KEY (prompt_id, idx)
);
CREATE TABLE rankings (
    id INTEGER PRIMARY KEY,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    annotator TEXT NOT NULL,
    submission_id TEXT NOT NULL UNIQUE,
    skipped INTEGER NOT NULL CHECK (skipped IN (0, 1)),
    ranks TEXT,                        -- JSON [rank of response 0, ...]; NULL when skipped
    created_at TEXT NOT NULL,          -- UTC, ISO 8601
    UNIQUE (prompt_id, annotator),
    CHECK ((skipped = 1) = (ranks IS NULL))
);
CREATE TABLE claims (
    annotator TEXT PRIMARY KEY,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    claimed_at REAL NOT NULL           -- unix seconds
);
"""


class Conflict(Exception):
    """A submission that contradicts one already stored (HTTP 409)."""


class NotFound(Exception):
    """A prompt id the store does not have (HTTP 404)."""


@dataclass(frozen=True)
class Submitted:
    """What :meth:`LabelStore.submit` stored, or found stored (``duplicate``) for a retry."""

    ranking: dict[str, Any]
    duplicate: bool


def _connect(path: str | Path) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; every write below says BEGIN IMMEDIATE.
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction: the write lock is taken at BEGIN, so two writers never interleave."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# ----------------------------------------------------------------------------------------------
# Writing a new store


def write_store(
    path: str | Path,
    prompts: Sequence[Sequence[Mapping[str, str]]],
    responses: Sequence[Sequence[str]],
    *,
    meta: Mapping[str, Any] | None = None,
    sources: Sequence[str | None] | None = None,
) -> Path:
    """Write a new store with ``prompts`` (message lists) and ``responses[i]`` for prompt i.

    The file appears whole or not at all: it is built under a temporary name beside ``path``
    and renamed. An existing ``path`` is an error (it may hold rankings).
    """
    path = Path(path)
    if path.exists():
        raise InputError("already exists; it may hold rankings, so choose another --out or remove it", file=str(path))
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} response lists")
    if not prompts:
        raise InputError("no prompts to label")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        conn = _connect(tmp)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.executescript(_SCHEMA)  # a temporary file nobody else opens: the rename is what's atomic
            with _transaction(conn):
                info = {"schema_version": SCHEMA_VERSION, "created_at": _now(), **(meta or {})}
                conn.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in info.items()])
                for i, (messages, texts) in enumerate(zip(prompts, responses)):
                    source = sources[i] if sources else None
                    cur = conn.execute(
                        "INSERT INTO prompts (messages, source) VALUES (?, ?)",
                        (json.dumps([dict(m) for m in messages], ensure_ascii=False), source),
                    )
                    conn.executemany(
                        "INSERT INTO responses VALUES (?, ?, ?)",
                        [(cur.lastrowid, j, text) for j, text in enumerate(texts)],
                    )
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp + "-wal", tmp + "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
    return path


# ----------------------------------------------------------------------------------------------
# Reading and ranking


class LabelStore:
    """An existing store. Safe to use from many threads and processes at once: every call opens
    its own connection, and every write is one transaction."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError("no such label store (make one with `instructkit label create`)", file=str(path))
        try:
            with self._conn() as conn:
                version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise InputError(f"not a label store: {exc}", file=str(path)) from None
        if version is None or json.loads(version[0]) != SCHEMA_VERSION:
            raise InputError(
                f"label store schema {version and version[0]}, this instructkit reads {SCHEMA_VERSION}", file=str(path)
            )

    @contextlib.contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        conn = _connect(self.path)
        try:
            yield conn
        finally:
            conn.close()

    def meta(self) -> dict[str, Any]:
        with self._conn() as conn:
            return {row["key"]: json.loads(row["value"]) for row in conn.execute("SELECT key, value FROM meta")}

    def journal_mode(self) -> str:
        with self._conn() as conn:
            return conn.execute("PRAGMA journal_mode").fetchone()[0]

    def prompt(self, prompt_id: int) -> dict[str, Any]:
        """``{"prompt_id", "messages", "responses": [{"index", "text"}]}``."""
        with self._conn() as conn:
            return self._prompt(conn, prompt_id)

    @staticmethod
    def _prompt(conn: sqlite3.Connection, prompt_id: int) -> dict[str, Any]:
        row = conn.execute("SELECT id, messages FROM prompts WHERE id = ?", (prompt_id,)).fetchone()
        if row is None:
            raise NotFound(f"no prompt {prompt_id} in this store")
        texts = conn.execute("SELECT idx, text FROM responses WHERE prompt_id = ? ORDER BY idx", (prompt_id,))
        return {
            "prompt_id": row["id"],
            "messages": json.loads(row["messages"]),
            "responses": [{"index": r["idx"], "text": r["text"]} for r in texts],
        }

    def progress(self, annotator: str | None = None) -> dict[str, int]:
        """Totals over the store, and this annotator's own counts when given."""
        with self._conn() as conn:
            return self._progress(conn, annotator)

    @staticmethod
    def _progress(conn: sqlite3.Connection, annotator: str | None) -> dict[str, int]:
        out = {
            "total": conn.execute("SELECT COUNT(*) FROM prompts").fetchone()[0],
            "prompts_ranked": conn.execute(
                "SELECT COUNT(DISTINCT prompt_id) FROM rankings WHERE NOT skipped"
            ).fetchone()[0],
            "rankings": conn.execute("SELECT COUNT(*) FROM rankings WHERE NOT skipped").fetchone()[0],
        }
        if annotator is not None:
            mine = conn.execute(
                "SELECT COALESCE(SUM(NOT skipped), 0), COALESCE(SUM(skipped), 0) FROM rankings WHERE annotator = ?",
                (annotator,),
            ).fetchone()
            out["ranked"], out["skipped"] = mine[0], mine[1]
        return out

    def next_prompt(self, annotator: str) -> dict[str, Any]:
        """The prompt ``annotator`` should rank next and the progress counts; ``prompt`` is None
        when they have answered every prompt. Asking again before answering returns the same
        prompt (a page reload does not lose one's place)."""
        annotator = check_annotator(annotator)
        with self._conn() as conn, _transaction(conn):
            claim = conn.execute(
                "SELECT c.prompt_id FROM claims c WHERE c.annotator = :a AND NOT EXISTS "
                "(SELECT 1 FROM rankings r WHERE r.prompt_id = c.prompt_id AND r.annotator = :a)",
                {"a": annotator},
            ).fetchone()
            if claim is not None:
                prompt_id = claim[0]
            else:
                pick = conn.execute(
                    "SELECT p.id FROM prompts p "
                    "WHERE NOT EXISTS (SELECT 1 FROM rankings r WHERE r.prompt_id = p.id AND r.annotator = :a) "
                    "ORDER BY (SELECT COUNT(*) FROM rankings r WHERE r.prompt_id = p.id AND NOT r.skipped) "
                    "       + (SELECT COUNT(*) FROM claims c WHERE c.prompt_id = p.id AND c.annotator != :a "
                    "          AND c.claimed_at > :fresh), p.id "
                    "LIMIT 1",
                    {"a": annotator, "fresh": time.time() - CLAIM_SECONDS},
                ).fetchone()
                prompt_id = pick[0] if pick is not None else None
            if prompt_id is None:
                conn.execute("DELETE FROM claims WHERE annotator = ?", (annotator,))
                return {"prompt": None, "progress": self._progress(conn, annotator)}
            conn.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?)", (annotator, prompt_id, time.time()))
            return {"prompt": self._prompt(conn, prompt_id), "progress": self._progress(conn, annotator)}

    def submit(
        self,
        *,
        submission_id: str,
        prompt_id: int,
        annotator: str,
        order: Sequence[int] | None = None,
        tied: Sequence[bool] | None = None,
        skip: bool = False,
    ) -> Submitted:
        """Store one ranking (``order``: response indices best first; ``tied[j]``: position j ties
        with position j - 1) or a skip, in one transaction.

        The same ``submission_id`` again returns the stored ranking (``duplicate=True``); a second,
        different answer by the same annotator to the same prompt is a :class:`Conflict`.
        """
        annotator = check_annotator(annotator)
        if not isinstance(submission_id, str) or not 0 < len(submission_id) <= MAX_SUBMISSION_ID_LENGTH:
            raise InputError(f"expected a string of 1 to {MAX_SUBMISSION_ID_LENGTH} characters", field="submission_id")
        _check_text(submission_id, "submission_id")
        with self._conn() as conn, _transaction(conn):
            stored = conn.execute("SELECT * FROM rankings WHERE submission_id = ?", (submission_id,)).fetchone()
            if stored is not None:
                if (stored["prompt_id"], stored["annotator"]) != (prompt_id, annotator):
                    raise Conflict(f"submission id {submission_id!r} was already used for another ranking")
                return Submitted(_ranking_dict(stored), duplicate=True)
            k = conn.execute("SELECT COUNT(*) FROM responses WHERE prompt_id = ?", (prompt_id,)).fetchone()[0]
            if k == 0:
                raise NotFound(f"no prompt {prompt_id} in this store")
            ranks = None if skip else json.dumps(ranks_from_order(order, tied, k))
            earlier = conn.execute(
                "SELECT created_at FROM rankings WHERE prompt_id = ? AND annotator = ?", (prompt_id, annotator)
            ).fetchone()
            if earlier is not None:
                raise Conflict(f"{annotator!r} already answered prompt {prompt_id} (at {earlier[0]})")
            conn.execute(
                "INSERT INTO rankings (prompt_id, annotator, submission_id, skipped, ranks, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (prompt_id, annotator, submission_id, int(skip), ranks, _now()),
            )
            conn.execute("DELETE FROM claims WHERE annotator = ? AND prompt_id = ?", (annotator, prompt_id))
            stored = conn.execute("SELECT * FROM rankings WHERE submission_id = ?", (submission_id,)).fetchone()
            return Submitted(_ranking_dict(stored), duplicate=False)

    def rankings(self, *, include_skipped: bool = True) -> list[dict[str, Any]]:
        """Every stored ranking, in the order they were committed."""
        with self._conn() as conn:
            where = "" if include_skipped else " WHERE NOT skipped"
            return [_ranking_dict(r) for r in conn.execute(f"SELECT * FROM rankings{where} ORDER BY id")]

    def export_records(self) -> tuple[list[dict[str, Any]], int]:
        """The rankings as records of the ``ranking`` data format (what ``instructkit rm``
        reads), and how many were left out.

        A record is ``{"prompt": [messages], "responses": [text, ...], "ranks": [int, ...]}``
        plus ``annotator``, ``ranked_at``, ``prompt_id`` and ``submission_id`` (ignored by the
        reader). Blank responses are left out of a record (the reader refuses empty content); a
        ranking left with no two different ranks is left out whole, as are skips.
        """
        records, left_out = [], 0
        with self._conn() as conn:
            conn.execute("BEGIN")  # one snapshot: prompts, responses and rankings agree
            try:
                for row in conn.execute("SELECT * FROM rankings WHERE NOT skipped ORDER BY id").fetchall():
                    prompt = self._prompt(conn, row["prompt_id"])
                    kept = [
                        (r["text"], rank)
                        for r, rank in zip(prompt["responses"], json.loads(row["ranks"]))
                        if r["text"].strip()
                    ]
                    if len({rank for _, rank in kept}) < 2:
                        left_out += 1
                        continue
                    dense = {rank: i for i, rank in enumerate(sorted({rank for _, rank in kept}))}
                    records.append(
                        {
                            "prompt": prompt["messages"],
                            "responses": [t for t, _ in kept],
                            "ranks": [dense[r] for _, r in kept],
                            "annotator": row["annotator"],
                            "ranked_at": row["created_at"],
                            "prompt_id": row["prompt_id"],
                            "submission_id": row["submission_id"],
                        }
                    )
            finally:
                conn.execute("COMMIT")
        return records, left_out


def _ranking_dict(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "prompt_id": row["prompt_id"],
        "annotator": row["annotator"],
        "submission_id": row["submission_id"],
        "skipped": bool(row["skipped"]),
        "ranks": None if row["ranks"] is None else json.loads(row["ranks"]),
        "created_at": row["created_at"],
    }


def check_annotator(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InputError("an annotator name is required", field="annotator")
    name = name.strip()
    if len(name) > MAX_ANNOTATOR_LENGTH:
        raise InputError(f"at most {MAX_ANNOTATOR_LENGTH} characters, got {len(name)}", field="annotator")
    _check_text(name, "annotator")
    return name


def _check_text(value: str, field: str) -> None:
    # JSON can carry a lone surrogate ("\ud800"), which SQLite cannot store as UTF-8.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError("not valid Unicode text", field=field) from None


def ranks_from_order(order: Sequence[int] | None, tied: Sequence[bool] | None, k: int) -> list[int]:
    """``ranks[i]`` (0 = best) of response i, from the order best first and the tie marks.

    ``order=[2, 0, 1], tied=[False, True, False]`` puts 2 and 0 first together and 1 after them:
    ``ranks == [0, 1, 0]``. Ranks are dense (0, 1, 2, ... with no gaps).
    """
    if order is None:
        raise InputError("expected the responses' order (or skip)", field="order")
    if sorted(order) != list(range(k)) or any(isinstance(i, bool) for i in order):
        raise InputError(f"expected each response index 0..{k - 1} exactly once, got {list(order)}", field="order")
    tied = [False] * k if tied is None else list(tied)
    if len(tied) != k or not all(isinstance(t, bool) for t in tied):
        raise InputError(f"expected {k} booleans, one per position", field="tied")
    if tied[0]:
        raise InputError("the first position has nothing above it to tie with", field="tied[0]")
    if all(tied[1:]):
        raise InputError("all responses are tied, so the ranking says nothing; skip the prompt instead", field="tied")
    ranks = [0] * k
    rank = -1
    for position, index in enumerate(order):
        if not tied[position]:
            rank += 1
        ranks[index] = rank
    return ranks


# ----------------------------------------------------------------------------------------------
# The two CLI commands


def create_label_store(
    prompts: str | Path,
    model: str,
    *,
    k: int = 4,
    out: str | Path,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 0.95,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    limit: int | None = None,
) -> dict[str, Any]:
    """``instructkit label create``: sample ``k`` responses to each prompt of ``prompts`` (records
    with a ``prompt``, a string or a message list, as PPO reads them) into a new store."""
    from instructkit.data.prompts import read_prompts
    from instructkit.datasets import resolve_data_path

    if k < 2:
        raise InputError(f"k must be at least 2 (a ranking compares responses), got {k}", field="k")
    if Path(out).exists():
        raise InputError("already exists; it may hold rankings, so choose another --out or remove it", file=str(out))
    source = resolve_data_path(prompts)
    records = read_prompts(source)[: limit or None]

    from instructkit.generation import generate
    from instructkit.models.loading import load_model_and_tokenizer

    lm, tokenizer = load_model_and_tokenizer(model)
    # Each prompt K times in one call: one seed covers the whole store, and the copies of a
    # prompt share batches (the sort by length keeps them together).
    messages = [[{"role": m.role, "content": m.content} for m in r.messages] for r in records]
    texts = generate(
        lm,
        tokenizer,
        [m for m in messages for _ in range(k)],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        seed=seed,
    )
    responses = [texts[i * k : (i + 1) * k] for i in range(len(records))]
    meta = {
        "model": str(model),
        "prompts_file": str(prompts),
        "k": k,
        "seed": seed,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
    }
    write_store(out, messages, responses, meta=meta)
    blank = sum(not t.strip() for t in texts)
    distinct = sum(len(set(r)) for r in responses)
    return {
        "store": str(out),
        "prompts": len(records),
        "k": k,
        "responses": len(texts),
        "blank_responses": blank,
        "duplicate_responses": len(texts) - distinct,
    }


def export_rankings(store: str | Path, out: str | Path) -> dict[str, Any]:
    """``instructkit label export``: the store's rankings as a ranking JSONL file, written whole
    (temporary file, then rename)."""
    records, left_out = LabelStore(store).export_records()
    if not records:
        raise InputError(
            "no rankings to export yet (rank some on the /rank page of `instructkit serve --label-store`)",
            file=str(store),
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    annotators = sorted({r["annotator"] for r in records})
    return {
        "out": str(out),
        "rankings": len(records),
        "left_out": left_out,
        "prompts": len({r["prompt_id"] for r in records}),
        "annotators": annotators,
    }
