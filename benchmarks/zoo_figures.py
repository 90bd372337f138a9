"""Measure the figures recorded in model_zoo/*.toml: MACs (torch counter, meta device) unreduced
and with the preset, and the tokens per block. Prints a [measured] table per entry to paste.

    python benchmarks/zoo_figures.py [--write] [entry names...]

``--write`` replaces the ``[measured]`` table of each entry's file in model_zoo/ (other tables,
such as ``[measured.fidelity]``, are kept).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import vtr
from vtr import zoo
from vtr.tools.profile import profile_model


def measure(entry: zoo.Entry) -> dict:
    with torch.device("meta"):
        model = zoo.build(entry)
    base = profile_model(model).macs
    vtr.patch(model, preset=entry.name)
    reduced = profile_model(model)
    tokens = [int(row.tokens_in) for row in reduced.blocks] + [int(reduced.blocks[-1].tokens_out)]
    return {"gmacs_unreduced": float(f"{base / 1e9:.6g}"), "gmacs": float(f"{reduced.macs / 1e9:.6g}"),
            "flops_fraction": round(reduced.macs / base, 4), "tokens": tokens}


HEADER = "[measured]  # torch counter on the meta device, MACs per image (FLOPs = 2 x MACs)"


def table(figures: dict) -> str:
    return "\n".join([HEADER] + [f"{key} = {value}" for key, value in figures.items()]) + "\n"


def replace_table(text: str, new: str) -> str:
    """``text`` with its [measured] table (up to the next table header) replaced by ``new``."""
    lines = text.rstrip("\n").split("\n")
    start = next((i for i, line in enumerate(lines) if line.split("#")[0].strip() == "[measured]"), None)
    if start is None:
        return text.rstrip("\n") + "\n\n" + new
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    tail = "\n".join(lines[end:])
    return "\n".join(lines[:start]) + "\n" + new + ("\n" + tail + "\n" if tail else "")


def main(args: list) -> None:
    write = "--write" in args
    names = [a for a in args if a != "--write"] or sorted(zoo.entries())
    folder = Path(__file__).resolve().parent.parent / "model_zoo"
    for name in names:
        entry = zoo.get(name)
        new = table(measure(entry))
        print(f"# {name}\n{new}")
        if write:
            path = folder / entry.source
            path.write_text(replace_table(path.read_text(), new))


if __name__ == "__main__":
    main(sys.argv[1:])
