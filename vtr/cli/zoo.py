"""`vtr zoo`: list the model zoo's presets, or show one entry with its measured figures."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from ..tools import zoo
from .models import zoo_entry


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("zoo", help="list model-zoo presets (vtr.patch(model, preset=...))")
    parser.add_argument("name", nargs="?", help="show one entry in full (a name from the list)")
    parser.add_argument("--json", action="store_true",
                        help="print JSON to stdout instead of text: the entries (every field), or the one named")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.json:
        found = [zoo_entry("name", args.name)] if args.name else zoo.entries().values()
        documents = [asdict(entry) for entry in found]
        print(json.dumps(documents[0] if args.name else documents, indent=2))
        return 0
    if args.name:
        entry = zoo_entry("name", args.name)
        print(f"{entry.name}: {entry.description}\nmodel: {entry.builder} {entry.model_name} {entry.model_kwargs or ''}")
        print("reduction: " + ", ".join(f"{k}={v}" for k, v in entry.reduction.items()))
        for key, value in entry.measured.items():
            print(f"  {key}: {value}")
        return 0
    for entry in zoo.entries().values():
        print(zoo.describe(entry))
    return 0
