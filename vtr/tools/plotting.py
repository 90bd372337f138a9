"""Line plots for the CLI: one line per method of a measure (throughput, accuracy) against FLOPs or batch.

Figures are built with ``matplotlib.figure.Figure`` and saved through its Agg canvas, never through
pyplot: no global backend switch (a notebook keeps its own) and no figure left open in pyplot's registry.
"""
from __future__ import annotations

from typing import Mapping, Sequence


def new_figure(**kwargs):
    """A matplotlib Figure outside pyplot; a clear error when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ValueError("plotting needs matplotlib: pip install 'vtr[plot]'") from error
    return Figure(**kwargs)


def lines(series: Mapping[str, Sequence[tuple[float, float]]], path: str, xlabel: str, ylabel: str,
          log_x: bool = False) -> None:
    """Draw ``{label: [(x, y), ...]}`` into the PNG ``path``; ``log_x`` for batch sizes (1, 8, 32 ...)."""
    many = len(series) > 8   # the legend beside the axes, not over the lines
    figure = new_figure(figsize=(9, 5) if many else (6, 4))
    axes = figure.subplots()
    for label, points in sorted(series.items()):
        axes.plot(*zip(*sorted(points)), marker="o", label=label)
    if log_x:
        ticks = sorted({x for points in series.values() for x, _ in points})
        axes.set_xscale("log", base=2)
        axes.set_xticks(ticks, [f"{x:g}" for x in ticks])
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if many:
        axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), ncol=1 + len(series) // 24)
    else:
        axes.legend()
    figure.savefig(path, dpi=120, bbox_inches="tight")


def frontier(series: Mapping[str, Sequence[tuple[float, float]]], path: str, ylabel: str) -> None:
    """Draw ``{method: [(flops_fraction, value), ...]}`` into the PNG ``path``."""
    lines(series, path, "FLOPs (fraction of the unreduced model)", ylabel)
