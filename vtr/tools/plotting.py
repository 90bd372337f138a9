"""Frontier plots: one line per method of a measure (throughput, accuracy) against FLOPs."""
from __future__ import annotations

from typing import Mapping, Sequence


def frontier(series: Mapping[str, Sequence[tuple[float, float]]], path: str, ylabel: str) -> None:
    """Draw ``{method: [(flops_fraction, value), ...]}`` into the PNG ``path``."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ValueError("plotting needs matplotlib: pip install 'vtr[plot]'") from error
    figure, axes = plt.subplots(figsize=(6, 4))
    for method, points in sorted(series.items()):
        axes.plot(*zip(*sorted(points)), marker="o", label=method)
    axes.set_xlabel("FLOPs (fraction of the unreduced model)")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
