"""The label store and its commands: WAL, one transaction per ranking, concurrent annotators
(threads, processes, and a server killed with SIGKILL), the export `instructkit rm` reads, and
the ranking and runs endpoints."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from instructkit.cli import main
from instructkit.errors import InputError
from instructkit.serve.labels import (
    Conflict,
    LabelStore,
    NotFound,
    export_rankings,
    ranks_from_order,
    write_store,
)
from tests.conftest import REPO_ROOT
from tests.tiny import write_jsonl


def make_store(path: Path, prompts: int, k: int = 3) -> Path:
    messages = [[{"role": "user", "content": f"question {i}"}] for i in range(prompts)]
    responses = [[f"answer {i}.{j}" for j in range(k)] for i in range(prompts)]
    return write_store(path, messages, responses, meta={"k": k})


def rows(path: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


# ----------------------------------------------------------------------------------------------
# The store


def test_store_is_wal_and_appears_whole(tmp_path):
    path = make_store(tmp_path / "s.sqlite", prompts=2)
    store = LabelStore(path)
    assert store.journal_mode() == "wal"
    assert store.meta()["k"] == 3 and store.meta()["schema_version"] == 1
    assert store.prompt(1)["responses"] == [{"index": j, "text": f"answer 0.{j}"} for j in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.sqlite"]  # no temporary file left
    before = path.read_bytes()
    with pytest.raises(InputError, match="already exists"):
        make_store(path, prompts=1)
    assert path.read_bytes() == before
    (tmp_path / "junk.sqlite").write_text("not a database")
    with pytest.raises(InputError, match="not a label store"):
        LabelStore(tmp_path / "junk.sqlite")


def test_ranks_from_order_with_ties():
    """order [2, 0, 1, 3], tied [F, T, F, F]: 2 and 0 share rank 0, then 1, then 3."""
    assert ranks_from_order([2, 0, 1, 3], [False, True, False, False], 4) == [0, 1, 0, 2]
    assert ranks_from_order([1, 0], None, 2) == [1, 0]
    assert ranks_from_order([0, 1, 2], [False, False, True], 3) == [0, 1, 1]
    for order, tied, match in [
        ([0, 0, 1], None, "exactly once"),
        ([0, 1], None, "exactly once"),
        ([0, 1, 2], [True, False, False], "nothing above"),
        ([0, 1, 2], [False, True, True], "all responses are tied"),
        ([0, 1, 2], [False, True], "3 booleans"),
        (None, None, "order"),
    ]:
        with pytest.raises(InputError, match=match):
            ranks_from_order(order, tied, 3)


def test_a_ranking_is_one_transaction(tmp_path, monkeypatch):
    import instructkit.serve.labels as labels

    path = make_store(tmp_path / "s.sqlite", prompts=2)
    store = LabelStore(path)
    statements: list[str] = []
    connect = labels._connect

    def traced(p):
        conn = connect(p)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(labels, "_connect", traced)
    store.submit(submission_id="s1", prompt_id=1, annotator="ann", order=[1, 0, 2])
    writes = [s.split()[0] for s in statements if s.split()[0] in ("BEGIN", "COMMIT", "ROLLBACK", "INSERT", "DELETE")]
    assert writes == ["BEGIN", "INSERT", "DELETE", "COMMIT"]
    assert "BEGIN IMMEDIATE" in statements

    # A failure after the ranking's INSERT (its claim cannot be released) rolls the INSERT back.
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE claims")
    conn.close()
    with pytest.raises(sqlite3.OperationalError, match="claims"):
        store.submit(submission_id="s2", prompt_id=2, annotator="ann", order=[0, 1, 2])
    assert rows(path, "SELECT submission_id FROM rankings") == [("s1",)]


def test_retry_is_idempotent_and_a_second_answer_conflicts(tmp_path):
    store = LabelStore(make_store(tmp_path / "s.sqlite", prompts=2))
    first = store.submit(submission_id="a", prompt_id=1, annotator="ann", order=[2, 1, 0], tied=[False, True, False])
    again = store.submit(submission_id="a", prompt_id=1, annotator="ann", order=[2, 1, 0], tied=[False, True, False])
    assert not first.duplicate and again.duplicate and again.ranking == first.ranking
    assert first.ranking["ranks"] == [1, 0, 0] and first.ranking["annotator"] == "ann"
    with pytest.raises(Conflict, match="already answered"):
        store.submit(submission_id="b", prompt_id=1, annotator="ann", order=[0, 1, 2])
    with pytest.raises(Conflict, match="another ranking"):
        store.submit(submission_id="a", prompt_id=2, annotator="ann", order=[0, 1, 2])
    with pytest.raises(NotFound):
        store.submit(submission_id="c", prompt_id=99, annotator="ann", order=[0, 1, 2])
    other = store.submit(submission_id="d", prompt_id=1, annotator="bob", order=[0, 1, 2])  # others may rank it too
    assert not other.duplicate
    assert len(store.rankings()) == 2


def test_next_prompt_spreads_annotators_and_keeps_ones_place(tmp_path):
    store = LabelStore(make_store(tmp_path / "s.sqlite", prompts=3))
    a, b = store.next_prompt("ann"), store.next_prompt("bob")
    assert a["prompt"]["prompt_id"] != b["prompt"]["prompt_id"]  # each is claimed by the other
    assert store.next_prompt("ann")["prompt"]["prompt_id"] == a["prompt"]["prompt_id"]  # a reload: same one
    seen = []
    for n in range(3):
        step = store.next_prompt("ann")
        assert step["progress"] == {"total": 3, "prompts_ranked": n, "rankings": n, "ranked": n, "skipped": 0}
        pid = step["prompt"]["prompt_id"]
        seen.append(pid)
        store.submit(submission_id=f"ann{n}", prompt_id=pid, annotator="ann", order=[0, 1, 2], skip=n == 2)
    assert sorted(seen) == [1, 2, 3]
    done = store.next_prompt("ann")
    assert done["prompt"] is None and done["progress"]["ranked"] == 2 and done["progress"]["skipped"] == 1


WORKER = r"""
import json, sys, uuid
from instructkit.serve.labels import Conflict, LabelStore
store, annotator = LabelStore(sys.argv[1]), sys.argv[2]
while (step := store.next_prompt(annotator))["prompt"] is not None:
    pid, sid = step["prompt"]["prompt_id"], uuid.uuid4().hex
    order = list(range(len(step["prompt"]["responses"])))[::-1]
    try:
        for _ in range(2):  # the second send is a retry whose first answer was lost
            done = store.submit(submission_id=sid, prompt_id=pid, annotator=annotator, order=order)
            print(json.dumps([sid, pid, done.duplicate]), flush=True)
    except Conflict:
        print(json.dumps(["conflict", pid, None]), flush=True)
"""


def test_concurrent_annotators_lose_and_duplicate_nothing(tmp_path):
    """Threads and processes rank every prompt at once, two threads sharing one name (two tabs),
    each submission sent twice: one ranking per (prompt, annotator), all acknowledged ones kept."""
    prompts = 12
    path = make_store(tmp_path / "s.sqlite", prompts=prompts)
    acknowledged: list[tuple[str, int, bool | None]] = []
    lock = threading.Lock()

    def thread_worker(annotator: str) -> None:
        import uuid

        store = LabelStore(path)
        while (step := store.next_prompt(annotator))["prompt"] is not None:
            pid, sid = step["prompt"]["prompt_id"], uuid.uuid4().hex
            try:
                for _ in range(2):
                    done = store.submit(submission_id=sid, prompt_id=pid, annotator=annotator, order=[0, 2, 1])
                    with lock:
                        acknowledged.append((sid, pid, done.duplicate))
            except Conflict:
                pass

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(path), f"proc{i}"], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    threads = [threading.Thread(target=thread_worker, args=(name,)) for name in ["t0", "t1", "t2", "tab", "tab"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        acknowledged += [tuple(json.loads(line)) for line in out.splitlines() if not line.startswith('["conflict"')]

    stored = rows(path, "SELECT prompt_id, annotator, submission_id FROM rankings")
    annotators = {"t0", "t1", "t2", "tab", "proc0", "proc1"}
    assert Counter((p, a) for p, a, _ in stored) == {(p, a): 1 for p in range(1, prompts + 1) for a in annotators}
    stored_ids = {s for _, _, s in stored}
    firsts = [sid for sid, _, duplicate in acknowledged if not duplicate]
    assert len(firsts) == len(set(firsts)) == len(stored)  # each stored once, each first send "created"
    assert {sid for sid, _, _ in acknowledged} == stored_ids
    assert all(Counter(sid for sid, _, _ in acknowledged)[s] == 2 for s in stored_ids)  # the retry: a duplicate


# ----------------------------------------------------------------------------------------------
# Export


def test_export_is_what_the_reward_model_reads(tmp_path):
    from instructkit.data.encoders import as_rankings
    from instructkit.data.formats import load_records

    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    path = write_store(
        tmp_path / "s.sqlite",
        [prompt, [{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Yo"}]],
        [["red", "blue", "  ", "green"], ["a", "b", "c", "d"], ["x", "", "y", "z"]],
    )
    store = LabelStore(path)
    store.submit(submission_id="1", prompt_id=1, annotator="ann", order=[3, 2, 0, 1])
    store.submit(submission_id="2", prompt_id=2, annotator="ann", skip=True)
    store.submit(submission_id="3", prompt_id=3, annotator="ann", order=[1, 0, 2, 3], tied=[False, False, True, True])
    out = tmp_path / "rankings.jsonl"
    out.write_text("old\n")
    summary = export_rankings(path, out)
    # Prompt 1 ranks green 0, blank 1, red 2, blue 3; without the blank and renumbered densely:
    # red 1, blue 2, green 0. Prompt 2 was skipped. Prompt 3 ranks the blank 0 and x, y, z 1 (tied);
    # without the blank no pair is left, so it is left out whole.
    assert summary["rankings"] == 1 and summary["left_out"] == 1 and summary["annotators"] == ["ann"]
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["prompt"] == prompt and record["responses"] == ["red", "blue", "green"]
    assert record["ranks"] == [1, 2, 0] and record["annotator"] == "ann" and record["ranked_at"]
    loaded = load_records(out)
    assert loaded.format == "ranking"
    (ranking,) = as_rankings(loaded.records, str(out))
    assert [r[0].content for r in ranking.responses] == ["red", "blue", "green"] and ranking.ranks == [1, 2, 0]
    assert ranking.prompt[0].role == "system" and ranking.prompt[1].content == "Name a colour."
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rankings.jsonl", "s.sqlite"]

    empty = make_store(tmp_path / "empty.sqlite", prompts=1)
    with pytest.raises(InputError, match="no rankings"):
        export_rankings(empty, tmp_path / "none.jsonl")
    assert not (tmp_path / "none.jsonl").exists()


# ----------------------------------------------------------------------------------------------
# The commands


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tests.tiny import tiny_model_dir

    # initializer_range 0.5: varied tokens (at the default 0.02 a random model repeats "\n")
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", initializer_range=0.5)


def test_label_create_samples_k_seeded_responses(tiny, tmp_path, capsys):
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            {"prompt": "Say hi", "id": 1},
            {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say bye"}]},
            {"prompt": "Count to three"},
        ],
    )
    args = [
        "label",
        "create",
        "--prompts",
        str(prompts),
        "--model",
        str(tiny),
        "--k",
        "3",
        "--max-new-tokens",
        "8",
        "--seed",
        "5",
    ]
    assert main([*args, "--out", str(tmp_path / "a.sqlite")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["prompts"] == 3 and summary["responses"] == 9
    store = LabelStore(tmp_path / "a.sqlite")
    assert store.meta()["seed"] == 5 and store.meta()["k"] == 3 and store.meta()["model"] == str(tiny)
    assert store.prompt(2)["messages"] == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Say bye"},
    ]
    texts = [[r["text"] for r in store.prompt(i)["responses"]] for i in (1, 2, 3)]
    assert [len(t) for t in texts] == [3, 3, 3]
    assert len({t for ts in texts for t in ts}) > 1  # sampled, not one greedy answer repeated
    assert main([*args, "--out", str(tmp_path / "b.sqlite")]) == 0
    assert [[r["text"] for r in LabelStore(tmp_path / "b.sqlite").prompt(i)["responses"]] for i in (1, 2, 3)] == texts


@pytest.mark.parametrize(
    "content, extra, problem",
    [
        ('{"prompt": "ok"}\n{"question": "no prompt"}\n', [], "prompts.jsonl:2, field 'prompt': missing field"),
        ('{"prompt": "ok"}\n{"prompt": [{"role": "assistant", "content": "x"}]}\n', [], "prompts.jsonl:2"),
        ('{"prompt": "ok"}\n{not json\n', [], "prompts.jsonl:2: invalid JSON"),
        ('{"prompt": "ok"}\n', ["--k", "1"], "k must be at least 2"),
    ],
)
def test_label_create_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, content, extra, problem):
    (tmp_path / "prompts.jsonl").write_text(content)
    out = tmp_path / "out" / "store.sqlite"
    code = main(
        [
            "label",
            "create",
            "--prompts",
            str(tmp_path / "prompts.jsonl"),
            "--model",
            "no-such-model",
            "--out",
            str(out),
            *extra,
        ]
    )
    assert code == 2
    assert problem in capsys.readouterr().err
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_label_export_command(tmp_path, capsys):
    store = make_store(tmp_path / "s.sqlite", prompts=2)
    LabelStore(store).submit(submission_id="x", prompt_id=2, annotator="ann", order=[2, 0, 1])
    assert main(["label", "export", str(store), "--out", str(tmp_path / "r.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["rankings"] == 1
    assert json.loads((tmp_path / "r.jsonl").read_text())["ranks"] == [1, 2, 0]
    assert main(["label", "export", str(tmp_path / "missing.sqlite"), "--out", str(tmp_path / "m.jsonl")]) == 2
    assert "no such label store" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The endpoints, through Starlette's TestClient


@pytest.fixture(scope="module")
def tiny_lm():
    from tests.tiny import real_tokenizer, tiny_llama

    return tiny_llama(len(real_tokenizer()))


def client_for(model, **kwargs):
    from fastapi.testclient import TestClient

    from instructkit.serve import create_app
    from tests.tiny import real_tokenizer

    return TestClient(create_app(model, real_tokenizer(), "tiny", **kwargs))


def test_ranking_endpoints(tiny_lm, tmp_path):
    path = make_store(tmp_path / "s.sqlite", prompts=2)
    with client_for(tiny_lm, label_store=str(path), api_key="sekret") as client:
        auth = {"Authorization": "Bearer sekret"}
        assert client.get("/label/next", params={"annotator": "ann"}).status_code == 401
        step = client.get("/label/next", params={"annotator": "ann"}, headers=auth).json()
        pid = step["prompt"]["prompt_id"]
        assert step["progress"]["total"] == 2 and len(step["prompt"]["responses"]) == 3
        body = {
            "submission_id": "s1",
            "prompt_id": pid,
            "annotator": "ann",
            "order": [2, 1, 0],
            "tied": [False, False, True],
        }
        assert client.post("/label/rank", json=body).status_code == 401
        r = client.post("/label/rank", json=body, headers=auth)
        assert r.status_code == 201 and r.json()["ranking"]["ranks"] == [1, 1, 0]
        assert r.json()["progress"]["ranked"] == 1
        r = client.post("/label/rank", json=body, headers=auth)
        assert r.status_code == 200 and r.json()["duplicate"]
        r = client.post("/label/rank", json={**body, "submission_id": "s2"}, headers=auth)
        assert r.status_code == 409 and "already answered" in r.json()["error"]["message"]
        for bad, status in [
            ({"tied": [False, True, True]}, 400),
            ({"order": [0, 0, 1]}, 400),
            ({"prompt_id": 42}, 404),
            ({"colour": "red"}, 400),
            ({"annotator": ""}, 400),
            ({"annotator": "\ud800"}, 400),
            ({"prompt_id": 2**63}, 400),
        ]:
            r = client.post(
                "/label/rank",
                content=json.dumps({**body, "submission_id": "s3", **bad}),
                headers={**auth, "Content-Type": "application/json"},
            )
            assert r.status_code == status, (bad, r.text)
            assert r.json()["error"]["message"]
        assert len(LabelStore(path).rankings()) == 1
        progress = client.get("/label/progress", params={"annotator": "ann"}, headers=auth).json()
        assert progress == {"total": 2, "prompts_ranked": 1, "rankings": 1, "ranked": 1, "skipped": 0}
    with client_for(tiny_lm) as client:
        r = client.get("/label/next", params={"annotator": "ann"})
        assert r.status_code == 404 and "--label-store" in r.json()["error"]["message"]


def test_pages_are_served_from_this_origin_only(tiny_lm):
    from instructkit.serve.pages import STATIC

    with client_for(tiny_lm) as client:
        for path, marker in [("/", "chat.js"), ("/chat", "chat.js"), ("/rank", "rank.js"), ("/runs", "runs.js")]:
            r = client.get(path)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html") and marker in r.text
            assert "default-src 'self'" in r.headers["content-security-policy"]
        for asset in sorted(STATIC.iterdir()):
            r = client.get(f"/static/{asset.name}")
            assert r.status_code == 200 and r.content == asset.read_bytes()
            assert "http://" not in r.text and "https://" not in r.text and "//cdn" not in r.text
        for bad in ("../pages.py", "%2e%2e%2fpages.py", ".hidden.js", "missing.js"):
            assert client.get(f"/static/{bad}").status_code == 404
        paths = client.get("/openapi.json").json()["paths"]
        assert "/rank" not in paths and "/static/{name}" not in paths  # pages are not API
        assert {"/label/next", "/label/rank", "/label/progress", "/runs/list"} <= set(paths)


def test_runs_listing_and_files_stay_inside_the_folder(tiny_lm, tmp_path):
    from instructkit.serve.pages import list_runs

    runs = tmp_path / "runs"
    (runs / "quick" / "sft").mkdir(parents=True)
    (runs / "quick" / "summary.json").write_text(json.dumps({"recipe": "quick", "out": "runs/quick"}))
    (runs / "quick" / "report.html").write_text("<h1>report</h1>")
    (runs / "quick" / "sft" / "summary.json").write_text(
        json.dumps({"stage": "sft", "steps": 20, "loss": 0.25, "ok": True, "final": "x"})
    )
    (runs / "quick" / "sft" / "checkpoints" / "step-1").mkdir(parents=True)
    (runs / "quick" / "sft" / "checkpoints" / "step-1" / "config.yaml").write_text("a: 1\n")
    (runs / "quick" / "sft" / "train.py").write_text("print('x')")
    (runs / "quick" / ".secret.json").write_text("{}")
    (tmp_path / "secret.txt").write_text("outside")
    (runs / "quick" / "link.txt").symlink_to(tmp_path / "secret.txt")

    listed = {r["path"]: r for r in list_runs(runs)}
    assert set(listed) == {"quick", "quick/sft"}  # checkpoints are not runs
    assert listed["quick/sft"]["numbers"] == {"steps": 20, "loss": 0.25}  # numbers only, no booleans
    assert listed["quick/sft"]["stage"] == "sft" and listed["quick"]["stage"] == "recipe"
    assert listed["quick"]["files"] == ["report.html", "summary.json"]

    with client_for(tiny_lm, runs_dir=str(runs), api_key="k&y") as client:
        assert client.get("/runs/list").status_code == 401
        body = client.get("/runs/list", headers={"Authorization": "Bearer k&y"}).json()
        assert {r["path"] for r in body["runs"]} == {"quick", "quick/sft"}
        assert client.get("/runs/file/quick/report.html").status_code == 401
        client.cookies.set("instructkit_api_key", "k%26y")  # as the pages write it (URL-encoded)
        r = client.get("/runs/file/quick/report.html")
        assert r.status_code == 200 and r.text == "<h1>report</h1>"
        assert r.headers["content-security-policy"].startswith("sandbox")
        assert client.get("/runs/file/quick/sft/summary.json").json()["steps"] == 20
        for bad in [
            "../secret.txt",
            "quick/../../secret.txt",
            "%2e%2e/secret.txt",
            "quick/%2e%2e/%2e%2e/secret.txt",
            "quick/link.txt",
            "quick/.secret.json",
            "quick/sft/train.py",
            "quick/sft",
            "/etc/passwd",
            "%2fetc%2fpasswd",
        ]:
            r = client.get(f"/runs/file/{bad}")
            assert r.status_code == 404, bad
            assert "outside" not in r.text


# ----------------------------------------------------------------------------------------------
# kill -9 of the server while rankings are being submitted


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigkill_while_ranking_loses_no_acknowledged_ranking(tiny, tmp_path):
    import httpx

    path = make_store(tmp_path / "s.sqlite", prompts=400)
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "instructkit",
            "serve",
            "--model",
            str(tiny),
            "--port",
            str(port),
            "--label-store",
            str(path),
            "--runs",
            str(tmp_path),
        ],
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # the server loads torch and the model first
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        acknowledged: list[str] = []
        lock = threading.Lock()

        def client(annotator: str) -> None:
            import uuid

            with httpx.Client(base_url=base, timeout=10) as http:
                try:
                    while True:
                        step = http.get("/label/next", params={"annotator": annotator}).json()
                        body = {
                            "submission_id": uuid.uuid4().hex,
                            "prompt_id": step["prompt"]["prompt_id"],
                            "annotator": annotator,
                            "order": [1, 0, 2],
                        }
                        r = http.post("/label/rank", json=body)
                        if r.is_success:
                            with lock:
                                acknowledged.append(body["submission_id"])
                except httpx.TransportError:
                    return  # the server is gone

        clients = [threading.Thread(target=client, args=(f"c{i}",)) for i in range(4)]
        for c in clients:
            c.start()
        while len(acknowledged) < 60 and all(c.is_alive() for c in clients):
            time.sleep(0.01)
        server.send_signal(signal.SIGKILL)
        server.wait()
        for c in clients:
            c.join()
    finally:
        if server.poll() is None:
            server.kill()
        log.close()

    assert server.returncode == -signal.SIGKILL and len(acknowledged) >= 60
    assert rows(path, "PRAGMA integrity_check") == [("ok",)]
    stored = rows(path, "SELECT submission_id, prompt_id, annotator FROM rankings")
    assert set(acknowledged) <= {s for s, _, _ in stored}
    assert len({(p, a) for _, p, a in stored}) == len(stored)
    summary = export_rankings(path, tmp_path / "r.jsonl")
    assert summary["rankings"] == len(stored)
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == len(stored)
    assert os.path.getsize(path) > 0
