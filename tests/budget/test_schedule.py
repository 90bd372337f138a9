"""Amounts: r= (int, list, (r, inflect)), keep=, flops=, layers=, and their errors."""
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vtr
from vtr.budget.cost import EncoderCost
from vtr.budget.schedule import make_schedule, reduced_macs

# ViT-B/16 at 224 (the analytic count matches torch's counter to the MAC; see test_timm.py).
VIT_B = EncoderCost(num_tokens=197, num_protected=1, num_layers=12, attn_linear=4 * 768 * 768,
                    attn_dim=768, mlp_linear=2 * 768 * 3072, fixed=196 * 768 * 768 + 768 * 1000,
                    metric_dim=768)


def counts(method, **amount):
    reducer = vtr.make_reducer(method)
    return make_schedule(reducer, VIT_B, **amount).token_counts(reducer, 197, 1)


def test_constant_r_is_capped_at_half_the_unprotected_tokens():
    assert counts("tome", r=16) == [197, 181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21, 11]
    assert counts("tome", r=100)[:3] == [197, 99, 50]


def test_r_inflect_decreases_from_2r_to_0():
    tokens = counts("tome", r=(8, -1))
    removed = [a - b for a, b in zip(tokens, tokens[1:])]
    assert removed[0] == 16 and removed[-1] == 0
    assert removed == sorted(removed, reverse=True)
    assert counts("tome", r=(8, 0)) == counts("tome", r=8)


def tome_parse_r(num_layers: int, r: int, inflect: float) -> list[int]:
    """ToMe's parse_r (tome/utils.py) for an (r, inflect) pair, step by step as ToMe computes it."""
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1)
    return [int(min_val + step * i) for i in range(num_layers)]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 100), st.floats(-1.0, 1.0, allow_nan=False), st.integers(2, 40))
def test_r_inflect_equals_tome_parse_r(r, inflect, num_layers):
    cost = replace(VIT_B, num_layers=num_layers)
    schedule = make_schedule(vtr.make_reducer("tome"), cost, r=(r, inflect))
    assert list(schedule.amounts) == tome_parse_r(num_layers, r, inflect)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 64), st.floats(-1.0, 1.0, allow_nan=False), st.sets(st.integers(0, 11), min_size=2))
def test_r_inflect_spans_the_chosen_layers_only(r, inflect, layers):
    """With layers=, the schedule runs over the reducing layers in order; the others remove nothing."""
    chosen = sorted(layers)
    schedule = make_schedule(vtr.make_reducer("tome"), VIT_B, r=(r, inflect), layers=chosen)
    assert [schedule.amounts[i] for i in chosen] == tome_parse_r(len(chosen), r, inflect)
    assert all(schedule.amounts[i] == 0 for i in range(12) if i not in layers)


def test_r_inflect_examples_where_truncation_and_float_arithmetic_matter():
    """(16, -1) on 12 layers is ToMe's decreasing schedule; a fractional inflect truncates the first count
    before mirroring it (the old linear interpolation gave 4..27 for (16, 0.7), ToMe 4..28); one layer
    removes the first count."""
    assert make_schedule(vtr.make_reducer("tome"), VIT_B, r=(16, -1)).amounts == (
        32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0)
    assert make_schedule(vtr.make_reducer("tome"), VIT_B, r=(16, 0.7)).amounts == tuple(tome_parse_r(12, 16, 0.7))
    assert make_schedule(vtr.make_reducer("tome"), VIT_B, r=(16, -0.5), layers=[3]).amounts[3] == 24


def test_per_layer_lists_and_layers():
    assert counts("tome", r=[0] * 11 + [10])[-2:] == [197, 187]
    assert counts("tome", r=10, layers=[2, 5]) == [197, 197, 197, 187, 187, 187, 177] + [177] * 6
    tokens = counts("pitome", keep=0.5, layers=[0])
    assert tokens[1] == 1 + 98 and tokens[-1] == 99


@pytest.mark.parametrize("method", ["evit", "fastv", "hired", "atf", "dynamicvit", "tome"])
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_a_per_layer_list_is_the_schedule_outside_the_default_layers_too(method, data):
    """Regression (issue 26, cases 1-2): ``evit keep=[0.5] * 4`` was scheduled (1, .5, .5, .5) and ``fastv
    r=[3] * 4`` (0, 3, 0, 0): entries outside the method's default layers were rewritten. Any list is now
    taken as given, at every layer."""
    reducer = vtr.make_reducer(method)
    if data.draw(st.booleans(), label="as r"):
        values = data.draw(st.lists(st.integers(0, 30), min_size=12, max_size=12), label="r")
        assert make_schedule(reducer, VIT_B, r=values).amounts == tuple(values)
    else:
        values = data.draw(st.lists(st.sampled_from([0.5, 0.75, 1.0]), min_size=12, max_size=12), label="keep")
        assert make_schedule(reducer, VIT_B, keep=values).amounts == tuple(values)


def test_a_per_layer_list_that_contradicts_layers_is_refused():
    with pytest.raises(ValueError, match=r"keep=\[0.5, 0.5.*reduces at block\(s\) \[0, 3, 4.*outside layers=\[1, 2\]"):
        counts("evit", keep=[0.5] * 12, layers=[1, 2])
    with pytest.raises(ValueError, match=r"r=.*outside layers=\[2\].*set those entries to 0"):
        counts("fastv", r=[3] * 12, layers=[2])
    assert counts("fastv", r=[0, 0, 3] + [0] * 9, layers=[2])[2:4] == [197, 194]   # agreeing: fine


def test_evit_past_its_keep_range_at_every_default_layer_takes_one_step_at_block_1():
    """On a 6-block ViT at 35% FLOPs, EViT's blocks (1, 3, 4) would need keep 0.15 each and leave a handful of
    tokens; one step at block 1 keeps more to the end (measured: 79.5% against 55.4% top-1 on the 6-block fidelity
    ViT). Where the defaults stay in the paper's keep range (12 blocks at 35%), nothing changes."""
    reducer = vtr.make_reducer("evit")
    shallow = make_schedule(reducer, replace(VIT_B, num_layers=6), flops=0.35)
    assert [i for i, keep in enumerate(shallow.amounts) if keep < 1] == [1]
    deep = make_schedule(reducer, VIT_B, flops=0.35)
    assert [i for i, keep in enumerate(deep.amounts) if keep < 1] == [1, 3, 6, 9] and min(deep.amounts) >= 0.5


def test_keep_is_a_fraction_of_unprotected_tokens():
    assert counts("random", keep=0.25)[1] == 1 + 49
    assert counts("tome", keep=1.0) == [197] * 13


@pytest.mark.parametrize("method", ["tome", "pitome", "random"])
@pytest.mark.parametrize("target", [0.9, 0.7, 0.5, 0.35])
def test_flops_target_is_met_by_the_analytic_count(method, target):
    reducer = vtr.make_reducer(method)
    tokens = make_schedule(reducer, VIT_B, flops=target).token_counts(reducer, 197, 1)
    assert reduced_macs(VIT_B, reducer, tokens) / VIT_B.unreduced() == pytest.approx(target, rel=0.01)


def test_flops_with_few_layers_reports_the_reachable_range():
    with pytest.raises(ValueError, match=r"flops=0.5 is out of reach for 'tome' on this model: the allowed "
                                         r"range is \[0\.\d+, 1\] .* only layers \[11\] reduce"):
        counts("tome", flops=0.5, layers=[11])


@pytest.mark.parametrize("amount, message", [
    ({"r": -1}, "r must be a non-negative int"),
    ({"r": 1.5}, "r must be a non-negative int"),
    ({"r": [1, 2]}, r"r as a list needs one value per layer \(12\), got 2"),
    ({"r": (8, 2)}, r"inflect in r=\(r, inflect\) must be a number in \[-1, 1\]"),
    ({"r": (8, True)}, r"inflect in r=\(r, inflect\) must be a number in \[-1, 1\], got True"),
    ({"r": (8, float("nan"))}, r"inflect in r=\(r, inflect\) must be a number in \[-1, 1\]"),
    ({"r": (8.5, -1)}, r"r in r=\(r, inflect\) must be a non-negative int"),
    ({"r": (-2, 0)}, r"r in r=\(r, inflect\) must be a non-negative int"),
    ({"r": (1, 2, 3)}, r"r as a tuple means \(r, inflect\)"),
    ({"keep": 0.3}, r"keep must be a fraction in \[0.5, 1\] for 'tome'"),
    ({"keep": 1.5}, r"keep must be a fraction in \[0.5, 1\]"),
    ({"flops": 0}, r"flops must be a fraction in \(0, 1\]"),
    ({"flops": 1.2}, r"flops must be a fraction in \(0, 1\]"),
    ({"flops": 0.05}, r"flops=0.05 is out of reach for 'tome' on this model: the allowed range is"),
    ({"r": 4, "keep": 0.9}, "give one amount, r=, keep= or flops=; got r and keep"),
    ({}, "method 'tome' needs an amount"),
    ({"r": 4, "layers": [12]}, r"layers must be distinct block indices in \[0, 11\], got \[12\]"),
    ({"r": 4, "layers": [1, 1]}, "layers must be distinct"),
])
def test_bad_amounts_name_the_parameter_and_range(amount, message):
    with pytest.raises(ValueError, match=message):
        counts("tome", **amount)


def test_none_method_refuses_an_amount():
    assert counts("none") == [197] * 13
    with pytest.raises(ValueError, match="method 'none' does not reduce"):
        counts("none", flops=0.5)
