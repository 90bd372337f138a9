"""Names in docstrings and in the README exist: every ``vtr.x.y`` a docstring cites (as a Sphinx role or in
double backticks) imports, and every ``tests/...py`` file it names is there. Stale names (``vtr.cost``,
``vtr.signals``, ``vtr.profile``, ``tests/test_kernels.py``) sent readers to modules that moved."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("vtr", "adapters", "kernels", "benchmarks") for p in (ROOT / folder).rglob("*.py"))
CITED = re.compile(r"(?::(?:mod|func|class|meth|attr|data):`~?|``)(vtr(?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
TEST_FILE = re.compile(r"\btests/[\w/]+\.py\b")


def resolves(name: str) -> bool:
    """``vtr.a.b.C.d``: the longest importable module prefix, then attributes for the rest."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


def cited(pattern: re.Pattern, paths) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in paths:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in pattern.finditer(line):
                found.setdefault(match.group(1) if match.groups() else match.group(0), []).append(
                    f"{path.relative_to(ROOT)}:{number}")
    return found


def test_every_vtr_name_a_docstring_cites_exists():
    names = cited(CITED, SOURCES)
    assert len(names) > 10   # the pattern finds the citations
    missing = {name: where for name, where in names.items() if not resolves(name)}
    assert not missing, f"docstrings cite names that do not exist: {missing}"


@pytest.mark.parametrize("paths", [SOURCES, [ROOT / "README.md"]], ids=["sources", "readme"])
def test_every_test_file_named_exists(paths):
    names = cited(TEST_FILE, paths)
    missing = {name: where for name, where in names.items() if not (ROOT / name).exists()}
    assert not missing, f"named test files that do not exist: {missing}"
