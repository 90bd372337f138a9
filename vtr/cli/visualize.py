"""`vtr visualize`: one PNG of what a reduction did to an image: the input, the merged groups / kept
patches, and the tokens entering each block, titled with model, method, amount and tokens kept."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from .models import add_model_arguments, build_model, saved_reduction
from .usage import output_file, usage
from ..api import report as vtr_report
from ..tools.visualize import SAMPLE_IMAGES, visualize


def image_arg(text: str) -> str:
    """A scikit-image sample name or an existing file."""
    if text not in SAMPLE_IMAGES and not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file {text!r}; give an image file or a sample: "
                                         f"{', '.join(SAMPLE_IMAGES)}")
    return text


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "visualize", help="draw the input, its merged groups / kept patches and the tokens per block as one PNG",
        description="One figure: the input image; each patch painted with the mean colour of its group (the "
                    "patches that ended in the same token), boundaries in white, dropped patches in dark grey; "
                    "and the tokens entering each block. Default reduction: tome at half the FLOPs.")
    add_model_arguments(parser)
    parser.add_argument("--image", type=image_arg, default="astronaut",
                        help=f"image file, or a scikit-image sample: {', '.join(SAMPLE_IMAGES)} (default: %(default)s)")
    parser.add_argument("--out", type=output_file, default="vtr-groups.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="print JSON to stdout instead of text: the PNG written and the tokens per block")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if not (args.method or args.preset or saved_reduction(args.model)):   # default: ToMe, at half the FLOPs
        args.method = "tome"
        if args.flops is None and args.r is None and args.keep is None:
            args.flops = 0.5
    image = args.image
    if image not in SAMPLE_IMAGES:
        with usage("--image", OSError):   # not an image PIL can read
            image = Image.open(image).convert("RGB")
    model = build_model(args)
    visualize(model, image, args.out, name=args.model or args.preset)
    tokens = vtr_report(model).tokens
    print(json.dumps({"out": args.out, "tokens": tokens}) if args.json
          else f"wrote {args.out}; tokens per block: {tokens}")
    return 0
