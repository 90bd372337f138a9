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
from ..api import methods
from ..tools import bench
from ..tools.models import create_model
from .usage import (UsageError, device, fractions, json_file, method_list_or_all, output_file, positive_int,
                    positive_ints, usage)

DEFAULT_MODEL = "vit_base_patch16_224"


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="speed-up vs FLOPs of each method on a timm ViT (random weights)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"timm name, open_clip:<name> (image tower), hf:<name> (random weights), or hf:<directory "
                        f"written by save_pretrained or Hub id in the local cache> (default {DEFAULT_MODEL})")
    p.add_argument("--img-size", type=positive_int, default=None, help="input size (default: the model's)")
    p.add_argument("--methods", type=method_list_or_all, default="tome,pitome",
                   help=f"comma-separated methods (available: {', '.join(methods())}; 'all' for every one; "
                        "default: %(default)s); the unreduced model is always timed first")
    p.add_argument("--flops", type=fractions, default="0.5",
                   help="comma-separated FLOPs fractions in (0, 1] to compare at (default: %(default)s)")
    p.add_argument("--batch", type=positive_ints, default="8",
                   help="images per forward pass; a comma-separated list (e.g. 1,8,32) sweeps batch sizes "
                        "(default: %(default)s)")
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
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    names = [m for m in args.methods if m != "none"]   # the unreduced model is always the first row
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
