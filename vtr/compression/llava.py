"""Compression modules on a LLaVA-format model (transformers' ``LlavaForConditionalGeneration``, and
``LlavaNextForConditionalGeneration`` with its AnyRes crops: each part compressed on its own, then packed as
transformers packs them, see :mod:`.anyres`; its inner model's class is swapped too, and restored by ``vtr.unpatch``).

The model gets a submodule ``_vtr_compression`` (:class:`Compression`: the settings and any trainable router, so
its parameters are the model's own and ``state_dict`` round-trips strictly) and a class mixed in front of its own
(:class:`CompressedLlava`). TokenPacker also takes the place of ``model.model.multi_modal_projector`` (the original
is kept aside for ``vtr.unpatch``), and the images are encoded with ``vision_feature_layer`` listing its levels.

The prompt keeps the processor's placeholders (one per patch; LLaVA-NeXT: one per token of the model's own packing);
a call with pixel values encodes the images, compresses each one and *compacts* the prompt to the tokens kept, as
vtr's reducers do (``vtr.adapters.vlm.prompt``): each row runs what it would run alone, ``generate()`` returns the
caller's own prompt then the new tokens, and ``forward`` returns logits over the compacted prompt
(``vtr.report(model).kept_positions`` maps them back; ``labels`` follow).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from vtr.adapters.base import Swapped, swap_class
from vtr.adapters.errors import UnsupportedModelError
from vtr.adapters.vlm.prompt import compact_prompt, image_rows, pad_id, row_queries

from . import anyres
from .granularity import check_levels, pool_level
from .module import CompressedModel, Compression, CompressionReport, attach, compression_of, record
from .tokenpacker import TokenPacker, grid_of


# -- which model ------------------------------------------------------------------------------------------

def is_next(model: nn.Module) -> bool:
    """LLaVA-NeXT (AnyRes crops, a token count per image)."""
    from transformers import LlavaNextForConditionalGeneration

    return (type(model)._vtr_original if isinstance(model, Swapped) else type(model)) is \
        LlavaNextForConditionalGeneration


def check(model: nn.Module) -> None:
    try:
        from transformers import LlavaForConditionalGeneration
    except ImportError as error:
        raise UnsupportedModelError("vtr.compress needs transformers") from error
    if not isinstance(model, LlavaForConditionalGeneration) and not is_next(model):
        raise UnsupportedModelError(
            f"vtr.compress takes transformers' LlavaForConditionalGeneration (LLaVA-1.5 format) and "
            f"LlavaNextForConditionalGeneration (AnyRes crops) of the LLaVA family so far, got "
            f"{type(model).__name__} (LLaVA-OneVision and LLaVA-NeXT-Video are not supported yet)")
    if model.config.vision_feature_select_strategy != "default":
        raise UnsupportedModelError("vtr.compress needs vision_feature_select_strategy='default' (patch tokens "
                                    "only: the CLS token has no place on the patch grid)")
    if not isinstance(model.config.vision_feature_layer, int):
        raise UnsupportedModelError("vtr.compress needs one vision_feature_layer (an int) in the model's config, "
                                    f"got {model.config.vision_feature_layer!r}")


def patch_grid(model: nn.Module) -> tuple[int, int]:
    vision = model.config.vision_config
    return grid_of((vision.image_size // vision.patch_size) ** 2)


def tower_layers(model: nn.Module) -> int:
    return model.config.vision_config.num_hidden_layers


def default_levels(num_layers: int) -> list[int]:
    """TokenPacker's multi-level layers scaled to the tower: hidden states 12, 16, 22 and 23 of CLIP ViT-L's 24."""
    return sorted({max(1, num_layers * k // 24) for k in (12, 16, 22)} | {num_layers - 1})


def check_layers(layers, num_layers: int) -> list[int]:
    """Hidden-state indexes (``0``: the embeddings, ``num_layers``: the last layer; negative counts from the end)."""
    if isinstance(layers, int) or not layers:
        raise ValueError(f"tokenpacker: layers must be a non-empty list of vision hidden-state indexes, got {layers!r}")
    out = []
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool) or not -(num_layers + 1) <= layer <= num_layers:
            raise ValueError(f"tokenpacker: layers must be hidden-state indexes of the {num_layers}-layer vision "
                             f"tower, in [{-(num_layers + 1)}, {num_layers}], got {layer!r}")
        out.append(layer % (num_layers + 1))
    return out


# -- attaching and removing ---------------------------------------------------------------------------------

def tokenpacker(model: nn.Module, scale: int = 2, layers: Optional[Sequence[int]] = None,
                width: Optional[int] = None, heads: Optional[int] = None) -> None:
    """Replace the projector with a :class:`~vtr.compression.tokenpacker.TokenPacker` of ``scale``."""
    num_layers, grid = tower_layers(model), patch_grid(model)
    levels = check_layers(default_levels(num_layers) if layers is None else list(layers), num_layers)
    query_layer = model.config.vision_feature_layer % (num_layers + 1)
    packer = TokenPacker(model.config.vision_config.hidden_size, len(levels), model.config.text_config.hidden_size,
                         grid, scale, width=width, heads=heads)
    arguments = {"scale": scale, "layers": levels} | ({"width": width} if width else {}) | (
        {"heads": heads} if heads else {})
    attach(model, Compression("tokenpacker", arguments, grid, layers=levels + [query_layer], levels=(scale,),
                              scale=scale), CompressedLlava, packer)
    if is_next(model):      # the crops' packed grids are laid out at the packed side
        swap_class(model.model, anyres.PackingLlavaNext)


def granularity(model: nn.Module, levels: Sequence[int] = (1, 2, 4), router: str = "relevance",
                tolerance: float = 0.25, temperature: float = 1.0) -> None:
    """Pool each image's projected tokens at the level its router picks for the image and question."""
    grid = patch_grid(model)
    attach(model, granularity_module(model.config.text_config.hidden_size, grid, levels, router, tolerance,
                                     temperature), CompressedLlava)
    if is_next(model):      # every part pooled, then packed at the pooled side (anyres.pooled)
        swap_class(model.model, anyres.PackingLlavaNext)


def granularity_module(width: int, grid: Optional[tuple[int, int]], levels: Sequence[int], router: str,
                       tolerance: float, temperature: float) -> Compression:
    """The granularity :class:`Compression` for tokens of ``width`` on ``grid`` (None: each image its own)."""
    from .granularity import LearnedRouter, RelevanceRouter

    levels = check_levels(list(levels) if not isinstance(levels, (int, str)) else levels, grid)
    arguments = {"levels": list(levels), "router": router}
    if router == "relevance":
        chosen = RelevanceRouter(tolerance, temperature)
        arguments |= {"tolerance": tolerance, "temperature": temperature}
    elif router == "learned":
        chosen = LearnedRouter(width, len(levels))
    else:
        raise ValueError(f"granularity: router must be 'relevance' (training-free) or 'learned' (train it with "
                         f"vtr.compression.train_router), got {router!r}")
    return Compression("granularity", arguments, grid, levels=levels, router=chosen)


# -- calls --------------------------------------------------------------------------------------------------

@dataclass
class Encoded:
    """A batch's images encoded for the language model, before compression."""

    features: list          # [N_i, D] per image: the projector's output (TokenPacker's: already packed)
    questions: list         # [1, Q, D] per image: its row's text embeddings (granularity), else None
    counts: Tensor          # [I] placeholders per image in the prompt
    rows: Tensor            # [I] prompt row of each image
    outputs: object         # the tower's output, whose pooler_output goes to the language model
    grids: Optional[list] = None   # (rows, cols) per image where images differ (Qwen-VL)
    sizes: Optional[list] = None   # LLaVA-NeXT's (height, width) per image, its features unpacked (granularity)


def encode(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor,
           image_sizes: Optional[Tensor] = None) -> Encoded:
    compression = compression_of(model)
    layer = compression.layers if compression.layers is not None else model.config.vision_feature_layer
    sizes = {"image_sizes": _check_sizes(pixel_values, image_sizes)} if is_next(model) else {}
    with anyres.unpacked() if sizes and compression.routes else contextlib.nullcontext():
        outputs = model.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=layer,
                                                 vision_feature_select_strategy="default", return_dict=True, **sizes)
    features = list(outputs.pooler_output)
    placeholder = input_ids == model.config.image_token_id
    if sizes:      # the processor's count: each image packed at the full crop side
        side = compression.grid[0]
        counts = torch.tensor([anyres.image_tokens(model.config, size, side) for size in sizes["image_sizes"].tolist()],
                              dtype=torch.long, device=input_ids.device)
    else:
        counts = torch.full((len(features),), compression.grid[0] * compression.grid[1], dtype=torch.long,
                            device=input_ids.device)
    if int(placeholder.sum()) != int(counts.sum()):
        need = f"need {int(counts[0])} each" if not sizes else f"need {counts.tolist()} (by their image_sizes)"
        raise ValueError(f"the prompt has {int(placeholder.sum())} image tokens (id {model.config.image_token_id}) "
                         f"but its {len(features)} images {need} (the processor's count: vtr compacts the prompt "
                         "itself)")
    rows = image_rows(placeholder, counts)
    questions = None
    if compression.routes:
        questions = row_queries(model, input_ids, attention_mask, placeholder, rows, None)
    unpacked = sizes["image_sizes"].tolist() if sizes and compression.routes else None
    return Encoded(features, questions, counts, rows, outputs, sizes=unpacked)


def _check_sizes(pixel_values: Tensor, image_sizes: Optional[Tensor]) -> Tensor:
    """LLaVA-NeXT's ``image_sizes``: one (height, width) per image, checked before the tower runs."""
    if image_sizes is None:
        raise ValueError("a vtr-compressed LLaVA-NeXT needs image_sizes with pixel_values (one (height, width) per "
                         "image, as the processor returns them)")
    sizes = torch.as_tensor(image_sizes)
    if sizes.dim() != 2 or sizes.shape[1] != 2 or (pixel_values.dim() == 5 and sizes.shape[0] != len(pixel_values)):
        raise ValueError(f"image_sizes must be [images, 2] (height, width of each of the {len(pixel_values)} images), "
                         f"got shape {tuple(sizes.shape)}")
    return sizes


def router_inputs(model: nn.Module, batch: dict) -> tuple[list, Tensor]:
    """Per image (tokens, question, grid), and each image's row, for training the router."""
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
    encoded = encode(model, batch["input_ids"], mask, batch["pixel_values"], batch.get("image_sizes"))
    grid = compression_of(model).grid
    return [(_finest(t), q[0], grid) for t, q in zip(encoded.features, encoded.questions)], encoded.rows


def _finest(tokens: Tensor) -> Tensor:
    """What the router reads of an image: its finest tokens ``[N, D]`` (LLaVA-NeXT: every part's, one grid after
    another, as AVG-LLaVA's router reads all of them)."""
    return tokens.flatten(0, 1) if tokens.dim() == 3 else tokens


def compress_images(model: nn.Module, compression: Compression, encoded: Encoded) -> tuple[list, list]:
    """(features, level) per image."""
    if not compression.routes:
        return encoded.features, [compression.scale] * len(encoded.features)
    kept, levels = [], []
    for index, (tokens, question) in enumerate(zip(encoded.features, encoded.questions)):
        with torch.no_grad():
            factor = compression.levels[compression.choose(_finest(tokens).detach(), question[0].detach())]
        if encoded.sizes is None:
            kept.append(pool_level(tokens, compression.grid, factor))
        else:
            kept.append(anyres.pooled(model.config, tokens, compression.grid, factor, encoded.sizes[index],
                                      model.model.image_newline))
        levels.append(factor)
    return kept, levels


def prepare(model: nn.Module, input_ids: Optional[Tensor], attention_mask: Optional[Tensor], pixel_values: Tensor,
            left: bool, image_sizes: Optional[Tensor] = None) -> tuple[Tensor, dict, Tensor]:
    """(compacted input_ids, the language model's other inputs, kept_positions); records the report."""
    if input_ids is None:
        raise ValueError("a vtr-compressed LLaVA needs input_ids with pixel_values (the image span is found from "
                         "config.image_token_id)")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    compression = compression_of(model)
    encoded = encode(model, input_ids, attention_mask, pixel_values, image_sizes)
    features, levels = compress_images(model, compression, encoded)
    kept = torch.tensor([len(f) for f in features], dtype=torch.long, device=input_ids.device)
    image_token_id = model.config.image_token_id
    ids, mask, kept_positions = compact_prompt(input_ids, attention_mask, image_token_id, encoded.counts, kept,
                                               pad_id(model, image_token_id), left)
    encoded.outputs.pooler_output = features
    record(compression, CompressionReport(compression.method, encoded.rows.cpu(), torch.tensor(levels),
                                           encoded.counts.cpu(), kept.cpu(), kept_positions.cpu()))
    return ids, {"attention_mask": mask, "mm_encoder_outputs": {"image": encoded.outputs}}, kept_positions


class CompressedLlava(CompressedModel, Swapped):
    """Mixed in front of the model's class: calls with pixel values run on the compacted prompt."""

    family = "LLaVA"

    def prepare_images(self, input_ids: Optional[Tensor], arguments: dict, left: bool) -> tuple[Tensor, dict, Tensor]:
        image_sizes = _vision_options(self, arguments)
        return prepare(self, input_ids, arguments.pop("attention_mask", None), arguments.pop("pixel_values"), left,
                       image_sizes)


def _vision_options(model: nn.Module, arguments: dict) -> Optional[Tensor]:
    """Refuse the vision options the compression fixed; pop and return LLaVA-NeXT's ``image_sizes``."""
    image_sizes = arguments.pop("image_sizes", None) if is_next(model) else None
    for key in ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes"):
        if arguments.get(key) is not None:
            raise ValueError(f"{key} cannot be given to a vtr-compressed LLaVA: the compression fixed it at "
                             "vtr.compress time")
    return image_sizes
