"""Where the data folders of the checkout are found once installed.

The design card's top-level ``kernels/`` (CUDA sources) and ``model_zoo/`` (TOML entries) hold no
Python, so nothing in the checkout is importable under a name another distribution owns. A wheel
installs them as data-only (namespace) packages inside ``vtr``: the folders vtr/kernels/cuda/ and
vtr/model_zoo/entries/. An editable install's finder cannot map a namespace package below a regular
one, so there the checkout's folder is read directly.
"""
from __future__ import annotations

from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent


def data_folder(package: str, folder: str) -> Traversable:
    """The files installed as ``package`` (a wheel), else the checkout's top-level ``folder``."""
    try:
        return resources.files(package)
    except ModuleNotFoundError:
        path = CHECKOUT / folder
        if path.is_dir():
            return path
        raise ModuleNotFoundError(f"{package} is not installed and {path} does not exist; reinstall vtr") from None
