"""`vtr profile`: MACs per layer (with tokens per layer) of a model, reduced or not."""
from __future__ import annotations

import argparse
import json
import sys

from .models import add_model_arguments, build_model
from .usage import device, positive_int
from ..tools.profile import COUNTERS, profile_model


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "profile", help="MACs/FLOPs per layer and tokens per layer",
        description="Count MACs per image layer by layer (FLOPs = 2 x MACs). Without --real the torch "
                    "counter runs on the meta device: no weights, seconds even for large models.")
    add_model_arguments(parser)
    parser.add_argument("--counter", choices=COUNTERS, default="torch",
                        help="torch (matmuls + convs) or fvcore (also norms, as papers count)")
    parser.add_argument("--batch", type=positive_int, default=1,
                        help="images per forward pass (default: %(default)s; other than 1 counts on real inputs)")
    parser.add_argument("--real", action="store_true", help="count on real random inputs, not on meta")
    parser.add_argument("--device", type=device, default="cpu",
                        help="cpu or cuda (cuda:N): where --real counts run; cuda implies --real (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print JSON to stdout instead of a table")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Count on the meta device where the shapes do not depend on data, else on a real random batch: a
    reduction that decides shapes from token values (``hired``) cannot be counted without them, so it is
    counted as ``--real`` would, with a note on stderr."""
    from ..tools.profile import MetaDeviceError, default_input

    real = args.real or args.counter == "fvcore" or args.batch != 1 or args.device != "cpu"
    if not real:
        try:
            result = profile_model(build_model(args, device="meta"), counter=args.counter)
        except MetaDeviceError:
            print("note: this reduction decides shapes from token values, which the meta device does not have: "
                  "counting on real random inputs (as --real)", file=sys.stderr)
            real = True
    if real:
        model = build_model(args).to(args.device)
        result = profile_model(model, default_input(model, batch=args.batch, device=args.device), counter=args.counter)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0
