"""Command-line options shared by `vtr profile` and `vtr visualize`: which model, which reduction.

Models are built from timm's configs with random weights, or loaded from a directory written by
``save_pretrained`` or the local Hugging Face cache (nothing is downloaded); ``--checkpoint`` loads a
state dict the user has. A ``--preset`` from the model zoo sets model, method and amount. A model
directory that also holds a saved reduction (``vtr.save_reduction``) is patched with it unless
``--method`` or ``--preset`` says otherwise.
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .. import api
from ..adapters import find_adapter, is_patched, settings
from ..tools import saving, zoo
from ..tools.models import create_model
from .usage import UsageError, existing_file, fraction, method, non_negative_int, positive_int, usage


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and reduction")
    group.add_argument("--model", default=None,
                       help="timm name, open_clip:<name> or hf:<name>, built with random weights, or hf:<directory "
                            "written by save_pretrained or Hub id in the local cache>, loaded; a directory's saved "
                            "reduction (vtr.save_reduction) applies unless --method/--preset is given (default: "
                            "the preset's model, else vit_base_patch16_224)")
    group.add_argument("--img-size", type=positive_int, default=None, help="input size (default: the model's)")
    group.add_argument("--checkpoint", type=existing_file, default=None,
                       help="state dict (.pt/.pth) to load into the model")
    group.add_argument("--preset", default=None, help="a model-zoo entry (see `vtr zoo`); sets method and amount")
    group.add_argument("--method", type=method, default=None,
                       help="reduction method (see vtr.methods()); none = unreduced")
    amount = group.add_mutually_exclusive_group()
    amount.add_argument("--flops", type=fraction, default=None,
                        help="target fraction in (0, 1] of the unreduced FLOPs")
    amount.add_argument("--r", type=non_negative_int, default=None, help="tokens removed per layer")
    amount.add_argument("--keep", type=fraction, default=None, help="fraction in (0, 1] of tokens kept per layer")
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


def load_checkpoint(model: nn.Module, path: str, flag: str = "--checkpoint") -> None:
    """Load the state dict at ``path`` (or its ``"model"`` entry) into ``model``; a file that is no
    state dict, or not one for this model, is a UsageError."""
    with usage(flag):
        state = saving.load_torch_file(path, "state dict")
    if isinstance(state, dict) and "model" in state:
        state = state["model"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise UsageError(flag, f"{path!r} does not fit the model: {_short(error, 300)}") from error


def _short(error: Exception, limit: int = 200) -> str:
    """The start of an error message, for one line on stderr (torch's can run to pages)."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def saved_reduction(model: Optional[str]) -> Optional[Path]:
    """The reduction saved beside an ``hf:<directory>`` model, if there is one."""
    family, sep, rest = (model or "").partition(":")
    return saving.saved_reduction(rest) if sep and family == "hf" and Path(rest).is_dir() else None


def zoo_entry(flag: str, name: str) -> zoo.Entry:
    """The model-zoo entry ``name``; an unknown name is a UsageError listing the zoo (a broken zoo
    file is not the user's mistake: that error keeps its traceback)."""
    available = zoo.entries()
    if name not in available:
        raise UsageError(flag, f"unknown preset {name!r}; the model zoo has: {', '.join(sorted(available))}")
    return available[name]


def build_model(args: argparse.Namespace, device: str = "cpu") -> nn.Module:
    """The model the options describe, patched when a method or preset is given. ``device="meta"``
    builds it without weights (for counting only; ignored with --checkpoint). What the user typed is
    checked before anything is built; the library's refusals become a :class:`UsageError`."""
    with usage("--option"):
        options = _options(args.option)
    entry = zoo_entry("--preset", args.preset) if args.preset else None
    name = args.method or (entry.reduction["method"] if entry else None)
    if options:
        if name is None:
            raise UsageError("--option", "needs --method or --preset (the method the options are for)")
        with usage("--option"):
            try:
                api.make_reducer(name, **options)   # unknown names and bad values, before building the model
            except TypeError as error:   # a value of the wrong type, e.g. margin='abc'
                given = ", ".join(f"{k}={v!r}" for k, v in options.items())
                raise UsageError("--option", f"{given} for method {name!r}: {error}") from error
    amounts = {k: v for k, v in (("flops", args.flops), ("r", args.r), ("keep", args.keep)) if v is not None}
    if amounts and name is None:
        raise UsageError(f"--{next(iter(amounts))}", "needs --method or --preset (the reduction to apply)")
    kwargs = {} if args.img_size is None else {"img_size": args.img_size}
    with usage("--preset" if args.model is None and entry else "--model"):
        with torch.device("cpu" if args.checkpoint else device):
            if args.model is None and entry:
                model = zoo.build(entry, **kwargs)
            else:
                model = create_model(args.model or "vit_base_patch16_224", **kwargs)
        find_adapter(model)   # a family vtr knows (else UnsupportedModelError, listing them)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    saved = saved_reduction(args.model) if name is None else None
    if saved is not None:
        with usage("--model"):
            saving.load_reduction(model, saved.parent)
            check_input(model)
        print(f"applied the reduction saved in {saved}: {settings(model).describe()} (--method none for the "
              "unreduced model)", file=sys.stderr)
        return model
    flag = next((f"--{k}" for k in amounts), "--preset" if args.preset else "--method")
    with usage(flag):   # a target out of the method's reach, an amount missing or not allowed
        if args.preset:
            api.patch(model, args.method, preset=args.preset, **amounts, **options)   # --method overrides
        elif args.method and api.is_identity(args.method):   # the unreduced reference takes no options
            api.patch(model, args.method, **amounts)
        elif args.method:
            api.patch(model, args.method, **amounts, **options)
    with usage("--option" if options else flag):
        check_input(model)
    return model


def check_input(model: nn.Module) -> None:
    """The reduction's options against the input the command runs the model on, the model's own size (ATF's
    prior: one value per patch position), before anything runs: a mismatch is the user's to fix, and a
    failing forward pass would report it as a crash (see :meth:`vtr.Reducer.check_input`)."""
    if is_patched(model):
        reduction = settings(model)
        cost = find_adapter(model).cost(model, reduction.metric)
        reduction.reducer.check_input(cost.num_tokens, cost.num_protected)
