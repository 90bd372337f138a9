"""`vtr bench`: unreduced vs reduced models in one run, speed-up beside the FLOPs ratio.

Repetitions are interleaved (A, B, C, A, B, C, ...) so drift in machine speed hits every method
alike; the table reports medians. efficiency = speed-up x FLOPs fraction: 1.0 means the time saved
is exactly the FLOPs saved, below 1 is overhead (the reduction itself, smaller less efficient matmuls).
"reducer" is the share of the forward pass spent inside the reducer (deciding and merging).
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..adapters import find_adapter, settings
from ..api import expected_flops, is_patched, patch, report
from .plotting import frontier
from .profile import default_input


@dataclass
class Row:
    method: str
    setting: str
    tokens_out: int           # tokens after the last block (of the first image)
    gmacs: float              # analytic GMACs per image
    flops_fraction: float     # of the unreduced model
    latency_ms: float         # median per batch
    iqr_ms: float
    speedup: float = 1.0
    efficiency: float = 1.0   # speedup * flops_fraction
    reducer_share: float = 0.0  # fraction of the forward pass spent deciding and applying reductions

    def as_dict(self) -> dict:
        return asdict(self)


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


class _ReducerClock:
    """Forward hooks on a reducer that add up the wall time spent inside it."""

    def __init__(self, reducer: nn.Module) -> None:
        self.total_ms, self._start = 0.0, 0.0
        reducer.register_forward_pre_hook(self._enter)
        reducer.register_forward_hook(self._leave)

    def _enter(self, module, args) -> None:
        self._start = time.perf_counter()

    def _leave(self, module, args, output) -> None:
        self.total_ms += (time.perf_counter() - self._start) * 1e3


def prepare(model: nn.Module, variants: Sequence[tuple[str, dict]]) -> dict:
    """``{(method, setting): model}``: ``model`` unreduced (in eval mode) under ``("none", "-")``, then a
    patched copy per ``(method, kwargs)`` variant. Patching checks each variant (an unknown method, a
    target out of reach, an unsupported model are errors here), so nothing is timed before all pass."""
    model = model.eval()
    models = {("none", "-"): model}
    for method, kwargs in variants:
        setting = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        models[(method, setting)] = patch(copy.deepcopy(model), method, **kwargs)
    return models


def measure(
    models: dict,
    batch: int = 8,
    reps: int = 7,
    warmup: int = 2,
    threads: Optional[int] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> list[Row]:
    """Time the models of :func:`prepare` (the unreduced one first) in interleaved repetitions."""
    for name, value, least in (("batch", batch, 1), ("reps", reps, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an int >= 1, got {threads!r}")
        torch.set_num_threads(threads)
    model = models[("none", "-")]
    torch.manual_seed(0)
    images = default_input(model, batch=batch)
    base_macs = expected_flops(model)[0]
    times: dict = {key: [] for key in models}
    with torch.inference_mode():
        for key, m in models.items():
            for _ in range(warmup):
                m(images)
        clocks = {key: _ReducerClock(settings(m).reducer) for key, m in models.items() if is_patched(m)}
        for rep in range(reps):
            for key, m in models.items():
                times[key].append(_time(lambda: m(images)))
            if progress:
                progress(f"rep {rep + 1}/{reps}")
    rows = []
    for (method, setting), m in models.items():
        samples = times[(method, setting)]
        q1, _, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else (0.0, 0.0, 0.0)
        macs = expected_flops(m)[0]
        tokens = report(m).tokens[-1] if is_patched(m) else find_adapter(m).cost(m).num_tokens
        row = Row(method, setting, tokens, macs / 1e9, macs / base_macs, statistics.median(samples), q3 - q1)
        if (method, setting) in clocks:
            row.reducer_share = clocks[(method, setting)].total_ms / sum(samples)
        rows.append(row)
    base = rows[0].latency_ms
    for row in rows:
        row.speedup = base / row.latency_ms
        row.efficiency = row.speedup * row.flops_fraction
    return rows


def run(
    model: nn.Module,
    variants: Sequence[tuple[str, dict]],
    batch: int = 8,
    reps: int = 7,
    warmup: int = 2,
    threads: Optional[int] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> list[Row]:
    """Time ``model`` unreduced and patched with each ``(method, kwargs)`` variant, interleaved:
    :func:`prepare`, then :func:`measure`."""
    return measure(prepare(model, variants), batch=batch, reps=reps, warmup=warmup, threads=threads,
                   progress=progress)


def plot(rows: Sequence[Row], path: str, batch: int) -> None:
    """Throughput against FLOPs fraction, one line per method from the unreduced point: the
    frontier each method offers on this machine."""
    def throughput(row: Row) -> float:
        return batch * 1e3 / row.latency_ms

    series: dict = {}
    for row in rows[1:]:
        series.setdefault(row.method, [(1.0, throughput(rows[0]))]).append((row.flops_fraction, throughput(row)))
    frontier(series, path, "throughput (images/s)")


def format_table(rows: Sequence[Row]) -> str:
    header = (f"{'method':<8} {'setting':<16} {'tokens':>6} {'GMACs':>7} {'FLOPs':>6} {'ms/batch':>9} {'IQR':>6} "
              f"{'speed-up':>8} {'effic.':>6} {'reducer':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.method:<8} {r.setting:<16} {r.tokens_out:>6} {r.gmacs:>7.2f} {r.flops_fraction:>6.1%} "
                     f"{r.latency_ms:>9.1f} {r.iqr_ms:>6.1f} {r.speedup:>7.2f}x {r.efficiency:>6.3f} "
                     f"{r.reducer_share:>7.1%}")
    return "\n".join(lines)
