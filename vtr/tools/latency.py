"""Latency and throughput with torch.utils.benchmark: explicit threads, warm-up, median and IQR.

Speed-ups are only comparable at the same thread count (torch's default depends on the machine
and on what ran before), so ``threads`` is always given. Medians and inter-quartile ranges are
robust to the occasional slow run that a mean would absorb.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils import benchmark


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and inter-quartile range over ``runs`` timed blocks."""

    median: float
    iqr: float
    runs: int
    threads: int

    def throughput(self, items_per_call: int = 1) -> float:
        """Items (e.g. images) per second."""
        return items_per_call / self.median


def _check(threads: int, min_run_time: float, warmup: int) -> None:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int (torch intra-op threads), got {threads!r}")
    if not min_run_time > 0:
        raise ValueError(f"min_run_time must be > 0 seconds, got {min_run_time!r}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0 calls, got {warmup!r}")


def measure(fn: Callable[[], object], *, threads: int, min_run_time: float = 1.0, warmup: int = 3,
            min_runs: int = 5) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then blocks of calls for at least ``min_run_time`` s
    and at least ``min_runs`` timed blocks (a slow call would otherwise give one sample, no IQR)."""
    _check(threads, min_run_time, warmup)
    if min_runs < 1:
        raise ValueError(f"min_runs must be >= 1, got {min_runs!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            fn()
    finally:
        torch.set_num_threads(previous)
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    times = list(timer.blocked_autorange(min_run_time=min_run_time).times)  # seconds per call, per block
    while len(times) < min_runs:
        times += timer.timeit(number=1).times
    low, median, high = np.percentile(times, [25, 50, 75])
    return Timing(median=float(median), iqr=float(high - low), runs=len(times), threads=threads)


@dataclass(frozen=True)
class SweepPoint:
    batch: int
    timing: Timing

    @property
    def images_per_second(self) -> float:
        return self.timing.throughput(self.batch)


@torch.inference_mode()
def batch_sweep(model: nn.Module, example: Tensor, batch_sizes: Sequence[int], *, threads: int,
                min_run_time: float = 1.0, warmup: int = 2) -> list[SweepPoint]:
    """Inference latency of ``model`` at each batch size; ``example`` is one input ``[1, ...]``
    (or a batch, whose first item is repeated)."""
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive ints, got {list(batch_sizes)}")
    points = []
    for batch in batch_sizes:
        x = example[:1].expand(int(batch), *example.shape[1:]).contiguous()
        timing = measure(lambda: model(x), threads=threads, min_run_time=min_run_time, warmup=warmup)
        points.append(SweepPoint(int(batch), timing))
    return points


def format_sweep(points: Sequence[SweepPoint]) -> str:
    lines = [f"{'batch':>6}{'median ms':>12}{'IQR ms':>10}{'images/s':>11}"]
    for p in points:
        lines.append(f"{p.batch:>6}{p.timing.median * 1e3:>12.2f}{p.timing.iqr * 1e3:>10.2f}"
                     f"{p.images_per_second:>11.1f}")
    return "\n".join(lines)
