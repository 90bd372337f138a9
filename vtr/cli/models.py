"""Command-line options shared by `vtr profile` and `vtr visualize`: which model, which reduction.

Models are built from timm's configs with random weights (nothing is downloaded); ``--checkpoint``
loads a state dict the user has. A ``--preset`` from the model zoo sets model, method and amount.
"""
from __future__ import annotations

import argparse
import ast

import torch
from torch import nn

from .. import api
from ..tools import zoo
from ..tools.models import create_model


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and reduction")
    group.add_argument("--model", default=None,
                       help="timm name, open_clip:<name> or hf:<name>, built with random weights (default: "
                            "the preset's model, else vit_base_patch16_224)")
    group.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    group.add_argument("--checkpoint", default=None, help="state dict (.pt/.pth) to load into the model")
    group.add_argument("--preset", default=None, help="a model-zoo entry (see `vtr zoo`); sets method and amount")
    group.add_argument("--method", default=None, help="reduction method (see vtr.methods()); none = unreduced")
    amount = group.add_mutually_exclusive_group()
    amount.add_argument("--flops", type=float, default=None, help="target fraction of the unreduced FLOPs")
    amount.add_argument("--r", type=int, default=None, help="tokens removed per layer")
    amount.add_argument("--keep", type=float, default=None, help="fraction of tokens kept per layer")
    group.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="method option, e.g. --option seed=1 (repeatable)")


def _options(pairs: list) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


def build_model(args: argparse.Namespace, device: str = "cpu") -> nn.Module:
    """The model the options describe, patched when a method or preset is given. ``device="meta"``
    builds it without weights (for counting only; ignored with --checkpoint)."""
    kwargs = {} if args.img_size is None else {"img_size": args.img_size}
    with torch.device("cpu" if args.checkpoint else device):
        if args.model is None and args.preset:
            model = zoo.build(zoo.get(args.preset), **kwargs)
        else:
            model = create_model(args.model or "vit_base_patch16_224", **kwargs)
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
    amounts = {k: v for k, v in (("flops", args.flops), ("r", args.r), ("keep", args.keep)) if v is not None}
    if args.preset:
        api.patch(model, preset=args.preset, **amounts, **_options(args.option))
    elif args.method and args.method != "none":
        api.patch(model, args.method, **amounts, **_options(args.option))
    elif args.method == "none":
        api.patch(model, "none")
    return model
