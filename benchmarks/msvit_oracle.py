"""MSViT with an oracle gate on the fidelity ViTs: the regions under the glyph get fine tokens, every other region
one coarse token, on the trained backbone as it is (no fine-tuning). It separates a gate that cannot find the glyph
from a backbone that cannot read mixed scales. The glyph's box is recovered by replaying make_images' random draws.

    python benchmarks/msvit_oracle.py        # one thread, a few minutes
"""
from __future__ import annotations

import json

import numpy as np
import torch

import vtr
from vtr.tools import fidelity
from vtr.tools.profile import count_macs


def glyph_boxes(task: fidelity.Task, count: int, seed: int) -> list[tuple[int, int]]:
    """The top-left corner of each image's 8x8 glyph, by the same draws as ``fidelity.make_images``."""
    rng = np.random.default_rng(seed)
    size = task.image_size
    rng.integers(0, task.num_classes, count)
    rng.uniform(0.1, 0.5, (count, 2, 3))
    rng.normal(0, 0.04, (count, size, size, 3))
    boxes = []
    for _ in range(count):
        for _ in range(task.clutter):
            h, w = ((2, 2), (1, 4), (4, 1))[rng.integers(3)]
            rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
            rng.uniform(0.3, 1.0, 3)
        y, x = rng.integers(0, size - 8 + 1, 2)
        rng.random()
        rng.uniform(0.5, 1.0, 3)
        boxes.append((int(y), int(x)))
    return boxes


def oracle(gate, boxes, region_px: int, grid: int):
    """``decide`` replacement: fine exactly where a region overlaps the glyph's box, per image of the batch."""
    state = {"start": 0}

    def decide(logits):
        rows = len(logits)
        chosen = torch.zeros_like(logits, dtype=torch.bool)
        for row in range(rows):
            y, x = boxes[state["start"] + row]
            for ry in range(y // region_px, (y + 7) // region_px + 1):
                for rx in range(x // region_px, (x + 7) // region_px + 1):
                    chosen[row, ry * grid + rx] = True
        state["start"] += rows
        return chosen

    return decide, state


def main() -> None:
    torch.set_num_threads(1)
    for name, (task, training), coarse in (("second", (fidelity.SECOND_TASK, fidelity.SECOND_TRAINING), 2),
                                           ("default", (fidelity.Task(), fidelity.Training()), 2),
                                           ("default", (fidelity.Task(), fidelity.Training()), 4)):
        model = fidelity.trained_model(task, training)
        images, labels = fidelity.make_images(task, 2000, seed=10_000)
        boxes = glyph_boxes(task, 2000, seed=10_000)
        base = count_macs(model, images[:1]).total
        vtr.adaptive.patch(model, "msvit", coarse=coarse)
        gate = model._vtr_adaptive
        region_px = task.patch_size * coarse
        decide, state = oracle(gate, boxes, region_px, task.image_size // region_px)
        gate.decide = decide
        correct, shares = 0, []
        with torch.no_grad(), vtr.adaptive.decisions(model) as found:
            for i in range(0, 2000, 250):
                correct += int((model(images[i:i + 250]).argmax(1) == labels[i:i + 250]).sum())
        share = vtr.adaptive.fine_share(found)
        state["start"] = 0
        flops = sum(count_macs(model, images[i:i + 1]).total for i in range(100)) / 100 / base
        print(json.dumps({"model": name, "coarse": coarse, "gate": "oracle (regions under the glyph fine)",
                          "top1": correct / 2000, "flops": flops, "fine_share": share}), flush=True)


if __name__ == "__main__":
    main()
