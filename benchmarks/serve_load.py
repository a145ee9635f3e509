"""instructkit serve under load vs plain HF ``model.generate`` one request at a time.

    .venv/bin/python benchmarks/serve_load.py            # 32 clients x 32 tokens, then the table
    .venv/bin/python benchmarks/serve_load.py --quick    # 8 clients x 8 tokens (smoke run)

The same N chat prompts (all different) go, greedy with ``max_tokens`` new tokens each:

* **instructkit serve**: the server (``create_app`` under uvicorn on 127.0.0.1, ``--max-batch``
  rows batched continuously, ``max_queue`` large enough for every client) runs in a worker
  process; this process opens N streaming clients (httpx, ``stream: true`` with
  ``stream_options.include_usage`` for exact token counts) all at once.
* **HF generate, sequential**: a fresh worker process calls ``model.generate`` for one prompt
  after another, as a server without batching would; a streamer stamps each first new token.

Measured the same way for both, from the moment all requests are issued (t0):

* TTFT of request i: t0 to its first generated text (HF: the time it waited for requests
  before it, plus its own prefill and first token). p50 and p95 over the N requests.
* Throughput: all generated tokens (the server's usage counts; HF: tokens before eos) divided
  by the wall time from t0 until the last request finished.
* Errors: non-200 answers, error events or exceptions; lost: requests that never ended with
  ``data: [DONE]``. Same text: how many of the N server answers equal HF's greedy text (the
  batched forward can differ from the unbatched one in the last float bits, which can flip a
  near-tied greedy token).

Both workers load the model the same way (``load_model_and_tokenizer``; fp32 on CPU), run one
warm-up request first, and use torch's default thread count. Results also go to
``benchmarks/results/serve_load.json`` (``serve_load-quick.json`` with ``--quick``); the
machine line gives the 1-minute load average before and after, since on a shared CPU another
process's load shows up directly as lower tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import machine_info, markdown_table, run_worker, save_results, write_json_atomic

HERE = Path(__file__).resolve().parent
PACKAGES = ("instructkit", "torch", "transformers", "fastapi", "uvicorn", "httpx")
DEFAULT_MODEL = "smollm2-135m-instruct"

TOPICS = [
    "the moon",
    "coffee",
    "rivers",
    "bicycles",
    "volcanoes",
    "libraries",
    "honeybees",
    "winter",
    "chess",
    "lighthouses",
    "bread",
    "octopuses",
    "trains",
    "deserts",
    "violins",
    "glaciers",
    "tomatoes",
    "owls",
    "bridges",
    "thunderstorms",
    "paper",
    "whales",
    "gardens",
    "clocks",
    "mountains",
    "salt",
    "kites",
    "coral reefs",
    "maps",
    "candles",
    "penguins",
    "windmills",
]
STYLES = [
    "Write one sentence about {}.",
    "Explain {} to a child in two sentences.",
    "Give three facts about {}, as a short list.",
    "What is the most surprising thing about {}? Be brief.",
]


def prompts(n: int) -> list[list[dict]]:
    """N different one-turn chats of varied length."""
    return [
        [
            {
                "role": "user",
                "content": STYLES[i % len(STYLES)].format(TOPICS[i % len(TOPICS)])
                + ("" if i < len(TOPICS) else f" (variant {i // len(TOPICS)})"),
            }
        ]
        for i in range(n)
    ]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# ----------------------------------------------------------------------------------------------
# Workers (fresh processes)


def set_threads(threads: int) -> None:
    """torch's intra-op threads (0: torch's default). On a CPU other processes keep busy, fewer
    threads than cores avoids threads waiting on each other at every small op."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def worker_hf(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers.generation.streamers import BaseStreamer

    from instructkit.data.templates import encode_prompt
    from instructkit.generation import stop_tokens
    from instructkit.models.loading import load_model_and_tokenizer

    set_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()
    stop_ids, _ = stop_tokens(model, tokenizer, None, None)

    class FirstToken(BaseStreamer):
        """Stamps the first ``put`` after the prompt's (the first generated token)."""

        def __init__(self) -> None:
            self.calls, self.first = 0, None

        def put(self, value) -> None:
            self.calls += 1
            if self.calls == 2 and self.first is None:
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    def run(messages, streamer=None) -> list[int]:
        ids = torch.tensor([encode_prompt(tokenizer, messages)])
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.max_tokens,
                do_sample=False,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
                streamer=streamer,
            )
        new = out[0, ids.shape[1] :].tolist()
        cut = next((k for k, t in enumerate(new) if t in stop_ids), len(new))
        return new[:cut]

    run(prompts(1)[0])  # warm-up
    t0 = time.perf_counter()
    requests = []
    for messages in prompts(args.clients):
        streamer = FirstToken()
        tokens = run(messages, streamer)
        requests.append(
            {
                "ttft_s": streamer.first - t0,
                "done_s": time.perf_counter() - t0,
                "tokens": len(tokens),
                "text": tokenizer.decode(tokens, skip_special_tokens=True),
            }
        )
    return {"wall_s": time.perf_counter() - t0, "requests": requests, "torch_threads": torch.get_num_threads()}


def worker_serve(args: argparse.Namespace) -> None:
    """Serve until SIGTERM; write the port to ``--result`` once listening, the batch sizes the
    engine ran to ``--result``.stats at shutdown."""
    import threading

    import torch
    import uvicorn

    from instructkit.models.loading import load_model_and_tokenizer
    from instructkit.serve import create_app

    set_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model)
    app = create_app(model, tokenizer, args.model, max_batch=args.max_batch, max_queue=4 * args.clients)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit("the server did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    write_json_atomic(args.result, {"port": port})
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    thread.join()
    sizes = app.state.engine.step_sizes
    write_json_atomic(
        str(args.result) + ".stats",
        {"step_sizes": {str(k): v for k, v in sorted(sizes.items())}, "torch_threads": torch.get_num_threads()},
    )


# ----------------------------------------------------------------------------------------------
# Clients (this process)


async def one_client(http, url: str, messages: list[dict], max_tokens: int, t0: float) -> dict[str, Any]:
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result: dict[str, Any] = {"ttft_s": None, "done_s": None, "tokens": 0, "text": "", "error": None, "done": False}
    try:
        async with http.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                result["error"] = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    result["done"] = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result["error"] = chunk["error"]["message"]
                    continue
                if chunk.get("usage"):
                    result["tokens"] = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    piece = choice["delta"].get("content") or ""
                    if piece and result["ttft_s"] is None:
                        result["ttft_s"] = time.perf_counter() - t0
                    result["text"] += piece
    except Exception as exc:  # counted, not raised: the table reports errors
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["done_s"] = time.perf_counter() - t0
    return result


async def load(port: int, args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as http:
        await one_client(http, url, prompts(1)[0], args.max_tokens, time.perf_counter())  # warm-up
        t0 = time.perf_counter()
        requests = await asyncio.gather(*(one_client(http, url, m, args.max_tokens, t0) for m in prompts(args.clients)))
        return {"wall_s": time.perf_counter() - t0, "requests": list(requests)}


def run_server_load(args: argparse.Namespace) -> dict[str, Any]:
    log_dir = HERE / "results" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp,
        open(log_dir / "serve_load-serve.log", "w", encoding="utf-8") as log,
    ):
        port_file = Path(tmp) / "port.json"
        cmd = [sys.executable, __file__, "--worker", "serve", *settings_argv(args), "--result", str(port_file)]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            while not port_file.is_file():
                if proc.poll() is not None:
                    raise SystemExit(f"the server worker exited with {proc.returncode}; log: {log.name}")
                time.sleep(0.2)
            result = asyncio.run(load(json.loads(port_file.read_text())["port"], args))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        stats = Path(str(port_file) + ".stats")
        result.update(json.loads(stats.read_text()) if stats.is_file() else {})
    return result


# ----------------------------------------------------------------------------------------------
# Report


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    requests = result["requests"]
    ok = [r for r in requests if not r.get("error") and r.get("done", True)]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "requests": len(requests),
        "errors": sum(bool(r.get("error")) for r in requests),
        "lost": sum(not r.get("done", True) and not r.get("error") for r in requests),
        "tokens": tokens,
        "wall_s": round(result["wall_s"], 2),
        "tokens_per_s": round(tokens / result["wall_s"], 2),
        "ttft_p50_s": round(percentile(ttft, 50), 2) if ttft else None,
        "ttft_p95_s": round(percentile(ttft, 95), 2) if ttft else None,
        "mean_batch_rows": mean_batch(result.get("step_sizes")),
    }


def mean_batch(step_sizes: dict[str, int] | None) -> float | None:
    if not step_sizes:
        return None
    steps = sum(step_sizes.values())
    return round(sum(int(k) * v for k, v in step_sizes.items()) / steps, 2)


def report(results: dict[str, Any], machine: dict[str, Any], args: argparse.Namespace, same_text: int) -> str:
    s, h = results["serve"]["summary"], results["hf"]["summary"]
    headers = ["", "requests", "errors", "lost", "tokens", "wall s", "tokens/s", "TTFT p50 s", "TTFT p95 s"]
    rows = [
        [
            f"instructkit serve (max_batch {args.max_batch}, streaming)",
            s["requests"],
            s["errors"],
            s["lost"],
            s["tokens"],
            s["wall_s"],
            s["tokens_per_s"],
            s["ttft_p50_s"],
            s["ttft_p95_s"],
        ],
        [
            "HF generate, one request at a time",
            h["requests"],
            h["errors"],
            h["lost"],
            h["tokens"],
            h["wall_s"],
            h["tokens_per_s"],
            h["ttft_p50_s"],
            h["ttft_p95_s"],
        ],
    ]
    speedup = s["tokens_per_s"] / h["tokens_per_s"] if h["tokens_per_s"] else float("nan")
    return "\n".join(
        [
            f"{args.clients} concurrent streaming clients, {args.max_tokens} new tokens each, greedy, model {args.model}",
            "",
            markdown_table(headers, rows),
            "",
            f"throughput x{speedup:.2f}; server decode steps ran {s['mean_batch_rows']} rows on average (the 1-row "
            f"warm-up request included); "
            f"same text as HF greedy: {same_text}/{args.clients}",
            f"machine: {machine['cpu']}, {machine['usable_cpus']} usable CPUs, load average (1 min) "
            f"{machine['load_avg_1m']} before, {machine.get('load_avg_1m_after')} after; torch threads "
            f"{results['serve'].get('torch_threads')} (server), {results['hf'].get('torch_threads')} (HF)",
        ]
    )


def settings_argv(args: argparse.Namespace) -> list[str]:
    return [
        "--model",
        args.model,
        "--clients",
        str(args.clients),
        "--max-tokens",
        str(args.max_tokens),
        "--max-batch",
        str(args.max_batch),
        "--threads",
        str(args.threads),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model spec (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per request (default: %(default)s)")
    parser.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch (default: %(default)s)")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads in both workers (default 0: torch's default, one per core)",
    )
    parser.add_argument("--quick", action="store_true", help="8 clients x 8 tokens (smoke run)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/)")
    parser.add_argument("--worker", choices=("hf", "serve"), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.max_tokens = 8, 8
    if args.clients < 1 or args.max_tokens < 1 or args.max_batch < 1:
        parser.error("--clients, --max-tokens and --max-batch must be at least 1")

    if args.worker == "hf":
        write_json_atomic(args.result, worker_hf(args))
        return 0
    if args.worker == "serve":
        worker_serve(args)
        return 0

    from instructkit.models.loading import resolve

    resolve(args.model)  # convert the embedded GGUF once, here, so neither worker pays for it
    machine = machine_info(PACKAGES)
    results = {}
    print(f"serve: {args.clients} clients ...", file=sys.stderr, flush=True)
    results["serve"] = run_server_load(args)
    print(f"hf: {args.clients} requests one at a time ...", file=sys.stderr, flush=True)
    results["hf"] = run_worker(__file__, "hf", settings_argv(args))
    machine["load_avg_1m_after"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    for result in results.values():
        result["summary"] = summarise(result)
    same_text = sum(a["text"] == b["text"] for a, b in zip(results["serve"]["requests"], results["hf"]["requests"]))
    print(report(results, machine, args, same_text))

    out = args.out or HERE / "results" / ("serve_load-quick.json" if args.quick else "serve_load.json")
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "result", "out")}
    save_results(out, "serve_load", settings=settings, machine=machine, same_text=same_text, results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
