"""The VQA task of the VLM yardstick: scenes of small objects on clutter, and one-word questions about them.

Each 64 x 64 scene holds 2-4 objects (8 x 8 glyphs: distinct shapes and distinct saturated colours, each in its own
quadrant at a random offset, so it covers 1-4 of the 8 x 8 visual tokens) on a dark gradient with grey clutter.
Six question types; four need one particular object and two the whole image:

==========  ======================================  ========================  ======
type        question                                answers                   chance
==========  ======================================  ========================  ======
colour      what colour is the {shape}              6 colours                 1/6
shape       what shape is coloured {colour}         6 shapes                  1/6
where       where is the {shape}                    4 quadrants               1/4
exists      is the {shape} {colour}                 yes / no                  1/2
count       how many objects                        two / three / four        1/3
any         is any object {colour}                  yes / no                  1/2
==========  ======================================  ========================  ======

Answers are balanced within each type (a "no" to "exists" names a colour and a shape that are both in the scene,
on different objects, so neither alone answers it). The word the answer hinges on comes last, right before the
answer, so that for most types one lookup in the image answers (``exists`` takes two: the object, then its colour). Every question comes with the map of the tokens that answer it
(:attr:`Examples.relevant`): the queried object, or for ``exists`` the objects of that colour or shape, or for
``count`` / ``any`` every object. The yardstick's oracle keeps those tokens first.

The vocabulary is word-level (one token per word, :data:`VOCABULARY`), so a one-word answer is the next token.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .fidelity import _glyphs

IMAGE_SIZE = 64
CELL = 8                       # pixels per visual token side: an 8 x 8 grid of tokens
GRID = IMAGE_SIZE // CELL
MEAN, STD = 0.3, 0.3           # pixel normalisation

SHAPES = ("square", "frame", "plus", "cross", "triangle", "ring")
_GLYPH_OF_SHAPE = (0, 1, 2, 3, 6, 7)   # vtr.tools.fidelity's glyphs
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
_RGB = np.array([(1.0, 0.15, 0.1), (0.1, 0.85, 0.15), (0.2, 0.35, 1.0), (1.0, 0.95, 0.1), (1.0, 0.15, 1.0),
                 (0.1, 0.95, 1.0)])
PLACES = ("top-left", "top-right", "bottom-left", "bottom-right")
COUNTS = ("two", "three", "four")
TYPES = ("colour", "shape", "where", "exists", "count", "any")
CHANCE = {"colour": 1 / 6, "shape": 1 / 6, "where": 1 / 4, "exists": 1 / 2, "count": 1 / 3, "any": 1 / 2}
WHOLE_IMAGE = ("count", "any")

# Special tokens first (id 0 pads); LLaVA uses <image>, Qwen-VL <vision_start> <image_pad> ... <vision_end>.
SPECIALS = ("<pad>", "<bos>", "<image>", "<vision_start>", "<vision_end>", "<image_pad>", "<video_pad>")
WORDS = ("what", "colour", "is", "the", "shape", "coloured", "object", "where", "any", "how", "many", "objects",
         "yes", "no")
VOCABULARY = SPECIALS + WORDS + SHAPES + COLOURS + PLACES + COUNTS
TOKEN = {word: index for index, word in enumerate(VOCABULARY)}
ANSWERS = SHAPES + COLOURS + PLACES + COUNTS + ("yes", "no")


@dataclass
class Examples:
    """``count`` questions about their scenes (``per_scene`` questions share a scene).

    images: ``[N, 3, 64, 64]`` normalised pixels, each example's scene's: ``scene_images[scene]`` (the scenes are
    stored once, so six questions per scene on 48,000 scenes hold 2.4 GB of pixels, not 14). questions: per
    example the question's token ids (no image, no special tokens). answers: ``[N]`` token id of the one-word
    answer. types: per example its type (:data:`TYPES`).
    relevant: ``[N, 8, 8]`` fraction of each visual token's pixels covered by the objects that answer the question
    (the oracle's score). objects: ``[N, 8, 8]`` the same for every object in the scene.
    scene_colour / scene_place: ``[N, 6]`` per shape its colour / quadrant index, -1 when absent; token_colour /
    token_shape: ``[N, 8, 8]`` the colour / shape index of the object covering most of each token, -1 for none (the
    vision towers' pretraining targets).
    """

    scene_images: Tensor
    scene: Tensor
    questions: list
    answers: Tensor
    types: list
    relevant: Tensor
    objects: Tensor
    scene_colour: Tensor
    scene_place: Tensor
    token_colour: Tensor
    token_shape: Tensor

    def __len__(self) -> int:
        return len(self.questions)

    @property
    def images(self) -> Tensor:
        return self.scene_images[self.scene]

    def subset(self, index) -> "Examples":
        index = list(range(len(self)))[index] if isinstance(index, slice) else list(index)
        return Examples(self.scene_images, self.scene[index], [self.questions[i] for i in index], self.answers[index],
                        [self.types[i] for i in index], self.relevant[index], self.objects[index],
                        self.scene_colour[index], self.scene_place[index], self.token_colour[index],
                        self.token_shape[index])


def make_examples(count: int, seed: int, types: tuple = TYPES, per_scene: int = 1) -> Examples:
    """``count`` examples, question types in turn (balanced), each type's answer drawn uniformly.

    ``per_scene`` questions are asked about each scene (examples ``i * per_scene ...`` share one): training puts
    them in one sequence, so a forward pass teaches several answers."""
    for kind in types:
        if kind not in TYPES:
            raise ValueError(f"types: each must be one of {', '.join(TYPES)}; got {kind!r}")
    if count % per_scene:
        raise ValueError(f"count must be a multiple of per_scene={per_scene}, got {count}")
    rng = np.random.default_rng(seed)
    glyphs = _glyphs()[list(_GLYPH_OF_SHAPE)]
    scenes = count // per_scene
    images = np.empty((scenes, IMAGE_SIZE, IMAGE_SIZE, 3))
    relevant = np.zeros((count, GRID, GRID))
    covers = np.zeros((scenes, len(SHAPES), GRID, GRID))
    scene_colour = np.full((scenes, len(SHAPES)), -1)
    scene_place = np.full((scenes, len(SHAPES)), -1)
    questions, answers, kinds = [], [], []
    order = [types[j % len(types)] for j in range(count)]
    if per_scene > 1:   # each scene its own mix of types, each in any place of its sequence
        order = [order[j] for j in rng.permutation(count)]
    for i in range(scenes):
        number = 2 + int(rng.integers(3))
        shapes, colours, places = (rng.permutation(n)[:number] for n in (len(SHAPES), len(COLOURS), len(PLACES)))
        images[i] = _background(rng)
        for shape, colour, place in zip(shapes, colours, places):
            covers[i, shape] = _draw(rng, images[i], glyphs[shape], _RGB[colour], place)
            scene_colour[i, shape], scene_place[i, shape] = colour, place
        for j in range(i * per_scene, (i + 1) * per_scene):
            kind = order[j]
            words, answer, wanted = _question(rng, kind, scene_colour[i], scene_place[i])
            relevant[j] = covers[i, wanted].sum(0)
            questions.append([TOKEN[w] for w in words])
            answers.append(TOKEN[answer])
            kinds.append(kind)
    present = covers >= 0.125                     # objects never share a token (one per quadrant)
    token_colour = np.where(present, scene_colour[:, :, None, None], -1).max(1)
    token_shape = np.where(present, np.arange(len(SHAPES))[None, :, None, None], -1).max(1)
    pixels = np.concatenate([((part.clip(0, 1) - MEAN) / STD).astype(np.float32).transpose(0, 3, 1, 2)
                             for part in np.array_split(images, max(1, scenes // 1000))])   # parts: no float64 copies
    scene = np.arange(count) // per_scene
    tensor = torch.from_numpy
    return Examples(tensor(pixels).contiguous(), tensor(scene), questions,
                    torch.tensor(answers), kinds, tensor(relevant.astype(np.float32)),
                    tensor(covers.sum(1).astype(np.float32))[scene], tensor(scene_colour)[scene],
                    tensor(scene_place)[scene], tensor(token_colour)[scene], tensor(token_shape)[scene])


def _question(rng: np.random.Generator, kind: str, scene_colour: np.ndarray, scene_place: np.ndarray):
    """A question of ``kind`` about the scene (per shape its colour and quadrant, -1 absent): its words, its
    answer, and which shapes' objects answer it (a boolean mask over the shapes)."""
    present = np.flatnonzero(scene_colour >= 0)
    s = int(rng.choice(present))
    c = int(scene_colour[s])
    if kind == "colour":
        return ["what", "colour", "is", "the", SHAPES[s]], COLOURS[c], np.arange(len(SHAPES)) == s
    if kind == "shape":
        return ["what", "shape", "is", "coloured", COLOURS[c]], SHAPES[s], np.arange(len(SHAPES)) == s
    if kind == "where":
        return ["where", "is", "the", SHAPES[s]], PLACES[scene_place[s]], np.arange(len(SHAPES)) == s
    if kind == "exists":
        answer = "yes"
        if rng.random() < 0.5:   # "no": the colour of another object
            c = int(scene_colour[rng.choice(present[present != s])])
            answer = "no"
        return ["is", "the", SHAPES[s], COLOURS[c]], answer, \
            (np.arange(len(SHAPES)) == s) | (scene_colour == c)
    if kind == "count":
        return ["how", "many", "objects"], COUNTS[len(present) - 2], scene_colour >= 0
    answer = "yes"   # any
    if rng.random() < 0.5:
        c = int(rng.choice([k for k in range(len(COLOURS)) if k not in scene_colour]))
        answer = "no"
    return ["is", "any", "object", COLOURS[c]], answer, scene_colour >= 0


def _background(rng: np.random.Generator) -> np.ndarray:
    """A dark colour gradient, pixel noise and 24 grey dots and dashes (clutter that no question is about)."""
    ramp = np.linspace(0, 1, IMAGE_SIZE)[None, :, None]
    corners = rng.uniform(0.05, 0.3, (2, 3))
    image = corners[0] * (1 - ramp) + corners[1] * ramp
    image = np.broadcast_to(image, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    if rng.random() < 0.5:
        image = image.transpose(1, 0, 2).copy()
    image += rng.normal(0, 0.03, image.shape)
    for _ in range(24):
        h, w = ((2, 2), (1, 4), (4, 1))[rng.integers(3)]
        y, x = rng.integers(0, IMAGE_SIZE - h + 1), rng.integers(0, IMAGE_SIZE - w + 1)
        image[y:y + h, x:x + w] = rng.uniform(0.35, 0.65) + rng.uniform(-0.05, 0.05, 3)
    return image


def _draw(rng: np.random.Generator, image: np.ndarray, glyph: np.ndarray, rgb: np.ndarray, place: int) -> np.ndarray:
    """Draw ``glyph`` (mirrored half the time) at a random offset inside quadrant ``place``; returns the fraction
    of each visual token's pixels it covers ``[8, 8]``."""
    half = IMAGE_SIZE // 2
    size = glyph.shape[0]
    y = (place // 2) * half + int(rng.integers(1, half - size))
    x = (place % 2) * half + int(rng.integers(1, half - size))
    mask = glyph[:, ::-1] if rng.random() < 0.5 else glyph
    image[y:y + size, x:x + size][mask] = rgb * rng.uniform(0.8, 1.0)
    full = np.zeros((IMAGE_SIZE, IMAGE_SIZE))
    full[y:y + size, x:x + size] = mask
    return full.reshape(GRID, CELL, GRID, CELL).mean(axis=(1, 3))


def text(ids) -> str:
    """The words of token ids (for logs and reports)."""
    return " ".join(VOCABULARY[int(i)] for i in ids)
