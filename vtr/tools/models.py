"""Models by name, never downloaded: what the CLI, the bench and the zoo build.

timm and open_clip names and the built-in ``hf:`` names are built from their configs with random
weights. ``hf:<directory>`` loads what ``save_pretrained`` wrote there, and ``hf:<org/name>`` loads a
Hub model from the local Hugging Face cache only (``local_files_only=True``): a benchmark never
starts a download, and a model not fetched yet is an error that says so.
"""
from __future__ import annotations

import difflib
from pathlib import Path

import torch
from torch import nn

# transformers vision towers by name, from configs with random weights (ViT-B/16 shapes).
HF_VISION = {
    "clip-vit-b16": ("CLIPVisionModel", "CLIPVisionConfig", dict(patch_size=16)),
    "siglip-vit-b16": ("SiglipVisionModel", "SiglipVisionConfig", dict(patch_size=16)),
    "vit-b16": ("ViTModel", "ViTConfig", dict(patch_size=16)),
}
# Saved transformers models hf: loads, by the architecture save_pretrained records in config.json;
# True: the image tower (``.vision_model``) of an image-text model, as open_clip:<name> is the tower.
HF_CLASSES = {"CLIPVisionModel": False, "CLIPVisionModelWithProjection": False, "SiglipVisionModel": False,
              "ViTModel": False, "ViTForImageClassification": False, "CLIPModel": True, "SiglipModel": True}
# A config without ``architectures`` (written by hand, or by an older tool): its model_type.
HF_BY_TYPE = {"clip": "CLIPModel", "clip_vision_model": "CLIPVisionModel", "siglip": "SiglipModel",
              "siglip_vision_model": "SiglipVisionModel", "vit": "ViTModel"}
# Saved vision-language models `vtr bench` times with the VLM prefill benchmark (vtr.tools.bench_vlm).
HF_VLM_CLASSES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration", "Qwen2VLForConditionalGeneration",
                  "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration",
                  "LlavaOnevisionForConditionalGeneration", "LlavaNextVideoForConditionalGeneration",
                  "Gemma3ForConditionalGeneration", "SmolVLMForConditionalGeneration",
                  "Idefics3ForConditionalGeneration", "InternVLForConditionalGeneration")
MODEL_NAMES = "a timm name, open_clip:<name> or hf:<name, directory or Hub id>"


def create_model(name: str, **kwargs) -> nn.Module:
    """A model in eval mode from its name: a timm name, ``open_clip:<name>`` (the image tower of an
    open_clip model), ``hf:<name>`` with a name from ``HF_VISION`` (random weights), or
    ``hf:<directory or Hub id>`` (see :func:`load_hf`). Nothing is downloaded. ``img_size`` (timm's
    spelling) sets the input size of every family built from a config."""
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
    if family == "hf" and rest:
        return load_hf(rest, image_size=kwargs.pop("image_size", None))
    raise ValueError(f"model {name!r}: give {MODEL_NAMES} (built-in hf names: {', '.join(sorted(HF_VISION))})")


def _hf_config(source: str):
    """The transformers config of the directory or cached Hub model ``source``; never downloads."""
    import transformers

    local = Path(source).is_dir()
    if local and not (Path(source) / "config.json").is_file():
        raise ValueError(f"hf:{source}: the directory holds no model config.json (write one with "
                         "model.save_pretrained(directory))")
    if not local and _looks_like_path(source):
        raise ValueError(f"hf:{source}: no such directory (a directory written by save_pretrained, or a Hub id "
                         "such as openai/clip-vit-base-patch16)")
    try:
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=True)
    except OSError as error:   # transformers' "not found", with local_files_only never a download
        raise ValueError(f"hf:{source}: not in the local Hugging Face cache, and vtr downloads nothing; fetch it "
                         f"first (`hf download {source}`) or give a directory written by save_pretrained, or a "
                         f"built-in name: {', '.join(sorted(HF_VISION))}") from error
    return config


def _vlm_architecture(config) -> str | None:
    return next((a for a in config.architectures or () if a in HF_VLM_CLASSES), None)


def is_hf_vlm(source: str) -> bool:
    """Whether ``hf:<source>`` names a saved (or cached) VLM of ``HF_VLM_CLASSES`` (LLaVA, OneVision, Qwen-VL),
    which `vtr bench` times with the VLM prefill benchmark (a source that does not load is no VLM:
    :func:`create_model` says why)."""
    try:
        return source not in HF_VISION and _vlm_architecture(_hf_config(source)) is not None
    except ValueError:
        return False


def load_hf_vlm(source: str) -> nn.Module:
    """The LLaVA-family or Qwen-VL model ``save_pretrained`` wrote to ``source`` (or cached from the Hub), float32 on
    the CPU, in eval mode. Never downloads."""
    import transformers

    config = _hf_config(source)
    architecture = _vlm_architecture(config)
    if architecture is None:
        found = ", ".join(config.architectures or ()) or f"model_type {config.model_type!r}"
        raise ValueError(f"hf:{source}: {found} is not a VLM the benchmark runs; it takes {', '.join(HF_VLM_CLASSES)}")
    with torch.device("cpu"):
        return getattr(transformers, architecture).from_pretrained(source, local_files_only=True,
                                                                   dtype=torch.float32).eval()


def load_hf(source: str, image_size: int | None = None) -> nn.Module:
    """The transformers image model ``save_pretrained`` wrote to the directory ``source``, or the Hub
    model ``source`` from the local cache; float32 on the CPU, in eval mode. An image-text model
    (CLIPModel, SiglipModel) gives its image tower. Never downloads."""
    import transformers

    config = _hf_config(source)
    architecture = next((a for a in config.architectures or () if a in HF_CLASSES),
                        HF_BY_TYPE.get(config.model_type))
    if architecture is None:
        found = ", ".join(config.architectures or ()) or f"model_type {config.model_type!r}"
        raise ValueError(f"hf:{source}: {found} is not an image model the vtr command runs; it takes "
                         f"{', '.join(HF_CLASSES)}" + (" (a LLaVA or Qwen-VL model: vtr bench runs its VLM prefill "
                                                         "benchmark)" if _vlm_architecture(config) else ""))
    with torch.device("cpu"):   # from_pretrained loads weights: never under a meta-device context
        model = getattr(transformers, architecture).from_pretrained(source, local_files_only=True,
                                                                    dtype=torch.float32)
    if HF_CLASSES[architecture]:
        model = model.vision_model
    saved_size = model.config.image_size
    if image_size is not None and image_size != saved_size:
        raise ValueError(f"hf:{source} was saved for {saved_size}x{saved_size} images; a loaded model runs at "
                         f"that size (img_size={image_size} applies to models built from a config)")
    return model.eval()


def _looks_like_path(source: str) -> bool:
    """A Hub id is ``name`` or ``org/name``; anything else with a slash or a leading dot is a path."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def _unknown(name: str, known: list, what: str, listing: str) -> None:
    """A ValueError for an unknown model name, with the closest known names."""
    close = difflib.get_close_matches(name, known, n=5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown {what} {name!r}{hint} (all: {listing}). A model is {MODEL_NAMES}")
