"""Invariants of the token state and of every merging/dropping step, on random shapes and contents."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import vtr
from vtr import Signals, TokenState
from vtr.reducers import REDUCERS

MERGERS = ["tome", "pitome"]


@st.composite
def states(draw, padded=False):
    batch = draw(st.integers(1, 3))
    num_tokens = draw(st.integers(2, 40))
    channels = draw(st.integers(1, 8))
    protected = draw(st.integers(0, min(3, num_tokens - 1)))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, num_tokens, channels, generator=g, dtype=torch.float64)
    mask = None
    if padded:
        # Padding sits after the real tokens; every row keeps at least one unprotected real token.
        lengths = torch.randint(protected + 1, num_tokens + 1, (batch,), generator=g)
        mask = torch.arange(num_tokens)[None, :] < lengths[:, None]
    return TokenState.start(x, protected, padding_mask=mask)


def step(method, state, r, seed=0):
    reducer = vtr.make_reducer(method, **({"seed": seed} if method == "random" else {}))
    r = min(r, reducer.max_removable(state.num_tokens, state.num_protected))
    signals = Signals(metric=state.x, layer=1, num_layers=4)
    return reducer(state, state.num_tokens - r, signals), r


def members_mean(start: TokenState, out: TokenState) -> torch.Tensor:
    """Each output token recomputed from the original tokens its assignment says it carries."""
    channels = start.x.shape[2]
    total = torch.zeros(out.x.shape[0], out.num_tokens, channels, dtype=start.x.dtype)
    weight = start.size.to(start.x.dtype)
    keep = out.assignment >= 0
    for b in range(start.x.shape[0]):
        total[b].index_add_(0, out.assignment[b][keep[b]], (start.x[b] * weight[b, :, None])[keep[b]])
    return total / out.size.to(start.x.dtype).clamp_min(1e-30)[..., None]


@settings(max_examples=60, deadline=None)
@given(state=states(padded=True), method=st.sampled_from(MERGERS), r=st.integers(0, 30))
def test_merging_conserves_size_and_feature_mass(state, method, r):
    out, r = step(method, state, r)
    assert out.num_tokens == state.num_tokens - r
    torch.testing.assert_close(out.size.sum(1), state.size.sum(1))
    mass_in = (state.x * state.size[..., None]).sum(1)
    mass_out = (out.x * out.size[..., None]).sum(1)
    torch.testing.assert_close(mass_out, mass_in)


@settings(max_examples=60, deadline=None)
@given(state=states(padded=True), method=st.sampled_from(MERGERS + ["random"]), r=st.integers(0, 30))
def test_assignment_is_consistent_with_sizes_and_features(state, method, r):
    out, _ = step(method, state, r)
    counted = torch.zeros_like(out.size)
    for b in range(out.size.shape[0]):
        kept = out.assignment[b] >= 0
        counted[b].index_add_(0, out.assignment[b][kept], state.size[b][kept])
    torch.testing.assert_close(counted, out.size)
    real = out.size > 0
    torch.testing.assert_close(members_mean(state, out)[real], out.x[real])


@settings(max_examples=40, deadline=None)
@given(state=states(), method=st.sampled_from(MERGERS + ["random"]), r=st.integers(0, 30))
def test_protected_tokens_survive_in_place(state, method, r):
    out, _ = step(method, state, r)
    p = state.num_protected
    assert torch.equal(out.x[:, :p], state.x[:, :p])
    assert torch.equal(out.assignment[:, :p], torch.arange(p).expand(out.x.shape[0], p))
    assert torch.equal(out.size[:, :p], state.size[:, :p])


@settings(max_examples=40, deadline=None)
@given(state=states(padded=True), method=st.sampled_from(MERGERS + ["random"]), r=st.integers(1, 30))
def test_each_row_gets_its_own_choice(state, method, r):
    """Reducing a batch gives each row what reducing that row alone gives."""
    out, r = step(method, state, r)
    for b in range(state.x.shape[0]):
        alone = TokenState(state.x[b : b + 1], state.size[b : b + 1], state.assignment[b : b + 1],
                           state.num_protected, state.padded)
        if method == "random":  # the random draw is per batch; the rule (padding first) is per row
            continue
        out_b, _ = step(method, alone, r)
        torch.testing.assert_close(out_b.x, out.x[b : b + 1])
        assert torch.equal(out_b.assignment, out.assignment[b : b + 1])


def test_rows_with_different_content_choose_differently():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 20, 4, generator=g)
    x[0, 3] = x[0, 4]  # row 0: tokens 3 and 4 are duplicates
    x[1, 9] = x[1, 10]  # row 1: tokens 9 and 10
    out, _ = step("tome", TokenState.start(x, 1), 1)
    # Relative to the first unprotected token: row 0 pairs (2, 3), row 1 pairs (8, 9).
    assert out.assignment[0, 3] == out.assignment[0, 4]
    assert out.assignment[1, 9] == out.assignment[1, 10]
    assert out.assignment[0, 9] != out.assignment[0, 10]


@settings(max_examples=40, deadline=None)
@given(state=states(padded=True), method=st.sampled_from(MERGERS + ["random"]), r=st.integers(1, 30))
def test_padding_content_never_matters(state, method, r):
    """Whatever padded positions hold, real tokens come out the same (size 0 weighs nothing)."""
    noise = torch.randn(state.x.shape, generator=torch.Generator().manual_seed(1), dtype=state.x.dtype)
    garbage = torch.where(state.size[..., None] > 0, state.x, noise * 100)
    out, _ = step(method, state, r)
    out_garbage, _ = step(method, state.with_x(garbage), r)
    real, real_original = out.size > 0, state.size > 0
    assert torch.equal(out.assignment[real_original], out_garbage.assignment[real_original])
    torch.testing.assert_close(out.x[real], out_garbage.x[real])


def test_random_drops_padding_first():
    x = torch.randn(2, 12, 4)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 8:] = False  # row 0: 4 padded tokens
    out, _ = step("random", TokenState.start(x, 1, padding_mask=mask), 4)
    assert bool((out.size[0] > 0).all())  # exactly the padding went
    assert out.size[0].sum() == 8


def test_random_is_deterministic_per_seed():
    state = TokenState.start(torch.randn(2, 30, 4), 1)
    a, _ = step("random", state, 10, seed=3)
    b, _ = step("random", state, 10, seed=3)
    c, _ = step("random", state, 10, seed=4)
    assert torch.equal(a.assignment, b.assignment)
    assert not torch.equal(a.assignment, c.assignment)
    assert not torch.equal(a.assignment[0], a.assignment[1])  # rows draw different subsets


def test_merge_gradients_flow_to_every_token():
    x = torch.randn(2, 12, 4, requires_grad=True)
    out, _ = step("tome", TokenState.start(x, 1), 4)
    out.x.sum().backward()
    assert x.grad is not None and bool((x.grad != 0).all())


def test_bf16_features_keep_float32_sizes():
    x = torch.randn(2, 16, 8).to(torch.bfloat16)
    for method in MERGERS:
        out, _ = step(method, TokenState.start(x, 1), 6)
        assert out.x.dtype == torch.bfloat16 and out.size.dtype == torch.float32
        assert torch.isfinite(out.x.float()).all()


@pytest.mark.parametrize("method", sorted(REDUCERS))
def test_zero_budget_change_is_identity(method):
    state = TokenState.start(torch.randn(2, 10, 4), 1)
    out, _ = step(method, state, 0)
    assert out is state


def test_state_bad_input():
    with pytest.raises(ValueError, match=r"x must be \[batch, tokens, channels\]"):
        TokenState.start(torch.randn(10, 4))
    with pytest.raises(ValueError, match=r"num_protected must be in \[0, 9\]"):
        TokenState.start(torch.randn(1, 10, 4), num_protected=10)
    with pytest.raises(ValueError, match="padding_mask must be"):
        TokenState.start(torch.randn(1, 10, 4), padding_mask=torch.ones(1, 9, dtype=torch.bool))
    state = TokenState.start(torch.randn(1, 10, 4), 1)
    with pytest.raises(ValueError, match=r"tome: num_kept must be in \[6, 10\]"):
        vtr.make_reducer("tome")(state, 3, Signals(metric=state.x))
    with pytest.raises(ValueError, match="needs signals.metric"):
        vtr.make_reducer("pitome")(state, 8, Signals())
    with pytest.raises(ValueError, match="signals.metric must be"):
        vtr.make_reducer("tome")(state, 8, Signals(metric=torch.randn(1, 9, 4)))
    with pytest.raises(ValueError, match=r"pitome: margin must be in \[0, 1\)"):
        vtr.make_reducer("pitome", margin=1.5)
