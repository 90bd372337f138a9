"""Adapters: patch a model family in place so its encoder runs on a token state.

Each family is one file with an :class:`~vtr.adapters.base.Adapter` subclass and one ``register``
line below (``"module:Class"`` and the library its models come from). Adapters for open_clip and
transformers are imported only when a model of theirs is seen.
"""
from __future__ import annotations

from .base import (Adapter, Swapped, family, find_adapter, is_patched, register, registered, remove_hooks,
                   restore_class, settings, swap_class, thread_settings, unwrap)
from .errors import UnsupportedModelError

register("vtr.adapters.timm_vit:TimmViT", "timm", supports="timm VisionTransformer")
register("vtr.adapters.open_clip_vit:OpenClipViT", "open_clip", supports="open_clip ViT image towers")
register("vtr.adapters.hf_vision:HfVision", "transformers", supports="transformers CLIP, SigLIP and ViT")
register("vtr.adapters.llava:Llava", "transformers", supports="transformers LLaVA, LLaVA-NeXT, LLaVA-OneVision and LLaVA-NeXT-Video")
register("vtr.adapters.gemma3:Gemma3", "transformers", supports="transformers Gemma 3")
register("vtr.adapters.smolvlm:SmolVLM", "transformers", supports="transformers SmolVLM and Idefics3")
register("vtr.adapters.internvl:InternVL", "transformers", supports="transformers InternVL (its own format)")
register("vtr.adapters.qwen_vl:QwenVL", "transformers", supports="transformers Qwen2-VL, Qwen2.5-VL and Qwen3-VL")

__all__ = ["Adapter", "Swapped", "UnsupportedModelError", "family", "find_adapter", "is_patched", "register",
           "registered", "remove_hooks", "restore_class", "settings", "swap_class", "thread_settings",
           "unwrap"]
