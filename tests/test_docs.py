"""Docs that run: every fenced block of README.md and docs/*.md is marked, and the marked-runnable
ones are executed, scaled down, so a command or snippet in the docs is one that works.

Markers. An HTML comment (invisible on GitHub) ends on the line just before the fence:

    <!-- docs-test: KIND [OPTION="VALUE" ...] -->

It may span lines; inside a value, a line break counts as a space.

    KIND    what the block is, and what the test does with it
    run     bash/sh/console/python: executed. Shell blocks line by line (a console block: only its
            `$ ` lines), each line must exit 0; Python blocks in the page's Python session (one
            interpreter per page, so a block sees the names earlier blocks of its page defined)
    skip    not executed; the reason follows in parentheses: <!-- docs-test: skip (needs a GPU) -->
    output  what a command prints, not a command. With cmd="...", that command is run (scaled)
            and every line of the block must appear in its output, numbers masked: the shape is
            checked, never the values
    text    shown as is, neither a command nor output: a layout, a rendering, an excerpt
    file    written to path="..." in every page's folder before anything runs: a config that a
            command of any page reads (YAML blocks get scale="key=value ..." merged in)
    data    a JSON record, or JSON lines, that must load as format="..." (format detection)

    OPTIONS of run (and of output's cmd):
    scale="ARGS"    appended to each instructkit/torchrun/python command line of the block, before
                    its comment: documented options that make it small (train.max_steps=1,
                    --limit 2, --max-new-tokens 4, model={tiny}, ...)
    scale.N="ARGS"  appended to the block's Nth command line only (N counts from 1)
    before="CMD"    run first (it must pass too): makes what the prose says you already have
    server="CMD"    a python block's server: CMD runs in the background from this block to the end
                    of the page (blocks naming the same CMD share it), and the block's
                    127.0.0.1:8000 is replaced by its address
    rank_as="A,B"   while the block's label-store server runs, annotators A and B rank every prompt
                    through the JSON API /rank uses (the people of step 2)
    xfail="REASON"  expected to fail today (strict: a pass fails the test, so the mark goes)

    Placeholders in values: {tiny} is a tiny random Llama with the default model's tokenizer
    (where docs say any model works), {quickstart} the overrides that scale the quickstart as the
    world ran it (QUICKSTART_SCALE). Values hold no double quote.

Where blocks run. Each page runs in its own temporary folder, a copy of one prepared world:
the repository's recipes/, scripts/ and benchmarks/ (symlinks), small data files under the names
the docs use (train.jsonl, pairs.jsonl, prompts.jsonl, held_out.jsonl, ...; see ``_write_data``),
every file block, a scaled quickstart run in runs/quickstart, the runs my_sft.yaml and my_rm.yaml
describe, and tiny models under the other run names the docs read (runs/ppo, runs/rm, ...).
An `instructkit serve` line is started in the background on a free port: it passes when /health
answers, and it is stopped at the end of its block. Other `instructkit ...` lines run in the
page's Python session through `instructkit.cli.main`, the function the console script calls
(a fresh interpreter per line would spend most of this test importing torch); anything else
(torchrun, python scripts, env-prefixed lines) runs in bash.

The checks: every fenced block is marked (an unmarked or mis-marked one fails
``test_every_block_is_marked``), at least 90% of the shell and Python blocks are `run`, each
`run`/`output cmd`/`data` block passes, and the README's "Training, briefly" commands leave the
quickstart's run folder byte-identical.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
SHELL = ("bash", "sh", "shell", "console")
PYTHON = ("python", "py")
KINDS = {  # kind -> the options it takes
    "run": {"scale", "before", "server", "rank_as", "xfail"},
    "skip": set(),
    "output": {"cmd", "scale", "xfail"},
    "text": set(),
    "file": {"path", "scale"},
    "data": {"format"},
}
RUNNABLE_SHARE = 0.9
BLOCK_TIMEOUT = 600
# The quickstart as every page's world has it: the same overrides wherever a doc runs it, so a
# rerun finds the same config (and skips what is finished) instead of a changed one.
QUICKSTART_SCALE = (
    "model={tiny} sft.train.max_steps=1 sft.data.limit=16 dpo.train.max_steps=1 dpo.data.limit=16 "
    "eval.limit=2 eval.max_new_tokens=4"
)

MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(.*?)\s*-->\s*$", re.S)
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
OPTION = re.compile(r'([\w.]+)="([^"]*)"')


# ----------------------------------------------------------------------------------------------
# Blocks and markers


@dataclasses.dataclass
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    heading: str  # the nearest heading above it
    kind: str | None = None
    reason: str = ""
    options: dict[str, str] = dataclasses.field(default_factory=dict)
    problem: str | None = None  # why the marker is invalid

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def parse_marker(block: Block, comment: str | None) -> None:
    if comment is None:
        block.problem = "no <!-- docs-test: ... --> marker on the line before the fence"
        return
    match = re.match(r"(\w+)\s*(?:\((.*)\))?\s*(.*)$", comment)
    kind, reason, rest = match.groups() if match else (comment, None, "")
    block.kind, block.reason = kind, reason or ""
    if kind not in KINDS:
        block.problem = f"unknown kind {kind!r} (expected one of {', '.join(KINDS)})"
        return
    block.options = dict(OPTION.findall(rest))
    leftover = OPTION.sub("", rest).strip()
    unknown = [k for k in block.options if k.split(".")[0] not in KINDS[kind]]
    if leftover or unknown:
        block.problem = f"cannot read {leftover or unknown} (a {kind} block takes {sorted(KINDS[kind]) or 'nothing'})"
    elif kind == "skip" and not block.reason.strip():
        block.problem = "skip needs a reason: <!-- docs-test: skip (why) -->"
    elif kind == "run" and block.lang not in SHELL + PYTHON:
        block.problem = f"only shell and Python blocks can run, not {block.lang or 'plain'} ones"
    elif kind == "file" and "path" not in block.options:
        block.problem = 'a file block needs path="..."'
    elif kind == "data" and ("format" not in block.options or block.lang != "json"):
        block.problem = 'a data block is a json block with format="..."'
    elif kind == "run" and "server" in block.options and block.lang not in PYTHON:
        block.problem = "server= is for python blocks (a shell block starts its own `instructkit serve`)"
    elif kind == "run" and block.lang in PYTHON and any(k.startswith("scale") for k in block.options):
        block.problem = "scale= appends to command lines; a python block has none (scale the file it reads)"


def _comment_before(lines: list[str], fence: int) -> str:
    """The HTML comment that ends on the line before ``fence`` (one line or several), or ''."""
    end = fence - 1
    if end < 0 or not lines[end].rstrip().endswith("-->"):
        return ""
    start = next((j for j in range(end, -1, -1) if "<!--" in lines[j]), end)
    return " ".join(line.strip() for line in lines[start : end + 1])


def parse_page(page: str) -> list[Block]:
    lines = (REPO / page).read_text(encoding="utf-8").splitlines()
    blocks, heading, i = [], "", 0
    while i < len(lines):
        if lines[i].startswith("#"):
            heading = lines[i].lstrip("#").strip()
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        indent, lang = fence.groups()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), len(lines))
        body = textwrap.dedent(
            "\n".join(line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : end])
        )
        block = Block(page, i + 1, lang.lower(), body + "\n", heading)
        comment = MARKER.match(_comment_before(lines, i))
        parse_marker(block, comment.group(1) if comment else None)
        blocks.append(block)
        i = end + 1
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in parse_page(page)]


def test_every_block_is_marked():
    problems = [f"{b.id} ({b.lang or 'plain'}, under '{b.heading}'): {b.problem}" for b in ALL_BLOCKS if b.problem]
    assert not problems, "fenced blocks without a valid docs-test marker (see tests/test_docs.py):\n" + "\n".join(
        problems
    )


def test_nearly_every_shell_and_python_block_runs():
    code = [b for b in ALL_BLOCKS if b.lang in SHELL + PYTHON]
    runs = [b for b in code if b.kind == "run"]
    skipped = "\n".join(f"  {b.id}: {b.kind} {b.reason}" for b in code if b.kind != "run")
    assert code and len(runs) / len(code) >= RUNNABLE_SHARE, (
        f"{len(runs)} of {len(code)} shell and Python blocks run (need {RUNNABLE_SHARE:.0%}); not run:\n{skipped}"
    )


def test_the_marker_checks_can_fail():
    """The checks above are only as good as the parser: feed it what they must catch."""

    def marked(comment: str | None, lang: str = "bash") -> str | None:
        block = Block("x.md", 1, lang, "true\n", "")
        parse_marker(block, comment)
        return block.problem

    assert marked(None) and marked("skip") and marked("runn") and marked('run scael="x"')
    assert marked("run", lang="json") and marked("file") and marked('data format="x"', lang="yaml")
    assert marked('run scale="--limit 2"', lang="python") and marked('run server="x"')
    assert marked("skip (a GPU)") is None and marked('run scale.2="--limit 2"') is None


def test_the_runner_can_fail(tmp_path):
    """A block passes only when every line exits 0, and an output block only when its lines are
    in the command's output (numbers aside)."""
    page = Page("x.md", tmp_path, World(tmp_path, tmp_path, []))
    assert page._run(Block("x.md", 1, "bash", "true   # fine\n", "")).ok
    assert not page._run(Block("x.md", 1, "bash", "true\nfalse\ntrue\n", "")).ok
    shown = Block("x.md", 1, "", "model  acc\nbase   0.500\n", "", kind="output", options={"cmd": "echo x"})
    assert not page._run(shown).ok
    shown.options["cmd"] = "printf 'model acc\\nbase -1.25\\n'"
    assert page._run(shown).ok


# ----------------------------------------------------------------------------------------------
# Command lines


def command_lines(block: Block) -> list[str]:
    """The block's commands: continuation lines joined, blank and comment lines dropped."""
    raw = block.text.splitlines()
    if block.lang == "console":
        raw = [line[2:] for line in raw if line.startswith("$ ")]
    out, pending = [], ""
    for line in raw:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(line.strip())
    return out


def split_comment(line: str) -> tuple[str, str]:
    """``cmd args  # note`` -> (``cmd args``, ``# note``), a ``#`` inside quotes left alone."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i:]
    return line, ""


def scaled(line: str, *extra: str) -> str:
    command, _ = split_comment(line)
    return " ".join([command, *(e for e in extra if e)])


def program(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """Leading VAR=value assignments, and the command words after them."""
    env = {}
    while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


def scalable(line: str) -> bool:
    _, words = program(shlex.split(split_comment(line)[0]))
    return bool(words) and (words[0] in ("instructkit", "torchrun") or words[0].endswith("python"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# The page's Python session


WORKER = r"""
import contextlib, io, json, os, sys, traceback
reply = os.fdopen(int(sys.argv[1]), "w")
namespace = {"__name__": "__main__"}
for line in sys.stdin:
    request = json.loads(line)
    out, status = io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            if request["op"] == "python":
                exec(compile(request["code"], request["name"], "exec"), namespace)
            else:
                from instructkit.cli import main
                status = main(request["argv"])
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except BaseException:
            traceback.print_exc()
            status = 1
    reply.write(json.dumps({"status": status, "output": out.getvalue()}) + "\n")
    reply.flush()
"""


def docs_env(folder: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": "",
        "OMP_NUM_THREADS": "1",  # the cores are shared
        "PET_MASTER_PORT": str(free_port()),
    }  # torchrun's port, away from other runs


class Session:
    """One Python interpreter in a folder: runs code blocks and `instructkit` argv in turn."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.proc = folder, None

    def _start(self) -> None:
        read, write = os.pipe()
        # open for the interpreter's life, closed with it (close())
        self.log = open(self.folder / ".docs-test-session.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(write)],
            cwd=self.folder,
            stdin=subprocess.PIPE,
            stdout=self.log,
            stderr=self.log,
            pass_fds=(write,),
            env=docs_env(self.folder),
            text=True,
        )
        os.close(write)
        self.replies = os.fdopen(read)

    def call(self, request: dict, timeout: float = BLOCK_TIMEOUT) -> tuple[int, str]:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.replies], [], [], timeout)
        line = self.replies.readline() if ready else ""
        if not line:  # timed out or died: the next call starts afresh
            self.close()
            return 124, f"(no answer within {timeout:.0f} s; the session was stopped)"
        reply = json.loads(line)
        return reply["status"], reply["output"]

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            self.replies.close()
            self.log.close()


@dataclasses.dataclass
class Outcome:
    ok: bool
    log: list[str]
    output: str = ""
    quickstart: tuple[str, str] = ("", "")  # digest of runs/quickstart before and after


class Server:
    """`instructkit serve ...` in the background until stopped; up once /health answers."""

    def __init__(self, line: str, folder: Path) -> None:
        self.port = free_port()
        self.line = scaled(line, f"--host 127.0.0.1 --port {self.port}")  # the last --host/--port wins
        env, words = program(shlex.split(self.line))
        self.proc = subprocess.Popen(
            words,
            cwd=folder,
            env={**docs_env(folder), **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def wait_up(self, timeout: float = 180) -> tuple[bool, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                return response.status == 200, json.loads(response.read())["status"]
            time.sleep(0.5)
        return False, "exited" if self.proc.poll() is not None else "no answer on /health"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> str:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.stdout.read()[-3000:]


def rank_everything(url: str, annotators: list[str]) -> int:
    """What the people of label.md's step 2 do on /rank, through the page's JSON API: each one
    ranks every prompt they are handed, in the order the responses came, until none are left."""

    def call(path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    ranked = 0
    for name in annotators:
        while (prompt := call(f"/label/next?annotator={name}")["prompt"]) is not None:
            order = [r["index"] for r in prompt["responses"]]
            call(
                "/label/rank",
                {
                    "submission_id": f"{name}-{prompt['prompt_id']}",
                    "prompt_id": prompt["prompt_id"],
                    "annotator": name,
                    "order": order,
                },
            )
            ranked += 1
    return ranked


def tree_digest(folder: Path) -> str:
    """Every file's path and bytes under ``folder``, as one hash ('' when it does not exist)."""
    if not folder.is_dir():
        return ""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


class Page:
    """A page's folder and Python session; its blocks run once, in order."""

    def __init__(self, name: str, folder: Path, world: World) -> None:
        self.name, self.folder, self.world = name, folder, world
        self.blocks = [b for b in ALL_BLOCKS if b.page == name]
        self.session = Session(folder)
        self.outcomes: dict[int, Outcome] = {}
        self.servers: dict[str, Server] = {}  # server= CMD -> its server, up until the page closes

    def close(self) -> None:
        self.session.close()
        for server in self.servers.values():
            server.stop()

    def outcome(self, block: Block) -> Outcome:
        for earlier in self.blocks:
            if earlier.line <= block.line and earlier.line not in self.outcomes and is_checked(earlier):
                before = tree_digest(self.folder / "runs" / "quickstart")
                try:
                    outcome = self._run(earlier)
                except Exception:  # a harness step that broke (an HTTP error, say) fails the block, not the page
                    import traceback

                    outcome = Outcome(False, [traceback.format_exc()])
                outcome.quickstart = (before, tree_digest(self.folder / "runs" / "quickstart"))
                self.outcomes[earlier.line] = outcome
        return self.outcomes[block.line]

    def expand(self, text: str) -> str:
        return text.replace("{quickstart}", QUICKSTART_SCALE).replace("{tiny}", str(self.world.tiny))

    def _run(self, block: Block) -> Outcome:
        log: list[str] = []
        if "before" in block.options and not self.command(self.expand(block.options["before"]), log)[0]:
            return Outcome(False, log)
        if block.kind == "data":
            return check_data(block)
        if block.kind == "output":
            command = scaled(self.expand(block.options["cmd"]), self.expand(block.options.get("scale", "")))
            ok, output = self.command(command, log)
            missing = [line for line in block.text.splitlines() if line.strip() and mask(line) not in mask(output)]
            log += [f"not in the output (numbers masked): {line!r}" for line in missing]
            return Outcome(ok and not missing, log, output)
        if block.lang in PYTHON:
            return self._python(block, log)
        return self._shell(block, log)

    def _python(self, block: Block, log: list[str]) -> Outcome:
        code, up = block.text, True
        if "server" in block.options:
            command = self.expand(block.options["server"])
            if command not in self.servers:
                self.servers[command] = Server(command, self.folder)
            server = self.servers[command]
            up, status = server.wait_up()
            log.append(f"server {server.line}: {status}")
            code = code.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
        status, output = self.session.call({"op": "python", "code": code, "name": block.id})
        log.append(f"python block -> {status}\n{output[-3000:]}")
        return Outcome(status == 0 and up, log, output)

    def _shell(self, block: Block, log: list[str]) -> Outcome:
        servers, ok, outputs = [], True, []
        try:
            for n, line in enumerate(command_lines(block), start=1):
                extra = [block.options.get("scale", ""), block.options.get(f"scale.{n}", "")] if scalable(line) else []
                line = self.expand(scaled(line, *extra))
                _, words = program(shlex.split(line))
                if words[:2] == ["instructkit", "serve"]:
                    server = Server(line, self.folder)
                    servers.append(server)
                    up, status = server.wait_up()
                    log.append(f"$ {server.line} &  -> /health: {status}")
                    if up and "rank_as" in block.options:
                        ranked = rank_everything(server.url, block.options["rank_as"].split(","))
                        log.append(f"   ranked {ranked} prompts through /label")
                    ok &= up
                    continue
                passed, output = self.command(line, log)
                ok &= passed
                outputs.append(output)
        finally:
            for server in servers:
                log.append(server.stop())
        return Outcome(ok, log, "\n".join(outputs))

    def command(self, line: str, log: list[str]) -> tuple[bool, str]:
        env, words = program(shlex.split(line))
        plain = words[:1] == ["instructkit"] and not env and not re.search(r"[|&;<>$`]", line)
        if plain:
            status, output = self.session.call({"op": "cli", "argv": words[1:]})
        else:
            try:
                proc = subprocess.run(
                    ["bash", "-c", line],
                    cwd=self.folder,
                    env=docs_env(self.folder),
                    capture_output=True,
                    text=True,
                    timeout=BLOCK_TIMEOUT,
                )
                status, output = proc.returncode, proc.stdout + proc.stderr
            except subprocess.TimeoutExpired as exc:
                status, output = 124, f"timed out after {exc.timeout} s"
        log.append(f"$ {line}  -> exit {status}\n{output[-3000:]}")
        return status == 0, output


def is_checked(block: Block) -> bool:
    if block.problem is not None:
        return False
    return block.kind in ("run", "data") or (block.kind == "output" and "cmd" in block.options)


def mask(text: str) -> str:
    """Numbers become N and runs of spaces one space: the shape of an output, not its values."""
    return "\n".join(" ".join(re.sub(r"-?\d+(\.\d+)?", "N", line).split()) for line in text.splitlines())


def check_data(block: Block) -> Outcome:
    from instructkit.data.formats import load_records

    try:
        rows = [json.loads(block.text)]
    except json.JSONDecodeError:
        rows = [json.loads(line) for line in block.text.splitlines() if line.strip()]
    folder = Path(os.environ.get("TMPDIR", "/tmp"))
    path = folder / f"docs-test-{os.getpid()}-{block.line}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    try:
        loaded = load_records(path)
    except Exception as exc:  # an InputError is the finding; report it as the block's failure
        return Outcome(False, [f"does not load: {exc}"])
    finally:
        path.unlink()
    expected = block.options["format"]
    return Outcome(loaded.format == expected, [f"detected {loaded.format}, the doc says {expected}"])


# ----------------------------------------------------------------------------------------------
# The world every page starts from


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _shipped(name: str, split: str, n: int) -> list[dict]:
    from instructkit.datasets import shipped_path

    return [json.loads(line) for line in shipped_path(name, split).read_text(encoding="utf-8").splitlines()[:n]]


def _write_data(folder: Path, shared_data: Path) -> None:
    """The files the docs name, small, from the shipped datasets and the shared data folder."""
    train, test = _shipped("extract", "train", 32), _shipped("extract", "test", 8)
    for name in ("train.jsonl", "my_data.jsonl", "sft_data.jsonl"):
        _write_jsonl(folder / name, train)
    _write_jsonl(folder / "val.jsonl", _shipped("extract", "val", 8))
    for name in ("test.jsonl", "held_out.jsonl"):
        _write_jsonl(folder / name, test)
    _write_jsonl(folder / "pairs.jsonl", _shipped("extract_prefs", "train", 24))
    for name in ("pairs_val.jsonl", "pairs_test.jsonl"):
        _write_jsonl(folder / name, _shipped("extract_prefs", "val", 8))
    _write_jsonl(folder / "prompts.jsonl", _shipped("extract_prompts", "train", 8))
    # responses made elsewhere: the references themselves, keyed by position
    _write_jsonl(
        folder / "vllm_outputs.jsonl",
        [{"key": i, "response": r["messages"][-1]["content"]} for i, r in enumerate(test)],
    )
    ifeval = (shared_data / "ifeval" / "input_data.jsonl").read_text(encoding="utf-8").splitlines()[:4]
    (folder / "input_data.jsonl").write_text("\n".join(ifeval) + "\n", encoding="utf-8")
    rows = [{"question": r["messages"][1]["content"], "answer": r["messages"][2]["content"]} for r in train]
    (folder / "train.csv").write_text(
        "question,answer\n" + "".join(f"{json.dumps(r['question'])},{json.dumps(r['answer'])}\n" for r in rows),
        encoding="utf-8",
    )
    speakers = {"user": "me", "assistant": "bot"}
    _write_jsonl(
        folder / "chats.jsonl",
        [
            {
                "dialog": [
                    {"speaker": speakers[m["role"]], "text": m["content"]}
                    for m in r["messages"]
                    if m["role"] in speakers
                ]
            }
            for r in train
        ],
    )
    shutil.copytree(shared_data / "peers" / "llama-factory", folder / "data", ignore=shutil.ignore_patterns("mllm*"))


def _write_file_block(block: Block, folder: Path, tiny: Path) -> None:
    import yaml

    text = block.text
    if "scale" in block.options:
        from instructkit.config import merge, parse_overrides

        overrides = block.options["scale"].replace("{tiny}", str(tiny)).split()
        text = yaml.safe_dump(merge(yaml.safe_load(text), parse_overrides(overrides)), sort_keys=False)
    path = folder / block.options["path"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@dataclasses.dataclass
class World:
    folder: Path
    tiny: Path
    problems: list[str]  # world steps that failed: every page that needs them fails too


def build_world(folder: Path, shared_data: Path) -> World:
    from tests.tiny import real_tokenizer, tiny_model_dir

    folder.mkdir(parents=True)
    for name in ("recipes", "scripts", "benchmarks"):
        (folder / name).symlink_to(REPO / name)
    _write_data(folder, shared_data)
    tiny = tiny_model_dir(folder.parent / "tiny")
    reward = folder.parent / "reward"
    _tiny_reward_model(reward, real_tokenizer())
    for block in ALL_BLOCKS:
        if block.kind == "file" and block.problem is None:
            _write_file_block(block, folder, tiny)
    world = World(folder, tiny, [])
    session, log = Session(folder), []
    page = Page("(world)", folder, world)
    page.session = session
    # runs the docs read: the quickstart, and the runs sft.md and rm.md configure
    steps = [
        scaled("instructkit run", page.expand("{quickstart}")),
        "instructkit sft --config my_sft.yaml",
        "instructkit rm --config my_rm.yaml",
    ]
    for step in steps:
        if not page.command(step, log)[0]:
            world.problems.append(log[-1])
    session.close()
    # any model will do under these names (eval.md reads them as "your PPO run", ...)
    for name, source in (("runs/sft", tiny), ("runs/ppo", tiny), ("runs/rlvr/ppo", tiny), ("runs/rm", reward)):
        shutil.copytree(source, folder / name)
    return world


def _tiny_reward_model(path: Path, tokenizer) -> None:
    """A one-label sequence classifier on the tiny Llama: eval.md says any such model judges."""
    import torch
    from transformers import LlamaForSequenceClassification

    from tests.tiny import tiny_llama_config

    torch.manual_seed(0)
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = tiny_llama_config(len(tokenizer), num_labels=1, **ids)
    LlamaForSequenceClassification(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="session")
def pages(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("docs")
    world = build_world(root / "world", shared_data)
    opened: dict[str, Page] = {}

    def page(name: str) -> Page:
        if name not in opened:
            # Blocks run page by page: a page left behind is closed and its folder (runs and
            # checkpoints, over a GB for some pages) removed. The README's stays: the last test reads it.
            for done in [n for n in opened if n != "README.md"]:
                opened.pop(done).close()
                shutil.rmtree(root / done.replace("/", "_"), ignore_errors=True)
            folder = root / name.replace("/", "_")
            shutil.copytree(world.folder, folder, symlinks=True)
            opened[name] = Page(name, folder, world)
        return opened[name]

    page.world = world
    yield page
    for p in opened.values():
        p.close()


# ----------------------------------------------------------------------------------------------
# The tests that run the docs


def _param(block: Block):
    marks = [pytest.mark.slow]
    if "xfail" in block.options:
        marks.append(pytest.mark.xfail(reason=block.options["xfail"], strict=True))
    return pytest.param(block, id=block.id, marks=marks)


@pytest.mark.parametrize("block", [_param(b) for b in ALL_BLOCKS if is_checked(b) or b.kind == "skip"])
def test_docs_block(pages, block):
    if block.kind == "skip":
        pytest.skip(f"marked skip: {block.reason}")
    page = pages(block.page)
    assert not page.world.problems, "the docs world could not be built:\n" + "\n".join(page.world.problems)
    outcome = page.outcome(block)
    assert outcome.ok, f"{block.id} ({block.lang}, under '{block.heading}') failed:\n" + "\n".join(outcome.log)


@pytest.mark.slow
def test_training_briefly_leaves_the_quickstart_run_untouched(pages):
    """The README's training commands right after a quickstart run write their own run folders:
    every file of runs/quickstart has the same bytes after them as before."""
    page = pages("README.md")
    (block,) = [b for b in page.blocks if b.heading == "Training, briefly" and b.lang in SHELL]
    outcome = page.outcome(block)
    before, after = outcome.quickstart
    assert before, "no quickstart run folder before the training commands"
    assert outcome.ok, "\n".join(outcome.log)
    assert after == before, "the training commands changed files in runs/quickstart"
