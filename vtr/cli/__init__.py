"""The `vtr` command. `vtr bench` (the default) compares methods on a timm ViT with random weights;
`vtr profile`, `vtr visualize`, `vtr zoo` and `vtr fidelity` live in the modules beside this one.

Conventions every subcommand follows: a mistake in what the user typed exits with status 2 and one
line on stderr naming the flag (argparse's own errors, and :class:`~vtr.cli.usage.UsageError` for what
only the library can check); anything else is a bug and keeps its traceback. ``--json`` is a switch
that prints JSON to stdout; ``--out PATH`` (and ``--plot``, ``--markdown``) write files.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from . import fidelity as cli_fidelity, profile as cli_profile, visualize as cli_visualize, zoo as cli_zoo
from .._version import __version__
from .. import api
from ..api import methods
from ..tools import bench, bench_vlm
from ..tools.models import create_model, is_hf_vlm
from .usage import (UsageError, device, fractions, json_file, method_list_or_all, output_file, positive_int,
                    positive_ints, runnable, usage)

DEFAULT_MODEL = "vit_base_patch16_224"


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="speed-up vs FLOPs of each method on a timm ViT (random weights), or "
                                         "a VLM's prefill speed-up (llava:, qwen-vl:, onevision:, gemma3:, smolvlm:, "
                                         "internvl:)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"timm name, open_clip:<name> (image tower), hf:<name> (random weights), or hf:<directory "
                        f"written by save_pretrained or Hub id in the local cache> (default {DEFAULT_MODEL}); a VLM: "
                        f"{', '.join(bench_vlm.SHAPES)}, or hf:<directory of a saved LLaVA, LLaVA-OneVision, "
                        "Qwen-VL, Gemma 3, SmolVLM or InternVL>")
    p.add_argument("--img-size", type=positive_int, default=None, help="input size (default: the model's)")
    p.add_argument("--methods", type=method_list_or_all, default="tome,pitome",
                   help=f"comma-separated methods (available: {', '.join(methods())}; 'all' for every one; "
                        "default: %(default)s); the unreduced model is always timed first")
    p.add_argument("--flops", type=fractions, default=None,
                   help="comma-separated FLOPs fractions in (0, 1] to compare at (default: 0.5; image models)")
    p.add_argument("--batch", type=positive_ints, default=None,
                   help="images (VLM: prompts) per forward pass; a comma-separated list (e.g. 1,8,32) sweeps batch "
                        "sizes of an image model (default: 8, VLM 1)")
    p.add_argument("--reps", type=positive_int, default=5,
                   help="interleaved timed repetitions per variant (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=torch.get_num_threads(),
                   help="torch intra-op threads (default: %(default)s, torch's current setting)")
    p.add_argument("--device", type=device, default="cpu",
                   help="cpu or cuda (cuda:N): where the models run; timing synchronises CUDA (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print rows as JSON to stdout instead of a table")
    p.add_argument("--out", type=json_file, metavar="PATH", help="also write the rows as JSON to PATH")
    p.add_argument("--plot", type=output_file, metavar="PNG",
                   help="also draw into PNG: throughput against FLOPs per method, or, with several --batch "
                        "sizes, throughput against batch size per method")
    vlm = p.add_argument_group(
        "VLM prefill benchmark", "with --model llava:<shape>, qwen-vl:<shape>, onevision:<shape>, gemma3:<shape>, "
        "smolvlm:<shape>, internvl:<shape> (built-in shapes: "
        f"{', '.join(bench_vlm.SHAPES)}; random weights) or hf:<directory of a saved LLaVA, LLaVA-OneVision, "
        "Qwen-VL, Gemma 3, SmolVLM or InternVL>: vision, "
        "LM prefill and decode timed unreduced and reduced, the prefill speed-up beside the analytic MACs ratio")
    amount = vlm.add_mutually_exclusive_group()
    amount.add_argument("--keep", type=fractions, default=None,
                        help="comma-separated fractions in (0, 1] of the visual tokens kept (default: 0.25)")
    amount.add_argument("--budget", type=positive_ints, default=None,
                        help="comma-separated numbers of visual tokens kept, instead of --keep")
    vlm.add_argument("--vision-layers", type=positive_int, default=None,
                     help="vision tower depth of a built-in shape (default: 2; widths are the named model's)")
    vlm.add_argument("--lm-layers", type=positive_int, default=None,
                     help="language model depth of a built-in shape (default: 2)")
    vlm.add_argument("--text", type=positive_int, default=None, help="text tokens around the image (default: 40)")
    vlm.add_argument("--video-frames", type=positive_int, default=None,
                     help="Qwen-VL, LLaVA-OneVision / NeXT-Video: a video of this many frames instead of an image "
                          "(--img-size: the frame side)")
    vlm.add_argument("--decode-tokens", type=positive_int, default=None,
                     help="generated tokens timed per decode (default: 8)")
    vlm.add_argument("--tower-layer", type=int, default=None, metavar="K",
                     help="Qwen-VL: reduce inside the vision tower, after its block K (whole 2x2 units), instead of "
                          "after it; the table then gives the tower's MACs ratio beside the vision speed-up")
    p.set_defaults(func=_bench)


_VLM_ONLY = ("keep", "budget", "vision_layers", "lm_layers", "text", "video_frames", "decode_tokens", "tower_layer")
VLM_MODELS = ("llava:<shape>, qwen-vl:<shape>, onevision:<shape>, gemma3:<shape>, smolvlm:<shape>, internvl:<shape> "
              "or hf:<directory of a saved VLM>")


def _bench(args: argparse.Namespace) -> int:
    family, _, rest = args.model.partition(":")
    if bench_vlm.is_vlm_name(args.model) or family == "hf" and is_hf_vlm(rest):
        return _bench_vlm(args)
    for name in _VLM_ONLY:
        if getattr(args, name) is not None:
            raise UsageError("--" + name.replace("_", "-"), f"is for the VLM prefill benchmark (--model {VLM_MODELS})")
    args.flops, args.batch = args.flops or [0.5], args.batch or [8]
    names = [m for m in runnable(args.methods, ("tower",)) if m != "none"]   # the unreduced model is the first row
    variants = [(name, {"flops": f}) for f in args.flops for name in names]
    with usage("--model"):
        model = create_model(args.model, **({} if args.img_size is None else {"img_size": args.img_size}))
    with usage("--flops"):   # methods are checked by argparse: what patching refuses here is the target
        models = bench.prepare(model, variants)
    batches = ",".join(map(str, args.batch))
    print(f"{args.model}, batch {batches}, {args.device}, {args.threads} threads, {args.reps} interleaved "
          f"repetitions of {len(models)} variants", file=sys.stderr)
    with tqdm(total=args.reps * len(args.batch), desc="timing", unit="rep", file=sys.stderr, disable=args.json) as bar:
        rows = bench.sweep(models, args.batch, reps=args.reps, threads=args.threads, device=args.device,
                           progress=lambda _: bar.update(1))
    document = json.dumps([r.as_dict() for r in rows], indent=1)
    print(document if args.json else bench.format_table(rows))
    if args.out:
        Path(args.out).write_text(document + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    if args.plot:
        (bench.plot_sweep if len(args.batch) > 1 else bench.plot)(rows, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _bench_vlm(args: argparse.Namespace) -> int:
    """`vtr bench --model llava:<shape> | qwen-vl:<shape> | onevision:<shape> | hf:<VLM directory>`: tools.bench_vlm's
    table."""
    for flag, given, why in (("--flops", args.flops, "a VLM keeps --keep fractions or --budget visual tokens"),
                             ("--plot", args.plot, "draws image-model benchmarks only"),
                             ("--batch", args.batch and len(args.batch) > 1, "takes one batch size with a VLM")):
        if given:
            raise UsageError(flag, f"{why} (--model {args.model})")
    with usage("--model"):
        model = bench_vlm.build(args.model, args.vision_layers or 2, args.lm_layers or 2)
    with usage("--video-frames" if args.video_frames else "--img-size"):
        load = bench_vlm.workload(model, text=args.text or 40, batch=(args.batch or [1])[0],
                                  image_size=args.img_size or getattr(bench_vlm.SHAPES.get(args.model), "image_size", None),
                                  video_frames=args.video_frames or 0)
    names = [m for m in runnable(args.methods, ("before_lm", "in_lm")) if m != "none"]
    if args.budget:
        variants = [(name, {"method": name, "budget": b}) for b in args.budget for name in names]
    else:
        variants = [(f"{name} ({f:.0%})", {"method": name, "budget": max(1, round(f * load.budgeted))})
                    for f in args.keep or [0.25] for name in names]
    if args.tower_layer is not None:
        variants = [(label, dict(kwargs, tower_layer=args.tower_layer)) for label, kwargs in variants]
    refused = "--tower-layer" if args.tower_layer is not None else "--budget" if args.budget else "--methods"
    with usage(refused):   # what patching refuses, before anything is timed
        for _, kwargs in variants:
            if kwargs["budget"] > load.budgeted:
                per = "" if load.unit is None else " of a tile"
                raise UsageError("--budget", f"{kwargs['budget']} is more than the {load.budgeted} visual tokens{per}")
            api.patch(model, **dict(load.patch, **kwargs))
            api.unpatch(model)
    torch.set_num_threads(args.threads)
    print(f"{args.model}: {getattr(bench_vlm.SHAPES.get(args.model), 'description', 'a saved model')}, {load.description}, "
          f"{load.inputs['input_ids'].shape[1]} prompt tokens ({load.visual} visual) x batch "
          f"{load.inputs['input_ids'].shape[0]}, {args.device}, {args.threads} threads, median of {args.reps} "
          "interleaved rounds", file=sys.stderr)
    with tqdm(total=len(variants), desc="timing", unit="variant", file=sys.stderr, disable=args.json) as bar:
        rows = bench_vlm.run(model, load, variants, rounds=args.reps, decode_tokens=args.decode_tokens or 8,
                             device=args.device, on_row=lambda _: bar.update(1))
    document = json.dumps([r.as_dict() for r in rows], indent=1)
    print(document if args.json else bench_vlm.format_table(rows))
    if args.out:
        Path(args.out).write_text(document + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def parser() -> argparse.ArgumentParser:
    """The `vtr` argument parser with every subcommand."""
    root = argparse.ArgumentParser(prog="vtr", description="visual token reduction")
    root.add_argument("--version", action="version", version=f"vtr {__version__}")
    sub = root.add_subparsers(dest="command")
    _bench_parser(sub)
    for module in (cli_profile, cli_visualize, cli_zoo, cli_fidelity):
        module.add_parser(sub)  # registers `profile`, `visualize`, `zoo`, `fidelity`
    return root


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["bench", *argv]
    args = parser().parse_args(argv)   # argparse's own errors: usage, one error line, exit 2
    try:
        return args.func(args)
    except UsageError as error:   # the library refused what the user typed: same form as argparse's errors
        print(f"vtr {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    raise SystemExit(main())
