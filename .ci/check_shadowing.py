"""Fail when a name importable from a folder that lands on sys.path shadows an installed package.

`python -m pytest`, `python -m zoengine` and `torchrun -m zoengine` put the repository root on
sys.path; pytest puts tests/, and `python benchmarks/x.py` puts benchmarks/. A regular package
(a folder with __init__.py) or a module there wins over any installed distribution of the same
import name: transformers 5.25 began to import Hugging Face's `kernels`, and our old top-level
`kernels/` package broke every command run from the root. A folder without __init__.py is only
a namespace portion, which loses to an installed regular package, so it is allowed.

Usage: python .ci/check_shadowing.py [ROOT]   (exit 1 and a line per clash)
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys

# the folders whose contents are importable by their bare names in some supported command
PATH_FOLDERS = (".", "tests", "benchmarks", "examples")
OWN = {"zoengine"}  # our own distribution's import name


def importable_names(folder: str) -> set[str]:
    """Bare import names a folder provides when it is on sys.path (modules, regular packages)."""
    if not os.path.isdir(folder):
        return set()
    out = set()
    for entry in os.listdir(folder):
        path = os.path.join(folder, entry)
        if entry.endswith(".py"):
            out.add(entry[:-3])
        elif os.path.isfile(os.path.join(path, "__init__.py")):
            out.add(entry)
    return out


def clashes(root: str) -> list[str]:
    installed = md.packages_distributions()  # import name -> [distribution, ...]
    found = []
    for rel in PATH_FOLDERS:
        for name in sorted(importable_names(os.path.join(root, rel)) - OWN):
            if name in installed:
                where = name if rel == "." else f"{rel}/{name}"
                found.append(f"{where} shadows the installed distribution(s) "
                             f"{', '.join(sorted(set(installed[name])))} (import name {name!r})")
    return found


if __name__ == "__main__":
    bad = clashes(sys.argv[1] if len(sys.argv) > 1 else os.getcwd())
    for line in bad:
        print(f"check_shadowing: {line}", file=sys.stderr)
    if not bad:
        print("check_shadowing: no folder on sys.path shadows an installed package")
    sys.exit(1 if bad else 0)
