"""Numbers as users pass them: a numpy scalar or a 0-d tensor is the Python number it holds.

Amounts (``r=``, ``keep=``, ``flops=``, ``layers=``, ``budget=``) and reducer options are checked as
Python ``int``/``float``. Values read from a config array (``np.float32(0.9)``) or swept as tensors
(``torch.tensor(0.5)``) are numbers to the user, so they are converted once, where they enter, and
every check and schedule downstream sees exactly what the Python number would give.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

# float32/float16 values print (and were most likely typed) as their shortest decimal: np.float32(0.9)
# is the user's 0.9, not 0.8999999761581421, which would round a token count differently at a boundary.
_SHORT_FLOATS = (np.float16, np.float32)


def plain(value: Any, name: str) -> Any:
    """``value`` with numpy scalars and 0-d tensors replaced by Python numbers, inside lists and
    tuples too (their type is kept: ``r=(r, inflect)`` stays a tuple). Bools stay bools, so checks
    that refuse a bool where a count belongs still do. Anything else comes back unchanged.

    A tensor or array with dimensions is a ValueError naming ``name``: where several values are
    meant (one per layer) vtr takes a list, and a silent ``tolist()`` would hide a shape mistake.
    """
    if type(value) in (list, tuple):
        return type(value)(plain(v, name) for v in value)
    if isinstance(value, (Tensor, np.ndarray)):
        if value.ndim != 0:
            kind = "tensor" if isinstance(value, Tensor) else "numpy array"
            raise ValueError(f"{name} takes numbers (Python, numpy or 0-d tensor scalars) or a list of them, got a "
                             f"{kind} of shape {tuple(value.shape)}; pass {name}=value.tolist() for one value per "
                             "layer")
        scalar = _tensor_scalar(value.detach().cpu()) if isinstance(value, Tensor) else value[()]
        return plain(scalar, name)
    if isinstance(value, np.generic):
        return _numpy_scalar(value)
    return value


def plain_scalar(value: Any) -> Any:
    """``value`` as a Python number if it is a numpy scalar or a 0-d tensor/array, else unchanged.

    For reducer options, where a tensor with dimensions is a legitimate value (ATF's prior, a query
    projection matrix) and is passed on as it is.
    """
    if isinstance(value, np.generic) or (isinstance(value, (Tensor, np.ndarray)) and value.ndim == 0):
        return plain(value, "value")
    return value


def _tensor_scalar(value: Tensor) -> Any:
    """A 0-d tensor's value as a numpy scalar where numpy has its dtype (shortest decimals), else a Python one."""
    if value.dtype in (torch.float16, torch.float32, torch.float64) or not value.dtype.is_floating_point:
        return value.numpy()[()]
    return value.item()   # bfloat16: no numpy dtype, the exact value


def _numpy_scalar(value: np.generic) -> Any:
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, _SHORT_FLOATS):
        return float(str(value))
    if isinstance(value, np.floating):
        return float(value)
    return value.item()
