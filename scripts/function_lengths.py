"""Print the length in lines of every function (and method) in the given Python files, longest
first, and exit 1 if any is longer than ``--max`` (default: report only).

    python scripts/function_lengths.py instructkit/train/*.py --max 80
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def lengths(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            out.append((f"{path}:{node.name}", node.end_lineno - start + 1))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--max", type=int, default=None, help="fail when a function is longer")
    parser.add_argument("--top", type=int, default=15, help="rows to print (default 15)")
    args = parser.parse_args()
    rows = sorted((row for f in args.files for row in lengths(f)), key=lambda r: -r[1])
    for name, n in rows[: args.top]:
        print(f"{n:5d}  {name}")
    too_long = [r for r in rows if args.max is not None and r[1] > args.max]
    return 1 if too_long else 0


if __name__ == "__main__":
    sys.exit(main())
