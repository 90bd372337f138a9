"""``generate()`` and ``forward()`` of a model whose visual tokens are reduced before its language model: the
family's ``prepare`` encodes and reduces the images and compacts the prompt; the language model then runs an
ordinary, shorter prompt; ``generate()`` returns the caller's prompt followed by the new tokens."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from vtr.core import run as runs

from .prompt import with_callers_prompt
from .report import text_only_report

def arguments_by_name(forward: Callable, model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """A call's arguments by name, as ``forward`` (the model class's own) would bind them; ``**kwargs`` flattened."""
    arguments = dict(inspect.signature(forward).bind(model, *args, **kwargs).arguments)
    arguments.pop("self")
    arguments |= arguments.pop("kwargs", {})
    return arguments


# prepare(model, input_ids, inputs, left) -> Compacted: ``inputs`` are the call's own keyword arguments that the
# family consumes (``Family.inputs``: the pixel values and what describes them, the attention mask, ...).
Prepare = Callable[[nn.Module, Optional[Tensor], dict, bool], "Compacted"]


@dataclass
class Compacted:
    """The compacted prompt and what else the model takes with it."""

    input_ids: Tensor
    kept_positions: Tensor      # [B, L'] source column in the caller's prompt, -1 padding
    model_inputs: dict          # attention_mask, mm_encoder_outputs (reduced features), position_ids, ...


@dataclass(frozen=True)
class Family:
    """What the calls need of a family: its ``prepare``, the keyword arguments it consumes (``inputs``; those
    starting with ``pixel_values`` carry the images), its report class and the name ``where`` it reduces."""

    prepare: Prepare
    inputs: tuple
    report_kind: type
    where: str
    name: str


def _has_pixels(inputs: dict) -> bool:
    return any(key.startswith("pixel_values") and value is not None for key, value in inputs.items())


def generate(model: nn.Module, family: Family, generate_fn: Callable, inputs: Optional[Tensor], *args, **kwargs):
    """``generate()`` on the compacted prompt with the reduced features; the caller's prompt, then the new tokens."""
    input_ids = kwargs.pop("input_ids", None) if inputs is None else inputs
    if kwargs.get("mm_encoder_outputs") is not None:
        raise ValueError(f"precomputed mm_encoder_outputs would bypass vtr's reduction on a patched {family.name}; "
                         "pass the pixel values (or vtr.unpatch(model) first)")
    own = {key: kwargs.pop(key) for key in family.inputs if kwargs.get(key) is not None}
    if not _has_pixels(own):
        if input_ids is not None:
            runs.record(model._vtr, text_only_report(model, input_ids, own.get("attention_mask"), family.where,
                                                     family.report_kind))
        return generate_fn(input_ids, *args, **own, **kwargs)
    refuse_position_ids(kwargs, family.name)
    with torch.no_grad():   # as generate() itself: no autograd graph for the tower (assisted decoding copies it)
        compacted = family.prepare(model, input_ids, own, True)
    output = generate_fn(compacted.input_ids, *args, **compacted.model_inputs, **kwargs)
    return with_callers_prompt(output, input_ids, compacted.input_ids.shape[1])


def forward(model: nn.Module, family: Family, original_forward: Callable, arguments: dict):
    """The model's forward; with pixel values it runs on the compacted prompt (``vtr.report(model).kept_positions``
    maps its columns back to the caller's prompt; ``labels`` follow them)."""
    if not _has_pixels(arguments):
        return original_forward(model, **arguments)
    refuse_position_ids(arguments, family.name)
    mask = arguments.get("attention_mask")
    right_padded = mask is not None and bool((mask[:, -1] == 0).any())
    own = {key: arguments.pop(key) for key in family.inputs if arguments.get(key) is not None}
    compacted = family.prepare(model, arguments.get("input_ids"), own, not right_padded)
    if arguments.get("labels") is not None:
        labels = arguments["labels"].gather(1, compacted.kept_positions.clamp_min(0))
        arguments["labels"] = labels.masked_fill(compacted.kept_positions < 0, -100)
    arguments.update(input_ids=compacted.input_ids, **compacted.model_inputs)
    return original_forward(model, **arguments)


def refuse_position_ids(arguments: dict, name: str) -> None:
    if arguments.get("position_ids") is not None:
        raise ValueError(f"position_ids cannot be combined with pixel values on a vtr-patched {name}: the prompt is "
                         "compacted, and vtr gives every token it keeps its position")
