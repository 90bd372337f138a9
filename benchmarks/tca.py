"""TCA (vtr.adaptive.TCA) on the tiny CLIP task under a domain shift, against plain zero-shot and training-free
token reduction at the same FLOPs. Results: benchmarks/RESULTS-tca.md.

    python benchmarks/tca.py --images 1000 --strength 0,0.7 --seeds 0,1,2   # RESULTS-tca.md
    python benchmarks/tca.py --images 1000 --strength 0,0.7 --seeds 0,1,2 --layers 4,6 --reducers tome
    python benchmarks/tca.py --images 1000 --strength 0,0.7 --seeds 0,1,2 --diagnose     # why the correction adds nothing

Every row runs the test images as a stream at batch 1, in the stream's order (a fresh TCA per stream). CPU, one
thread, no downloads (the CLIP is trained once and cached, see vtr.tools.clip_task). Rows are appended as JSON
to ``--out`` (default benchmarks/tca-results.jsonl) and printed as a markdown table.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

import vtr
from vtr.adaptive import TCA
from vtr.adaptive.tca_reservoir import entropy
from vtr.tools import clip_task
from vtr.tools.fidelity import make_images
from vtr.tools.profile import count_macs


def stream(strength: float, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = make_images(clip_task.TASK, count, seed=1000 + seed)   # never the training images (seed 1)
    return (clip_task.shift(images, strength=strength, seed=seed) if strength else images), labels


@torch.no_grad()
def run_tca(model, text, images, labels, **options) -> tuple[float, float]:
    tca = TCA(model, text, **options)
    correct = sum(int(tca.step(images[i:i + 1]).argmax()) == int(labels[i]) for i in range(len(images)))
    return correct / len(images), tca.macs(images[:1])     # MACs with the anchors of the stream's end


@torch.no_grad()
def run_reducer(model, text, images, labels, method: str, flops: float) -> tuple[float, float]:
    patched = vtr.patch(copy.deepcopy(model), method, flops=flops)
    correct = 0
    for i in range(len(images)):
        logits = vtr.clip.zero_shot(patched, images[i:i + 1], text, condition=False)
        correct += int(logits.argmax()) == int(labels[i])
    return correct / len(images), count_macs(patched.visual, images[:1]).total


@torch.no_grad()
def diagnose(model, text, images, labels, warmup: int = 100) -> dict:
    """Why the correction helps or not: the reservoir's cache classifier alone (argmax of the correction) against
    zero-shot, after ``warmup`` images, on a stream without condensation; the correction's spread over classes
    against zero-shot's top-1 - top-2 margin (both in logits)."""
    tca = TCA(model, text, rate=0.0)
    cache = plain = 0
    spread, margin = [], []
    for i in range(len(images)):
        encoded = tca.encode(images[i:i + 1])
        logits = tca.zero_shot(encoded.features)[0]
        tca.reservoir.update(int(logits.argmax()), encoded.cls_tokens[0], float(entropy(logits)))
        correction = tca.reservoir.correction(encoded.cls_tokens[0], tca.scale, tca.lambd, tca.beta)
        if i >= warmup:
            cache += int(correction.argmax()) == int(labels[i])
            plain += int(logits.argmax()) == int(labels[i])
            spread.append(float(correction.max() - correction.min()))
            margin.append(float(logits.topk(2).values.diff().abs()))
    n = len(images) - warmup
    return dict(cache_top1=cache / n, zero_shot_top1=plain / n, correction_spread=sum(spread) / n,
                zero_shot_margin=sum(margin) / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--strength", default="0,1", help="shift strengths, comma-separated (0: clean)")
    parser.add_argument("--seeds", default="0", help="stream seeds (images, shift and order), comma-separated")
    parser.add_argument("--rates", default="0.1", help="TCA condensation rates, comma-separated")
    parser.add_argument("--layers", default="", help="condensation blocks, comma-separated (default: 1/4, 1/2, 3/4)")
    parser.add_argument("--reducers", default="evit,tome", help="training-free reducers at TCA's FLOPs")
    parser.add_argument("--diagnose", action="store_true", help="only the cache-classifier diagnosis per stream")
    parser.add_argument("--out", default="benchmarks/tca-results.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = clip_task.trained_clip()
    with torch.no_grad():
        text = clip_task.class_features(model)
    base = count_macs(model.visual, torch.zeros(1, 3, 32, 32)).total
    load = os.getloadavg()[0]
    layers = {"layers": tuple(int(l) for l in args.layers.split(","))} if args.layers else {}
    where = f" at blocks {args.layers}" if args.layers else ""
    rows = []
    if args.diagnose:
        for strength in (float(s) for s in args.strength.split(",")):
            for seed in (int(s) for s in args.seeds.split(",")):
                print(json.dumps(dict(strength=strength, seed=seed, **diagnose(model, text, *stream(strength,
                                      args.images, seed)))), flush=True)
        return
    for strength in (float(s) for s in args.strength.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            images, labels = stream(strength, args.images, seed)
            runs = [("zero-shot", dict(rate=0.0, lambd=0.0))]
            for rate in (float(r) for r in args.rates.split(",")):
                runs += [(f"TCA R={rate}{where}", dict(rate=rate, **layers)),
                         (f"TCA R={rate}{where} condensation only (no anchors, no correction)",
                          dict(rate=rate, lambd=0.0, anchors=False, **layers))]
            runs.append(("TCA correction only (R=0)", dict(rate=0.0)))
            fractions = {}
            for name, options in runs:
                start = time.time()
                top1, macs = run_tca(model, text, images, labels, **options)
                fractions[options["rate"]] = macs / base
                rows.append(dict(method=name, strength=strength, seed=seed, top1=top1, flops=macs / base,
                                 seconds=time.time() - start, options=options))
                print(json.dumps(rows[-1]), flush=True)
            for rate, fraction in fractions.items():
                if rate == 0:
                    continue
                for method in args.reducers.split(","):
                    start = time.time()
                    top1, macs = run_reducer(model, text, images, labels, method, fraction)
                    rows.append(dict(method=f"{method} at TCA R={rate}{where}'s FLOPs", strength=strength, seed=seed,
                                     top1=top1, flops=macs / base, seconds=time.time() - start))
                    print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "a") as out:
        for row in rows:
            out.write(json.dumps({**row, "images": args.images, "load": load}) + "\n")
    print("\n| method | shift | stream seed | FLOPs | zero-shot top-1 |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['strength']} | {row['seed']} | {row['flops']:.1%} | {row['top1']:.2%} |")


if __name__ == "__main__":
    main()
