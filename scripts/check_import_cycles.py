"""Fail if any module of the package imports another that imports it back, directly or
through others (an import cycle), and print each cycle found.

import-linter's contracts forbid imports that run up the layers; this checks the rest of the
graph, including imports inside functions, which Python allows to form cycles silently.
Run by `make lint`: ``python scripts/check_import_cycles.py [package]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grimp

# The checkout this script is in, not whatever copy of the package is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def find_cycles(package: str) -> list[list[str]]:
    graph = grimp.build_graph(package)
    cycles, seen = [], set()
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back is None:
                continue
            cycle = [importer, *back]
            key = frozenset(cycle)
            if key not in seen:
                seen.add(key)
                cycles.append(cycle)
    return cycles


def main() -> int:
    package = sys.argv[1] if len(sys.argv) > 1 else "instructkit"
    cycles = find_cycles(package)
    for cycle in cycles:
        print("import cycle: " + " -> ".join(cycle))
    print(f"{len(cycles)} import cycles in {package}")
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
