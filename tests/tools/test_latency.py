"""vtr.tools.latency: warm-up, medians, IQRs and thread counts, checked on a fake clock (no wall-clock time:
a timed test would depend on the machine's load).

The fake clock advances only inside the timed function, by the durations the test gives, so every
statistic ``measure`` reports is known exactly."""
import itertools

import pytest
import timm
import torch
from torch.utils import benchmark

from vtr.tools import latency
from vtr.tools.latency import Timing, batch_sweep, format_sweep, measure


class FakeClock:
    """A clock for torch's Timer; ``call()`` is the timed function: each call takes the next duration."""

    def __init__(self, durations):
        self.now, self.calls, self.durations = 0.0, 0, iter(durations)

    def __call__(self) -> float:
        return self.now

    def call(self) -> None:
        self.calls += 1
        self.now += next(self.durations)


@pytest.fixture
def fake_timer(monkeypatch):
    """Make ``measure`` time on a FakeClock; records how many calls were made before timing started."""
    seen = {"times": []}

    class Recording(benchmark.Timer):   # keeps the per-call times of every timed block it returns
        def blocked_autorange(self, *args, **kwargs):
            measurement = super().blocked_autorange(*args, **kwargs)
            seen["times"] += measurement.times
            return measurement

        def timeit(self, *args, **kwargs):
            measurement = super().timeit(*args, **kwargs)
            seen["times"] += measurement.times
            return measurement

    def use(clock: FakeClock):
        def timer(*args, **kwargs):
            seen["calls before timing"] = clock.calls
            seen["threads"] = kwargs.get("num_threads")
            return Recording(*args, timer=clock, **kwargs)
        monkeypatch.setattr(latency.benchmark, "Timer", timer)
        seen["times"] = []
        return seen
    return use


def test_median_and_iqr_of_equal_calls_are_exact(fake_timer):
    clock = FakeClock(itertools.repeat(0.002))
    fake_timer(clock)
    timing = measure(clock.call, threads=1, min_run_time=0.05, warmup=1)
    assert isinstance(timing, Timing)
    assert timing.median == pytest.approx(0.002, rel=1e-9) and timing.iqr == pytest.approx(0.0, abs=1e-12)
    assert timing.runs >= 5 and timing.threads == 1
    assert timing.throughput(8) == pytest.approx(4000.0)


def test_median_and_iqr_are_those_of_the_timed_blocks(fake_timer):
    """Calls of random length: the median and IQR are those of the timed blocks' per-call times."""
    generator = torch.Generator().manual_seed(0)
    clock = FakeClock(float(d) for d in 0.001 + 0.004 * torch.rand(100_000, generator=generator, dtype=torch.float64))
    seen = fake_timer(clock)
    timing = measure(clock.call, threads=1, min_run_time=0.05, warmup=3, min_runs=5)
    times = torch.tensor(seen["times"], dtype=torch.float64)
    assert timing.runs == len(times) >= 5
    assert timing.median == pytest.approx(float(times.quantile(0.5)), rel=1e-9)
    assert timing.iqr == pytest.approx(float(times.quantile(0.75) - times.quantile(0.25)), rel=1e-9)
    assert timing.iqr > 0


def test_warmup_calls_are_made_before_timing(fake_timer):
    for warmup in (0, 1, 5):
        clock = FakeClock(itertools.repeat(0.01))
        seen = fake_timer(clock)
        measure(clock.call, threads=1, min_run_time=0.01, warmup=warmup)
        assert seen["calls before timing"] == warmup


def test_slow_calls_still_give_min_runs(fake_timer):
    clock = FakeClock(itertools.repeat(0.03))
    fake_timer(clock)
    timing = measure(clock.call, threads=1, min_run_time=0.01, warmup=0, min_runs=4)
    assert timing.runs >= 4 and timing.median == pytest.approx(0.03, rel=1e-9)


def test_threads_are_set_and_restored(fake_timer):
    before = torch.get_num_threads()
    other = 2 if before == 1 else 1
    seen_threads = []
    clock = FakeClock(itertools.repeat(0.01))
    seen = fake_timer(clock)
    measure(lambda: (seen_threads.append(torch.get_num_threads()), clock.call()), threads=other, min_run_time=0.02,
            warmup=2)
    assert set(seen_threads) == {other} and seen["threads"] == other
    assert torch.get_num_threads() == before


def test_batch_sweep():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=32, depth=2, num_heads=2).eval()
    points = batch_sweep(model, torch.randn(1, 3, 32, 32), [1, 4], threads=1, min_run_time=0.05)
    assert [p.batch for p in points] == [1, 4]
    assert all(p.images_per_second > 0 for p in points)
    assert "images/s" in format_sweep(points)


@pytest.mark.parametrize("kwargs, match", [
    (dict(threads=0), "threads"), (dict(threads=1, min_run_time=0), "min_run_time"),
    (dict(threads=1, warmup=-1), "warmup"), (dict(threads=1, min_runs=0), "min_runs"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        measure(lambda: None, **kwargs)
