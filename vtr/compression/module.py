"""What every compression shares, whatever the model family: the module a compressed model carries
(:class:`Compression`), installing and removing it, the per-call report, and forcing a level.

A compressed model has a submodule ``_vtr_compression`` (the settings and any trainable router: its parameters are
the model's own, and ``state_dict`` round-trips strictly) and a class mixed in front of its own (the family's,
e.g. :class:`vtr.compression.llava.CompressedLlava`); TokenPacker also stands in the model's projector's place.
"""
from __future__ import annotations

import contextvars
import functools
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from vtr.adapters.base import restore_class, swap_class
from vtr.adapters.vlm.calls import arguments_by_name, refuse_position_ids
from vtr.adapters.vlm.prompt import with_callers_prompt

COMPRESSION = "_vtr_compression"


@dataclass
class CompressionReport:
    """What the last call of a compressed model did, per image (in prompt order)."""

    method: str
    image_rows: Tensor            # [I] the prompt row of each image
    levels: Tensor                # [I] pooling factor each image got (granularity; TokenPacker: its scale)
    tokens_before: Tensor         # [I] placeholders the prompt gave the image
    tokens_after: Tensor          # [I] tokens the language model read
    kept_positions: Tensor        # [B, L'] source column in the caller's prompt of each compacted column, -1 padding

    @property
    def mean_tokens(self) -> float:
        return float(self.tokens_after.float().mean()) if self.tokens_after.numel() else 0.0


class Compression(nn.Module):
    """A compression's settings, its trainable parts (``router``) and, for TokenPacker, the original projector."""

    def __init__(self, method: str, arguments: dict, grid: tuple[int, int], *, layers: Optional[list] = None,
                 levels: Sequence[int] = (), router=None, scale: int = 1):
        super().__init__()
        self.method, self.arguments, self.grid = method, dict(arguments), grid
        self.layers, self.levels, self.scale = layers, tuple(levels), scale
        self.family = "llava"      # which family module (vtr.compression.llava / qwen_vl) runs its calls
        if isinstance(router, nn.Module):
            self.router = router
        else:
            self.__dict__["free_router"] = router
        self.__dict__["original_projector"] = None

    @property
    def routes(self) -> bool:
        """Whether a router picks a level per image (adaptive granularity), rather than one fixed packing."""
        return "router" in self._modules or self.__dict__.get("free_router") is not None

    @property
    def packs(self) -> bool:
        """Whether the compression is a projector of its own in the model's place (TokenPacker)."""
        return self.__dict__["original_projector"] is not None

    def describe(self) -> str:
        return f"{self.method}({', '.join(f'{k}={v!r}' for k, v in self.arguments.items())})"

    def choose(self, tokens: Tensor, question: Tensor, grid: Optional[tuple[int, int]] = None) -> int:
        """Index of the level for one image (on ``grid``, default the model's); ``forced_level`` overrides the
        router."""
        forced = _FORCED.get()
        if forced is not None:
            return self.levels.index(forced)
        router = self._modules.get("router") or self.__dict__["free_router"]
        return router.choose(tokens, question, grid or self.grid, self.levels)


def attach(model: nn.Module, compression: Compression, mixin: type, projector: Optional[nn.Module] = None) -> None:
    """Install ``compression`` on ``model``, with the family's class ``mixin`` in front of the model's (and
    ``projector`` in place of the model's ``multi_modal_projector``)."""
    weights = next(p for p in model.parameters() if p.is_floating_point())
    compression.to(device=weights.device, dtype=weights.dtype)
    if projector is not None:
        projector.to(device=weights.device, dtype=weights.dtype).train(model.training)
        compression.__dict__["original_projector"] = model.model.multi_modal_projector
        model.model.multi_modal_projector = projector
    compression.train(model.training)
    setattr(model, COMPRESSION, compression)
    swap_class(model, mixin)


def detach(model: nn.Module) -> None:
    compression = model._modules.pop(COMPRESSION)
    if compression.original_projector is not None:
        model.model.multi_modal_projector = compression.original_projector
    restore_class(model.model)      # LLaVA-NeXT's packing (vtr.compression.anyres; a no-op elsewhere)
    restore_class(model)


# -- calls --------------------------------------------------------------------------------------------------

_FORCED: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("vtr_forced_level", default=None)
_LAST: contextvars.ContextVar = contextvars.ContextVar("vtr_compression_last", default=None)


@contextmanager
def forced_level(model: nn.Module, factor: int) -> Iterator[None]:
    """Every image of the calls inside gets pooling level ``factor`` (one of the model's levels), whatever its
    router says: for measuring a fixed level, and for RGLF's per-level answer losses."""
    compression = compression_of(model)
    if not compression.routes or factor not in compression.levels:
        raise ValueError(f"forced_level: factor must be one of the granularity levels {list(compression.levels)}, "
                         f"got {factor!r}")
    token = _FORCED.set(factor)
    try:
        yield
    finally:
        _FORCED.reset(token)


def compression_of(model: nn.Module) -> Compression:
    compression = model._modules.get(COMPRESSION) if isinstance(model, nn.Module) else None
    if compression is None:
        raise ValueError("model is not compressed by vtr; call vtr.compress(model, ...) first")
    return compression


def last_report(model: nn.Module) -> CompressionReport:
    calls = _LAST.get()
    found = None if calls is None else calls.get(compression_of(model))
    if found is None:
        raise ValueError("no call with images of this compressed model yet in this thread: run it once, then read "
                         "vtr.report(model)")
    return found


def record(compression: Compression, report: CompressionReport) -> None:
    calls = _LAST.get()
    calls = weakref.WeakKeyDictionary() if calls is None else calls.copy()
    calls[compression] = report
    _LAST.set(calls)


_IN_GENERATE: contextvars.ContextVar[bool] = contextvars.ContextVar("vtr_compression_generating", default=False)


@contextmanager
def generating() -> Iterator[None]:
    """Inside a compressed model's ``generate()``: its decode steps (forwards without images) keep the prefill's
    report."""
    token = _IN_GENERATE.set(True)
    try:
        yield
    finally:
        _IN_GENERATE.reset(token)


def record_text_only(compression: Compression, input_ids: Optional[Tensor]) -> None:
    """A call without images (not a decode step of ``generate()``): its report has no image and keeps every column,
    so ``vtr.report`` never describes an earlier call as this one."""
    if _IN_GENERATE.get() or input_ids is None:
        return
    empty = torch.zeros(0, dtype=torch.long)
    columns = torch.arange(input_ids.shape[1]).expand(input_ids.shape[0], -1).clone()
    record(compression, CompressionReport(compression.method, empty, empty, empty, empty, columns))


class CompressedModel:
    """What the families' mixins share: calls with images run on the compacted prompt. A family names itself
    (``family``, for errors) and says how its images are prepared (``prepare_images``); the forward of the model's
    own class is wrapped once per swapped class (``__init_subclass__``), ``generate()`` here."""

    family = "model"

    def prepare_images(self, input_ids: Optional[Tensor], arguments: dict, left: bool) -> tuple[Tensor, dict, Tensor]:
        """(compacted input_ids, the language model's other inputs, kept_positions) of a call with images; pops
        ``pixel_values``, ``attention_mask`` and the family's image arguments from ``arguments``."""
        raise NotImplementedError

    def refuse_arguments(self, arguments: dict) -> None:
        """Raise on arguments the family's compression cannot take, with or without images."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        original = cls.__dict__.get("_vtr_original")
        if original is None:
            return
        original_forward = original.forward

        @functools.wraps(original_forward)   # generate() reads forward's signature (mm_encoder_outputs, ...)
        def forward(self, *args, **kwargs):
            arguments = arguments_by_name(original_forward, self, args, kwargs)
            self.refuse_arguments(arguments)
            if arguments.get("pixel_values") is None:
                record_text_only(compression_of(self), arguments.get("input_ids"))
                return original_forward(self, **arguments)
            refuse_position_ids(arguments, self.family)
            mask = arguments.get("attention_mask")
            right_padded = mask is not None and bool((mask[:, -1] == 0).any())
            ids, inputs, kept_positions = self.prepare_images(arguments.get("input_ids"), arguments, not right_padded)
            if arguments.get("labels") is not None:
                labels = arguments["labels"].gather(1, kept_positions.clamp_min(0))
                arguments["labels"] = labels.masked_fill(kept_positions < 0, -100)
            arguments.update(input_ids=ids, **inputs)
            return original_forward(self, **arguments)

        cls.forward = forward

    def generate(self, inputs: Optional[Tensor] = None, *args, **kwargs):
        input_ids = kwargs.pop("input_ids", None) if inputs is None else inputs
        self.refuse_arguments(kwargs)
        if kwargs.get("pixel_values") is None:
            kwargs.pop("pixel_values", None)
            record_text_only(compression_of(self), input_ids)
            with generating():
                return super().generate(input_ids, *args, **kwargs)
        if kwargs.get("mm_encoder_outputs") is not None:
            raise ValueError("precomputed mm_encoder_outputs would bypass vtr's compression; pass pixel_values")
        refuse_position_ids(kwargs, self.family)
        with torch.no_grad():
            ids, prepared, _ = self.prepare_images(input_ids, kwargs, True)
        with generating():
            output = super().generate(ids, *args, **prepared, **kwargs)
        return with_callers_prompt(output, input_ids, ids.shape[1])

    def save_pretrained(self, *args, **kwargs):
        raise ValueError("a vtr-compressed model has weights its own class cannot load (the compression's): save "
                         "model.state_dict() instead, and load it strict into a model compressed the same way "
                         "(vtr.compress(fresh, ...); fresh.load_state_dict(state, strict=True)), or vtr.unpatch first")
