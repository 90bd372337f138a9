"""Hugging Face LLaVA adapter: fewer visual tokens reach the language model; ``generate()`` unchanged.

Where: once per image, on the projector output (the very tokens the language model would read),
with any vtr reducer, down to ``budget`` tokens per image. A reducer whose ``max_step`` is below 1
(bipartite merging removes at most half per step) runs as many steps as the budget needs.

How the language model sees it: the prompt is *compacted*. Each image keeps as many ``<image>``
placeholders (found from ``config.image_token_id``, never a hard-coded span) as it kept tokens,
padding is rebuilt on the left, and the reduced features go in through ``mm_encoder_outputs``.
The language model then runs an ordinary, shorter prompt: ``generate()`` numbers positions from
the compacted mask as it always does (kept tokens get consecutive positions), the KV cache is
short from the first step, every attention implementation works, and each row of a batch
computes what it would compute alone, whatever each row kept. ``generate()`` returns the caller's
own prompt followed by the new tokens, as the unpatched model does.

``layers=[K]`` prunes inside the language model instead, ``layers=[K1, K2, ...]`` progressively at
each of those decoder layers (``adapters/llava_prune.py``).
LLaVA-NeXT (AnyRes: a thumbnail plus crops, a different token count per image) takes the same
flow; ``adapters/llava_next.py`` splits each image's budget over its thumbnail and crops. In-LLM
pruning works on it too, each image keeping ``min(budget, its own count)``.

Limits: ``prop_attn`` has no effect here (the language model's attention is not changed; a merged
token counts once); ``forward()`` with ``pixel_values`` returns logits over the compacted prompt
(``vtr.report(model).kept_positions`` maps them back) and refuses ``position_ids``; prompts must
come as ``input_ids``; ``image_sizes`` is for LLaVA-NeXT only; other LLaVA-family models
(LLaVA-NeXT-Video, LLaVA-OneVision, VipLLaVA, ...) are refused with UnsupportedModelError.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from vtr.config import Reduction, Report
from vtr.cost import EncoderCost
from vtr.reducers import Reducer, Signals
from vtr.schedule import Schedule
from vtr.signals import cls_attention
from vtr.state import TokenState

from .errors import UnsupportedModelError
from .steps import linear_macs

name = "llava"
AMOUNTS = ("budget",)          # vtr.patch(model, method, budget=64): visual tokens kept per image
WHERE = "before the language model (projector output, per image)"
_VISION_KEYS = ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes")


def _llava_classes() -> tuple:
    try:
        from transformers import LlavaForConditionalGeneration, LlavaModel
    except ImportError:  # transformers is optional for vtr
        return ()
    return LlavaForConditionalGeneration, LlavaModel


def matches(model: nn.Module) -> bool:
    """Any LLaVA-family model of transformers, so that unsupported members get a clear error."""
    return (type(model).__module__.startswith("transformers.models.llava") or isinstance(model, _llava_classes())
            or _anyres(model) is not None)


def _anyres(model: nn.Module):
    """The LLaVA-NeXT module when ``model`` is LLaVA-NeXT, else None (imported here: it builds on this one)."""
    from . import llava_next
    return llava_next if llava_next.is_next(model) else None


def check(model: nn.Module) -> None:
    kind = type(model).__name__
    classes = _llava_classes()
    anyres = _anyres(model)
    if anyres is None and (not classes or not isinstance(model, classes[0])):
        raise UnsupportedModelError(
            f"vtr's LLaVA adapter supports transformers' LlavaForConditionalGeneration (LLaVA-1.5) and "
            f"LlavaNextForConditionalGeneration (LLaVA-NeXT, AnyRes); got {kind}, which is not supported. "
            "For a bare LlavaModel / LlavaNextModel, patch the ...ForConditionalGeneration that holds it"
        )
    config = model.config
    if getattr(config, "image_token_id", None) is None:
        raise UnsupportedModelError(f"{kind}.config.image_token_id is not set: vtr finds the image span from it")
    if anyres is not None:
        anyres.check(model)
    if config.vision_feature_select_strategy not in ("default", "full"):
        raise UnsupportedModelError(
            f"vision_feature_select_strategy={config.vision_feature_select_strategy!r}; supported: 'default', 'full'"
        )


def image_tokens(model: nn.Module) -> tuple[int, int]:
    """(visual tokens per image, protected leading tokens) at the model's own image size.

    With the 'full' strategy the first feature is the vision tower's CLS token: it is protected.
    LLaVA-NeXT: the most tokens one image can have (its count depends on the image's size).
    """
    anyres = _anyres(model)
    if anyres is not None:
        return anyres.largest_image_tokens(model), 0
    config = model.config
    vision = config.vision_config
    protected = 1 if config.vision_feature_select_strategy == "full" else 0
    if hasattr(vision, "image_size") and hasattr(vision, "patch_size"):
        return (vision.image_size // vision.patch_size) ** 2 + protected, protected
    return int(config.image_seq_length), protected


def reduction_steps(num_tokens: int, budget: int, reducer: Reducer, num_protected: int) -> list[int]:
    """Tokens each step removes to go from ``num_tokens`` to ``budget`` within the reducer's ``max_step``."""
    steps, n = [], num_tokens
    while n > budget:
        removable = reducer.max_removable(n, num_protected)
        if removable == 0:
            raise ValueError(
                f"method {reducer.name!r} cannot remove tokens, so it cannot keep budget={budget} of {num_tokens}"
            )
        kept = max(budget, n - removable)
        steps.append(n - kept)
        n = kept
    return steps


def make_schedule(model: nn.Module, reducer: Reducer, *, r=None, keep=None, flops=None, layers=None,
                  budget: Optional[Union[int, Sequence[int]]] = None) -> Schedule:
    """``budget=`` (visual tokens kept per image) as a schedule of reduction steps.

    ``layers=None`` reduces on the projector output, before the language model; ``layers=[K]``
    prunes inside the language model at decoder layer K (FastV-style), ``layers=[K1, K2, ...]``
    progressively at each of them (``budget=`` the final count, or one count per layer; see
    ``llava_prune``).
    """
    others = [k for k, v in (("r", r), ("keep", keep), ("flops", flops)) if v is not None]
    if others:
        raise ValueError(
            f"the LLaVA adapter takes budget= (visual tokens kept per image), not {', '.join(o + '=' for o in others)}"
        )
    num_tokens, protected = image_tokens(model)
    low = protected + 1 if _anyres(model) is None else _anyres(model).MIN_BUDGET
    if layers is not None:
        from .llava_prune import stage_budgets, stage_layers
        num_stages = len(stage_layers(layers, len(model.model.language_model.layers)))
        if reducer.max_step != 0.0 and budget is not None:
            budgets = stage_budgets(budget, num_tokens, protected, num_stages)
            steps = []
            for entering, kept in zip([num_tokens] + budgets, budgets):
                steps += reduction_steps(entering, kept, reducer, protected)
            return Schedule("r", tuple(steps) or (0,))
    if reducer.max_step == 0.0:  # the 'none' method
        if budget not in (None, num_tokens):
            raise ValueError(f"method {reducer.name!r} does not reduce; leave out budget= (or set budget={num_tokens})")
        return Schedule("r", (0,))
    if budget is None:
        raise ValueError(f"method {reducer.name!r} needs budget= (visual tokens kept per image, {low}..{num_tokens})")
    if isinstance(budget, bool) or not isinstance(budget, int) or not low <= budget <= num_tokens:
        raise ValueError(
            f"budget must be an int in [{low}, {num_tokens}] (visual tokens kept per image; this model "
            f"gives at most {num_tokens} per image), got {budget!r}"
        )
    return Schedule("r", tuple(reduction_steps(num_tokens, budget, reducer, protected)) or (0,))


def cost(model: nn.Module, metric: str = "x") -> EncoderCost:
    """Language-model MACs of one image's visual tokens (what the reduction saves), per layer."""
    language = model.model.language_model
    layer = language.layers[0]
    num_tokens, protected = image_tokens(model)
    return EncoderCost(
        num_tokens=num_tokens,
        num_protected=protected,
        num_layers=len(language.layers),
        attn_linear=linear_macs(layer.self_attn),
        attn_dim=layer.self_attn.q_proj.out_features,
        mlp_linear=linear_macs(layer.mlp),
        fixed=0.0,
        metric_dim=model.config.text_config.hidden_size,
    )


def prefill_macs(model: nn.Module, num_tokens: Tensor, kept_tokens: Optional[Union[Tensor, Sequence[Tensor]]] = None,
                 from_layer: Union[int, Sequence[int]] = 0) -> Tensor:
    """Analytic language-model prefill MACs for prompts of ``num_tokens`` real tokens (per row).

    Linear layers per token, causal attention scores and values over ``T(T+1)/2`` query-key
    pairs, and the head on the last position (what ``generate()`` computes). Norms, activations
    and softmax are left out, as every counter does. With ``kept_tokens``, layers from
    ``from_layer`` on run on that many tokens (in-LLM pruning); with lists (progressive pruning),
    layers from ``from_layer[i]`` on run on ``kept_tokens[i]`` tokens.
    """
    c = cost(model)

    def layer(t: Tensor) -> Tensor:
        t = t.double()
        return (c.attn_linear + c.mlp_linear) * t + c.attn_dim * t * (t + 1)

    kept_tokens = num_tokens if kept_tokens is None else kept_tokens
    counts = [num_tokens, *(kept_tokens if isinstance(kept_tokens, (list, tuple)) else [kept_tokens])]
    bounds = [0, *(from_layer if isinstance(from_layer, (list, tuple)) else [from_layer]), c.num_layers]
    segments = sum(layer(t) * (end - start) for t, start, end in zip(counts, bounds[:-1], bounds[1:]))
    return segments + linear_macs(model.lm_head)


def expected_flops(model: nn.Module) -> tuple[float, float]:
    """(reduced, unreduced) language-model prefill MACs of one image's visual tokens alone (no text),
    the reducer's own decisions included; the vision tower is the same either way.
    LLaVA-NeXT: of the largest image (crops split by token count; the thumbnail's attention is only
    known at run time)."""
    num_tokens, protected = image_tokens(model)
    reduction = getattr(model, "_vtr", None)
    if not isinstance(reduction, Reduction):
        unreduced = float(prefill_macs(model, torch.tensor([num_tokens])))
        return unreduced, unreduced
    if _pruner(model) is not None:
        return _pruner(model).expected_flops(num_tokens)
    anyres = _anyres(model)
    if anyres is not None and reduction.reduces:
        budget = reduction.arguments["budget"]
        parts = anyres.expected_parts(model, budget)
        decisions = sum(decision_macs(model, reduction, step_counts(n, reduction_steps(n, b, reduction.reducer, 0)))
                        for n, b in parts)
        kept = budget
    else:
        tokens = reduction.schedule.token_counts(reduction.reducer, num_tokens, protected)
        decisions, kept = decision_macs(model, reduction, tokens), tokens[-1]
    reduced, unreduced = prefill_macs(model, torch.tensor([kept, num_tokens])).tolist()
    return reduced + decisions, unreduced


@dataclass
class LlavaReport(Report):
    """What the last call really kept (a :class:`vtr.Report` whose batch dimension is the images).

    tokens: visual tokens per image entering each reduction step, then the count kept.
    stage_layers / stage_tokens: in-LLM pruning only: the decoder layer of each stage, and the visual
        tokens per image entering the first stage, then kept after each stage (``tokens`` lists
        every reducer step; a stage takes several when the reducer's ``max_step`` is below 1).
        When the images have different counts (LLaVA-NeXT), both give the most any image had or
        kept (``tokens`` equals ``stage_tokens``); ``image_tokens_before/after`` give each image's.
    assignment / size: per image, as in :class:`vtr.Report` (merged tokens have size > 1).
    image_rows: ``[I]`` prompt row of each image.
    visual_tokens_before / visual_tokens_after: ``[B]`` placeholders per row in the caller's prompt
        and in the compacted prompt the language model saw (text-only rows: 0 and 0).
    kept_positions: ``[B, L']`` index in the caller's prompt of each column of the compacted prompt,
        -1 for padding; ``forward()`` logits follow these columns.
    prefill_macs / prefill_macs_unreduced: ``[B]`` analytic language-model prefill MACs per row,
        with and without the reduction (real tokens only; the vision tower is unchanged).
    reducer_macs: MACs of the reducer's own decisions for the whole batch.
    image_tokens_before / image_tokens_after: ``[I]`` visual tokens of each image before and after.
    anyres: LLaVA-NeXT only, per image an :class:`adapters.llava_next.AnyresSplit`: the tokens and
        budgets of its base image, its crops and its newline tokens. For LLaVA-NeXT ``tokens`` is
        [most tokens an image had, most an image kept], ``assignment`` is padded with -1 past an
        image's own token count, ``size`` with 0 past its kept count, and ``grid`` is None.
    """

    where: str = WHERE
    image_rows: Optional[Tensor] = None
    visual_tokens_before: Optional[Tensor] = None
    visual_tokens_after: Optional[Tensor] = None
    kept_positions: Optional[Tensor] = None
    prefill_macs: Optional[Tensor] = None
    prefill_macs_unreduced: Optional[Tensor] = None
    reducer_macs: float = 0.0
    stage_layers: Optional[list] = None
    stage_tokens: Optional[list] = None
    image_tokens_before: Optional[Tensor] = None
    image_tokens_after: Optional[Tensor] = None
    anyres: Optional[list] = None

    @property
    def crop_budgets(self) -> Optional[list[list[int]]]:
        """LLaVA-NeXT: per image, the tokens kept from each crop (row-major crop order)."""
        return None if self.anyres is None else [split.crop_budgets for split in self.anyres]

    @property
    def prefill_flops_saved(self) -> float:
        """Fraction of the batch's analytic language-model prefill MACs the reduction removed."""
        unreduced = float(self.prefill_macs_unreduced.sum())
        return 1.0 - (float(self.prefill_macs.sum()) + self.reducer_macs) / unreduced


@dataclass
class ReducedImages:
    """Each image's reduced features and what they carry, for the compacted prompt and the report."""

    features: list[Tensor]        # [K_i, D] per image, in the order the language model reads them
    assignment: list[Tensor]      # [N_i] index of the output token carrying each original one, -1 dropped
    size: list[Tensor]            # [K_i] original tokens each output token stands for
    tokens: list[int]             # LlavaReport.tokens
    reducer_macs: float
    num_protected: int = 0
    grid: Optional[tuple] = None
    anyres: Optional[list] = None  # LLaVA-NeXT: per image, how the budget was split


@dataclass
class Prepared:
    """Compacted inputs for the language model and what to restore for the caller."""

    input_ids: Tensor
    attention_mask: Tensor
    image_outputs: object          # the vision tower's output with reduced ``pooler_output``
    kept_positions: Tensor         # [B, L'] source column in the caller's prompt, -1 padding


def _image_of_placeholder(placeholder: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """For each position: index of the image its placeholder belongs to, and its rank in that image.

    transformers fills placeholders with the images' features in row-major order, image after
    image, so the k-th placeholder of the batch belongs to the image whose cumulative count covers k.
    """
    order = placeholder.flatten().long().cumsum(0).view_as(placeholder) - 1
    ends = counts.cumsum(0)
    image = torch.searchsorted(ends, order.clamp_min(0), right=True).clamp_max(len(counts) - 1)
    rank = order - (ends - counts)[image]
    return image, rank


def compact_prompt(input_ids: Tensor, attention_mask: Tensor, image_token_id: int, counts: Tensor,
                   kept: Tensor, pad_id: int, left: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Drop each image's placeholders past its kept count and the old padding; pad again.

    ``counts`` / ``kept`` ``[I]``: placeholders per image before / after. Returns ``input_ids``,
    ``attention_mask`` and ``kept_positions`` (source column, -1 padding) of the compacted prompt.
    """
    placeholder = input_ids == image_token_id
    keep = attention_mask.bool()
    if counts.numel():
        image, rank = _image_of_placeholder(placeholder, counts)
        keep = torch.where(placeholder, rank < kept[image], keep)
    kept_positions = kept_columns(keep, left)
    real = kept_positions >= 0
    ids = torch.where(real, input_ids.gather(1, kept_positions.clamp_min(0)), pad_id)
    return ids, real.to(attention_mask.dtype), kept_positions


def kept_columns(keep: Tensor, left: bool = True) -> Tensor:
    """``[B, L']`` source column of each slot of the rows' kept tokens (in order), -1 for padding."""
    lengths = keep.sum(1)
    width = int(lengths.max()) if lengths.numel() else 0
    column = keep.long().cumsum(1) - 1 + ((width - lengths)[:, None] if left else 0)
    rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(column)
    source = torch.arange(keep.shape[1], device=keep.device).expand_as(column)
    kept = torch.full((keep.shape[0], width), -1, dtype=torch.long, device=keep.device)
    kept[rows[keep], column[keep]] = source[keep]
    return kept


class ReducingLlava:
    """Mixed in before the model's own class; see the module docstring."""

    _vtr: Reduction

    def generate(self, inputs: Optional[Tensor] = None, *args, **kwargs):
        if _pruner(self) is not None:   # in-LLM pruning: hooks on the decoder layers do the work
            _pruner(self).check_generate(kwargs)
            return super().generate(inputs, *args, **kwargs)
        pixel_values = kwargs.pop("pixel_values", None)
        input_ids = kwargs.pop("input_ids", None) if inputs is None else inputs
        if pixel_values is None:
            if kwargs.get("mm_encoder_outputs") is not None:
                raise ValueError("precomputed mm_encoder_outputs would bypass vtr's reduction on a patched LLaVA; "
                                 "pass pixel_values (or vtr.unpatch(model) first)")
            if input_ids is not None:
                self._vtr.report = text_only_report(self, input_ids, kwargs.get("attention_mask"))
            return super().generate(input_ids, *args, **kwargs)
        vision = {k: kwargs.pop(k) for k in _VISION_KEYS if k in kwargs}
        with torch.no_grad():   # as generate() itself: no autograd graph for the tower (assisted decoding copies it)
            prepared = self._vtr_prepare(input_ids, kwargs.pop("attention_mask", None), pixel_values, left=True,
                                         **vision)
        output = super().generate(prepared.input_ids, *args, attention_mask=prepared.attention_mask,
                                  mm_encoder_outputs={"image": prepared.image_outputs}, **kwargs)
        return _with_callers_prompt(output, input_ids, prepared.input_ids.shape[1])

    def save_pretrained(self, *args, **kwargs):
        """Saved as the original class: the checkpoint is the unpatched model's, weights untouched."""
        patched = type(self)
        self.__class__ = self._vtr.original_class
        try:
            return self.save_pretrained(*args, **kwargs)
        finally:
            self.__class__ = patched

    def _vtr_prepare(self, input_ids: Optional[Tensor], attention_mask: Optional[Tensor], pixel_values: Tensor,
                     left: bool, **vision) -> Prepared:
        """Encode the images, reduce each one, compact the prompt, record the report."""
        if input_ids is None:
            raise ValueError("a vtr-patched LLaVA needs input_ids with pixel_values: the image span is found from "
                             "config.image_token_id in input_ids (inputs_embeds are not supported)")
        anyres = _anyres(self)
        if anyres is None and vision.get("image_sizes") is not None:
            raise UnsupportedModelError("image_sizes (per-image resolutions) are for LLaVA-NeXT; vtr's LLaVA-1.5 "
                                        "path does not take them")
        if anyres is not None and vision.get("image_sizes") is None:
            raise ValueError("LLaVA-NeXT needs image_sizes ([images, 2] height and width of each image, as the "
                             "processor returns them) with pixel_values")
        if anyres is not None:
            anyres.check_inputs(pixel_values, vision["image_sizes"])
        reduction = self._vtr
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # NeXT splits each image's budget by the thumbnail's CLS attention, when the tower has one.
        wanted = "cls_attention" in reduction.reducer.needs or (anyres is not None and reduction.reduces)
        with _ClsAttention(self, wanted) as attention:
            image_outputs = self.model.get_image_features(pixel_values=pixel_values, return_dict=True, **vision)
        features = list(image_outputs.pooler_output)                    # [N_i, D] per image
        counts = torch.tensor([len(f) for f in features], dtype=torch.long, device=input_ids.device)
        image_token_id = self.config.image_token_id
        placeholder = input_ids == image_token_id
        if int(placeholder.sum()) != int(counts.sum()):
            raise ValueError(
                f"the prompt has {int(placeholder.sum())} image tokens (id {image_token_id}) but the "
                f"{len(features)} images give {int(counts.sum())} features"
            )
        image_rows = _image_rows(placeholder, counts)
        query = None
        if "query" in reduction.reducer.needs:
            query = _query(self, input_ids, attention_mask, placeholder, image_rows, reduction.query)
        cls_row = attention.value
        if cls_row is not None and image_tokens(self)[1] == 0:
            cls_row = cls_row[:, 1:]      # the CLS token is not among the 'default' features
        if anyres is not None:
            images = anyres.reduce_images(self, reduction, features, cls_row, query, vision["image_sizes"])
        else:
            images = _reduce_images(self, reduction, features, cls_row, query)

        kept = torch.tensor([len(f) for f in images.features], dtype=torch.long, device=input_ids.device)
        pad_id = _pad_id(self, image_token_id)
        ids, mask, kept_positions = compact_prompt(input_ids, attention_mask, image_token_id, counts, kept, pad_id,
                                                   left)
        image_outputs.pooler_output = images.features
        _record(self, reduction, images, image_rows, placeholder, ids == image_token_id, attention_mask, mask,
                kept_positions)
        return Prepared(ids, mask, image_outputs, kept_positions)


def _vtr_forward(self, original_forward, *args, **kwargs):
    """The model's forward; with ``pixel_values`` it runs on the compacted prompt (see LlavaReport)."""
    bound = inspect.signature(original_forward).bind(self, *args, **kwargs)
    arguments = dict(bound.arguments)
    arguments.pop("self")
    arguments |= arguments.pop("kwargs", {})
    pruner = _pruner(self)
    if pruner is not None:
        images = (arguments.get("mm_encoder_outputs") or {}).get("image")
        pruner.observe(arguments.get("input_ids"), arguments.get("attention_mask"),
                       arguments.get("cache", arguments.get("past_key_values")),
                       None if images is None else images.pooler_output, arguments.get("image_sizes"))
        return original_forward(self, **arguments)
    if arguments.get("pixel_values") is None:
        return original_forward(self, **arguments)
    if arguments.get("position_ids") is not None:
        raise ValueError("position_ids cannot be combined with pixel_values on a vtr-patched LLaVA: the prompt is "
                         "compacted, so positions follow the compacted attention_mask")
    mask = arguments.get("attention_mask")
    right_padded = mask is not None and bool((mask[:, -1] == 0).any())
    vision = {k: arguments.pop(k) for k in _VISION_KEYS if arguments.get(k) is not None}
    prepared = self._vtr_prepare(arguments.get("input_ids"), mask, arguments.pop("pixel_values"),
                                 left=not right_padded, **vision)
    if arguments.get("labels") is not None:
        labels = arguments["labels"].gather(1, prepared.kept_positions.clamp_min(0))
        arguments["labels"] = labels.masked_fill(prepared.kept_positions < 0, -100)
    arguments.update(input_ids=prepared.input_ids, attention_mask=prepared.attention_mask,
                     mm_encoder_outputs={"image": prepared.image_outputs})
    return original_forward(self, **arguments)


def _pruner(model):
    return getattr(model._vtr, "pruner", None)


def _with_callers_prompt(output, input_ids: Tensor, compact_length: int):
    """generate() output with the caller's prompt in front of the new tokens (not the compacted one)."""
    sequences = output if isinstance(output, Tensor) else output.sequences
    repeat = sequences.shape[0] // input_ids.shape[0]   # num_return_sequences / beams
    prompt = input_ids.repeat_interleave(repeat, dim=0).to(sequences.device)
    restored = torch.cat([prompt, sequences[:, compact_length:]], dim=1)
    if isinstance(output, Tensor):
        return restored
    output.sequences = restored
    return output


def _pad_id(model, image_token_id: int) -> int:
    for pad in (getattr(model.generation_config, "pad_token_id", None),
                getattr(model.config.text_config, "pad_token_id", None), 0):
        if isinstance(pad, int) and pad != image_token_id:
            return pad
    return 0 if image_token_id != 0 else 1


def _image_rows(placeholder: Tensor, counts: Tensor) -> Tensor:
    """Row of each image: the row holding its first placeholder."""
    starts = torch.cumsum(counts, 0) - counts
    flat_rows = placeholder.nonzero()[:, 0]
    return flat_rows[starts]


def _query(model, input_ids: Tensor, attention_mask: Tensor, placeholder: Tensor, image_rows: Tensor,
           given: Optional[Tensor]) -> list[Tensor]:
    """Per image ``[1, Q, D]``: the language model's input embeddings of its row's text tokens, or the
    row's query from ``vtr.conditioned(model, query)`` (``[B, D]`` / ``[B, Q, D]``, one row per prompt)."""
    if given is not None:
        if given.shape[0] != input_ids.shape[0]:
            raise ValueError(f"vtr.conditioned: query must have one row per prompt ({input_ids.shape[0]}), "
                             f"got {tuple(given.shape)}")
        return [given[row][None].to(model.dtype) for row in image_rows.tolist()]
    text = attention_mask.bool() & ~placeholder
    embed = model.get_input_embeddings()
    queries = []
    for row in image_rows.tolist():
        tokens = input_ids[row][text[row]]
        if tokens.numel() == 0:
            raise ValueError(f"query-conditioned reduction needs text in the prompt; row {row} has only image tokens")
        queries.append(embed(tokens)[None])
    return queries


class _ClsAttention:
    """Captures q/k of the vision layer whose output LLaVA uses, to give reducers the CLS attention row.

    Hooks live only while the vision tower runs; the layer keeps its fused attention. ``wanted``:
    whether to capture; a reducer that needs it made sure at patch time that the tower has it.
    """

    def __init__(self, model, wanted: bool):
        self.attn = _feature_attention(model, required=False) if wanted else None
        self.captured: dict = {}
        self.handles: list = []

    def __enter__(self) -> "_ClsAttention":
        if self.attn is not None:
            for key in ("q", "k"):
                module = getattr(self.attn, f"{key}_proj")
                self.handles.append(module.register_forward_hook(
                    lambda m, args, out, key=key: self.captured.__setitem__(key, out)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    @property
    def value(self) -> Optional[Tensor]:
        """``[I, N]`` head-mean attention of the CLS token to each token LLaVA keeps as a feature."""
        if self.attn is None:
            return None
        q, k = self.captured["q"], self.captured["k"]
        heads = self.attn.num_heads
        split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        return cls_attention(split(q), split(k), scale=self.attn.scale)


def _feature_attention(model, required: bool = True) -> Optional[nn.Module]:
    """The attention module of the vision layer that produces ``hidden_states[vision_feature_layer]``;
    None where there is none and it is not ``required``."""
    layer_index = model.config.vision_feature_layer
    layers = getattr(getattr(model.model.vision_tower, "encoder", None), "layers", None)
    problem = None
    if not isinstance(layer_index, int) or layers is None:
        problem = "cls_attention needs a CLIP-style vision tower and an int vision_feature_layer"
    elif layer_index % (len(layers) + 1) == 0:
        problem = "vision_feature_layer selects the embeddings: there is no attention to read"
    if problem is not None:
        if required:
            raise UnsupportedModelError(problem)
        return None
    attention = layers[layer_index % (len(layers) + 1) - 1].self_attn
    if not all(hasattr(attention, key) for key in ("q_proj", "k_proj", "num_heads", "scale")):
        if required:
            raise UnsupportedModelError(f"cls_attention: {type(attention).__name__} has no CLIP-style q_proj/k_proj")
        return None
    return attention


def reduce_group(reduction: Reduction, features: Tensor, budget: int, num_protected: int = 0, *,
                 attention: Optional[Tensor] = None, query: Optional[Tensor] = None,
                 grid: Optional[tuple] = None) -> tuple[TokenState, list[int]]:
    """Reduce ``features [G, N, D]`` (G token sets of one size) to ``budget`` tokens each.

    Takes as many steps as the reducer's ``max_step`` needs (:func:`reduction_steps`); ``attention``
    ``[G, N]`` is the CLS attention to the original tokens, ``grid`` their (rows, cols). Returns the
    state and the token count entering each step, then the count kept.
    """
    steps = reduction_steps(features.shape[1], budget, reduction.reducer, num_protected)
    state = TokenState.start(features, num_protected)
    for step, remove in enumerate(steps):
        signals = Signals(
            metric=state.x, layer=step, num_layers=len(steps),
            cls_attention=None if attention is None else _carried(attention, state),
            query=query, grid=None if state.is_reduced else grid,
        )
        state = reduction.reducer(state, state.num_tokens - remove, signals)
    return state, step_counts(features.shape[1], steps)


def step_counts(num_tokens: int, steps: list[int]) -> list[int]:
    """Token count entering each step (tokens removed per step), then the count kept."""
    tokens = [num_tokens]
    for remove in steps:
        tokens.append(tokens[-1] - remove)
    return tokens


def decision_macs(model, reduction: Reduction, tokens: list[int]) -> float:
    """MACs of the reducer's own decisions along one token set's steps (``tokens`` as reduce_group gives),
    before the language model: a CLS-attention row is the vision tower's, at the tower's width."""
    attention = _feature_attention(model, required=False) if "cls_attention" in reduction.reducer.needs else None
    image_cost = replace(cost(model, reduction.metric), has_cls=attention is not None,
                         attn_dim=0 if attention is None else attention.q_proj.out_features)
    return float(sum(reduction.reducer.extra_macs(n, image_cost) for n, m in zip(tokens[:-1], tokens[1:]) if m < n))


def _reduce(model, reduction: Reduction, features: Tensor, attention: Optional[Tensor],
            query: Optional[list]) -> tuple[TokenState, list[int], float]:
    """Run the reducer's steps on every image ``[I, N, D]``; query-conditioned reducers run image by image."""
    num_tokens, protected = features.shape[1], image_tokens(model)[1]
    budget = num_tokens - sum(reduction.schedule.amounts)
    if num_tokens != image_tokens(model)[0]:
        budget = min(reduction.arguments.get("budget", num_tokens), num_tokens)
    if not reduction.reduces:
        budget = num_tokens
    side = int(round((num_tokens - protected) ** 0.5))
    grid = (side, side) if side * side == num_tokens - protected else None
    groups = [slice(i, i + 1) for i in range(features.shape[0])] if query is not None else [slice(None)]
    states = []
    for i, group in enumerate(groups):
        state, tokens = reduce_group(reduction, features[group], budget, protected,
                                     attention=None if attention is None else attention[group],
                                     query=None if query is None else query[i], grid=grid)
        states.append(state)
    state = states[0] if len(states) == 1 else TokenState(
        x=torch.cat([s.x for s in states]), size=torch.cat([s.size for s in states]),
        assignment=torch.cat([s.assignment for s in states]), num_protected=protected)
    return state, tokens, features.shape[0] * decision_macs(model, reduction, tokens)


def _reduce_images(model, reduction: Reduction, features: list[Tensor], attention: Optional[Tensor],
                   query: Optional[list]) -> ReducedImages:
    """LLaVA-1.5: every image has the same count and the same budget."""
    state, tokens, reducer_macs = _reduce(model, reduction, torch.stack(features), attention, query)
    side = int(round((state.num_original - state.num_protected) ** 0.5))
    return ReducedImages(
        features=list(state.x), assignment=list(state.assignment), size=list(state.size), tokens=tokens,
        reducer_macs=reducer_macs, num_protected=state.num_protected,
        grid=(side, side) if side * side == state.num_original - state.num_protected else None)


def _carried(attention: Tensor, state: TokenState) -> Tensor:
    """Attention to each current token: the sum over the original tokens it carries."""
    if not state.is_reduced:
        return attention
    index = state.assignment.clamp_min(0)
    weights = attention.float() * (state.assignment >= 0)
    return weights.new_zeros(state.size.shape).scatter_add_(1, index, weights)


def _padded(rows: list[Tensor], fill) -> Tensor:
    """Per-image 1-D tensors as one ``[I, longest]`` tensor, ``fill`` past each one's end."""
    width = max((len(r) for r in rows), default=0)
    return torch.stack([torch.nn.functional.pad(r, (0, width - len(r)), value=fill) for r in rows]) if rows \
        else torch.zeros(0, 0)


def _record(model, reduction: Reduction, images: ReducedImages, image_rows: Tensor, placeholder: Tensor,
            kept_placeholder: Tensor, mask: Tensor, compact_mask: Tensor, kept_positions: Tensor) -> None:
    reduction.report = LlavaReport(
        tokens=images.tokens,
        assignment=_padded([a.detach() for a in images.assignment], -1),
        size=_padded([s.detach() for s in images.size], 0.0),
        num_protected=images.num_protected,
        grid=images.grid,
        image_rows=image_rows,
        visual_tokens_before=placeholder.sum(1),
        visual_tokens_after=kept_placeholder.sum(1),
        kept_positions=kept_positions,
        prefill_macs=prefill_macs(model, compact_mask.sum(1)),
        prefill_macs_unreduced=prefill_macs(model, mask.sum(1)),
        reducer_macs=images.reducer_macs,
        image_tokens_before=torch.tensor([len(a) for a in images.assignment]),
        image_tokens_after=torch.tensor([len(f) for f in images.features]),
        anyres=images.anyres,
    )


def text_only_report(model, input_ids: Tensor, attention_mask: Optional[Tensor], where: str = WHERE) -> LlavaReport:
    """Report of a call without images: nothing to reduce, every row passes through untouched."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    zeros = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    real = mask.sum(1)
    columns = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return LlavaReport(
        tokens=[], assignment=torch.zeros(0, 0, dtype=torch.long), size=torch.zeros(0, 0), num_protected=0,
        where=where, image_rows=zeros[:0], visual_tokens_before=zeros, visual_tokens_after=zeros,
        kept_positions=columns.masked_fill(mask == 0, -1), prefill_macs=prefill_macs(model, real),
        prefill_macs_unreduced=prefill_macs(model, real),
    )


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(cls: type) -> type:
    if cls not in _PATCHED_CLASSES:
        original_forward = cls.forward

        @functools.wraps(original_forward)  # generate() reads forward's signature (mm_encoder_outputs, ...)
        def forward(self, *args, **kwargs):
            return _vtr_forward(self, original_forward, *args, **kwargs)

        _PATCHED_CLASSES[cls] = type(f"Vtr{cls.__name__}", (ReducingLlava, cls), {"forward": forward})
    return _PATCHED_CLASSES[cls]


def patch(model: nn.Module, reduction: Reduction) -> None:
    if reduction.metric != "x":
        raise ValueError("the LLaVA adapter compares visual tokens by their projected features: use metric='x'")
    if _anyres(model) is not None:
        _anyres(model).check_reduction(model, reduction)
    if "cls_attention" in reduction.reducer.needs:
        _feature_attention(model)   # fail at patch time, not at the first call
    reduction.original_class = type(model)
    if reduction.arguments.get("layers") is not None:
        from .llava_prune import LanguageModelPruning, stage_budgets, stage_layers
        layers = stage_layers(reduction.arguments["layers"], len(model.model.language_model.layers))
        num_tokens, protected = image_tokens(model)
        budgets = stage_budgets(reduction.arguments.get("budget", num_tokens), num_tokens, protected, len(layers))
        reduction.pruner = LanguageModelPruning(model, reduction, layers, budgets)
    model._vtr = reduction
    model.__class__ = _patched_class(type(model))


def unpatch(model: nn.Module) -> None:
    reduction: Reduction = model._vtr
    if _pruner(model) is not None:
        reduction.pruner.remove()
    model.__class__ = reduction.original_class
    del model._vtr


__all__: Sequence[str] = ["LlavaReport", "ReducedImages", "compact_prompt", "decision_macs", "prefill_macs",
                          "reduce_group", "reduction_steps"]
