"""What instructkit/eval/ may depend on and how it reads, checked on its source: no recipe
imported, no batched no-grad loop of its own, no function too long to read, no suite
special-cased by name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

EVAL_DIR = Path(__file__).resolve().parents[2] / "instructkit" / "eval"
MODULES = sorted(EVAL_DIR.glob("*.py"))
SUITE_NAMES = {"exact_match", "accuracy", "bleu", "rouge", "reward", "winrate", "perplexity", "ifeval", "preference"}
MAX_FUNCTION_LINES = 80


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def imported_modules(module: ast.Module) -> set[str]:
    """Every module imported anywhere in the file, function-local imports included."""
    names = set()
    for node in ast.walk(module):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_recipe_is_imported(path):
    """Eval scores models; what it shares with the recipes lives one floor down (data.encoders,
    data.collate, models.passes, models.lm, fileio)."""
    assert not [m for m in imported_modules(tree(path)) if m.startswith("instructkit.train")]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_batched_no_grad_passes_go_through_models_passes(path):
    """``torch.no_grad``, ``torch.inference_mode`` and ``.eval()`` belong to
    instructkit.models.passes, which also puts the module back in its mode."""
    calls = {
        node.func.attr
        for node in ast.walk(tree(path))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    assert not calls & {"no_grad", "inference_mode", "eval"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_functions_are_short_enough_to_read(path):
    long = [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(tree(path))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_suite_is_special_cased_by_name(path):
    """Suites declare what they need in the registry; no code compares with a suite's name."""
    compared = []
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                values = operand.elts if isinstance(operand, (ast.Set, ast.Tuple, ast.List)) else [operand]
                compared += [v.value for v in values if isinstance(v, ast.Constant) and v.value in SUITE_NAMES]
    assert not compared
