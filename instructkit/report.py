"""`report.html`: one self-contained page that shows what each stage of a recipe changed.

Built from a recipe's run folder alone (its ``summary.json``, each stage's ``metrics.jsonl`` and
the evaluation stage's per-example files), so it can be rebuilt at any time with
:func:`write_report`. Sections, each with an ``id`` the browser test looks for:

- ``summary``: recipe, stages, final model, time;
- ``results``: a before/after table per evaluation suite (one row per model: the starting model,
  its k-shot prompting baseline if asked, then the model after each stage), with the change
  from the starting model;
- ``curves``: loss, reward and KL curves per training stage (matplotlib PNGs, inlined);
- ``samples``: responses of every model to the same held-out prompts, side by side;
- ``footprint`` (an eval stage with ``footprint: true``): every model's weights on disk against its
  held-out exact match, each point labelled with its batch-1 decode tokens/s;
- ``continual`` (a recipe with a continual stage): per strategy its accuracy matrix R as a heat
  map, forgetting per earlier task, and the metrics of R (ACC, BWT, FWT, forgetting, perplexity).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

# Curves drawn per training stage: panel title -> metrics.jsonl keys (those present are drawn).
PANELS: dict[str, tuple[str, ...]] = {
    "loss": ("loss", "val_loss", "ptx_loss", "value_loss", "policy_loss"),
    "reward": (
        "reward_mean",
        "score_mean",
        "penalized_reward_mean",
        "kl_penalty",
        "reward_margin",
        "reward_accuracy",
        "accuracy",
        "val_accuracy",
        "val_reward_margin",
    ),
    "KL (nats)": ("kl", "kl_target"),
    # PPO's diagnostics (docs/ppo.md): is the value model learning, what do the advantages look
    # like, how often the ratio clips, where the time goes
    "value model": ("explained_variance",),
    "advantages and returns": ("advantage_mean", "advantage_std", "return_mean", "return_std", "value_mean"),
    "clipped fraction": ("clip_frac", "value_clip_frac"),
    "seconds per step": ("generate_seconds", "train_seconds"),
}

# Evaluation metric -> the suite it belongs to, by exact name or prefix; the rest go to "other".
SUITE_OF_METRIC: tuple[tuple[str, str], ...] = (
    ("refusal_", "refusal"),
    ("over_refusal", "refusal"),
    ("injection_", "injection"),
    ("robust_", "robustness"),
    ("exact_match", "exact_match"),
    ("pref_", "preference"),
    ("prompt_", "ifeval"),
    ("instruction_", "ifeval"),
    ("bleu", "bleu"),
    ("chrf", "bleu"),
    ("rouge", "rouge"),
    ("entity_", "entities"),
    ("token_accuracy", "entities"),
    ("accuracy", "accuracy"),
    ("f1", "accuracy"),
    ("macro_", "accuracy"),
    ("micro_", "accuracy"),
    ("precision", "accuracy"),
    ("recall", "accuracy"),
    ("loss", "perplexity"),
    ("perplexity", "perplexity"),
    ("reward", "reward"),
    ("win", "winrate"),
    ("tie", "winrate"),
    ("loss_rate", "winrate"),
    ("weights_mb", "footprint"),
    ("parameters_m", "footprint"),
    ("decode_tokens_per_s", "footprint"),
)
HIDDEN_METRICS = {"k_shot", "n", "pref_pairs", "seed", "temperature", "max_new_tokens", "injection_checked"}
LOWER_IS_BETTER = (
    "loss",
    "perplexity",
    "weights_mb",
    "parameters_m",
    "over_refusal",  # benign look-alikes refused
    "injection_success",  # the hidden instruction obeyed
    "injection_hijack",
    "injection_echo",  # the input copied into the answer
    "robust_drop_",  # what a perturbation costs
)


def suite_of(metric: str) -> str:
    for prefix, suite in SUITE_OF_METRIC:
        if metric.startswith(prefix):
            return suite
    return "other"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a torn last line (a killed run) is ignored."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def panels_of(rows: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """The panels a stage's curves get: each of :data:`PANELS` with the keys its rows logged."""
    panels = [(title, [k for k in keys if any(k in r for r in rows)]) for title, keys in PANELS.items()]
    return [(title, keys) for title, keys in panels if keys]


def plot_stage(stage: str, rows: list[dict[str, Any]]) -> str | None:
    """One PNG (as a data URI) with a panel per metric group that the stage logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = panels_of(rows)
    if not panels:
        return None
    cols = min(len(panels), 4)
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.0 * rows_n), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(points) < 12 else None, markersize=3, label=key)
        ax.set_title(f"{stage}: {title}", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def _delta(metric: str, value: Any, start: Any) -> str:
    if not isinstance(value, (int, float)) or not isinstance(start, (int, float)) or isinstance(value, bool):
        return ""
    change = value - start
    if abs(change) < 1e-12:
        return ' <span class="same">(±0)</span>'
    better = (change < 0) if metric.startswith(LOWER_IS_BETTER) else (change > 0)
    return f' <span class="{"up" if better else "down"}">({change:+.3f})</span>'


def results_tables(table: dict[str, dict[str, Any]]) -> str:
    """A before/after table per suite: rows are models, the first row is the starting point."""
    if not table:
        return "<p>No evaluation stage in this recipe.</p>"
    metrics = [m for m in dict.fromkeys(k for row in table.values() for k in row) if m not in HIDDEN_METRICS]
    by_suite: dict[str, list[str]] = {}
    for metric in metrics:
        by_suite.setdefault(suite_of(metric), []).append(metric)
    start = next(iter(table.values()))
    parts = []
    for suite, names in by_suite.items():
        head = "".join(f"<th>{html.escape(m)}</th>" for m in names)
        body = "".join(
            f"<tr><td>{html.escape(model)}</td>"
            + "".join(
                f"<td>{_fmt(row.get(m, '-'))}{'' if row is start else _delta(m, row.get(m), start.get(m))}</td>"
                for m in names
            )
            + "</tr>"
            for model, row in table.items()
        )
        parts.append(
            f'<h3>{html.escape(suite)}</h3><table class="results" data-suite="{html.escape(suite)}">'
            f"<tr><th>model</th>{head}</tr>{body}</table>"
        )
    return "\n".join(parts)


def read_samples(eval_dir: Path, models: list[str], limit: int) -> list[dict[str, Any]]:
    """Per prompt: the reference (if any) and each model's response, for the first ``limit``
    prompts that every model answered (generation suites only)."""
    per_model: dict[str, dict[str, dict[str, Any]]] = {}
    for model in models:
        path = eval_dir / f"{model.replace(' ', '_')}.samples.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        per_model[model] = {r["prompt"]: r for r in rows if "response" in r and isinstance(r.get("prompt"), str)}
    if not per_model or not all(per_model.values()):
        return []
    first = next(iter(per_model.values()))
    prompts = [p for p in first if all(p in rows for rows in per_model.values())][:limit]
    return [
        {"prompt": p, "reference": first[p].get("reference"), "responses": {m: per_model[m][p] for m in models}}
        for p in prompts
    ]


def samples_table(samples: list[dict[str, Any]], models: list[str]) -> str:
    if not samples:
        return "<p>No generated responses were recorded.</p>"
    head = "".join(f"<th>{html.escape(m)}</th>" for m in models)
    rows = []
    for s in samples:
        cells = []
        for m in models:
            r = s["responses"][m]
            mark = (
                ""
                if "correct" not in r
                else (' <span class="up">✓</span>' if r["correct"] else ' <span class="down">✗</span>')
            )
            cells.append(f"<td><pre>{html.escape(str(r['response']))}</pre>{mark}</td>")
        ref = f"<pre>{html.escape(str(s['reference']))}</pre>" if s.get("reference") is not None else "-"
        rows.append(f"<tr><td><pre>{html.escape(s['prompt'])}</pre></td><td>{ref}</td>{''.join(cells)}</tr>")
    return f'<table class="samples"><tr><th>prompt</th><th>reference</th>{head}</tr>{"".join(rows)}</table>'


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")  # rotated tick labels stay inside
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def plot_accuracy_matrices(result: dict[str, Any]) -> str:
    """One heat map per strategy: rows are the model before the first task and after each task,
    columns the tasks, cells the held-out exact match (0 to 1), written in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, strategies = result["tasks"], result["strategies"]
    rows = ["start", *(f"after {t}" for t in tasks)]
    fig, axes = plt.subplots(
        1, len(strategies), figsize=(1.0 + 0.9 * len(tasks) * len(strategies), 0.9 + 0.45 * len(rows)), squeeze=False
    )
    for ax, (name, s) in zip(axes[0], strategies.items()):
        R = [result["baseline"]["exact_match"], *s["R"]]
        image = ax.imshow(R, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for i, row in enumerate(R):
            for j, x in enumerate(row):
                ax.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize=8, color="white" if x < 0.6 else "black")
        ax.set_xticks(range(len(tasks)), tasks, fontsize=8, rotation=30)
        ax.set_yticks(range(len(rows)), rows if ax is axes[0][0] else [""] * len(rows), fontsize=8)
        ax.set_title(name, fontsize=10)
    fig.colorbar(image, ax=list(axes[0]), fraction=0.02, label="exact match")
    return _png(fig)


def plot_forgetting(result: dict[str, Any]) -> str:
    """Forgetting of each earlier task (best value it ever had minus its value at the end), one
    group of bars per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, strategies = result["tasks"][:-1], result["strategies"]
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(strategies), 3.0))
    width = 0.8 / max(len(tasks), 1)
    for k, task in enumerate(tasks):
        xs = [i + (k - (len(tasks) - 1) / 2) * width for i in range(len(strategies))]
        ax.bar(xs, [s["forgetting"][k] for s in strategies.values()], width, label=task)
    ax.set_xticks(range(len(strategies)), list(strategies), fontsize=8, rotation=15)
    ax.axhline(0.0, color="#888", linewidth=0.8)
    ax.set_ylabel("forgetting (exact match)")
    ax.legend(fontsize=8, title="task", title_fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def plot_footprint(table: dict[str, dict[str, Any]]) -> str | None:
    """Size against quality: one point per model (weights MiB, exact match), labelled with its name
    and decode tokens/s; None unless the models have both numbers."""
    points = [
        (name, row["weights_mb"], row["exact_match"], row.get("decode_tokens_per_s"))
        for name, row in table.items()
        if isinstance(row.get("weights_mb"), (int, float)) and isinstance(row.get("exact_match"), (int, float))
    ]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for i, (name, size, quality, speed) in enumerate(points):
        ax.scatter([size], [quality], s=40)
        label = name if speed is None else f"{name}\n{speed:.1f} tok/s"
        # Alternate above and below the point, so neighbours' labels do not overlap.
        ax.annotate(label, (size, quality), textcoords="offset points", xytext=(6, 4 if i % 2 else -22), fontsize=8)
    ax.set_xlabel("weights on disk (MiB)")
    ax.set_ylabel("held-out exact match")
    ax.set_ylim(-0.05, 1.1)
    ax.set_xlim(0, max(p[1] for p in points) * 1.3)
    ax.grid(alpha=0.3)
    return _png(fig)


def footprint_section(table: dict[str, dict[str, Any]]) -> str:
    image = plot_footprint(table)
    if image is None:
        return ""
    return f"""<section id="footprint"><h2>Size, speed and quality of every model</h2>
<p>Weights on disk (what loading the model reads, base and adapters together) against held-out exact match;
each point carries the model's greedy decode speed at batch 1 (eval/footprint.py).</p>
<figure><img alt="size against exact match" src="{image}"><figcaption>footprint</figcaption></figure></section>"""


def continual_section(result: dict[str, Any] | None) -> str:
    """The ``continual`` section: heat maps of R, forgetting per strategy, the metrics table."""
    if not result or not result.get("strategies"):
        return ""
    metrics = list(dict.fromkeys(k for row in result["table"].values() for k in row))
    head = "".join(f"<th>{html.escape(m)}</th>" for m in metrics)
    body = "".join(
        f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{_fmt(row.get(m, '-'))}</td>" for m in metrics) + "</tr>"
        for name, row in result["table"].items()
    )
    forgetting = plot_forgetting(result)
    return f"""<section id="continual"><h2>Continual learning: the accuracy matrix per strategy</h2>
<p>R[i][j] is the held-out exact match on task j (column) after training task i (row); the first row is the
starting model. ACC is the mean of the last row, BWT the mean change of each earlier task from just after it was
learned to the end, FWT the mean change of each task, before it was trained, from the starting model, forgetting
the best value a task ever had minus its last (docs/continual.md).</p>
<figure><img alt="accuracy matrices" src="{plot_accuracy_matrices(result)}"><figcaption>R per strategy</figcaption>
</figure><figure><img alt="forgetting per strategy" src="{forgetting}"><figcaption>forgetting per strategy
</figcaption></figure><table class="results" data-suite="continual"><tr><th>strategy</th>{head}</tr>{body}</table>
</section>"""


def plot_confusion(held: dict[str, Any]) -> str | None:
    """Heat maps of a classifier's confusion matrices on the held-out split, untrained head and
    trained one side by side: rows the reference label, columns the predicted one, the share of
    each row's inputs in the colour and the count written in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, held[k]["confusion"]) for t, k in (("untrained head", "before"), ("trained", "after"))]
    panels = [(t, c) for t, c in panels if c]
    if not panels:
        return None
    labels = panels[0][1]["labels"]
    size = 1.2 + 0.55 * len(labels)
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels) + 1.0, size), squeeze=False)
    for ax, (title, confusion) in zip(axes[0], panels):
        counts = confusion["matrix"]
        shares = [[x / max(sum(row), 1) for x in row] for row in counts]
        image = ax.imshow(shares, vmin=0.0, vmax=1.0, cmap="viridis")
        for i, row in enumerate(counts):
            for j, x in enumerate(row):
                color = "white" if shares[i][j] < 0.6 else "black"
                ax.text(j, i, str(x), ha="center", va="center", fontsize=8, color=color)
        ax.set_xticks(range(len(labels)), labels, fontsize=8, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels if ax is axes[0][0] else [""] * len(labels), fontsize=8)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[0][0].set_ylabel("reference", fontsize=8)
    fig.colorbar(image, ax=list(axes[0]), fraction=0.03, label="share of the row")
    return _png(fig)


def heads_section(stages: dict[str, Any]) -> str:
    """Per classify stage: the per-label (or per entity type) report on the held-out split, untrained
    head and trained, and the confusion matrices of a sequence classifier."""
    parts = []
    for stage, info in stages.items():
        held = info.get("heldout") if isinstance(info, dict) else None
        if not held or not held.get("after"):
            continue
        before, after = held.get("before") or {}, held["after"]
        cols = ("precision", "recall", "f1", "support")
        head = "".join(f"<th>{c}</th>" for c in cols) + "<th>f1 untrained</th>"
        body = "".join(
            f"<tr><td>{html.escape(label)}</td>"
            + "".join(f"<td>{_fmt(row[c])}</td>" for c in cols)
            + f"<td>{_fmt(before.get('per_label', {}).get(label, {}).get('f1', '-'))}</td></tr>"
            for label, row in after["per_label"].items()
        )
        kind = "entity type" if "entity_f1" in after else "label"
        image = plot_confusion(held) if "confusion" in after else None
        figure = f'<figure><img alt="confusion matrices" src="{image}"><figcaption>confusion</figcaption></figure>'
        parts.append(
            f"<h3>{html.escape(stage)}: {html.escape(held['task'])} on {html.escape(str(held['split']))}</h3>"
            f'<table class="results" data-suite="per_label"><tr><th>{kind}</th>{head}</tr>{body}</table>'
            + (figure if image else "")
        )
    if not parts:
        return ""
    return (
        '<section id="heads"><h2>Classifier heads: per-label report and confusion matrix</h2><p>Scored from the '
        "head on the held-out split (no generation); the untrained head is the same encoder with a freshly "
        f"initialised head (docs/classify.md).</p>{''.join(parts)}</section>"
    )


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.3em .6em;vertical-align:top}
th{background:#f3f3f3}td pre{white-space:pre-wrap;margin:0;font-size:.85em;max-width:28em}
.up{color:#1a7f37}.down{color:#c0392b}.same{color:#888}img{max-width:100%;border:1px solid #eee}
"""


def render(summary: dict[str, Any], root: Path, *, sample_limit: int = 6) -> str:
    """The report's HTML for a recipe folder whose stages have run."""
    stages: dict[str, Any] = summary.get("stages", {})
    table: dict[str, dict[str, Any]] = summary.get("table") or {}
    facts = [
        ("recipe", summary.get("recipe")),
        ("stages", " → ".join(stages)),
        ("final model", summary.get("final_model")),
        ("seconds", summary.get("seconds")),
    ]
    for stage, info in stages.items():
        for key in (
            "loss",
            "steps",
            "train_seconds",
            "tokens_per_s",
            "val_accuracy",
            "val_reward_margin",
            "perplexity_before",
            "perplexity_after",
        ):
            if isinstance(info, dict) and key in info:
                facts.append((f"{stage} {key}", info[key]))
    summary_html = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in facts)

    curves = []
    for stage in stages:
        if stage == "eval":
            continue
        image = plot_stage(stage, read_metrics(root / stage / "metrics.jsonl"))
        if image:
            curves.append(
                f'<figure><img alt="{html.escape(stage)} curves" src="{image}">'
                f"<figcaption>{html.escape(stage)}</figcaption></figure>"
            )
    models = list(table)
    samples = read_samples(root / "eval", [m for m in models], sample_limit)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>instructkit report: {html.escape(str(summary.get("recipe")))}</title>
<style>{STYLE}</style></head><body>
<h1>instructkit report: {html.escape(str(summary.get("recipe")))}</h1>
<section id="summary"><h2>Summary</h2><table>{summary_html}</table></section>
<section id="results"><h2>Held-out results, before and after each stage</h2>
<p>Each table is one evaluation suite; the first row is the starting model and the change from it is in
brackets (green: better).</p>{results_tables(table)}</section>
<section id="curves"><h2>Training curves</h2>{"".join(curves) or "<p>No training stage logged metrics.</p>"}</section>
<section id="samples"><h2>Sample responses on held-out prompts</h2>{samples_table(samples, models)}</section>
{footprint_section(table)}
{continual_section(stages.get("continual"))}
{heads_section(stages)}
</body></html>
"""


def write_report(root: str | Path, summary: dict[str, Any] | None = None) -> Path:
    """Write ``root/report.html`` (atomically) for a recipe folder; returns its path."""
    from instructkit.fileio import atomic_write_text

    root = Path(root)
    summary = summary if summary is not None else json.loads((root / "summary.json").read_text())
    path = root / "report.html"
    atomic_write_text(path, render(summary, root))
    return path
