"""`vtr fidelity` (also `python benchmarks/fidelity.py`): accuracy and agreement vs FLOPs per method.

Default: the procedural task and its small ViT (trained once, cached). With ``--checkpoint`` and
``--data`` it evaluates a user's own timm model on an ImageFolder instead. With ``--model llava-task`` or
``--model qwen-task`` it measures the VLM yardstick instead: a tiny LLaVA / Qwen2.5-VL trained here on one-word
questions about scenes (:mod:`vtr.tools.vlm_fidelity`), every method before and in the LM at visual-token budgets.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from ..tools import fidelity, vlm_fidelity, vlm_yardstick, vqa_task
from ..tools.models import create_model
from ..tools.plotting import frontier, lines
from .models import _options, load_checkpoint
from .usage import (UsageError, budget_fractions, device, existing_dir, existing_file, fractions, json_file,
                    method_list, output_file, positive_int, usage)



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", type=method_list, default=None,
                        help="comma-separated methods (default: every training-free one; "
                             "dynamicvit and sit run untrained only when named)")
    parser.add_argument("--targets", type=fractions, default="0.7,0.5,0.35",
                        help="comma-separated FLOPs fractions in (0, 1] (default: %(default)s)")
    parser.add_argument("--test-images", type=positive_int, default=2000,
                        help="evaluation images (procedural task; default: %(default)s)")
    parser.add_argument("--batch", type=positive_int, default=250,
                        help="images per evaluation batch (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--device", type=device, default="cpu",
                        help="cpu or cuda (cuda:N): where the model is evaluated (default: %(default)s; the task "
                             "model's first training runs on the CPU)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true",
                       help="a smaller task and model (trained once in about a minute, cached; 500 test images)")
    which.add_argument("--second", action="store_true",
                       help="the second task model: 6 blocks, 8 px patches, 48 px images (defaults must hold on both)")
    parser.add_argument("--retrain", action="store_true", help="train the task model again, ignoring the cache")
    parser.add_argument("--cache", default=None, help="checkpoint cache dir (default: $VTR_CACHE or ~/.cache/vtr)")
    vlm = parser.add_argument_group("the VLM yardstick (--model llava-task / qwen-task)")
    vlm.add_argument("--budgets", type=budget_fractions, default="0.5,0.25,0.11",
                     help="comma-separated fractions of the visual tokens kept, in (0, 1) (default: %(default)s)")
    vlm.add_argument("--stages", default="before,in", type=_stages,
                     help="before (the LM), in (the LM) or both, comma-separated (default: %(default)s)")
    vlm.add_argument("--in-llm-layer", type=positive_int, default=1,
                     help="decoder layer where in-LM pruning acts (default: %(default)s)")
    real = parser.add_argument_group("your own model and data")
    real.add_argument("--checkpoint", type=existing_file, default=None,
                      help="state dict of a timm model (with --model, --data)")
    real.add_argument("--model", default=None,
                      help="timm model name the checkpoint belongs to; or llava-task / qwen-task: the VLM yardstick")
    real.add_argument("--num-classes", type=positive_int, default=None, help="classes of the checkpoint's head")
    real.add_argument("--img-size", type=positive_int, default=None,
                      help="input size the checkpoint was trained at (default: the model's)")
    real.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                      help="extra timm.create_model argument, e.g. --model-arg depth=6 (repeatable)")
    real.add_argument("--data", type=existing_dir, default=None,
                      help="ImageFolder directory (class folders in the model's order)")
    real.add_argument("--limit", type=positive_int, default=None, help="evaluate at most this many images")
    parser.add_argument("--json", action="store_true", help="print the results as JSON to stdout instead of a table")
    parser.add_argument("--out", type=json_file, default=None, metavar="PATH",
                        help="write the results (setting and rows) as JSON to PATH")
    parser.add_argument("--markdown", type=output_file, default=None, metavar="PATH",
                        help="write the table as markdown to PATH")
    parser.add_argument("--plot", type=output_file, default=None, metavar="PNG",
                        help="draw top-1 against measured FLOPs per method into PNG")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("fidelity", help="accuracy / agreement vs FLOPs for every method",
                                   description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def _own_model(args: argparse.Namespace):
    if not (args.model and args.data):
        raise UsageError("--checkpoint", "needs --model (the timm architecture) and --data (an ImageFolder)")
    if ":" in args.model:
        raise UsageError("--model", f"a timm model name (the checkpoint's architecture), got {args.model!r}")
    kwargs = {k: v for k, v in (("num_classes", args.num_classes), ("img_size", args.img_size)) if v is not None}
    with usage("--model-arg"):
        kwargs |= _options(args.model_arg)
    # an unknown name, or an argument timm refuses (a TypeError from the model's __init__)
    with usage("--model-arg" if args.model_arg else "--model", TypeError):
        model = create_model(args.model, **kwargs)
    load_checkpoint(model, args.checkpoint)
    model.eval()
    with usage("--data", OSError):
        data = fidelity.imagefolder_batches(args.data, model, args.batch, args.limit)
    return model, data


def _stages(text: str) -> tuple:
    names = {"before": vlm_fidelity.STAGES[0], "in": vlm_fidelity.STAGES[1]}
    stages = tuple(part.strip() for part in text.split(",") if part.strip())
    if not stages or any(stage not in names for stage in stages):
        raise argparse.ArgumentTypeError(f"stages are before and/or in, comma-separated; got {text!r}")
    return tuple(names[stage] for stage in stages)


YARDSTICKS = {"llava-task": "llava", "qwen-task": "qwen"}


def _write(args: argparse.Namespace, document: dict, table: str) -> None:
    """The table (or with --json the document) on stdout; --markdown the table, --out the document, to files."""
    print(json.dumps(document, indent=2) if args.json else table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.out:
        Path(args.out).write_text(json.dumps(document, indent=2))


def _run_vlm(args: argparse.Namespace, log) -> int:
    if args.second or args.data:
        raise UsageError("--second" if args.second else "--data", f"does not apply to --model {args.model}")
    training = vlm_yardstick.recipe(YARDSTICKS[args.model], quick=args.quick)
    model = vlm_yardstick.trained_model(training, root=Path(args.cache) if args.cache else None,
                                        retrain=args.retrain, log=log).to(args.device)
    count = min(args.test_images, 600) if args.quick else args.test_images
    examples = vqa_task.make_examples(count, seed=10_000 + training.seed, types=training.types)
    results = vlm_fidelity.evaluate(model, examples, methods=args.methods, budgets=args.budgets,
                                    stages=args.stages, in_llm_layer=args.in_llm_layer, log=log)
    table = vlm_fidelity.format_table(results)
    setting = {"model": args.model, "training": asdict(training), "test_examples": count,
               "in_llm_layer": args.in_llm_layer, "chance": vlm_fidelity.chance_accuracy(examples)}
    _write(args, {"setting": setting, "results": [asdict(r) for r in results]}, table)
    if args.plot:
        lines(vlm_fidelity.accuracy_series(results), args.plot, "prefill FLOPs (fraction of the unreduced, measured)",
              "answer accuracy")
    return 0


def run(args: argparse.Namespace) -> int:
    log = (lambda line: print(line, file=sys.stderr)) if args.json else print   # stdout: the JSON alone
    if args.model in YARDSTICKS and args.checkpoint is None:
        torch.set_num_threads(args.threads)
        return _run_vlm(args, log)
    if args.checkpoint is None and (args.model or args.data):
        raise UsageError("--model" if args.model else "--data", "needs --checkpoint (your model's state dict), "
                         f"unless it names a VLM yardstick ({', '.join(YARDSTICKS)})")
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        model, data = _own_model(args)
        setting = {"checkpoint": args.checkpoint, "model": args.model, "data": args.data}
    else:
        task, training = ((fidelity.QUICK_TASK, fidelity.QUICK_TRAINING) if args.quick else
                          (fidelity.SECOND_TASK, fidelity.SECOND_TRAINING) if args.second else
                          (fidelity.Task(), fidelity.Training()))
        root = Path(args.cache) if args.cache else None
        model = fidelity.trained_model(task, training, root=root, retrain=args.retrain, log=log)
        count = min(args.test_images, 500) if args.quick else args.test_images
        images, labels = fidelity.make_images(task, count, seed=10_000 + training.seed)
        data = fidelity.batches(images, labels, args.batch)
        setting = {"task": asdict(task), "training": asdict(training), "test_images": count}
    model = model.to(args.device)
    data = [(images.to(args.device), labels.to(args.device)) for images, labels in data]
    results = fidelity.evaluate(model, data, methods=args.methods, targets=args.targets, log=log)
    table = fidelity.format_table(results)
    _write(args, {"setting": setting, "results": [asdict(r) for r in results]}, table)
    if args.plot:
        frontier(fidelity.accuracy_series(results), args.plot, "top-1 accuracy")
    return 0
