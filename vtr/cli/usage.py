"""What the user typed, checked: argparse types for the flags, and :class:`UsageError` for the mistakes
only the library can see (an unknown model, a FLOPs target a method cannot reach, a bad checkpoint).

``vtr.cli.main`` turns a UsageError into one line on stderr, ``vtr <command>: error: argument <flag>:
<message>``, and exit status 2, as argparse does for its own errors. Anything else is a bug and keeps
its traceback: only the phases that validate input (model creation, patching, file loading) run
inside :func:`usage`, never the computation after them.
"""
from __future__ import annotations

import argparse
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..adapters import UnsupportedModelError
from ..api import methods


class UsageError(Exception):
    """A mistake in the command line, named by its flag; ``vtr.cli.main`` exits 2 with it."""

    def __init__(self, flag: Optional[str], message: str) -> None:
        message = re.sub(r"\s+", " ", str(message)).strip()   # one line, whatever the library wrote
        super().__init__(f"argument {flag}: {message}" if flag else message)
        self.flag = flag


@contextmanager
def usage(flag: str, *also: type) -> Iterator[None]:
    """Inside the block, the library's errors about what the user typed become a UsageError naming
    ``flag``: ValueError (validation), FileNotFoundError (a missing input file) and the exception
    types in ``also``. UnsupportedModelError is always about ``--model``."""
    try:
        yield
    except UsageError:
        raise
    except UnsupportedModelError as error:
        raise UsageError("--model", str(error)) from error
    except FileNotFoundError as error:
        raise UsageError(flag, f"no such file: {error.filename or error}") from error
    except (ValueError, *also) as error:
        raise UsageError(flag, str(error) or type(error).__name__) from error


# -- argparse types: a ValueError or ArgumentTypeError here is reported by argparse as
#    "vtr <command>: error: argument --flag: <message>" with exit status 2 -----------------------------

def _int(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An int >= 1 (batch, repetitions, threads, sizes)."""
    return _int(text, 1, "a positive integer (1 or more)")


def non_negative_int(text: str) -> int:
    """An int >= 0 (tokens removed per layer)."""
    return _int(text, 0, "a non-negative integer (0 or more)")


def fraction(text: str) -> float:
    """A float in (0, 1] (FLOPs fractions, kept fractions)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {value:g}")
    return value


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of ints >= 1, e.g. ``1,8,32`` (batch sizes to sweep)."""
    return [positive_int(item) for item in _items(text)]


def device(text: str) -> str:
    """``cpu``, or ``cuda``/``cuda:N`` when torch sees that CUDA device: asking for a GPU this machine
    does not have is a mistake in the command line, not a crash halfway through a benchmark."""
    if text == "cpu":
        return text
    found = re.fullmatch(r"cuda(?::(\d+))?", text)
    if not found:
        raise argparse.ArgumentTypeError(f"expected cpu or cuda (or cuda:N), got {text!r}")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text} is not available here (torch.cuda.is_available() is False); "
                                         "use --device cpu")
    if found.group(1) is not None and int(found.group(1)) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return text


def _items(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list with no empty item, got {text!r}")
    return items


def fractions(text: str) -> list[float]:
    """A comma-separated list of fractions in (0, 1], e.g. ``0.7,0.5``."""
    return [fraction(item) for item in _items(text)]


def budget_fractions(text: str) -> list[float]:
    """A comma-separated list of fractions in (0, 1), e.g. ``0.5,0.25,0.11`` (1 would keep everything)."""
    values = fractions(text)
    if any(value >= 1 for value in values):
        raise argparse.ArgumentTypeError(f"each budget must be a fraction in (0, 1) of the visual tokens, got {text!r}")
    return values


def method(text: str) -> str:
    """A registered reduction method (``none`` included)."""
    if text not in methods():
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; choose from {', '.join(methods())}")
    return text


class EveryMethod(list):
    """What ``all`` names: every method but ``none``; a tool keeps those that act where it runs them
    (:func:`runnable`), where a method the user named is patched, and refused with its reason if it cannot act."""


def runnable(names: list[str], stages: tuple[str, ...]) -> list[str]:
    """``names`` as given, or, when they came from ``all``, the ones that act at one of ``stages`` (a ViT benchmark:
    the tower; a VLM benchmark: before or inside its language model, where learned reducers do not act)."""
    if not isinstance(names, EveryMethod):
        return list(names)
    details = methods(details=True)
    return [m for m in names if set(details[m].stages) & set(stages)]


def method_list(text: str, allow_all: bool = False) -> list[str]:
    """A comma-separated list of registered methods; ``all`` (when allowed) is every one but ``none``."""
    if allow_all and text.strip() == "all":
        return EveryMethod(m for m in methods() if m != "none")
    return [method(item) for item in _items(text)]


def method_list_or_all(text: str) -> list[str]:
    return method_list(text, allow_all=True)


def existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


def output_file(text: str) -> str:
    """A file to write: its folder must exist."""
    folder = Path(text).parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: no such directory {str(folder)!r}")
    return text


def json_file(text: str) -> str:
    """A JSON file to write (``--out``): a picture's name here is a mix-up with ``--plot``."""
    if Path(text).suffix.lower() in (".png", ".jpg", ".jpeg", ".pdf", ".svg"):
        raise argparse.ArgumentTypeError(f"writes the results as JSON, got {text!r}; draw a picture with --plot {text}")
    return output_file(text)


def existing_dir(text: str) -> str:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {text!r}")
    return text

