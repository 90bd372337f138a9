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
from ..adapters import is_patched, settings, unwrap
from ..api import patch

FILE = "vtr_reduction.json"
TENSORS = "vtr_reduction.pt"
FORMAT = 1
# The fields load_reduction passes to vtr.patch: their JSON type, and what they hold (for the error naming one).
FIELDS = {"method": (str, "a method name (a string)"), "arguments": (dict, "an object of vtr.patch arguments"),
          "metric": (str, "a string ('x' or 'keys')"), "prop_attn": (bool, "true or false")}


def save_reduction(model: nn.Module, path: Union[str, Path]) -> Path:
    """Write the reduction ``model`` is patched with to ``path/vtr_reduction.json`` (``path`` is a
    directory, created if missing: the one ``save_pretrained`` wrote). Returns the JSON file.

    Options that are tensors or arrays are stored in ``path/vtr_reduction.pt``; an option that is
    neither data nor a number (a module, a function) is a ValueError: pass it again to ``vtr.patch``.
    """
    reduction = settings(model)
    tensors: dict[str, Tensor] = {}
    arguments = {name: _encode(value, name, tensors, reduction.method) for name, value in reduction.arguments.items()}
    document = {"vtr_reduction": FORMAT, "vtr_version": __version__, "model": type(unwrap(model)).__name__,
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
    a ValueError: unpatch it first, so two reductions are never stacked by accident.

    A file that is not what ``save_reduction`` writes (not JSON, a field missing or of the wrong type, a
    ``vtr_reduction.pt`` torch cannot read) is a ValueError naming the file and the field, as is a saved
    value ``vtr.patch`` refuses.
    """
    if is_patched(model):
        raise ValueError(f"model is already patched with {settings(model).describe()}; vtr.unpatch(model) before "
                         "loading a saved reduction")
    file = saved_reduction(path)
    if file is None:
        raise FileNotFoundError(f"no {FILE} in {str(path)!r} (vtr.save_reduction(model, directory) writes it)")
    document = _read_document(file)
    tensors = _read_tensors(file.parent / TENSORS) if (file.parent / TENSORS).exists() else {}
    arguments = {name: _decode(value, name, tensors, file) for name, value in document["arguments"].items()}
    try:
        return patch(model, document["method"], metric=document["metric"], prop_attn=document["prop_attn"],
                     **arguments)
    except ValueError as error:   # a saved value vtr.patch refuses: say where it came from
        raise ValueError(f"{file}: {error}") from error


def load_torch_file(path: Union[str, Path], what: str = "torch file") -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU. A file torch cannot read is a ValueError naming
    it and ``what`` it should have been: the unpickler trips over stray bytes with whatever it meets first
    (UnpicklingError, but also IndexError, KeyError, UnicodeDecodeError), none of which says which file. A
    missing file stays a FileNotFoundError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:   # noqa: BLE001 - any failure to unpickle means the same: not a torch file
        raise ValueError(f"{path} is no {what} torch.load(weights_only=True) can read ({type(error).__name__})") \
            from error


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


def _decode(value: Any, name: str, tensors: dict, file: Path) -> Any:
    if isinstance(value, list):
        return [_decode(v, name, tensors, file) for v in value]
    if isinstance(value, dict) and set(value) == {"tuple"} and isinstance(value["tuple"], list):
        return tuple(_decode(v, name, tensors, file) for v in value["tuple"])
    if isinstance(value, dict) and set(value) == {"tensor"}:
        if value["tensor"] not in tensors:
            raise ValueError(f"{file}: argument {name!r} names tensor {value['tensor']!r}, but {TENSORS} beside it "
                             "does not hold it")
        return tensors[value["tensor"]]
    if isinstance(value, dict):
        raise ValueError(f"{file}: argument {name!r} must be a number, string, list, {{\"tuple\": [...]}} or "
                         f"{{\"tensor\": name}}, got {json.dumps(value)}")
    return value


def _read_document(file: Path) -> dict:
    """The JSON ``save_reduction`` wrote, with every field ``load_reduction`` reads present and of its type."""
    again = "write it again with vtr.save_reduction(model, directory)"
    text = file.read_bytes()
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        problem = "is empty" if not text.strip() else f"is not JSON ({error})"
        raise ValueError(f"{file} {problem}; {again}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{file} must hold a JSON object (fields {', '.join(['vtr_reduction', *FIELDS])}), got "
                         f"{_json_type(document)}; {again}")
    if document.get("vtr_reduction") != FORMAT:
        raise ValueError(f"{file}: field 'vtr_reduction' must be {FORMAT} (the format vtr.save_reduction writes), "
                         f"got {json.dumps(document.get('vtr_reduction'))}")
    for field, (kind, allowed) in FIELDS.items():
        if field not in document:
            raise ValueError(f"{file}: field {field!r} is missing; it must be {allowed}")
        if not isinstance(document[field], kind):
            raise ValueError(f"{file}: field {field!r} must be {allowed}, got {_json_type(document[field])}")
    return document


def _read_tensors(file: Path) -> dict[str, Tensor]:
    """The sidecar of tensor options: a dict of tensors by option name."""
    tensors = load_torch_file(file, "tensor file")
    if not (isinstance(tensors, dict) and all(isinstance(v, Tensor) for v in tensors.values())):
        raise ValueError(f"{file} must hold a dict of tensors by option name (vtr.save_reduction writes it), got "
                         f"{type(tensors).__name__}")
    return tensors


def _json_type(value: Any) -> str:
    """How JSON calls the type of ``value`` (as json.loads gives it)."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
