"""`vtr fidelity` (also `python benchmarks/fidelity.py`): accuracy and agreement vs FLOPs per method.

Default: the procedural task and its small ViT (trained once, cached). With ``--checkpoint`` and
``--data`` it evaluates a user's own timm model on an ImageFolder instead.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from ..tools import fidelity
from ..tools.plotting import frontier
from .models import _options

QUICK_TASK = fidelity.Task(image_size=16, patch_size=4, clutter=4, num_classes=4)
QUICK_TRAINING = fidelity.Training(embed_dim=16, depth=2, num_heads=2, train_images=64, epochs=1, batch_size=32)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: every registered one)")
    parser.add_argument("--targets", default="0.7,0.5,0.35", help="FLOPs fractions (default: %(default)s)")
    parser.add_argument("--test-images", type=int, default=2000, help="evaluation images (procedural task)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a tiny task and model: a smoke test in seconds")
    parser.add_argument("--retrain", action="store_true", help="train the task model again, ignoring the cache")
    parser.add_argument("--cache", default=None, help="checkpoint cache dir (default: $VTR_CACHE or ~/.cache/vtr)")
    real = parser.add_argument_group("your own model and data")
    real.add_argument("--checkpoint", default=None, help="state dict of a timm model (with --model, --data)")
    real.add_argument("--model", default=None, help="timm model name the checkpoint belongs to")
    real.add_argument("--num-classes", type=int, default=None, help="classes of the checkpoint's head")
    real.add_argument("--img-size", type=int, default=None)
    real.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                      help="extra timm.create_model argument, e.g. --model-arg depth=6 (repeatable)")
    real.add_argument("--data", default=None, help="ImageFolder directory (class folders in the model's order)")
    real.add_argument("--limit", type=int, default=None, help="evaluate at most this many images")
    parser.add_argument("--json", default=None, help="write the results as JSON to this file")
    parser.add_argument("--markdown", default=None, help="write the table as markdown to this file")
    parser.add_argument("--plot", default=None, metavar="PNG", help="draw top-1 against measured FLOPs per method")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("fidelity", help="accuracy / agreement vs FLOPs for every method",
                                   description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def _own_model(args: argparse.Namespace):
    import timm

    if not (args.model and args.data):
        raise ValueError("--checkpoint needs --model (the timm architecture) and --data (an ImageFolder)")
    kwargs = {k: v for k, v in (("num_classes", args.num_classes), ("img_size", args.img_size)) if v is not None}
    kwargs |= _options(args.model_arg)
    model = timm.create_model(args.model, pretrained=False, **kwargs)
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("model", state) if isinstance(state, dict) and "model" in state else state)
    model.eval()
    return model, fidelity.imagefolder_batches(args.data, model, args.batch_size, args.limit)


def run(args: argparse.Namespace) -> int:
    targets = [float(t) for t in args.targets.split(",") if t]
    bad = [t for t in targets if not 0 < t <= 1]
    if bad:
        raise ValueError(f"--targets must be fractions in (0, 1], got {bad}")
    methods = args.methods.split(",") if args.methods else None
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        model, data = _own_model(args)
        setting = {"checkpoint": args.checkpoint, "model": args.model, "data": args.data}
    else:
        task, training = (QUICK_TASK, QUICK_TRAINING) if args.quick else (fidelity.Task(), fidelity.Training())
        root = Path(args.cache) if args.cache else None
        model = fidelity.trained_model(task, training, root=root, retrain=args.retrain)
        count = min(args.test_images, 64) if args.quick else args.test_images
        images, labels = fidelity.make_images(task, count, seed=10_000 + training.seed)
        data = fidelity.batches(images, labels, args.batch_size)
        setting = {"task": asdict(task), "training": asdict(training), "test_images": count}
    results = fidelity.evaluate(model, data, methods=methods, targets=targets)
    table = fidelity.format_table(results)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"setting": setting, "results": [asdict(r) for r in results]}, indent=2))
    if args.plot:
        frontier(fidelity.accuracy_series(results), args.plot, "top-1 accuracy")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
