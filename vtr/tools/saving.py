"""Save a model's reduction beside its weights and re-apply it after loading (the Hub round trip).

``save_pretrained`` writes the unpatched model: patching changes no weight and no config. So the
reduction travels as its own small file, ``vtr_reduction.json``, in the same directory (what
``vtr.patch`` was given: method, amounts, layers, options, metric, proportional attention), and
``vtr.load_reduction`` patches a freshly loaded model with exactly that. Nothing is written into
``model.config`` behind the user's back, and a model loaded without ``load_reduction`` is the plain
model. Tensor options (ATF's ``prior``) go to ``vtr_reduction.pt`` beside the JSON.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from .._version import __version__
from ..adapters import is_patched, settings
from ..api import patch

FILE = "vtr_reduction.json"
TENSORS = "vtr_reduction.pt"
FORMAT = 1


def save_reduction(model: nn.Module, path: Union[str, Path]) -> Path:
    """Write the reduction ``model`` is patched with to ``path/vtr_reduction.json`` (``path`` is a
    directory, created if missing: the one ``save_pretrained`` wrote). Returns the JSON file.

    Options that are tensors or arrays are stored in ``path/vtr_reduction.pt``; an option that is
    neither data nor a number (a module, a function) is a ValueError: pass it again to ``vtr.patch``.
    """
    reduction = settings(model)
    tensors: dict[str, Tensor] = {}
    arguments = {name: _encode(value, name, tensors, reduction.method) for name, value in reduction.arguments.items()}
    document = {"vtr_reduction": FORMAT, "vtr_version": __version__, "model": type(model).__name__,
                "method": reduction.method, "arguments": arguments, "metric": reduction.metric,
                "prop_attn": reduction.prop_attn}
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    if tensors:
        torch.save(tensors, folder / TENSORS)
    else:
        (folder / TENSORS).unlink(missing_ok=True)   # a stale sidecar from an earlier save would mislead
    (folder / FILE).write_text(json.dumps(document, indent=2) + "\n")
    return folder / FILE


def load_reduction(model: nn.Module, path: Union[str, Path]) -> nn.Module:
    """Patch ``model`` (e.g. fresh from ``from_pretrained(path)``) with the reduction saved in
    ``path`` by :func:`save_reduction`; returns the same model. A model that is already patched is
    a ValueError: unpatch it first, so two reductions are never stacked by accident."""
    if is_patched(model):
        raise ValueError(f"model is already patched with {settings(model).describe()}; vtr.unpatch(model) before "
                         "loading a saved reduction")
    file = saved_reduction(path)
    if file is None:
        raise FileNotFoundError(f"no {FILE} in {str(path)!r} (vtr.save_reduction(model, directory) writes it)")
    document = json.loads(file.read_text())
    if document.get("vtr_reduction") != FORMAT:
        raise ValueError(f"{file} is not a vtr reduction of format {FORMAT} (got {document.get('vtr_reduction')!r})")
    tensors = torch.load(file.parent / TENSORS, weights_only=True) if (file.parent / TENSORS).exists() else {}
    arguments = {name: _decode(value, tensors, file) for name, value in document["arguments"].items()}
    return patch(model, document["method"], metric=document["metric"], prop_attn=document["prop_attn"], **arguments)


def saved_reduction(path: Union[str, Path]) -> Optional[Path]:
    """``path/vtr_reduction.json`` if the directory ``path`` holds a saved reduction, else None."""
    file = Path(path) / FILE
    return file if file.is_file() else None


# JSON has no tuples and no tensors: r=(16, -1) (an inflected schedule) is not r=[16, -1] (one value per
# layer), so a tuple is {"tuple": [...]}, and a tensor {"tensor": name} names its entry in the sidecar.
def _encode(value: Any, name: str, tensors: dict, method: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_encode(v, name, tensors, method) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, name, tensors, method) for v in value]}
    if isinstance(value, (Tensor, np.ndarray)):
        tensors[name] = torch.as_tensor(value).detach().cpu().clone()
        return {"tensor": name}
    raise ValueError(f"cannot save option {name}={type(value).__name__} of {method!r}: a saved reduction holds "
                     "numbers, strings, lists and tensors; save it without that option and pass it again to "
                     "vtr.patch")


def _decode(value: Any, tensors: dict, file: Path) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, file) for v in value]
    if isinstance(value, dict) and set(value) == {"tuple"}:
        return tuple(_decode(v, tensors, file) for v in value["tuple"])
    if isinstance(value, dict) and set(value) == {"tensor"}:
        if value["tensor"] not in tensors:
            raise ValueError(f"{file} names tensor {value['tensor']!r}, but {TENSORS} beside it does not hold it")
        return tensors[value["tensor"]]
    return value
