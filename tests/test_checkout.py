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


# -- what a plain `pip install -e .` (the README's first command) installs ------------------------------------------

def _project() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:   # Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _source_packages() -> dict[str, Path]:
    """Import name -> folder of every package the project's code lives in (``vtr/...`` and ``adapters/<family>``)."""
    setuptools = _project()["tool"]["setuptools"]
    folders = {name: ROOT / folder for name, folder in setuptools["package-dir"].items()}
    found = {}
    for init in sorted([*(ROOT / "vtr").rglob("__init__.py"), *(ROOT / "adapters").rglob("__init__.py")]):
        folder = init.parent
        mapped = [name for name, root in folders.items() if folder == root or root in folder.parents]
        base = max(mapped, key=len)   # the deepest mapping that holds the folder
        found[".".join([base, *folder.relative_to(folders[base]).parts])] = folder
    return found


def test_every_package_of_the_code_is_installed():
    """A package missing from ``packages`` works in an editable install of this checkout and is absent from a
    built wheel (``vtr.adaptive`` was, until 2026-12-07)."""
    listed = set(_project()["tool"]["setuptools"]["packages"])
    assert set(_source_packages()) - listed == set()


def _module_level_imports(path: Path) -> set[str]:
    """Top-level names a module imports when it is imported (not inside functions, classes or try blocks)."""
    import ast
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_what_importing_vtr_needs_is_a_declared_dependency():
    """Every third-party module imported at module level by the installed code comes from a distribution in
    ``dependencies``: the README's first command installs only those (scipy, imported by ``vtr.adaptive.msvit``
    and pulled in only by the test extras, failed `vtr bench` on a fresh venv until 2026-12-07). Optional
    packages (cupy, peft, matplotlib, ...) are imported where they are used."""
    import re
    declared = {re.split(r"[<>=!~;\[ ]", requirement)[0].strip().lower().replace("_", "-")
                for requirement in _project()["project"]["dependencies"]}
    owners = importlib.metadata.packages_distributions()
    missing = {}
    for folder in _source_packages().values():
        for path in folder.glob("*.py"):
            for name in _module_level_imports(path) - set(sys.stdlib_module_names) - {"__future__", "vtr"}:
                distributions = {d.lower().replace("_", "-") for d in owners.get(name, [name])}
                if not distributions & declared:
                    missing.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert missing == {}, f"imported at module level but not in pyproject's dependencies: {missing}"
