"""Text-conditioned image encoding for CLIP-style models (open_clip and Hugging Face).

A query-conditioned reducer decides which image tokens to keep by their relevance to a text
embedding. The text embeddings live in the joint image-text space (after the towers' projections),
the image tokens in the tower's width; the adapter bridges them: ``Signals.query_projection`` maps
each token to the image embedding it would give if it were the pooled token (the tower's final norm
and projection; SigLIP: its attention-pooling head attending to that token alone), so a reducer
compares like with like. Its cost (one projection per token) is paid only by reducers that use it.

    model = vtr.patch(clip_model, "query", keep=0.5)
    with vtr.clip.text_query(model, text_features):          # [D] or [K, D]: shared by all images
        image_features = vtr.clip.image_features(model, images)
    logits = vtr.clip.zero_shot(model, images, class_text_features)   # [B, K], conditioned on the classes
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters import family
from ..api import conditioned


def _as_query(text_features: Tensor, per_image: bool) -> Tensor:
    if not isinstance(text_features, Tensor):
        raise ValueError(f"text_features must be a tensor, got {type(text_features).__name__}")
    if per_image:
        if text_features.dim() not in (2, 3):
            raise ValueError("text_features with per_image=True must be [B, D] (one query per image) or "
                             f"[B, Q, D] (several per image), got {tuple(text_features.shape)}")
        return text_features
    if text_features.dim() not in (1, 2):
        raise ValueError("text_features shared by every image must be [D] (one query) or [K, D] (e.g. class "
                         f"prompts); got {tuple(text_features.shape)} (pass per_image=True for one row per image)")
    return text_features.reshape(1, -1, text_features.shape[-1])


@contextmanager
def text_query(model: nn.Module, text_features: Tensor, per_image: bool = False) -> Iterator[nn.Module]:
    """Condition the patched image tower on text embeddings for the forward passes inside the block.

    ``text_features`` come from ``model.encode_text`` (open_clip) or ``model.get_text_features``
    (transformers), in the joint embedding space. By default they are shared by every image:
    ``[D]`` (one retrieval query) or ``[K, D]`` (a query set, e.g. the K class prompts of zero-shot
    classification). With ``per_image=True`` they are one row per image: ``[B, D]`` or ``[B, Q, D]``.
    A width other than the model's embedding width raises ValueError at the forward pass.
    """
    with conditioned(model, _as_query(text_features, per_image)) as inner:
        yield inner


def image_features(model: nn.Module, images: Tensor) -> Tensor:
    """Image embeddings ``[B, D]`` in the joint space, whatever kind of CLIP model this is."""
    kind = family(model)
    if kind == "open_clip":
        if hasattr(model, "encode_image"):                   # CLIP / CustomTextCLIP / CoCa
            return model.encode_image(images)
        output = model(images)                               # an image tower
        return output[0] if isinstance(output, tuple) else output
    if kind == "hf_vision":
        if hasattr(model, "get_image_features"):             # CLIPModel / SiglipModel
            return model.get_image_features(pixel_values=images).pooler_output
        output = model(pixel_values=images)                  # a vision model
        embeds = getattr(output, "image_embeds", None)
        return embeds if embeds is not None else output.pooler_output
    raise ValueError(f"vtr.clip works on open_clip and transformers CLIP/SigLIP models, got {type(model).__name__}")


def zero_shot(model: nn.Module, images: Tensor, class_features: Tensor, condition: bool = True) -> Tensor:
    """Zero-shot logits ``[B, K]``: cosine of image and class-prompt embeddings times the model's
    ``logit_scale.exp()`` (plus ``logit_bias`` for SigLIP), as the libraries compute them.

    With ``condition=True`` (the default) the image tower is conditioned on all K class prompts as
    its query set, so a query-conditioned reducer keeps the tokens relevant to any of the classes.
    """
    if not isinstance(class_features, Tensor) or class_features.dim() != 2:
        shape = tuple(class_features.shape) if isinstance(class_features, Tensor) else type(class_features).__name__
        raise ValueError(f"class_features must be [K, D] (one text embedding per class), got {shape}")
    if condition:
        with text_query(model, class_features):
            image = image_features(model, images)
    else:
        image = image_features(model, images)
    logits = F.normalize(image, dim=-1) @ F.normalize(class_features, dim=-1).t().to(image.dtype)
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, Tensor):
        logits = logits * scale.exp()
    bias = getattr(model, "logit_bias", None)
    if isinstance(bias, Tensor):
        logits = logits + bias
    return logits


__all__ = ["text_query", "image_features", "zero_shot"]
