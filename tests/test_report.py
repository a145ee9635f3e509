"""`report.html`: built from a run folder alone; tables, curves and samples from its files."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from instructkit.report import read_metrics, render, results_tables, suite_of, write_report


def make_run_folder(root: Path) -> dict:
    """A recipe folder as `instructkit run` leaves it: sft and dpo metrics, eval samples."""
    (root / "sft").mkdir(parents=True)
    (root / "dpo").mkdir()
    (root / "eval").mkdir()
    sft_rows = [{"step": s, "loss": 2.0 / s, "lr": 1e-3} for s in range(1, 6)] + [{"step": 5, "val_loss": 0.5}]
    (root / "sft" / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in sft_rows) + '{"step": 6, "loss"'
    )  # torn last line of a killed run
    dpo_rows = [
        {"step": s, "loss": 0.7 - 0.1 * s, "reward_margin": 0.2 * s, "reward_accuracy": 0.5 + 0.1 * s}
        for s in range(1, 4)
    ]
    (root / "dpo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dpo_rows))
    prompts = ["p1 <b>", "p2", "p3"]
    for model, answers in {"base": ["x", "y", "z"], "sft": ["a1", "a2", "z"], "dpo": ["a1", "a2", "a3"]}.items():
        rows = [
            {"key": i, "prompt": p, "response": r, "reference": f"a{i + 1}", "correct": r == f"a{i + 1}"}
            for i, (p, r) in enumerate(zip(prompts, answers))
        ]
        if model == "dpo":
            rows = rows[::-1]  # order differs: samples are matched by prompt
        (root / "eval" / f"{model}.samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = {
        "base": {"exact_match": 0.0, "loss": 2.0, "pref_accuracy": 0.5, "n": 3},
        "sft": {"exact_match": 2 / 3, "loss": 1.0, "pref_accuracy": 0.5, "n": 3},
        "dpo": {"exact_match": 1.0, "loss": 2.5, "pref_accuracy": 0.9, "n": 3},
    }
    return {
        "recipe": "toy",
        "out": str(root),
        "final_model": str(root / "dpo"),
        "seconds": 1.0,
        "stages": {"sft": {"steps": 5}, "dpo": {"steps": 3}, "eval": {"table": table}},
        "table": table,
    }


def test_metrics_map_to_suites():
    assert suite_of("exact_match") == "exact_match"
    assert suite_of("pref_margin") == "preference"
    assert suite_of("prompt_strict") == "ifeval"
    assert suite_of("rougeL") == "rouge"
    assert suite_of("f1_macro") == "accuracy"
    assert suite_of("perplexity") == suite_of("loss") == "perplexity"
    assert suite_of("win_rate") == "winrate"


def test_results_tables_show_changes_from_the_starting_model_with_the_right_sign(tmp_path):
    summary = make_run_folder(tmp_path)
    page = results_tables(summary["table"])
    assert page.count("<table") == 3  # exact_match, perplexity (loss), preference; `n` is hidden
    assert '<span class="up">(+1.000)</span>' in page  # dpo exact match 0 -> 1: better
    assert '<span class="up">(-1.000)</span>' in page  # sft loss 2 -> 1: lower is better
    assert '<span class="down">(+0.500)</span>' in page  # dpo loss 2 -> 2.5: worse
    assert '<span class="same">(±0)</span>' in page  # sft preference unchanged


def test_report_is_self_contained_with_curves_tables_and_aligned_samples(tmp_path):
    summary = make_run_folder(tmp_path)
    assert len(read_metrics(tmp_path / "sft" / "metrics.jsonl")) == 6  # torn line skipped
    path = write_report(tmp_path, summary)
    page = path.read_text()
    for section in ("summary", "results", "curves", "samples"):
        assert f'<section id="{section}">' in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2  # one figure per training stage
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert not re.search(r'src="(?!data:)', page)  # nothing fetched from elsewhere
    assert "p1 &lt;b&gt;" in page and "p1 <b>" not in page  # text is escaped
    # each prompt row holds base, sft, dpo answers in that order, matched by prompt
    row = re.search(r"<tr><td><pre>p3</pre></td>(.*?)</tr>", page).group(1)
    assert re.findall(r"<pre>(.*?)</pre>", row) == ["a3", "z", "z", "a3"]
    assert "✓" in page and "✗" in page
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert write_report(tmp_path).read_text() == page  # rebuilt from the folder's summary.json alone


def test_render_without_eval_or_curves_says_so(tmp_path):
    page = render({"recipe": "r", "stages": {}, "table": {}}, tmp_path)
    assert "No evaluation stage" in page and "No training stage logged metrics" in page
