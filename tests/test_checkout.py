"""Nothing in the checkout shadows an installed package.

``python`` started in the repository root (``python -m pytest`` included) puts the root first on
``sys.path``, so a top-level folder with an ``__init__.py`` or a top-level ``*.py`` is imported in
place of an installed distribution of the same name. transformers 5.25 imports the Hugging Face
``kernels`` distribution whenever it is installed; a ``kernels/__init__.py`` here broke 13 test
modules on a fresh install. The design card's folders stay, without a top-level package in them.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN = {"vtr"}   # the project's own import name: the checkout is allowed to provide it


def run_in_root(code: str) -> subprocess.CompletedProcess:
    """``python -c code`` started in the repository root, as a user would type it there."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def checkout_top_level_names() -> set[str]:
    """Names a ``python`` started in the root imports from the checkout: modules and regular packages.
    (A folder without ``__init__.py`` is at most a namespace portion: an installed package wins over it.)"""
    names = set()
    for entry in ROOT.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix == ".py":
            names.add(entry.stem)
        elif entry.is_dir() and (entry / "__init__.py").exists():
            names.add(entry.name)
    return names


def installed_top_level_names() -> set[str]:
    """Top-level import names that installed distributions provide, and the standard library's."""
    return set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)


def test_no_top_level_folder_or_module_is_an_installed_name():
    clashes = sorted((checkout_top_level_names() & installed_top_level_names()) - OWN)
    providers = importlib.metadata.packages_distributions()
    assert not clashes, "the checkout shadows installed packages: " + ", ".join(
        f"{name} (from {', '.join(providers.get(name, ['the standard library']))})" for name in clashes)


def test_the_design_cards_folders_hold_no_top_level_package():
    for folder in ("kernels", "adapters", "model_zoo"):
        assert (ROOT / folder).is_dir(), f"{folder}/ is on the design card"
        assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/ would be importable as {folder!r}"


def test_every_installed_name_resolves_outside_the_checkout():
    """Asked from the root, every installed top-level name is found where it is installed."""
    names = sorted(set(importlib.metadata.packages_distributions()) - OWN)
    code = ("import importlib.util, json, sys\n"
            "found = {}\n"
            f"for name in {names!r}:\n"
            "    try:\n"
            "        spec = importlib.util.find_spec(name)\n"
            "    except Exception:\n"
            "        continue\n"
            "    if spec is not None:\n"
            "        found[name] = [spec.origin or ''] + list(spec.submodule_search_locations or [])\n"
            "print(json.dumps(found))\n")
    result = run_in_root(code)
    assert result.returncode == 0, result.stderr
    root = str(ROOT)
    installed = {"site-packages", "dist-packages"}   # a virtual environment may live in the root (CI's does)
    inside = {name: places for name, places in json.loads(result.stdout).items()
              if any(p.startswith(root + os.sep) and not installed & set(Path(p).parts) for p in places)}
    assert not inside, f"installed names resolved in the checkout from its root: {inside}"


def test_transformers_imports_from_the_repository_root():
    """The regression itself: transformers imports the ``kernels`` distribution when it is installed."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the `kernels` distribution is not installed (transformers < 5.25)")
    result = run_in_root("from transformers import CLIPModel\nimport kernels\nprint(kernels.__file__)")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not result.stdout.strip().startswith(str(ROOT / "kernels")), result.stdout
