"""ATF: filtering before the encoder by a calibrated prior and a per-image score."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import vtr
from vtr.tools.profile import count_macs
from vtr.reducers import ATF, Signals
from vtr.tools.calibrate import calibrate

from conftest import make_state, tiny_vit, vit_images as images


def kept(out, row=0):
    return (out.assignment[row] >= 0).nonzero().flatten()


def test_prior_alone_keeps_the_highest_prior_positions_in_every_row():
    state = make_state(2, 13, 4, 1, padding=2)
    prior = torch.tensor([5, 1, 9, 3, 7, 2, 8, 0, 6, 4, 11, 10.0])  # the last two positions are padding
    out = ATF(prior=prior, prior_weight=1.0, fuse="drop")(state, 5, Signals(metric=state.x))
    for row in range(2):
        assert kept(out, row).tolist() == [0, 3, 5, 7, 9]  # priors 9, 7, 8, 6: best real ones


def test_dynamic_score_keeps_the_tokens_least_like_the_average():
    x = torch.zeros(1, 9, 4)
    x[0, 1:, 0] = 1.0
    x[0, 3, 1] = 5.0  # the two outliers
    x[0, 6, 2] = 3.0
    state = vtr.TokenState.start(x, 1)
    out = ATF(fuse="drop")(state, 3, Signals(metric=state.x))
    assert kept(out).tolist() == [0, 3, 6]


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), tokens=st.integers(3, 20), padding=st.integers(0, 4), fraction=st.floats(0, 1),
       weight=st.floats(0, 1), seed=st.integers(0, 1000))
def test_budget_protected_padding_and_determinism(batch, tokens, padding, fraction, weight, seed):
    padding = min(padding, tokens - 2)
    state = make_state(batch, tokens, 5, 1, padding, seed)
    prior = torch.rand(tokens - 1, generator=torch.Generator().manual_seed(seed))
    num_kept = 2 + int(fraction * (tokens - 2))
    reducer = ATF(prior=prior, prior_weight=weight, fuse="drop")
    out = reducer(state, num_kept, Signals(metric=state.x))
    assert out.x.shape[1] == num_kept
    torch.testing.assert_close(out.x[:, :1], state.x[:, :1])
    real = tokens - 1 - padding
    assert ((out.size[:, 1:] > 0).sum(1) == min(num_kept - 1, real)).all()
    assert torch.equal(out.assignment, reducer(state, num_kept, Signals(metric=state.x)).assignment)


def test_later_steps_follow_the_prior_through_the_provenance():
    state = make_state(1, 9, 4, 1)
    prior = torch.arange(8.0)
    first = ATF(prior=prior, prior_weight=1.0, fuse="drop")(state, 6, Signals(metric=state.x))
    assert kept(first).tolist() == [0, 4, 5, 6, 7, 8]
    second = ATF(prior=prior, prior_weight=1.0, fuse="drop")(first, 3, Signals(metric=first.x))
    assert (second.assignment[0] >= 0).nonzero().flatten().tolist() == [0, 7, 8]


def test_bad_priors_and_weights():
    state = make_state(1, 9, 4, 1)
    with pytest.raises(ValueError, match="prior has 5 positions but the input has 8 patch tokens"):
        ATF(prior=torch.ones(5))(state, 4, Signals(metric=state.x))
    with pytest.raises(ValueError, match=r"prior_weight must be in \[0, 1\]"):
        ATF(prior_weight=-0.1)
    with pytest.raises(ValueError, match="prior must be finite"):
        ATF(prior=torch.tensor([1.0, float("nan")]))


def test_calibrate_returns_a_distribution_and_restores_the_model():
    model = tiny_vit()
    x = images(3)
    reference = model(x)
    prior = calibrate(model, x, batch_size=2)
    assert prior.shape == (36,) and torch.isclose(prior.sum(), torch.tensor(1.0)) and (prior >= 0).all()
    assert not vtr.is_patched(model) and torch.equal(model(x), reference)
    one_layer = calibrate(model, x, layers=[0])
    assert not torch.allclose(one_layer, prior)
    vtr.patch(model, "none")
    torch.testing.assert_close(calibrate(model, x, batch_size=2), prior)
    assert vtr.is_patched(model) and model._vtr.method == "none"
    vtr.unpatch(model)
    vtr.patch(model, "evit", keep=0.5)
    with pytest.raises(ValueError, match="needs an unpatched model"):
        calibrate(model, x)
    with pytest.raises(ValueError, match="images must be a non-empty tensor"):
        calibrate(tiny_vit(), x[0])
    no_cls = calibrate(tiny_vit(class_token=False, global_pool="avg"), x)  # fallback score
    assert no_cls.shape == (36,) and torch.isfinite(no_cls).all()


def test_filters_before_block_zero_with_a_calibrated_prior():
    model = tiny_vit()
    x = images(2)
    prior = calibrate(model, x)
    seen = {}
    model.blocks[0].norm1.register_forward_pre_hook(lambda module, args: seen.update(tokens=args[0].shape[1]))
    vtr.patch(model, "atf", keep=0.5, layers=[0], prior=prior)
    model(x)
    assert seen["tokens"] == 19 and vtr.report(model).tokens == [37, 19, 19, 19, 19]
    base = vtr.expected_flops(model)[1]
    vtr.unpatch(model)
    vtr.patch(model, "atf", flops=0.5, layers=[0], prior=prior)
    counted = count_macs(model, x[:1]).per_image
    assert abs(counted / base - 0.5) < 0.02
