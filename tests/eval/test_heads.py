"""The eval stage and the report for classify runs: the table is the heads' held-out numbers
(untrained head first, then each classify stage), read from the runs' heldout.json; the report
shows the per-label report and the confusion matrices. No model runs here: the scores are made
by hand with models.heads."""

from __future__ import annotations

import json
from pathlib import Path

from instructkit.models.heads import entity_scores, label_scores


def _run(path: Path, held: dict) -> Path:
    path.mkdir(parents=True)
    (path / "heldout.json").write_text(json.dumps(held))
    (path / "summary.json").write_text(json.dumps({"stage": "classify", "heldout": held}))
    return path


def _seq_held() -> dict:
    labels = ["billing", "shipping"]
    before = label_scores(["billing"] * 4, ["billing", "billing", "shipping", "shipping"], labels)
    after = label_scores(
        ["billing", "billing", "shipping", "billing"], ["billing", "billing", "shipping", "shipping"], labels
    )
    return {
        "task": "seq_classification",
        "split": "shipped:classify/test",
        "labels": labels,
        "before": before,
        "after": after,
    }


def test_eval_stage_after_classify_reports_the_heads(tmp_path):
    from instructkit.config import EvalStageConfig
    from instructkit.eval.stage import eval_stage

    held = _seq_held()
    run = _run(tmp_path / "classify", held)
    summary = eval_stage(EvalStageConfig(), [("base", "minilm-l6"), ("classify", str(run))], tmp_path / "eval")
    # before: all billing -> accuracy 1/2; billing P 1/2 R 1 F 2/3, shipping 0: macro F1 1/3.
    # after: 3 of 4 right; billing P 2/3 R 1 F 4/5, shipping P 1 R 1/2 F 2/3: macro F1 11/15.
    assert list(summary["table"]) == ["untrained head", "classify"]
    assert summary["table"]["untrained head"]["accuracy"] == 0.5
    assert abs(summary["table"]["untrained head"]["f1_macro"] - 1 / 3) < 1e-9
    assert summary["table"]["classify"]["accuracy"] == 0.75
    assert abs(summary["table"]["classify"]["f1_macro"] - 11 / 15) < 1e-9
    assert "per_label" not in summary["table"]["classify"]  # the table holds numbers only
    assert json.loads((tmp_path / "eval" / "summary.json").read_text()) == summary
    assert json.loads((tmp_path / "eval" / "classify.heldout.json").read_text()) == held


def test_eval_stage_of_a_tagger_reports_entity_scores(tmp_path):
    from instructkit.config import EvalStageConfig
    from instructkit.eval.stage import eval_stage

    ref = [["B-PER", "I-PER", "O"], ["B-LOC", "O", "O"]]
    held = {
        "task": "token_classification",
        "split": "shipped:ner/test.conll",
        "labels": ["B-LOC", "B-PER", "I-PER", "O"],
        "before": entity_scores([["O", "O", "O"], ["O", "O", "O"]], ref),
        "after": entity_scores(ref, ref),
    }
    run = _run(tmp_path / "classify", held)
    table = eval_stage(EvalStageConfig(), [("base", "minilm-l6"), ("classify", str(run))], tmp_path / "eval")["table"]
    assert table["untrained head"]["entity_f1"] == 0.0 and table["classify"]["entity_f1"] == 1.0
    assert set(table["classify"]) == {"entity_f1", "entity_precision", "entity_recall", "token_accuracy"}


def test_report_shows_per_label_table_and_confusion_matrices(tmp_path):
    from instructkit.report import render, suite_of

    held = _seq_held()
    summary = {
        "recipe": "classify",
        "stages": {"classify": {"stage": "classify", "heldout": held}, "eval": {"table": {}}},
        "table": {"untrained head": {"accuracy": 0.5}, "classify": {"accuracy": 0.75}},
    }
    page = render(summary, tmp_path)
    section = page[page.index('<section id="heads">') :]
    assert "<td>billing</td>" in section and "<td>shipping</td>" in section
    assert '<img alt="confusion matrices" src="data:image/png;base64,' in section
    assert suite_of("entity_f1") == "entities" and suite_of("f1_macro") == "accuracy"


def test_report_has_no_heads_section_without_a_classify_stage(tmp_path):
    from instructkit.report import render

    page = render({"recipe": "x", "stages": {"sft": {"loss": 1.0}}, "table": {}}, tmp_path)
    assert '<section id="heads">' not in page


def test_eval_stage_after_vision_runs_reads_their_answers_not_a_head(tmp_path):
    """A vision run folder holds a heldout.json too; the eval stage must take it for what it is
    (exact match and BLEU before and after), not as a classifier's head scores (an empty table)."""
    from instructkit.config import EvalStageConfig
    from instructkit.eval.stage import eval_stage

    held = {
        "split": "shipped:vision/test",
        "before": {"exact_match": 0.0, "bleu": 1.5, "n": 4, "exact_match_by_kind": {"count": 0.0}},
        "after": {"exact_match": 0.5, "bleu": 40.0, "n": 4, "exact_match_by_kind": {"count": 0.5}},
    }
    run = _run(tmp_path / "vision", held)
    (run / "final").mkdir()
    (run / "final" / "vision.json").write_text("{}")
    table = eval_stage(EvalStageConfig(), [("base", "smollm2-135m-instruct"), ("vision", str(run))], tmp_path / "e")[
        "table"
    ]
    assert table["vision"]["exact_match"] == 0.5 and table["vision"]["bleu"] == 40.0
    assert table["vision"]["exact_match_count"] == 0.5 and "accuracy" not in table["vision"]
