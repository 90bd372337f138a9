"""The VLM prefill benchmark (`vtr bench --model llava:<shape>` / `qwen-vl:<shape>` / `onevision:<shape>` /
`gemma3:<shape>` / `smolvlm:<shape>` / `internvl:<shape>` /
`hf:<VLM directory>`,
``benchmarks/bench_llava.py``, ``benchmarks/bench_vlm.py``): the unreduced and the reduced model, each timed in
three parts per batch of prompts (one image or video plus text tokens each):

- vision: vision tower + projector/merger (OneVision: and its frame pooling), plus (reduced before the LM) the
  reducer, prompt compaction and positions, seconds;
- prefill: the language model on the prompt it really sees, seconds, and its speed-up;
- MACs: the reduced/unreduced ratio of vtr's analytic LM prefill count and, in brackets, its inverse, which
  bounds the prefill speed-up: with V visual tokens, b kept and T text tokens about (V + T) / (b + T);
- reduced inside the vision tower (Qwen-VL's ``tower_layer=``, ``--tower-layer``): the tower's own MACs ratio as
  it ran (its bound) beside the vision part's speed-up, apart from the prefill's;
- decode: milliseconds per generated token (the KV cache is as short as the kept prompt).

Built-in shapes have a 7B model's widths with random weights and the depth scaled down to fit a CPU
(``vision_layers``, ``lm_layers``); the unreduced and reduced runs alternate so both see the same machine load.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils import benchmark

from ..adapters import find_adapter, is_patched, settings
from ..api import make_reducer, patch, report, unpatch
from .models import load_hf_vlm


@dataclass(frozen=True)
class Shape:
    """A VLM built from configs with random weights: transformers' config and model class names and their
    keywords (``{vision_layers}``/``{lm_layers}`` set the depth); ``image_size`` is the default input side."""
    description: str
    model_cls: str
    config_cls: str
    vision: dict
    text: dict
    tokens: dict
    image_size: int
    vision_config: str = "CLIPVisionConfig"   # the sub-config classes of a LLaVA-style model
    text_config: str = "LlamaConfig"


_CLIP_L336 = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=336, patch_size=14,
                  projection_dim=768)
_LLAMA_7B = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                 num_key_value_heads=32, pad_token_id=0)
_LLAVA = dict(image_token_index=32000, vision_feature_layer=-2, vision_feature_select_strategy="default",
              image_seq_length=576)
_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
_QWEN_MERGE = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
_QWEN3_MERGE = dict(patch_size=16, spatial_merge_size=2, temporal_patch_size=2)
_QWEN_TOKENS = dict(image_token_id=31990, video_token_id=31991, vision_start_token_id=31992, vision_end_token_id=31993)
_QWEN_TEXT = dict(pad_token_id=0, bos_token_id=None, eos_token_id=None)
# LLaVA-OneVision-Qwen2-7B: SigLIP-so400m at 384 px (27 x 27 patches, a video frame pooled to 14 x 14) and Qwen2-7B.
_SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, image_size=384, patch_size=14,
                      vision_use_head=False)
_QWEN2_7B = dict(vocab_size=32000, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                 num_key_value_heads=4, rope_theta=1e6, **_QWEN_TEXT)
_ONEVISION = dict(image_token_index=31998, video_token_index=31999, vision_feature_layer=-1,
                  vision_feature_select_strategy="full")

SHAPES = {
    "llava:1.5-7b": Shape("LLaVA-1.5-7B-shaped (CLIP ViT-L/14 at 336 px: 576 visual tokens; Llama-7B)",
                          "LlavaForConditionalGeneration", "LlavaConfig", _CLIP_L336, _LLAMA_7B, _LLAVA, 336),
    "llava:next-7b": Shape("LLaVA-NeXT-7B-shaped (AnyRes: a 672x672 image as the base view and 2x2 crops)",
                           "LlavaNextForConditionalGeneration", "LlavaNextConfig", _CLIP_L336, _LLAMA_7B,
                           dict(_LLAVA, image_grid_pinpoints=_PINPOINTS), 672),
    "llava:tiny": Shape("tiny LLaVA (56 px: 16 visual tokens; LM hidden 64), for tests",
                        "LlavaForConditionalGeneration", "LlavaConfig",
                        dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, image_size=56, patch_size=14),
                        dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                             num_key_value_heads=2, pad_token_id=0),
                        dict(image_token_index=99, vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_seq_length=16), 56),
    # The vocabulary is trimmed to 32000: only the last position's head runs at prefill.
    "qwen-vl:2.5-7b": Shape("Qwen2.5-VL-7B-shaped (vision hidden 1280, windows of 112 px; LM hidden 3584, 4 KV heads, "
                            "M-RoPE)", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig",
                            dict(hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                                 window_size=112, **_QWEN_MERGE),
                            dict(vocab_size=32000, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                                 num_key_value_heads=4, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                                 **_QWEN_TEXT), _QWEN_TOKENS, 448),
    "qwen-vl:tiny": Shape("tiny Qwen2.5-VL (vision hidden 32, windows of 56 px; LM hidden 64), for tests",
                          "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig",
                          dict(hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, window_size=56,
                               **_QWEN_MERGE),
                          dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                               num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                               **_QWEN_TEXT),
                          dict(image_token_id=90, video_token_id=91, vision_start_token_id=92, vision_end_token_id=93),
                          112),
    # Qwen3-VL-8B: SigLIP-2-shaped tower at patch 16 (a 512 px image: 256 tokens), DeepStack from 3 tower layers
    # (spread over the depth built), Qwen3-8B LM with q/k norms and interleaved M-RoPE.
    "qwen-vl:3-8b": Shape("Qwen3-VL-8B-shaped (vision hidden 1152, patch 16, DeepStack from 3 tower layers; LM hidden "
                          "4096, 8 KV heads, interleaved M-RoPE)", "Qwen3VLForConditionalGeneration", "Qwen3VLConfig",
                          dict(hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                               num_position_embeddings=2304, **_QWEN3_MERGE),
                          dict(vocab_size=32000, hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=128, rope_scaling={
                                   "rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
                               rope_theta=5e6, **_QWEN_TEXT), _QWEN_TOKENS, 512),
    "qwen-vl:3-tiny": Shape("tiny Qwen3-VL (vision hidden 32, patch 16, DeepStack; LM hidden 64), for tests",
                            "Qwen3VLForConditionalGeneration", "Qwen3VLConfig",
                            dict(hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                                 num_position_embeddings=64, **_QWEN3_MERGE),
                            dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, rope_scaling={
                                     "rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
                                 **_QWEN_TEXT),
                            dict(image_token_id=90, video_token_id=91, vision_start_token_id=92,
                                 vision_end_token_id=93), 128),
    # Qwen2.5-VL-7B at 1344 x 1344 (96 x 96 patches: 2304 visual tokens), where the tower's cost rivals the prefill's:
    # the shape for reduction inside the tower (--tower-layer).
    "qwen-vl:2.5-7b-1344": Shape("Qwen2.5-VL-7B-shaped at 1344 px (96 x 96 patches: 2304 visual tokens; windows of "
                                 "112 px)", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig",
                                 dict(hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                                      window_size=112, **_QWEN_MERGE),
                                 dict(vocab_size=32000, hidden_size=3584, intermediate_size=18944,
                                      num_attention_heads=28, num_key_value_heads=4,
                                      rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, **_QWEN_TEXT),
                                 _QWEN_TOKENS, 1344),
    "onevision:7b": Shape("LLaVA-OneVision-Qwen2-7B-shaped (SigLIP-so400m at 384 px: 729 patches a view, a video "
                          "frame pooled to 196 tokens; Qwen2-7B, 4 KV heads)", "LlavaOnevisionForConditionalGeneration",
                          "LlavaOnevisionConfig", _SIGLIP_SO400M, _QWEN2_7B, _ONEVISION, 384,
                          "SiglipVisionConfig", "Qwen2Config"),
    "onevision:tiny": Shape("tiny LLaVA-OneVision (56 px: 16 patches a view, a frame pooled to 4 tokens; LM hidden "
                            "64), for tests", "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionConfig",
                            dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, image_size=56,
                                 patch_size=14),
                            dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                 num_key_value_heads=2, **_QWEN_TEXT),
                            dict(_ONEVISION, image_token_index=98, video_token_index=99,
                                 image_grid_pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112]]), 56,
                            "SiglipVisionConfig", "Qwen2Config"),
    # Gemma 3 4B: SigLIP-so400m at 896 px (64 x 64 patches of 14) average-pooled to 16 x 16 = 256 tokens; Gemma 3
    # LM hidden 2560 (head_dim 256, 4 KV heads), five sliding-window layers (1024) per full one.
    "gemma3:4b": Shape("Gemma-3-4B-shaped (SigLIP-so400m at 896 px pooled to 256 tokens; LM hidden 2560, 4 KV heads, "
                       "sliding windows of 1024)", "Gemma3ForConditionalGeneration", "Gemma3Config",
                       dict(_SIGLIP_SO400M, image_size=896),
                       dict(vocab_size=32000, hidden_size=2560, intermediate_size=10240, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=256, sliding_window=1024, **_QWEN_TEXT),
                       dict(mm_tokens_per_image=256, image_token_id=31990, boi_token_id=31991, eoi_token_id=31992),
                       896, "SiglipVisionConfig", "Gemma3TextConfig"),
    "gemma3:tiny": Shape("tiny Gemma 3 (64 px: 8 x 8 patches pooled to 16 tokens; LM hidden 64), for tests",
                         "Gemma3ForConditionalGeneration", "Gemma3Config",
                         dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, image_size=64, patch_size=8),
                         dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, sliding_window=64, **_QWEN_TEXT),
                         dict(mm_tokens_per_image=16, image_token_id=95, boi_token_id=96, eoi_token_id=97), 64,
                         "SiglipVisionConfig", "Gemma3TextConfig"),
    # SmolVLM-2.2B: SigLIP-so400m at 384 px (27 x 27 patches of 14, 3 x 3 pixel shuffle: 81 tokens a tile) and a
    # SmolLM2-1.7B LM (hidden 2048, 32 heads, no GQA); a prompt holds an image split into 2 x 2 tiles and its global view.
    "smolvlm:2b": Shape("SmolVLM-2.2B-shaped (SigLIP-so400m at 384 px, 81 tokens a tile: an image of 2x2 tiles and a "
                        "global view; LM hidden 2048)", "SmolVLMForConditionalGeneration", "SmolVLMConfig",
                        dict(_SIGLIP_SO400M, image_size=378),
                        dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                             num_key_value_heads=32, **_QWEN_TEXT),
                        dict(scale_factor=3, image_token_id=31990), 378, "SmolVLMVisionConfig", "LlamaConfig"),
    "smolvlm:tiny": Shape("tiny SmolVLM (64 px tiles: 8 x 8 patches shuffled to 16 tokens; LM hidden 64), for tests",
                          "SmolVLMForConditionalGeneration", "SmolVLMConfig",
                          dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, image_size=64,
                               patch_size=8),
                          dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                               num_key_value_heads=2, **_QWEN_TEXT),
                          dict(scale_factor=2, image_token_id=95), 64, "SmolVLMVisionConfig", "LlamaConfig"),
    # InternVL3-8B (transformers' format): InternViT-300M at 448 px (32 x 32 patches of 14, pixel-shuffled to 256
    # tokens a tile) and Qwen2.5-7B; a prompt holds an image of 2 x 2 dynamic tiles and its thumbnail.
    "internvl:8b": Shape("InternVL3-8B-shaped (InternViT-300M at 448 px, 256 tokens a tile: an image of 2x2 tiles and "
                         "a thumbnail; LM hidden 3584, 4 KV heads)", "InternVLForConditionalGeneration",
                         "InternVLConfig",
                         dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=[448, 448],
                              patch_size=[14, 14]),
                         dict(vocab_size=32000, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                              num_key_value_heads=4, rope_theta=1e6, **_QWEN_TEXT),
                         dict(image_token_id=31990, image_seq_length=256, downsample_ratio=0.5), 448,
                         "InternVLVisionConfig", "Qwen2Config"),
    "internvl:tiny": Shape("tiny InternVL (64 px tiles: 8 x 8 patches shuffled to 16 tokens; LM hidden 64), for tests",
                           "InternVLForConditionalGeneration", "InternVLConfig",
                           dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, image_size=[64, 64],
                                patch_size=[8, 8]),
                           dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                num_key_value_heads=2, **_QWEN_TEXT),
                           dict(image_token_id=95, image_seq_length=16, downsample_ratio=0.5), 64,
                           "InternVLVisionConfig", "Qwen2Config"),
}
FAMILIES = ("llava", "qwen-vl", "onevision", "gemma3", "smolvlm", "internvl")


def is_vlm_name(name: str) -> bool:
    """``llava:<shape>``, ``qwen-vl:<shape>``, ``onevision:<shape>``, ``gemma3:<shape>``, ``smolvlm:<shape>`` or
    ``internvl:<shape>`` (``hf:<directory>`` of a VLM: :func:`vtr.tools.models.is_hf_vlm`)."""
    return name.partition(":")[0] in FAMILIES


def build(name: str, vision_layers: int = 2, lm_layers: int = 2, tower_size: Optional[int] = None) -> nn.Module:
    """The shape ``name`` of :data:`SHAPES` with random weights (seed 0), ``vision_layers`` / ``lm_layers`` deep;
    ``hf:<directory or Hub id>`` loads a saved LLaVA, LLaVA-OneVision or Qwen-VL instead (its own depth).
    ``tower_size`` changes a LLaVA-style tower's input side: OneVision's video frames are that size, so smaller
    frames (a cheaper CPU run) need a smaller tower."""
    if name.startswith("hf:"):
        return load_hf_vlm(name[3:])
    if name not in SHAPES:
        kind = name.partition(":")[0]
        known = [n for n in SHAPES if n.startswith(kind + ":")] or list(SHAPES)
        raise ValueError(f"unknown VLM shape {name!r}; the built-in shapes are {', '.join(known)} (or hf:<directory "
                         "written by save_pretrained>)")
    import transformers

    shape = SHAPES[name]
    text = dict(shape.text, num_hidden_layers=lm_layers)
    if shape.config_cls.startswith("Qwen"):
        if tower_size is not None:
            raise ValueError("a Qwen-VL tower takes images of any size; give the image size instead of tower_size")
        vision = dict(shape.vision, depth=vision_layers)
        if shape.config_cls == "Qwen3VLConfig":   # DeepStack at a third, two thirds and the end of Qwen3-VL-8B's 27
            vision["deepstack_visual_indexes"] = sorted({vision_layers * k // 27 for k in (8, 16, 24)})
        else:
            vision["fullatt_block_indexes"] = [vision_layers - 1]
    else:
        vision = dict(shape.vision, num_hidden_layers=vision_layers)
        vision["image_size"] = tower_size or vision["image_size"]
        vision = getattr(transformers, shape.vision_config)(**vision)
        text = getattr(transformers, shape.text_config)(**text)
    config = getattr(transformers, shape.config_cls)(vision_config=vision, text_config=text, **shape.tokens)
    torch.manual_seed(0)
    return getattr(transformers, shape.model_cls)._from_config(config, attn_implementation="sdpa").eval()


# -- prompts: batch copies of text, one image (or video), text; random pixels ----------------------------------

@dataclass
class Workload:
    """What one benchmark call feeds the model: keywords of ``model(...)`` and what they hold."""
    inputs: dict
    visual: int         # visual tokens per prompt
    description: str
    patch: dict         # extra keywords of vtr.patch for this input (a video's frame split)
    unit: Optional[int] = None   # visual tokens one budget= covers, when it is less than the prompt's (a tile)

    @property
    def budgeted(self) -> int:
        """Visual tokens a ``budget=`` counts against: an image or video (the prompt's), or one tile (SmolVLM)."""
        return self.unit or self.visual


def workload(model: nn.Module, text: int = 40, batch: int = 1, image_size: Optional[int] = None,
             video_frames: int = 0, frames: Optional[str] = None) -> Workload:
    """``batch`` copies of one prompt for ``model``: ``text`` text tokens around one image of ``image_size``
    (default the model's), or for Qwen-VL, LLaVA-OneVision and NeXT-Video a ``video_frames``-frame video of that
    side; built by the family (``Adapter.benchmark_workload``)."""
    return Workload(*find_adapter(model).benchmark_workload(model, text, batch, image_size, video_frames, frames))


# -- timing ---------------------------------------------------------------------------------------------------

def timed(fn: Callable) -> tuple[float, Any]:
    """(seconds, result) of one call, on torch.utils.benchmark's clock (it synchronises CUDA before reading the
    time)."""
    start = benchmark.timer()
    result = fn()
    return benchmark.timer() - start, result


@torch.inference_mode()
def measure(model: nn.Module, inputs: dict, decode_tokens: int = 8) -> dict:
    """One timing of each part for the model as it is now (patched or not): ``vision`` and ``prefill`` seconds,
    ``decode_ms`` per token; patched, also the report's LM prefill ``macs``/``macs_unreduced`` and ``kept``."""
    patched = is_patched(model)
    before = patched and not settings(model).visual.in_llm
    vision, prefill_inputs, step_positions = find_adapter(model).benchmark_prompt(model, inputs, before, timed)
    prefill_inputs.update(logits_to_keep=1, use_cache=True)
    prefill, out = timed(lambda: model(**prefill_inputs))

    # Decode: single-token steps on the cache that prefill left (in-LLM pruning: each step continues the pruning
    # the prefill made on that cache).
    cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    batch, length = prefill_inputs["input_ids"].shape
    seconds = 0.0
    for step in range(decode_tokens):
        mask = torch.ones(batch, length + step + 1, dtype=torch.long, device=token.device)
        seconds += timed(lambda: model(input_ids=token, cache=cache, attention_mask=mask,
                                       position_ids=step_positions(step), use_cache=True))[0]
    result = {"vision": vision, "prefill": prefill, "decode_ms": 1000 * seconds / max(decode_tokens, 1)}
    if patched:
        run = report(model)
        result.update(macs=float(run.prefill_macs.sum()), macs_unreduced=float(run.prefill_macs_unreduced.sum()),
                      kept=int(run.visual_tokens_after[0]))
        if getattr(run, "tower_macs", None) is not None:   # reduced inside the vision tower
            result.update(tower_macs=run.tower_macs, tower_macs_unreduced=run.tower_macs_unreduced)
    return result


def interleaved(model: nn.Module, measure: Callable, rounds: int, **patch_kwargs) -> tuple[dict, dict]:
    """``measure(model)`` of the unreduced model and of ``vtr.patch(model, **patch_kwargs)``, alternating
    ``rounds`` times; the medians of each (the reduced one with what ``measure`` read from the report)."""
    base, reduced = [], []
    for _ in range(rounds):
        base.append(measure(model))
        patch(model, **patch_kwargs)
        try:
            reduced.append(measure(model))
        finally:
            unpatch(model)
    median = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    return ({k: median(base, k) for k in ("vision", "prefill", "decode_ms")},
            {k: median(reduced, k) for k in reduced[0]})


# -- rows -----------------------------------------------------------------------------------------------------

@dataclass
class Row:
    method: str                 # with the kept fraction asked for, e.g. "tome (25%)"
    where: str                  # "before LM" or "LM layer <n>"
    visual: int                 # visual tokens per prompt
    kept: int                   # visual tokens kept (first prompt)
    macs_ratio: float           # analytic LM prefill MACs, reduced / unreduced
    prefill_s: float            # median per batch
    prefill_unreduced_s: float
    speedup: float              # prefill, unreduced / reduced
    vision_s: float
    vision_unreduced_s: float
    decode_ms: float            # per generated token
    decode_unreduced_ms: float
    batch: int = 1
    tower_macs_ratio: Optional[float] = None   # reduced inside the tower: its MACs as run, reduced / unreduced
    vision_speedup: float = 0.0                # vision part (tower + reducer), unreduced / reduced

    def as_dict(self) -> dict:
        return asdict(self)


HEADER = ("| method | where | visual kept | LM prefill MACs (bound) | prefill s (unreduced) | prefill speed-up "
          "| vision+reduce s (unreduced) | decode ms/token (unreduced) | tower MACs (bound) | vision speed-up |"
          "\n|---|---|---|---|---|---|---|---|---|---|")


def make_row(method: str, where: str, visual: int, base: dict, reduced: dict, batch: int = 1) -> Row:
    tower = reduced.get("tower_macs")
    return Row(method, where, visual, int(reduced["kept"]), reduced["macs"] / reduced["macs_unreduced"],
               reduced["prefill"], base["prefill"], base["prefill"] / reduced["prefill"], reduced["vision"],
               base["vision"], reduced["decode_ms"], base["decode_ms"], batch,
               None if tower is None else tower / reduced["tower_macs_unreduced"], base["vision"] / reduced["vision"])


def format_row(row: Row) -> str:
    """One table row: the MACs ratio beside its bound on the prefill speed-up (its inverse); reduced inside the
    tower, the tower's MACs ratio beside its bound on the vision speed-up ("-": the tower ran unreduced)."""
    tower = "-" if row.tower_macs_ratio is None else f"{row.tower_macs_ratio:.3f} ({1 / row.tower_macs_ratio:.2f}x)"
    return (f"| {row.method} | {row.where} | {row.kept} | {row.macs_ratio:.3f} ({1 / row.macs_ratio:.2f}x) | "
            f"{row.prefill_s:.3f} ({row.prefill_unreduced_s:.3f}) | {row.speedup:.2f}x | "
            f"{row.vision_s:.3f} ({row.vision_unreduced_s:.3f}) | {row.decode_ms:.1f} ({row.decode_unreduced_ms:.1f}) | "
            f"{tower} | {row.vision_speedup:.2f}x |")


def format_table(rows: Sequence[Row]) -> str:
    return "\n".join([HEADER, *map(format_row, rows)])


def where_of(model: nn.Module, kwargs: dict) -> str:
    """Where a variant reduces: "before LM", "tower block K" (inside the vision tower, after its block K), or "LM
    layer K" (the first of its layers), the layers given or, for a method that acts only inside the language model,
    its own default ones."""
    if kwargs.get("tower_layer") is not None:
        return f"tower block {kwargs['tower_layer']}"
    layers = kwargs.get("layers")
    if layers is None and kwargs.get("method"):
        layers = find_adapter(model).default_stage_layers(model, make_reducer(kwargs["method"]), None)
    return f"LM layer {layers[0]}" if layers else "before LM"


def run(model: nn.Module, load: Workload, variants: Sequence[tuple[str, dict]], rounds: int = 3,
        decode_tokens: int = 8, device: str = "cpu", on_row: Optional[Callable[[Row], None]] = None) -> list[Row]:
    """Each ``(label, patch keywords)`` variant against the unreduced model on ``load``, interleaved over
    ``rounds``, after one warm-up call; ``on_row`` sees each row as it is measured."""
    model.to(device)
    inputs = {k: v.to(device) for k, v in load.inputs.items()}
    measure(model, inputs, 1)   # warm-up
    rows = []
    for label, kwargs in variants:
        kwargs = dict(load.patch, **kwargs) if not kwargs.get("layers") else kwargs
        base, reduced = interleaved(model, lambda m: measure(m, inputs, decode_tokens), rounds, **kwargs)
        rows.append(make_row(label, where_of(model, kwargs), load.visual, base, reduced, inputs["input_ids"].shape[0]))
        if on_row:
            on_row(rows[-1])
    return rows
