"""vtr.tools.latency: timings are positive, ordered and taken at the requested thread count."""
import time

import pytest
import timm
import torch

from vtr.tools.latency import Timing, batch_sweep, format_sweep, measure


def test_measure_sleep():
    timing = measure(lambda: time.sleep(0.002), threads=1, min_run_time=0.05, warmup=1)
    assert isinstance(timing, Timing)
    assert 0.002 <= timing.median < 0.02 and timing.iqr >= 0 and timing.runs >= 1
    assert timing.throughput(8) == pytest.approx(8 / timing.median)


def test_threads_are_set_and_restored():
    before = torch.get_num_threads()
    seen = []
    measure(lambda: seen.append(torch.get_num_threads()), threads=1, min_run_time=0.01, warmup=2)
    assert set(seen) == {1} and torch.get_num_threads() == before


def test_slow_calls_still_give_min_runs():
    timing = measure(lambda: time.sleep(0.03), threads=1, min_run_time=0.01, warmup=0, min_runs=4)
    assert timing.runs >= 4 and timing.median >= 0.03


def test_warmup_calls_are_made():
    calls = []
    measure(lambda: calls.append(1), threads=1, min_run_time=0.01, warmup=5)
    assert len(calls) > 5


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
