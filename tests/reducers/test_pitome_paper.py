"""PiToMe's ``variant="paper"``: the step the paper's released ViT code runs, decision for decision.

The reference below is written from the released code's description (its ViT patch and merge
functions): one image, CLS first, float64. Inputs are random; a draw is used only when every choice
the reference makes wins by more than ``GAP`` (energy ranks, best matches, the r-th merge), so no
decision can hinge on the float32 rounding of vtr's cosine similarities.
"""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import vtr
from vtr.core.state import TokenState
from vtr.reducers import PiToMe, Signals

GAP = 1e-5


def _winning_gaps(values: torch.Tensor) -> torch.Tensor:
    """Gap between consecutive values sorted in descending order."""
    ordered = values.sort(descending=True).values
    return ordered[:-1] - ordered[1:]


def released_step(metric: torch.Tensor, r: int, layer: int, num_layers: int, margin: float = 0.75,
                  alpha: float = 1.0) -> tuple[set, float]:
    """The released ViT code's merge at ``layer`` for one image: ``metric`` ``[N, D]`` with the CLS token
    first (never merged). Returns the groups of token indices that end up as one token, and the
    smallest margin by which any of its choices won."""
    tokens = F.normalize(metric[1:], dim=-1)
    sim = tokens @ tokens.T
    layer_margin = margin - margin * layer / num_layers
    energy = F.elu(sim - layer_margin, alpha=alpha).mean(dim=-1)
    rank = energy.argsort(descending=True)
    gaps = [_winning_gaps(energy)]
    if layer < math.ceil(num_layers * 0.5):
        # Every token, alternately by energy rank, into A and B; the r A tokens whose best B match is
        # the most similar merge into it.
        a, b = rank[0::2], rank[1::2]
        scores = sim[a][:, b]
        best, partner = scores.max(dim=-1)
        edges = best.argsort(descending=True)
        merging = edges[:r]
        gaps.append(best[edges[r - 1]] - best[edges[r]] if r < len(a) else torch.ones(1, dtype=sim.dtype))
    else:
        # The 2r highest-energy tokens alternately into A and B; every A token merges into its best B.
        a, b = rank[0:2 * r:2], rank[1:2 * r:2]
        scores = sim[a][:, b]
        partner = scores.argmax(dim=-1)
        merging = torch.arange(r)
    if scores.shape[1] > 1:
        top2 = scores.topk(2, dim=-1).values
        gaps.append(top2[:, 0] - top2[:, 1])
    groups = {int(t): {int(t)} for t in range(len(tokens))}
    for i in merging.tolist():
        source, target = int(a[i]), int(b[partner[i]])
        groups[target] |= groups.pop(source)
    found = {frozenset(t + 1 for t in group) for group in groups.values()} | {frozenset({0})}
    return found, float(torch.cat([g.flatten() for g in gaps]).min())


def groups_of(assignment: torch.Tensor) -> set:
    """The original tokens each output token carries, as a set of frozensets."""
    return {frozenset((assignment == j).nonzero()[:, 0].tolist()) for j in assignment.unique().tolist()}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(seed=st.integers(0, 2**31 - 1), tokens=st.integers(5, 40), width=st.integers(3, 12),
       num_layers=st.integers(1, 12), data=st.data())
def test_paper_variant_makes_the_released_codes_decisions(seed, tokens, width, num_layers, data):
    layer = data.draw(st.integers(0, num_layers - 1))
    r = data.draw(st.integers(1, tokens // 2))
    generator = torch.Generator().manual_seed(seed)
    metric = torch.randn(2, tokens + 1, width, dtype=torch.float64, generator=generator)
    metric[:, 1:] += torch.randn(2, 1, width, dtype=torch.float64, generator=generator)   # correlated: clusters
    x = torch.randn(2, tokens + 1, 4, dtype=torch.float64, generator=generator)
    expected = [released_step(metric[row], r, layer, num_layers) for row in range(2)]
    assume(min(gap for _, gap in expected) > GAP)

    state = TokenState.start(x, num_protected=1)
    out = PiToMe(variant="paper")(state, tokens + 1 - r, Signals(metric=metric, layer=layer, num_layers=num_layers))
    for row, (groups, _) in enumerate(expected):
        assert groups_of(out.assignment[row]) == groups
        for j in range(out.num_tokens):          # every output token is the mean of what it carries
            carried = out.assignment[row] == j
            torch.testing.assert_close(out.x[row, j], x[row, carried].mean(0))
            assert out.size[row, j] == carried.sum()


def test_paper_variant_splits_the_layers_at_half_depth():
    """12 blocks: layers 0-5 match by energy order over all tokens, 6-11 take the energy step (here on a
    draw where the two steps choose differently), as the released code's layer split."""
    generator = torch.Generator().manual_seed(0)
    metric = torch.randn(1, 25, 6, dtype=torch.float64, generator=generator)
    state = TokenState.start(torch.randn(1, 25, 4, dtype=torch.float64, generator=generator), 1)
    reducer = PiToMe(variant="paper")
    for layer in range(12):
        expected, gap = released_step(metric[0], 6, layer, 12)
        assert gap > GAP
        out = reducer(state, 19, Signals(metric=metric, layer=layer, num_layers=12))
        assert groups_of(out.assignment[0]) == expected
    first_half = released_step(metric[0], 6, 5, 12)[0]
    energy_step = groups_of(PiToMe(margin=0.75)(state, 19, Signals(metric=metric, layer=5, num_layers=12))
                            .assignment[0])
    assert first_half != energy_step


def test_paper_variant_in_the_second_half_is_the_energy_step():
    generator = torch.Generator().manual_seed(1)
    metric = torch.randn(2, 17, 5, dtype=torch.float64, generator=generator)
    state = TokenState.start(torch.randn(2, 17, 3, dtype=torch.float64, generator=generator), 1)
    for layer in (6, 9, 11):
        signals = Signals(metric=metric, layer=layer, num_layers=12)
        paper, energy = PiToMe(variant="paper")(state, 12, signals), PiToMe(margin=0.75)(state, 12, signals)
        assert torch.equal(paper.assignment, energy.assignment) and torch.equal(paper.x, energy.x)


def test_paper_variant_padding_merges_away_first():
    """Padding (size 0) in A merges first and never pulls a real token into it."""
    metric = torch.randn(1, 9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    padding_mask = torch.tensor([[True] * 6 + [False] * 3])
    state = TokenState.start(torch.randn(1, 9, 3, dtype=torch.float64), 1, padding_mask=padding_mask)
    out = PiToMe(variant="paper")(state, 6, Signals(metric=metric, layer=0, num_layers=12))
    assert out.size.sum() == 6
    for j in range(out.num_tokens):
        carried = (out.assignment[0] == j) & padding_mask[0]
        if carried.any():
            torch.testing.assert_close(out.x[0, j], state.x[0, carried].mean(0))


def test_variant_defaults_and_bad_variant():
    assert PiToMe().margin == 0.9 and PiToMe(variant="paper").margin == 0.75
    assert PiToMe(variant="paper", margin=0.5).margin == 0.5
    assert PiToMe(variant="paper").patch_defaults() == {"metric": "keys", "prop_attn": False}
    assert PiToMe().patch_defaults() == {}
    with pytest.raises(ValueError, match=r"pitome: variant must be one of \('energy', 'paper'\), got 'released'"):
        vtr.make_reducer("pitome", variant="released")


@pytest.mark.parametrize("given, expected", [
    ({}, ("keys", False)),
    ({"metric": "x"}, ("x", False)),
    ({"prop_attn": True}, ("keys", True)),
    ({"metric": "x", "prop_attn": True}, ("x", True)),
])
def test_paper_variant_sets_the_patch_defaults_the_caller_left_out(given, expected):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=4, img_size=64).eval()
    vtr.patch(model, "pitome", r=4, variant="paper", **given)
    reduction = vtr.adapters.settings(model)
    assert (reduction.metric, reduction.prop_attn) == expected
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert vtr.report(model).tokens == [17, 13, 9, 5, 3]
    vtr.unpatch(model)
    vtr.patch(model, "pitome", r=4, **given)            # the default variant keeps vtr's defaults
    reduction = vtr.adapters.settings(model)
    assert (reduction.metric, reduction.prop_attn) == (given.get("metric", "x"), given.get("prop_attn", True))


@pytest.mark.parametrize("given, message", [
    ({"metric": "key"}, r"metric must be one of \('x', 'keys'\), got 'key'"),
    ({"prop_attn": "no"}, r"prop_attn must be True or False, got 'no'"),
])
def test_bad_patch_settings_name_the_parameter(given, message):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32)
    with pytest.raises(ValueError, match=message):
        vtr.patch(model, "pitome", r=2, variant="paper", **given)
    assert not vtr.is_patched(model)
