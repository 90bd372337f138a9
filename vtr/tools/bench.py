"""`vtr bench`: unreduced vs reduced models in one run, speed-up beside the FLOPs ratio.

Repetitions are interleaved (A, B, C, A, B, C, ...) so drift in machine speed hits every method
alike; the table reports medians. efficiency = speed-up x FLOPs fraction: 1.0 means the time saved
is exactly the FLOPs saved, below 1 is overhead (the reduction itself, smaller less efficient matmuls).
"reducer" is the share of the forward pass spent inside the reducer (deciding and merging).

Each call is timed on ``torch.utils.benchmark``'s clock, which synchronises the accelerator before it
reads the time: on CUDA the kernels a forward pass queued are inside its measurement.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils import benchmark

from ..adapters import find_adapter, settings
from ..api import expected_flops, is_identity, is_patched, patch, report
from .plotting import frontier, lines
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
    batch: int = 1            # images per forward pass

    def as_dict(self) -> dict:
        return asdict(self)


def _time(fn: Callable[[], object]) -> float:
    """Milliseconds of one call of ``fn``, on torch.utils.benchmark's synchronising clock."""
    start = benchmark.timer()
    fn()
    return (benchmark.timer() - start) * 1e3


class _ReducerClock:
    """Forward hooks on a reducer that add up the time spent inside it. On CUDA the hooks record events
    on the stream instead of reading a clock: synchronising inside the forward pass would stall it, and
    slow the very model being timed. The events are read once the timed calls have synchronised."""

    def __init__(self, reducer: nn.Module, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._total_ms, self._start, self._events = 0.0, None, []
        self._handles = [reducer.register_forward_pre_hook(self._enter), reducer.register_forward_hook(self._leave)]

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _enter(self, module, args) -> None:
        self._start = self._now()

    def _leave(self, module, args, output) -> None:
        end = self._now()
        if self.cuda:
            self._events.append((self._start, end))
        else:
            self._total_ms += (end - self._start) * 1e3

    def total_ms(self) -> float:
        if self._events:
            torch.cuda.synchronize()
            self._total_ms += sum(start.elapsed_time(end) for start, end in self._events)
            self._events.clear()
        return self._total_ms

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


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
    device: Union[str, torch.device] = "cpu",
) -> list[Row]:
    """Time the models of :func:`prepare` (the unreduced one first) in interleaved repetitions, on
    ``device`` (the models are moved there)."""
    for name, value, least in (("batch", batch, 1), ("reps", reps, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an int >= 1, got {threads!r}")
        torch.set_num_threads(threads)
    device = torch.device(device)
    for m in models.values():
        m.to(device)
    model = models[("none", "-")]
    torch.manual_seed(0)
    images = default_input(model, batch=batch, device=device)
    base_macs = expected_flops(model)[0]
    times: dict = {key: [] for key in models}
    clocks = {}
    try:
        with torch.inference_mode():
            for key, m in models.items():
                for _ in range(warmup):
                    m(images)
            clocks = {key: _ReducerClock(settings(m).reducer, device) for key, m in models.items() if is_patched(m)}
            for rep in range(reps):
                for key, m in models.items():
                    times[key].append(_time(lambda: m(images)))
                if progress:
                    progress(f"rep {rep + 1}/{reps}")
        reducer_ms = {key: clock.total_ms() for key, clock in clocks.items()}
    finally:
        for clock in clocks.values():
            clock.remove()
    rows = []
    for (method, setting), m in models.items():
        samples = times[(method, setting)]
        q1, _, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else (0.0, 0.0, 0.0)
        macs = expected_flops(m)[0]
        tokens = report(m).tokens[-1] if is_patched(m) else find_adapter(m).cost(m).num_tokens
        row = Row(method, setting, tokens, macs / 1e9, macs / base_macs, statistics.median(samples), q3 - q1,
                  batch=batch)
        if (method, setting) in reducer_ms:
            row.reducer_share = reducer_ms[(method, setting)] / sum(samples)
        rows.append(row)
    base = rows[0].latency_ms
    for row in rows:
        row.speedup = base / row.latency_ms
        row.efficiency = row.speedup * row.flops_fraction
    return rows


def sweep(models: dict, batches: Sequence[int], **kwargs) -> list[Row]:
    """:func:`measure` at each batch size in turn (``kwargs`` as there): rows of every variant per
    batch, each speed-up against the unreduced model at the same batch."""
    if not batches:
        raise ValueError("batches must name at least one batch size")
    return [row for batch in batches for row in measure(models, batch=batch, **kwargs)]


def run(
    model: nn.Module,
    variants: Sequence[tuple[str, dict]],
    batch: int = 8,
    reps: int = 7,
    warmup: int = 2,
    threads: Optional[int] = None,
    progress: Optional[Callable[[str], None]] = None,
    device: Union[str, torch.device] = "cpu",
) -> list[Row]:
    """Time ``model`` unreduced and patched with each ``(method, kwargs)`` variant, interleaved:
    :func:`prepare`, then :func:`measure`."""
    return measure(prepare(model, variants), batch=batch, reps=reps, warmup=warmup, threads=threads,
                   progress=progress, device=device)


def _throughput(row: Row) -> float:
    return row.batch * 1e3 / row.latency_ms


def plot(rows: Sequence[Row], path: str) -> None:
    """Throughput against FLOPs fraction, one line per method from the unreduced point: the
    frontier each method offers on this machine (rows of one batch size)."""
    series: dict = {}
    for row in rows[1:]:
        series.setdefault(row.method, [(1.0, _throughput(rows[0]))]).append((row.flops_fraction, _throughput(row)))
    frontier(series, path, "throughput (images/s)")


def plot_sweep(rows: Sequence[Row], path: str) -> None:
    """Throughput against batch size, one line per method and setting (rows of :func:`sweep`)."""
    series: dict = {}
    for row in rows:
        label = "unreduced" if is_identity(row.method) else f"{row.method} ({row.setting})"
        series.setdefault(label, []).append((row.batch, _throughput(row)))
    lines(series, path, "batch size (images per forward pass)", "throughput (images/s)", log_x=True)


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a table; a batch column when they hold several batch sizes (a sweep)."""
    several = len({r.batch for r in rows}) > 1
    header = ((f"{'batch':>5} " if several else "") +
              f"{'method':<8} {'setting':<16} {'tokens':>6} {'GMACs':>7} {'FLOPs':>6} {'ms/batch':>9} {'IQR':>6} "
              f"{'speed-up':>8} {'effic.':>6} {'reducer':>7}" + (f" {'images/s':>9}" if several else ""))
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append((f"{r.batch:>5} " if several else "") +
                     f"{r.method:<8} {r.setting:<16} {r.tokens_out:>6} {r.gmacs:>7.2f} {r.flops_fraction:>6.1%} "
                     f"{r.latency_ms:>9.1f} {r.iqr_ms:>6.1f} {r.speedup:>7.2f}x {r.efficiency:>6.3f} "
                     f"{r.reducer_share:>7.1%}" + (f" {_throughput(r):>9.1f}" if several else ""))
    return "\n".join(lines)
