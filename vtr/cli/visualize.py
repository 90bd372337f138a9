"""`vtr visualize`: a PNG of merged groups / kept tokens of a reduced model over an image."""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from .models import add_model_arguments, build_model
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
        "visualize", help="draw merged groups / kept tokens over an image as a PNG",
        description="Each patch is painted with the mean colour of its group (the patches that ended in "
                    "the same token), boundaries in white, dropped patches in grey.")
    add_model_arguments(parser)
    parser.add_argument("--image", type=image_arg, default="astronaut",
                        help=f"image file, or a scikit-image sample: {', '.join(SAMPLE_IMAGES)} (default: %(default)s)")
    parser.add_argument("--out", type=output_file, default="vtr-groups.png", help="PNG to write (default: %(default)s)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if not (args.method or args.preset):   # default: ToMe, at half the FLOPs unless an amount is given
        args.method = "tome"
        if args.flops is None and args.r is None and args.keep is None:
            args.flops = 0.5
    image = args.image
    if image not in SAMPLE_IMAGES:
        with usage("--image", OSError):   # not an image PIL can read
            image = Image.open(image).convert("RGB")
    model = build_model(args)
    drawing = visualize(model, image, args.out)
    print(f"wrote {args.out} ({drawing.shape[1]}x{drawing.shape[0]}); tokens per layer: "
          f"{vtr_report(model).tokens}")
    return 0
