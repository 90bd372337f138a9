"""The `vtr` command. `vtr bench` (the default) compares methods on a timm ViT with random weights;
`vtr profile`, `vtr visualize`, `vtr zoo` and `vtr fidelity` live in the modules beside this one."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from . import fidelity as cli_fidelity, profile as cli_profile, visualize as cli_visualize, zoo as cli_zoo
from ..api import methods
from ..tools import bench
from ..tools.models import create_model

DEFAULT_MODEL = "vit_base_patch16_224"


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="speed-up vs FLOPs of each method on a timm ViT (random weights)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"timm name, open_clip:<name> (image tower) or hf:<name> (default {DEFAULT_MODEL})")
    p.add_argument("--methods", default="tome,pitome",
                   help=f"comma-separated methods (available: {', '.join(methods())}; 'all' for every one)")
    p.add_argument("--flops", default="0.5", help="comma-separated FLOPs fractions to compare at (default 0.5)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=5, help="interleaved timed repetitions per variant")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", action="store_true", help="print rows as JSON instead of a table")
    p.add_argument("--plot", metavar="PNG", help="also draw throughput against FLOPs per method into PNG")
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    names = [m for m in methods() if m != "none"] if args.methods == "all" else args.methods.split(",")
    for name in names:
        if name not in methods():
            raise SystemExit(f"vtr bench: unknown method {name!r}; available: {', '.join(methods())}")
    variants = [(name, {"flops": float(f)}) for f in args.flops.split(",") for name in names]
    model = create_model(args.model)
    print(f"{args.model}, batch {args.batch}, {args.threads} threads, {args.reps} interleaved repetitions of "
          f"{len(variants) + 1} variants", file=sys.stderr)
    with tqdm(total=args.reps, desc="timing", unit="rep", file=sys.stderr, disable=args.json) as bar:
        rows = bench.run(model, variants, batch=args.batch, reps=args.reps, threads=args.threads,
                         progress=lambda _: bar.update(1))
    print(json.dumps([r.as_dict() for r in rows], indent=1) if args.json else bench.format_table(rows))
    if args.plot:
        bench.plot(rows, args.plot, args.batch)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vtr", description="visual token reduction")
    sub = parser.add_subparsers(dest="command")
    _bench_parser(sub)
    for module in (cli_profile, cli_visualize, cli_zoo, cli_fidelity):
        module.add_parser(sub)  # registers `profile`, `visualize`, `zoo`, `fidelity`
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["bench", *argv]
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
