"""The VLM yardstick's models: a tiny LLaVA and a tiny Qwen2.5-VL trained here on the VQA task
(:mod:`vtr.tools.vqa_task`), so that what a reduction keeps can be measured on a VLM that has learnt something.

Both are Hugging Face models built from configs (``LlavaForConditionalGeneration``: a CLIP tower and a Llama;
``Qwen2_5_VLForConditionalGeneration``: its windowed tower with the 2x2 merger, M-RoPE), each with 64 visual tokens
(an 8 x 8 grid) per 64 px image, and trained the way real ones are, in two stages:

1. the vision tower is pretrained alone (LLaVA's: the CLIP tower up to its last layer; Qwen's: up to the merger) on
   what the scene holds: from its pooled output (CLIP's class token, Qwen's mean token) the colour and quadrant of
   each shape and the object count, and from each token at the feature layer the colour and shape under it. Real
   towers are pretrained on image-text pairs before the LM is attached; without it the class-token attention at
   LLaVA's feature layer gets no gradient (LLaVA drops that token) and methods that read it would be judged on noise;
2. the tower is frozen (as LLaVA's is) and the projector (Qwen: the LM alone, the merger being the tower's) and the
   language model learn to answer, with the loss on the answer token.

Training runs once on the CPU and is cached in the user cache dir (``$VTR_CACHE``, as the fidelity ViT is).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import vqa_task as task
from .fidelity import keyed_checkpoint, trained_once, warmup_cosine

FAMILIES = ("llava", "qwen")
QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL = 4, 2, 2   # 16 x 16 patches of 4 px -> 8 x 8 tokens after the merger


@dataclass(frozen=True)
class VlmTraining:
    """A yardstick model's size and recipe (part of its cache key)."""

    family: str = "llava"
    vision_width: int = 64
    vision_layers: int = 4
    lm_width: int = 96
    lm_layers: int = 3
    tower_images: int = 8000
    tower_epochs: int = 4
    tower_batch: int = 64
    examples: int = 72000        # questions: 12,000 scenes
    per_scene: int = 6           # questions per scene in one training sequence (6: 87% train accuracy after 10
                                 # epochs, where 3 per scene for 8 epochs stopped at 76%)
    epochs: int = 10
    batch_size: int = 16         # scenes per step: many small steps (retrieval by attention is learnt late)
    lr: float = 1e-3
    seed: int = 0
    types: tuple = task.TYPES    # the question types of stage 2


    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}")


# `vtr fidelity --model llava-task --quick` and CI: narrower, shallower, trained on less (about a minute) and asked
# only how many objects there are: a question on the whole image that every object's tokens answer, learnt in a few
# hundred steps where the lookup questions take thousands (measured).
QUICK = dict(vision_width=32, vision_layers=3, lm_width=64, lm_layers=2, tower_images=3000, tower_epochs=8,
             examples=6000, per_scene=3, epochs=10, lr=2e-3, types=("count",))


# Qwen's tower sees 4x the patches (4 px, merged 2 x 2 into the 8 x 8 tokens): fewer pretraining images.
FAMILY = {"llava": dict(examples=144000), "qwen": dict(tower_images=6000, examples=288000)}


def recipe(family: str, quick: bool = False, **changes) -> VlmTraining:
    """The yardstick recipe of ``family`` ("llava" or "qwen"): the full one, or the quick one."""
    if family not in FAMILY:
        raise ValueError(f"family must be one of {', '.join(FAMILY)}, got {family!r}")
    return VlmTraining(family=family, **{**(QUICK if quick else FAMILY[family]), **changes})


# --- the models -----------------------------------------------------------------------------------

def build_model(training: VlmTraining) -> nn.Module:
    """The untrained model of ``training.family`` (SDPA attention, float32, eval mode)."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration)

    torch.manual_seed(training.seed)
    heads = 4
    text = dict(vocab_size=len(task.VOCABULARY), hidden_size=training.lm_width,
                intermediate_size=2 * training.lm_width, num_hidden_layers=training.lm_layers,
                num_attention_heads=heads, num_key_value_heads=heads, pad_token_id=task.TOKEN["<pad>"],
                max_position_embeddings=256, tie_word_embeddings=False,
                # 1/sqrt(width), not the 0.02 made for widths in the thousands: with it attention logits start near
                # zero and learning to look a word up in the image stalled for thousands of steps (measured)
                initializer_range=training.lm_width ** -0.5)
    if training.family == "llava":
        vision = CLIPVisionConfig(hidden_size=training.vision_width, intermediate_size=2 * training.vision_width,
                                  num_hidden_layers=training.vision_layers, num_attention_heads=heads,
                                  image_size=task.IMAGE_SIZE, patch_size=task.CELL)
        config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**text, bos_token_id=task.TOKEN["<bos>"],
                                                                          eos_token_id=None),
                             image_token_index=task.TOKEN["<image>"], vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_seq_length=task.GRID ** 2)
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    else:
        half, spatial = training.lm_width // heads // 2, 3 * training.lm_width // heads // 16   # rotary pairs
        vision = dict(depth=training.vision_layers, hidden_size=training.vision_width,
                      intermediate_size=2 * training.vision_width, num_heads=heads, out_hidden_size=training.lm_width,
                      patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL,
                      window_size=task.IMAGE_SIZE // 2, fullatt_block_indexes=[training.vision_layers - 1],
                      initializer_range=training.vision_width ** -0.5)
        text |= dict(bos_token_id=None, eos_token_id=None,
                     rope_scaling={"type": "mrope", "mrope_section": [half - 2 * spatial, spatial, spatial]})
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=task.TOKEN["<image_pad>"],
                                  video_token_id=task.TOKEN["<video_pad>"],
                                  vision_start_token_id=task.TOKEN["<vision_start>"],
                                  vision_end_token_id=task.TOKEN["<vision_end>"])
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    return model.eval()


def family_of(model: nn.Module) -> str:
    return "qwen" if "qwen" in type(model).__name__.lower() else "llava"


def qwen_pixels(images: Tensor) -> Tensor:
    """Images ``[B, 3, H, W]`` as Qwen2-VL's image processor lays them out: ``[B * h * w, 3 * 2 * 4 * 4]`` rows of
    one patch (each image repeated over the 2 temporal frames), grouped by 2 x 2 merge window in raster order."""
    b, c, height, width = images.shape
    p, m, t = QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL
    h, w = height // p, width // p
    patches = images[:, None].expand(b, t, c, height, width)
    patches = patches.reshape(b, t, c, h // m, m, p, w // m, m, p)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return patches.reshape(b * h * w, c * t * p * p)


def prompt_ids(family: str, question: list) -> list:
    """The token ids of one prompt: the image's placeholders, then the question."""
    visual = [task.TOKEN["<image>"]] * task.GRID ** 2 if family == "llava" else \
        [task.TOKEN["<vision_start>"], *[task.TOKEN["<image_pad>"]] * task.GRID ** 2, task.TOKEN["<vision_end>"]]
    return [task.TOKEN["<bos>"], *visual, *question]


def model_inputs(model: nn.Module, examples: "task.Examples") -> dict:
    """``forward()``/``generate()`` keywords for ``examples``, left-padded as a processor pads for generation."""
    family = family_of(model)
    prompts = [prompt_ids(family, q) for q in examples.questions]
    ids, mask = _padded(prompts)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if family == "llava":
        return inputs | {"pixel_values": examples.images}
    side = task.IMAGE_SIZE // QWEN_PATCH
    return inputs | {"pixel_values": qwen_pixels(examples.images),
                     "image_grid_thw": torch.tensor([[1, side, side]] * len(prompts)),
                     "mm_token_type_ids": (ids == task.TOKEN["<image_pad>"]).long()}


@torch.no_grad()
def answer_logits(model: nn.Module, examples: "task.Examples", batch_size: int = 250) -> Tensor:
    """``[N, vocabulary]`` next-token logits after each prompt (the one-word answer is their argmax)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(examples), batch_size):
        inputs = model_inputs(model, examples.subset(slice(start, start + batch_size)))
        logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits
        out.append(logits[:, -1].float().cpu())
    return torch.cat(out)


# --- stage 1: the vision tower --------------------------------------------------------------------

_QUADRANT = ((torch.arange(task.GRID) // (task.GRID // 2))[:, None] * 2
             + torch.arange(task.GRID) // (task.GRID // 2)).flatten()[None]   # each token's quadrant


class TowerHeads(nn.Module):
    """Pretraining heads: per shape its colour (or absent) and quadrant (or absent), the object count, from the
    pooled feature; per token the colour and shape under it and its quadrant, from the feature layer."""

    def __init__(self, pooled_width: int, token_width: int):
        super().__init__()
        shapes = len(task.SHAPES)
        self.colour = nn.Linear(pooled_width, shapes * (len(task.COLOURS) + 1))
        self.place = nn.Linear(pooled_width, shapes * (len(task.PLACES) + 1))
        self.count = nn.Linear(pooled_width, len(task.COUNTS))
        self.token = nn.Linear(token_width, len(task.COLOURS) + len(task.SHAPES) + 2 + len(task.PLACES))

    def loss(self, pooled: Tensor, tokens: Tensor, examples: "task.Examples") -> Tensor:
        shapes, colours = len(task.SHAPES), len(task.COLOURS)
        colour = self.colour(pooled).view(-1, shapes, colours + 1)
        place = self.place(pooled).view(-1, shapes, len(task.PLACES) + 1)
        count = (examples.scene_colour >= 0).sum(1) - 2
        token = self.token(tokens)
        # -1 (absent / no object) is the last class of each head
        absent = lambda target, classes: torch.where(target < 0, classes, target)
        return (F.cross_entropy(colour.flatten(0, 1), absent(examples.scene_colour, colours).flatten())
                + F.cross_entropy(place.flatten(0, 1), absent(examples.scene_place, len(task.PLACES)).flatten())
                + F.cross_entropy(self.count(pooled), count)
                + F.cross_entropy(token[..., :colours + 1].flatten(0, 1),
                                  absent(examples.token_colour, colours).flatten())
                + F.cross_entropy(token[..., colours + 1:colours + shapes + 2].flatten(0, 1),
                                  absent(examples.token_shape, shapes).flatten())
                + F.cross_entropy(token[..., colours + shapes + 2:].flatten(0, 1), _QUADRANT.expand(len(tokens), -1).flatten()))


def tower_features(model: nn.Module, examples: "task.Examples") -> tuple[Tensor, Tensor]:
    """(pooled ``[B, D]``, tokens at the feature layer ``[B, 64, D']``) of the tower, with gradients."""
    if family_of(model) == "llava":
        out = model.model.vision_tower(examples.images, output_hidden_states=True)
        return out.pooler_output, out.hidden_states[-2][:, 1:]
    side = task.IMAGE_SIZE // QWEN_PATCH
    grid = torch.tensor([[1, side, side]] * len(examples))
    tokens = model.model.visual(qwen_pixels(examples.images), grid_thw=grid)
    tokens = getattr(tokens, "pooler_output", tokens).view(len(examples), task.GRID ** 2, -1)
    return tokens.mean(1), tokens


def tower_of(model: nn.Module) -> nn.Module:
    return model.model.vision_tower if family_of(model) == "llava" else model.model.visual


def pretrain_tower(model: nn.Module, training: VlmTraining, log=print) -> None:
    tower = tower_of(model)
    pooled, tokens = tower_features(model, task.make_examples(2, seed=0))
    heads = TowerHeads(pooled.shape[-1], tokens.shape[-1])
    data = task.make_examples(training.tower_images, seed=training.seed + 1)
    parameters = [*tower.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=training.lr, weight_decay=0.05)
    steps = -(-len(data) // training.tower_batch)
    schedule = warmup_cosine(optimizer, steps * training.tower_epochs)
    generator = torch.Generator().manual_seed(training.seed)
    tower.train()
    start = time.time()
    for epoch in range(training.tower_epochs):
        order = torch.randperm(len(data), generator=generator)
        total = 0.0
        for step in range(steps):
            batch = data.subset(order[step * training.tower_batch:(step + 1) * training.tower_batch].tolist())
            loss = heads.loss(*tower_features(model, batch), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        log(f"tower epoch {epoch + 1}/{training.tower_epochs}: loss {total / steps:.3f} ({time.time() - start:.0f}s)")
    tower.eval()


# --- stage 2: answering ---------------------------------------------------------------------------

def _padded(prompts: list) -> tuple[Tensor, Tensor]:
    """Left-padded ids and attention mask of token-id lists."""
    length = max(map(len, prompts))
    ids = torch.full((len(prompts), length), task.TOKEN["<pad>"])
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = torch.tensor(prompt)
        mask[row, length - len(prompt):] = 1
    return ids, mask


def _scene_inputs(model: nn.Module, data: "task.Examples", scenes: list, per_scene: int):
    """One training row per scene: its image, then each question followed by its answer (the last answer left
    out). Returns the model's inputs and, per answer, its (row, position) and target."""
    family = family_of(model)
    first = data.subset([scene * per_scene for scene in scenes])
    prompts, where, targets = [], [], []
    for row, scene in enumerate(scenes):
        prompt = prompt_ids(family, [])
        for j in range(scene * per_scene, (scene + 1) * per_scene):
            prompt = prompt + ([int(data.answers[j - 1])] if j > scene * per_scene else []) + data.questions[j]
            where.append((row, len(prompt) - 1))
            targets.append(int(data.answers[j]))
        prompts.append(prompt)
    ids, mask = _padded(prompts)
    shift = ids.shape[1] - torch.tensor([len(p) for p in prompts])
    rows = torch.tensor([r for r, _ in where])
    positions = torch.tensor([c for _, c in where]) + shift[rows]
    inputs = model_inputs(model, first) | {"input_ids": ids, "attention_mask": mask}
    if family == "qwen":
        inputs["mm_token_type_ids"] = (ids == task.TOKEN["<image_pad>"]).long()
    return inputs, rows, positions, torch.tensor(targets)


class _FrozenImageFeatures:
    """Stage 2 on Qwen-VL: its tower (merger included) is frozen, so its output for each training scene is computed
    once and handed to the model's forward in place of ``get_image_features`` (on LLaVA the projector trains, and
    the CLIP tower is cheap: nothing is cached)."""

    def __init__(self, model: nn.Module, images: "task.Examples", batch_size: int = 250):
        self.model, parts = model, []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                inputs = model_inputs(model, images.subset(slice(start, start + batch_size)))
                out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
                parts.append(torch.cat(list(out.pooler_output)))
        self.features = torch.cat(parts).view(len(images), task.GRID ** 2, -1)
        self.current = None

    def select(self, scenes: list) -> None:
        """The features of ``scenes`` for the next forward."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        self.current = BaseModelOutputWithPooling(pooler_output=tuple(self.features[scenes]))

    def __enter__(self):
        self.model.model.get_image_features = lambda *args, **kwargs: self.current
        return self

    def __exit__(self, *exc):
        del self.model.model.get_image_features


def train_answers(model: nn.Module, training: VlmTraining, log=print) -> None:
    tower = tower_of(model)
    tower.requires_grad_(False)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=training.lr, weight_decay=0.05)
    data = task.make_examples(training.examples, seed=training.seed + 2, per_scene=training.per_scene,
                              types=training.types)
    scenes = len(data) // training.per_scene
    steps = -(-scenes // training.batch_size)
    schedule = warmup_cosine(optimizer, steps * training.epochs)
    generator = torch.Generator().manual_seed(training.seed + 1)
    cached = None
    if family_of(model) == "qwen":
        cached = _FrozenImageFeatures(model, data.subset(range(0, len(data), training.per_scene)))
    model.train()
    tower.eval()
    start = time.time()
    with cached or contextlib.nullcontext():
        for epoch in range(training.epochs):
            order = torch.randperm(scenes, generator=generator)
            correct = 0
            for step in range(steps):
                chosen = order[step * training.batch_size:(step + 1) * training.batch_size].tolist()
                inputs, rows, positions, targets = _scene_inputs(model, data, chosen, training.per_scene)
                if cached is not None:
                    cached.select(chosen)
                logits = model(**inputs).logits[rows, positions]
                loss = F.cross_entropy(logits, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                correct += int((logits.argmax(-1) == targets).sum())
            log(f"answer epoch {epoch + 1}/{training.epochs}: train accuracy {correct / len(data):.3f} "
                f"({time.time() - start:.0f}s)")
    tower.requires_grad_(True)
    model.eval()


def train(training: VlmTraining, log=print, threads: int = 1) -> nn.Module:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = build_model(training)
        pretrain_tower(model, training, log)
        train_answers(model, training, log)
    finally:
        torch.set_num_threads(previous)
    return model.eval()


def checkpoint_path(training: VlmTraining, root: Optional[Path] = None) -> Path:
    return keyed_checkpoint(f"yardstick-{training.family}", {"training": asdict(training), "task": "vqa-v2",
                                                             "version": 1}, root)


def trained_model(training: VlmTraining = VlmTraining(), *, root: Optional[Path] = None, retrain: bool = False,
                  log=print) -> nn.Module:
    """The yardstick model of ``training``, trained once and then loaded from the cache."""
    return trained_once(checkpoint_path(training, root), lambda: build_model(training),
                        lambda: train(training, log=log), retrain=retrain, log=log,
                        what=f"the {training.family} yardstick VLM")
