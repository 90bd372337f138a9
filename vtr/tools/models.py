"""Models by name with random weights (nothing is downloaded): what the CLI, the bench and the zoo build."""
from __future__ import annotations

import difflib

import torch
from torch import nn

# transformers vision towers by name, from configs with random weights (ViT-B/16 shapes).
HF_VISION = {
    "clip-vit-b16": ("CLIPVisionModel", "CLIPVisionConfig", dict(patch_size=16)),
    "siglip-vit-b16": ("SiglipVisionModel", "SiglipVisionConfig", dict(patch_size=16)),
    "vit-b16": ("ViTModel", "ViTConfig", dict(patch_size=16)),
}


def create_model(name: str, **kwargs) -> nn.Module:
    """A model with random weights from its name: a timm name, ``open_clip:<name>`` (the image
    tower of an open_clip model) or ``hf:<name>`` with a name from ``HF_VISION``. No download.
    ``img_size`` (timm's spelling) sets the input size of every family."""
    family, sep, rest = name.partition(":")
    if sep and "img_size" in kwargs:   # open_clip's and transformers' spellings of the input size
        kwargs[{"open_clip": "force_image_size", "hf": "image_size"}.get(family, "img_size")] = kwargs.pop("img_size")
    if not sep:
        import timm
        if not timm.is_model(name):   # a name with a pretrained tag (name.tag) counts
            _unknown(name, timm.list_models(), "timm model", "timm.list_models()")
        return timm.create_model(name, pretrained=False, **kwargs).eval()
    if family == "open_clip":
        import open_clip
        if rest not in open_clip.list_models():
            _unknown(rest, open_clip.list_models(), "open_clip model", "open_clip.list_models()")
        # open_clip moves the model to its device argument: pass the default one (meta for counting).
        kwargs.setdefault("device", torch.get_default_device())
        return open_clip.create_model(rest, pretrained=None, **kwargs).visual.eval()
    if family == "hf" and rest in HF_VISION:
        import transformers
        model_cls, config_cls, config = HF_VISION[rest]
        config = getattr(transformers, config_cls)(**config, **kwargs)
        return getattr(transformers, model_cls)(config).eval()
    raise ValueError(f"model {name!r}: give a timm name, open_clip:<name> or hf:<name> with a name in "
                     f"{sorted(HF_VISION)}")


def _unknown(name: str, known: list, what: str, listing: str) -> None:
    """A ValueError for an unknown model name, with the closest known names."""
    close = difflib.get_close_matches(name, known, n=5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown {what} {name!r}{hint} (all: {listing}). A model is a timm name, open_clip:<name> or "
                     f"hf:<name> with a name in {sorted(HF_VISION)}")
