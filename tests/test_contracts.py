"""Model families and tools ask a reducer what it is through the ``Reducer`` interface (``identity``,
``fixed_count``, ``published_fuse``, ``kept_grid``, ``for_budget``), never by its class or its name: so a
method written anywhere runs wherever its stage applies (tests/adapters/test_one_file_method.py), and a
new one costs one file. This scans the sources outside ``vtr/reducers`` for the special cases."""
from __future__ import annotations

import re
from pathlib import Path

import vtr
from vtr.reducers.base import REDUCERS, Reducer

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("vtr", "adapters") for p in (ROOT / folder).rglob("*.py")
                 if not p.is_relative_to(ROOT / "vtr" / "reducers"))


def reducer_classes() -> set[str]:
    found, todo = set(), [Reducer]
    while todo:
        cls = todo.pop()
        found.add(cls.__name__)
        todo += cls.__subclasses__()
    return found | {cls.__name__ for cls in REDUCERS.values()}


def offending_lines(pattern: re.Pattern) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
            for path in SOURCES for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if pattern.search(line)]


def test_no_class_test_of_a_reducer_outside_the_reducers():
    names = "|".join(sorted(reducer_classes()))
    pattern = re.compile(rf"isinstance\([^)]*\b({names})\b|issubclass\([^)]*\b({names})\b")
    assert len(reducer_classes()) > 10   # the pattern knows the reducers
    assert not offending_lines(pattern), offending_lines(pattern)


def test_no_test_of_a_method_name_outside_the_reducers():
    pattern = re.compile(r"""\bmethod\s*(==|!=)|\bmethod\s+(not\s+)?in\s*[\[({]|\.name\s*(==|!=)\s*["']""")
    assert not offending_lines(pattern), offending_lines(pattern)


def test_no_special_case_of_a_reducers_step_size_outside_the_reducers():
    """``max_step == 0`` meant 'the none method': that is the ``identity`` capability."""
    pattern = re.compile(r"max_step\s*(==|!=|>|<)\s*0")
    assert not offending_lines(pattern), offending_lines(pattern)


def test_capabilities_say_what_each_reducer_is():
    identity = {name for name, cls in REDUCERS.items() if cls.identity}
    fixed = {name for name, cls in REDUCERS.items() if cls.fixed_count}
    published = {name: cls.published_fuse for name, cls in REDUCERS.items() if cls.published_fuse}
    assert identity == {"none"} and fixed == {"pool"}
    assert published == {"evit": "one", "fastv": "drop", "hired": "drop", "atf": "drop", "query": "drop",
                         "divprune": "drop", "vispruner": "drop", "fastervlm": "drop",
                         "pyramiddrop": "drop", "cdpruner": "drop", "dart": "drop", "feather": "drop"}
    assert vtr.make_reducer("pool", factor=2).kept_grid((5, 4)) == (3, 2)
