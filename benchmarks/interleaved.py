"""What the vision-language benchmarks share: timing one call, and unreduced/reduced runs interleaved so both
see the same machine load (``bench_llava.py``, ``bench_vlm.py``)."""
from __future__ import annotations

import statistics
from typing import Callable

from torch.utils import benchmark

import vtr

HEADER = ("| method | where | visual kept | LM prefill MACs (bound) | prefill s (unreduced) | prefill speed-up "
          "| vision+reduce s (unreduced) | decode ms/token (unreduced) |\n|---|---|---|---|---|---|---|---|")


def timed(fn: Callable) -> float:
    """Seconds of one call, on torch.utils.benchmark's clock (it synchronises CUDA before reading the time)."""
    start = benchmark.timer()
    fn()
    return benchmark.timer() - start


def interleaved(model, measure: Callable, rounds: int, **patch) -> tuple[dict, dict]:
    """``measure(model)`` of the unreduced model and of ``vtr.patch(model, **patch)``, alternating ``rounds`` times;
    the medians of each (the reduced one with what ``measure`` read from the report)."""
    base, reduced = [], []
    for _ in range(rounds):
        base.append(measure(model))
        vtr.patch(model, **patch)
        reduced.append(measure(model))
        vtr.unpatch(model)
    median = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    return ({k: median(base, k) for k in ("vision", "prefill", "decode_ms")},
            {k: median(reduced, k) for k in reduced[0]})


def row(method: str, where: str, base: dict, reduced: dict) -> str:
    """One table row: the MACs ratio beside its bound on the prefill speed-up (its inverse)."""
    ratio = reduced["macs"] / reduced["macs_unreduced"]
    return (f"| {method} | {where} | {int(reduced['kept'])} | {ratio:.3f} ({1 / ratio:.2f}x) | "
            f"{reduced['prefill']:.3f} ({base['prefill']:.3f}) | {base['prefill'] / reduced['prefill']:.2f}x | "
            f"{reduced['vision']:.3f} ({base['vision']:.3f}) | {reduced['decode_ms']:.1f} ({base['decode_ms']:.1f}) |")
