"""Plumbing shared by the benchmarks: memory probes, worker subprocesses, machine facts, tables.

A benchmark runs each framework in a fresh worker process (so peak memory is not shared), the
worker writes its measurements as JSON to a file the parent names, and the parent prints one
table. Nothing here imports torch, so the parent stays light.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


# ----------------------------------------------------------------------------------------------
# Memory


def rss_mib() -> float:
    """Resident set size of this process now."""
    import psutil  # a dependency of accelerate, so always there

    return psutil.Process().memory_info().rss / MIB


def max_rss_mib() -> float:
    """Peak resident set size of this process so far (``getrusage``; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024


class MemoryProbe:
    """RSS over a training window: the baseline when it starts, the peak while it runs.

    ``ru_maxrss`` is exact but covers the whole process, model loading included. If it grew
    during the window, the window set the process peak and that is the training peak. If not
    (loading peaked higher), the training peak comes from a thread that samples RSS every
    ``interval`` seconds, which can miss a short spike.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled_peak = 0.0
        self.baseline = self.max_before = self.max_after = 0.0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._sampled_peak = max(self._sampled_peak, rss_mib())

    def start(self) -> None:
        self.baseline = rss_mib()
        self.max_before = max_rss_mib()
        self._sampled_peak = self.baseline
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._sampled_peak = max(self._sampled_peak, rss_mib())
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.max_after = max_rss_mib()

    def result(self) -> dict[str, Any]:
        exact = self.max_after > self.max_before
        train_peak = self.max_after if exact else self._sampled_peak
        return {
            "rss_baseline_mib": round(self.baseline, 1),
            "peak_rss_mib": round(self.max_after, 1),
            "train_peak_rss_mib": round(train_peak, 1),
            "peak_above_baseline_mib": round(train_peak - self.baseline, 1),
            "train_peak_source": "ru_maxrss" if exact else "sampled",
        }


# ----------------------------------------------------------------------------------------------
# Time


class StepClock:
    """Wall and process-CPU seconds from ``start()`` to the end of each step.

    CPU seconds (all threads of the process) move far less than wall seconds when other
    processes share the CPU, so they help read a run taken on a busy machine. Work that a
    framework does inside a step but that the benchmark leaves out (a checkpoint write) is
    timed with :meth:`excluded` and subtracted.
    """

    def __init__(self) -> None:
        self._wall0 = self._cpu0 = 0.0
        self._skipped_wall = self._skipped_cpu = 0.0
        self.step_end_s: list[float] = []
        self.step_end_cpu_s: list[float] = []

    def start(self) -> None:
        self._wall0, self._cpu0 = time.perf_counter(), time.process_time()

    def stamp(self) -> None:
        self.step_end_s.append(time.perf_counter() - self._wall0 - self._skipped_wall)
        self.step_end_cpu_s.append(time.process_time() - self._cpu0 - self._skipped_cpu)

    @contextlib.contextmanager
    def excluded(self):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self._skipped_wall += time.perf_counter() - wall
            self._skipped_cpu += time.process_time() - cpu


# ----------------------------------------------------------------------------------------------
# Worker processes


def run_worker(script: str | Path, name: str, args: list[str]) -> dict[str, Any]:
    """Run ``python SCRIPT --worker NAME ARGS --result FILE`` in a fresh process; return its JSON.

    The worker's own output (library logs, warnings) is kept in ``benchmarks/results/logs/`` and
    its tail is shown if it fails.
    """
    log_dir = Path(__file__).resolve().parent / "results" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{Path(script).stem}-{name}.log"
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), "--worker", name, *args, "--result", str(result_path)]
        started = time.perf_counter()
        with open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
        if proc.returncode != 0 or not result_path.is_file():
            tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
            print("\n".join(tail), file=sys.stderr)
            raise SystemExit(f"worker '{name}' failed with exit status {proc.returncode}; log: {log_path}")
        result = json.loads(result_path.read_text())
    result["worker_wall_s"] = round(time.perf_counter() - started, 1)
    result["log"] = str(log_path)
    return result


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON via a temporary file and a rename, so a reader never sees half a file."""
    from instructkit.fileio import atomic_write_json  # stdlib only: the parent stays light

    atomic_write_json(path, data)


def save_results(path: str | Path, benchmark: str, **fields: Any) -> None:
    """A benchmark's results file: its name, the given fields and when it was made; says where."""
    write_json_atomic(path, {"benchmark": benchmark, **fields, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    print(f"\nresults: {path}", file=sys.stderr)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(packages: tuple[str, ...]) -> dict[str, Any]:
    """CPU, load and library versions: what a reader needs to judge a timing."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def machine_line(machine: dict[str, Any]) -> str:
    """The line under a table that says where it was measured (:func:`machine_info`'s facts)."""
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    return (
        f"machine: {machine['cpu']}, {machine['usable_cpus']} usable CPUs, "
        f"load {machine['load_avg_1m']} before the run; {versions}"
    )


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table; numbers right-aligned, text left-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) for i in range(len(headers))]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if n else ("-" * (w + 2)) for w, n in zip(widths, numeric)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


# ----------------------------------------------------------------------------------------------
# Models


def trainable_hash(model) -> str:
    """SHA-256 of the trainable parameters (names and values): equal hashes, equal adapters."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def instructkit_fair_sections(
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    betas: tuple[float, float],
    weight_decay: float,
    max_grad_norm: float,
    **extra_train: Any,
) -> dict[str, Any]:
    """The ``optim`` and ``train`` sections of an instructkit stage config set up as
    :func:`trl_fair_args` sets up TRL: AdamW, constant lr without warm-up, fp32 on CPU, no
    gradient checkpointing, no eval, no saving, logging every step. ``extra_train`` adds keys
    (DPO turns dropout off, as TRL's DPOTrainer does)."""
    optim = {
        "name": "adamw",
        "lr": lr,
        "betas": list(betas),
        "weight_decay": weight_decay,
        "scheduler": "constant",
        "warmup_steps": 0,
        "max_grad_norm": max_grad_norm,
    }
    train = {
        "batch_size": batch_size,
        "grad_accum": 1,
        "max_steps": steps,
        "seed": seed,
        "eval_every": 0,
        "save_every": 0,
        "log_every": 1,
        "dtype": "fp32",
        "device": "cpu",
        "gradient_checkpointing": False,
        "progress": False,
        **extra_train,
    }
    return {"optim": optim, "train": train}


def trl_fair_args(
    config_cls,
    *,
    out: str,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    max_length: int,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    max_grad_norm: float,
    **extra: Any,
):
    """A TRL config (SFTConfig, DPOConfig, ...) set up as instructkit trains: fp32 on CPU, no
    gradient checkpointing, torch AdamW (not fused), constant lr without warm-up, the batches in
    the order the caller's dataset already has, no eval, no saving, logging every step."""
    import dataclasses

    # TRL defaults gradient checkpointing on; transformers 5.2x renamed the field (the old name
    # still works but warns), so set whichever this version has.
    fields = {f.name for f in dataclasses.fields(config_cls)}
    no_checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return config_cls(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",  # transformers 5 defaults to the fused kernel; instructkit's is not
        adam_beta1=betas[0],
        adam_beta2=betas[1],
        adam_epsilon=eps,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        seed=seed,
        data_seed=seed,
        bf16=False,
        fp16=False,
        use_cpu=True,
        **{no_checkpointing: False},
        max_length=max_length,
        padding_free=False,
        train_sampling_strategy="sequential",  # the order is instructkit's, set by the caller
        dataloader_num_workers=0,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        **extra,
    )


def measure_callback(seen: dict[str, Any], probe: MemoryProbe, clock: StepClock):
    """A transformers TrainerCallback that hashes the starting adapter, and runs the memory
    probe and the step clock over the training loop."""
    from transformers import TrainerCallback

    class Measure(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["init_hash"] = trainable_hash(model)
            probe.start()
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            clock.stamp()

        def on_train_end(self, args, state, control, **kwargs):
            probe.stop()

    return Measure()


def timed_window(r: dict[str, Any]) -> dict[str, Any]:
    """What both TRL comparisons report of one worker's run: the timed window is the end of step 1
    to the end of the last step (the whole run if only one step), so start-up and the first
    step's warm-up count for neither framework. ``r`` holds ``steps``, ``step_end_s``,
    ``step_end_cpu_s``, ``step_tokens`` (real tokens) and ``step_loss``."""
    first = 1 if r["steps"] > 1 else 0

    def window(ends: list[float]) -> float:
        return ends[-1] - (ends[first - 1] if first else 0.0)

    ends = r["step_end_s"]
    durations = [b - a for a, b in zip([0.0, *ends], ends)]
    real = sum(r["step_tokens"][first:])
    seconds = window(ends)
    out = {
        "timed_steps": len(ends) - first,
        "timed_real_tokens": real,
        "timed_seconds": round(seconds, 3),
        "tokens_per_s": round(real / seconds, 1),
        "timed_cpu_seconds": round(window(r["step_end_cpu_s"]), 3),
        "first_step_s": round(ends[0], 3),
        "median_step_s": round(statistics.median(durations[first:]), 3),
        "fastest_step_s": round(min(durations[first:]), 3),
        # Both frameworks train the same batch at step k, so the best single step compares too.
        "best_step_tokens_per_s": round(max(n / d for n, d in zip(r["step_tokens"][first:], durations[first:])), 1),
        "final_loss": r["step_loss"][-1],
    }
    if "engine_step_end_s" in r:
        out["engine_clock_timed_seconds"] = round(window(r["engine_step_end_s"]), 3)
    return out
