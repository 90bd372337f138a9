"""CuPy kernels for the hot reduction ops; plain torch is the fallback and the reference.

The merge kernel (``merge.cu``) replaces the size-weighted scatter of :meth:`vtr.TokenState.reduce`
on CUDA tensors when CuPy is installed (``pip install "vtr[cuda]"``) and kernels are enabled.
Kernels are **off by default** until they have been checked on a GPU against the torch path
(``tests/core/test_kernels.py`` does that; it is skipped without CUDA and CuPy): turn them on with
``vtr.kernels.enable()``, ``with vtr.kernels.enabled():`` or ``VTR_KERNELS=1``. They serve inference only: while autograd records
or ``torch.compile`` traces, the torch path runs.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch import Tensor

from .merge import merge, segments

_enabled = os.environ.get("VTR_KERNELS", "0") == "1"


def enable(on: bool = True) -> None:
    """Use the CuPy kernels where they apply (CUDA tensors, CuPy importable, no autograd)."""
    global _enabled
    _enabled = bool(on)


@contextlib.contextmanager
def enabled(on: bool = True):
    """``with vtr.kernels.enabled(): ...``: kernels on (or off) inside the block, as before after it."""
    global _enabled
    before, _enabled = _enabled, bool(on)
    try:
        yield
    finally:
        _enabled = before


@functools.lru_cache(maxsize=None)
def cupy_available() -> bool:
    try:
        import cupy
        return bool(cupy.cuda.is_available())
    except Exception:  # not installed, or installed without a usable CUDA driver
        return False


def use_for(x: Tensor, *others: Tensor) -> bool:
    """True when the kernels should run on ``x``: enabled, on CUDA with CuPy, nothing to differentiate."""
    if not (_enabled and x.is_cuda) or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *others)):
        return False
    return x.dtype in (torch.float32, torch.float16, torch.bfloat16) and cupy_available()


__all__ = ["enable", "enabled", "cupy_available", "use_for", "merge", "segments"]
