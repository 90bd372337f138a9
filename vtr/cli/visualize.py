"""`vtr visualize`: a PNG of merged groups / kept tokens of a reduced model over an image."""
from __future__ import annotations

import argparse

from .models import add_model_arguments, build_model
from ..api import report as vtr_report
from ..tools.visualize import SAMPLE_IMAGES, visualize


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "visualize", help="draw merged groups / kept tokens over an image as a PNG",
        description="Each patch is painted with the mean colour of its group (the patches that ended in "
                    "the same token), boundaries in white, dropped patches in grey.")
    add_model_arguments(parser)
    parser.add_argument("--image", default="astronaut",
                        help=f"image file, or a scikit-image sample: {', '.join(SAMPLE_IMAGES)} (default: %(default)s)")
    parser.add_argument("--out", default="vtr-groups.png", help="PNG to write (default: %(default)s)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if not (args.method or args.preset):
        args.method, args.flops = "tome", args.flops or 0.5
    model = build_model(args)
    drawing = visualize(model, args.image, args.out)
    print(f"wrote {args.out} ({drawing.shape[1]}x{drawing.shape[0]}); tokens per layer: "
          f"{vtr_report(model).tokens}")
    return 0
