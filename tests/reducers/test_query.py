"""Query-conditioned pruning: relevance to a query, max-min diversity, and the mix between them."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import vtr
from vtr.reducers import QueryPrune, Signals
from vtr.reducers.base import unit
from vtr.core.state import TokenState

from conftest import make_state, tiny_vit, vit_images as images


def planted(batch=2, tokens=40, channels=32, protected=1, region=6, seed=0):
    """Random tokens plus, per row, a region of tokens close to that row's query."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=generator)
    query = torch.randn(batch, channels, generator=generator)
    regions = []
    for row in range(batch):
        start = protected + 5 + 13 * row  # a different region in each row
        cells = torch.arange(start, start + region)
        noise = torch.randn(region, channels, generator=generator)
        x[row, cells] = 3 * unit(query[row])[None] * channels ** 0.5 + noise
        regions.append(cells)
    return TokenState.start(x, protected), query, regions


def kept_positions(out, row):
    return (out.assignment[row] >= 0).nonzero().flatten()


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_planted_region_the_query_points_at_survives_in_every_row(weight):
    state, query, regions = planted()
    out = QueryPrune(relevance_weight=weight, fuse="drop")(state, 1 + 10, Signals(metric=state.x, query=query))
    for row, cells in enumerate(regions):
        assert set(cells.tolist()) <= set(kept_positions(out, row).tolist())
    # Without the query the same budget keeps a diverse set that misses most of each region.
    blind = QueryPrune(relevance_weight=weight, fuse="drop")(state, 1 + 10, Signals(metric=state.x))
    assert any(not set(c.tolist()) <= set(kept_positions(blind, r).tolist()) for r, c in enumerate(regions))


def test_each_row_follows_its_own_query_and_several_queries_take_the_best():
    state, query, regions = planted()
    swapped = QueryPrune(relevance_weight=1.0, fuse="drop")(state, 7, Signals(metric=state.x, query=query.flip(0)))
    assert not set(regions[0].tolist()) & set(kept_positions(swapped, 0).tolist())
    both = torch.stack([query, query.flip(0)], dim=1)  # [B, 2, D]: the matching query is among the two
    out = QueryPrune(relevance_weight=1.0, fuse="drop")(state, 7, Signals(metric=state.x, query=both))
    for row, cells in enumerate(regions):
        assert set(kept_positions(out, row).tolist()[1:]) == set(cells.tolist())


def test_pure_diversity_keeps_one_token_per_cluster_of_near_duplicates():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=generator)
    members = centers.repeat_interleave(6, dim=0) + 0.01 * torch.randn(30, 16, generator=generator)
    order = torch.randperm(30, generator=generator)
    state = TokenState.start(torch.cat([torch.zeros(1, 16), members[order]])[None], 1)
    out = QueryPrune(relevance_weight=0.0, fuse="drop")(state, 6, Signals(metric=state.x))
    cluster = torch.arange(5).repeat_interleave(6)[order]
    kept = kept_positions(out, 0)[1:] - 1
    assert sorted(cluster[kept].tolist()) == [0, 1, 2, 3, 4]
    no_query = QueryPrune(relevance_weight=0.7, fuse="drop")(state, 6, Signals(metric=state.x))
    assert torch.equal(no_query.assignment, out.assignment)  # no query: diversity only


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), tokens=st.integers(3, 20), protected=st.integers(0, 2), padding=st.integers(0, 4),
       fraction=st.floats(0, 1), weight=st.sampled_from([0.0, 0.3, 1.0]), seed=st.integers(0, 1000))
def test_budget_protected_padding_and_determinism(batch, tokens, protected, padding, fraction, weight, seed):
    padding = min(padding, tokens - protected - 1)
    state = make_state(batch, tokens, 6, protected, padding, seed)
    query = torch.randn(batch, 3, 6, generator=torch.Generator().manual_seed(seed))
    low = protected + 1
    num_kept = low + int(fraction * (tokens - low))
    signals = Signals(metric=state.x, query=query)
    out = QueryPrune(relevance_weight=weight, fuse="drop")(state, num_kept, signals)
    assert out.x.shape[1] == num_kept
    assert torch.equal(out.assignment[:, :protected], state.assignment[:, :protected])
    torch.testing.assert_close(out.x[:, :protected], state.x[:, :protected])
    real = int((state.size[0] > 0).sum()) - protected
    assert ((out.size[:, protected:] > 0).sum(1) == min(num_kept - protected, real)).all()  # padding last
    again = QueryPrune(relevance_weight=weight, fuse="drop")(state, num_kept, signals)
    assert torch.equal(out.assignment, again.assignment)


def test_projection_maps_tokens_to_the_query_space_and_widths_are_checked():
    state, query, regions = planted(channels=32)
    matrix = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(1)))[0][:, :12]
    projected_query = query @ matrix
    for projection in (matrix, lambda t: t @ matrix, nn.Linear(32, 12, bias=False)):
        if isinstance(projection, nn.Linear):
            projection.weight.data = matrix.T.clone()
        out = QueryPrune(1.0, projection, fuse="drop")(state, 1 + 6, Signals(metric=state.x, query=projected_query))
        for row, cells in enumerate(regions):
            assert set(cells.tolist()) == set(kept_positions(out, row).tolist()[1:])
    with pytest.raises(ValueError, match="query has width 12 but the tokens .* width 32"):
        QueryPrune()(state, 7, Signals(metric=state.x, query=projected_query))
    with pytest.raises(ValueError, match="query has width 32 but the projected tokens have width 12"):
        QueryPrune(projection=matrix)(state, 7, Signals(metric=state.x, query=query))
    with pytest.raises(ValueError, match=r"projection is \[12, 32\] but the tokens have width 32"):
        QueryPrune(projection=matrix.T)(state, 7, Signals(metric=state.x, query=query))
    with pytest.raises(ValueError, match="3 rows for a batch of 2"):
        QueryPrune()(state, 7, Signals(metric=state.x, query=torch.randn(3, 32)))
    with pytest.raises(ValueError, match="with Q >= 1"):
        QueryPrune()(state, 7, Signals(metric=state.x, query=torch.randn(2, 0, 32)))
    with pytest.raises(ValueError, match=r"relevance_weight must be in \[0, 1\]"):
        QueryPrune(relevance_weight=1.5, fuse="drop")


def test_gradients_flow_through_kept_tokens():
    state = make_state(2, 10, 6, 1, requires_grad=True)
    out = QueryPrune(fuse="drop")(state, 5, Signals(metric=state.x.detach(), query=torch.randn(2, 6)))
    out.x.sum().backward()
    assert (state.x.grad.abs().sum(-1) > 0).sum(1).tolist() == [5, 5]


def test_conditioned_model_choices_follow_each_rows_query():
    model = vtr.patch(tiny_vit(), "query", keep=0.5, layers=[1])
    x = images(2)
    width = model.embed_dim
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randn(2, width, generator=generator), torch.randn(2, width, generator=generator)
    with vtr.conditioned(model, first):
        out_first = model(x)
        kept_first = vtr.report(model).assignment.clone()
    with vtr.conditioned(model, torch.stack([first[0], second[1]])):
        model(x)
        kept_mixed = vtr.report(model).assignment.clone()
    assert torch.equal(kept_mixed[0], kept_first[0]) and not torch.equal(kept_mixed[1], kept_first[1])
    with vtr.conditioned(model, first[:1]):  # each row alone gives the batch's choice for that row
        alone = model(x[:1])
    torch.testing.assert_close(alone, out_first[:1], rtol=1e-4, atol=1e-5)
    model(x)  # no query: diversity only, still runs
    with pytest.raises(ValueError, match=f"query has width 7 but the tokens .* width {width}"):
        with vtr.conditioned(model, torch.randn(2, 7)):
            model(x)


def test_signals_query_projection_maps_tokens_and_the_reducers_own_projection_wins():
    """The adapter's ``signals.query_projection`` brings the tokens into the query's space (wider
    tokens than query, as in every real CLIP); a ``projection=`` given to the reducer takes precedence."""
    x = torch.zeros(1, 6, 4)
    x[0, 1:, 0] = torch.tensor([1.0, 0.0, 2.0, 0.0, -1.0])  # channel 0: seen by the adapter's projection
    x[0, 1:, 2] = torch.tensor([0.0, 1.0, 0.0, 3.0, 0.0])  # channel 2: seen by the reducer's own one
    x[0, 1:, 3] = 0.1                                       # keeps every token off zero
    state = TokenState.start(x, 1)
    query = torch.tensor([[1.0, 0.0]])                      # width 2 < token width 4
    adapter = torch.zeros(4, 2)
    adapter[0, 0] = adapter[3, 1] = 1.0                     # token -> (channel 0, channel 3)
    calls = []
    signals = Signals(metric=state.x, query=query, query_projection=lambda t: calls.append(t) or t @ adapter)
    relevance = QueryPrune(1.0).relevance(state, query, signals.query_projection)
    expected_cosine = torch.tensor([1.0, 0.0, 2.0, 0.0, -1.0]) / torch.tensor([1.01, 0.01, 4.01, 0.01, 1.01]).sqrt()
    torch.testing.assert_close(relevance[0], (1 + expected_cosine) / 2)
    out = QueryPrune(1.0, fuse="drop")(state, 1 + 2, signals)
    assert kept_positions(out, 0).tolist() == [0, 1, 3]     # the two tokens along channel 0
    assert len(calls) == 2 and calls[0].shape == (1, 5, 4)  # called on the unprotected tokens only
    own = torch.zeros(4, 2)
    own[2, 0] = own[3, 1] = 1.0                             # token -> (channel 2, channel 3)
    out = QueryPrune(1.0, projection=own, fuse="drop")(state, 1 + 2, signals)
    assert kept_positions(out, 0).tolist() == [0, 2, 4]     # the reducer's projection won
    assert len(calls) == 2                                  # and the adapter's was not called
    with pytest.raises(ValueError, match="query has width 2 but the tokens .* have width 4"):
        QueryPrune(1.0)(state, 3, Signals(metric=state.x, query=query))   # no projection at all
    with pytest.raises(ValueError, match="query has width 2 but the tokens mapped by the model's query projection "
                                         "have width 3"):
        QueryPrune(1.0)(state, 3, Signals(metric=state.x, query=query, query_projection=lambda t: t[..., :3]))
