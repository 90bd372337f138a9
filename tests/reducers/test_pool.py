"""Grid pooling: exact average pooling, conserved mass, fixed counts and how schedules treat it."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import vtr
from vtr.tools.profile import count_macs
from vtr.reducers import GridPool, Signals
from vtr.core.state import TokenState

from conftest import make_state, tiny_vit, vit_images as images


def test_matches_avg_pool2d_on_a_divisible_grid_and_keeps_protected():
    state = make_state(2, 2 + 36, 5, protected=2)
    out = GridPool(factor=2)(state, state.num_tokens - 1, Signals(grid=(6, 6)))  # count set by factor
    patches = state.x[:, 2:].reshape(2, 6, 6, 5).permute(0, 3, 1, 2)
    expected = F.avg_pool2d(patches, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out.x[:, 2:], expected)
    torch.testing.assert_close(out.x[:, :2], state.x[:, :2])
    assert out.size[:, 2:].eq(4).all() and out.size[:, :2].eq(1).all()


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 7), cols=st.integers(1, 7), factor=st.integers(2, 4), protected=st.integers(0, 2),
       padding=st.integers(0, 3), seed=st.integers(0, 1000))
def test_any_grid_conserves_size_and_mass(rows, cols, factor, protected, padding, seed):
    tokens = protected + rows * cols
    padding = min(padding, rows * cols - 1)
    state = make_state(2, tokens, 3, protected, padding, seed)
    pooled = protected + math.ceil(rows / factor) * math.ceil(cols / factor)
    out = GridPool(factor)(state, pooled, Signals(grid=(rows, cols)))  # a 1x1 grid keeps everything: no-op
    assert out.x.shape[1] == pooled
    torch.testing.assert_close(out.size.sum(1), state.size.sum(1))
    torch.testing.assert_close((out.x * out.size[..., None]).sum(1), (state.x * state.size[..., None]).sum(1),
                               rtol=1e-4, atol=1e-4)
    # Each original patch lands in the window that covers it.
    r, c = torch.arange(rows).repeat_interleave(cols), torch.arange(cols).repeat(rows)
    window = protected + (r // factor) * math.ceil(cols / factor) + c // factor
    real = state.size[0, protected:] > 0
    assert torch.equal(out.assignment[0, protected:][real], window[real])


def test_bad_inputs():
    state = make_state(1, 17, 3, 1)
    with pytest.raises(ValueError, match="needs signals.grid"):
        GridPool()(state, state.num_tokens - 1, Signals())
    with pytest.raises(ValueError, match="grid 3x3 does not match the 16"):
        GridPool()(state, state.num_tokens - 1, Signals(grid=(3, 3)))
    for factor in (1, 0, 2.0, True):
        with pytest.raises(ValueError, match="factor must be an integer >= 2"):
            GridPool(factor)
    model = tiny_vit()
    for amount in ({"r": 4}, {"keep": 0.25}):
        with pytest.raises(ValueError, match="sets its own token count"):
            vtr.patch(model, "pool", **amount)
    with pytest.raises(ValueError, match="pools once"):
        vtr.patch(model, "pool", layers=[0, 1])
    with pytest.raises(ValueError, match="flops must be a fraction"):
        vtr.patch(model, "pool", flops=1.5)


def test_patched_model_pools_once_where_told():
    model = vtr.patch(tiny_vit(), "pool", factor=2, layers=[2])
    x = images()
    model(x)
    assert vtr.report(model).tokens == [37, 37, 37, 10, 10] == vtr.expected_tokens(model)
    vtr.unpatch(model)
    vtr.patch(model, "pool", factor=4)  # 6x6 grid, factor 4: 2x2 windows, edge ones smaller
    model(x)
    report = vtr.report(model)
    assert report.tokens == [37, 5, 5, 5, 5] and report.size[0, 1:].tolist() == [16, 8, 8, 4]


def test_flops_picks_the_layer_closest_to_the_target():
    model = tiny_vit()
    base = count_macs(model, images(1)).per_image
    for target in (0.3, 0.5, 0.8):
        try:
            vtr.patch(model, "pool", flops=target)
        except ValueError as error:  # no layer lands within the tolerance: say so, with what is reachable
            assert "is out of reach for 'pool' with factor=2" in str(error)
            reachable = [float(v) for v in str(error).split("[")[1].split("]")[0].split(", ")]
            assert min(abs(v - target) for v in reachable) > 0.05
            continue
        reduced, unreduced = vtr.expected_flops(model)
        tokens = vtr.expected_tokens(model)
        layer = tokens.index(10) - 1
        counted = count_macs(model, images(1)).per_image
        assert abs(counted / reduced - 1) < 0.02 and abs(unreduced / base - 1) < 0.02
        others = []
        for other in range(4):
            vtr.unpatch(model)
            vtr.patch(model, "pool", layers=[other])
            others.append(abs(vtr.expected_flops(model)[0] / unreduced - target))
        assert others[layer] == min(others)
        vtr.unpatch(model)
