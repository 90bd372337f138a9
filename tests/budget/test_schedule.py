"""Amounts: r= (int, list, (r, inflect)), keep=, flops=, layers=, and their errors."""
import pytest

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


def test_per_layer_lists_and_layers():
    assert counts("tome", r=[0] * 11 + [10])[-2:] == [197, 187]
    assert counts("tome", r=10, layers=[2, 5]) == [197, 197, 197, 187, 187, 187, 177] + [177] * 6
    tokens = counts("pitome", keep=0.5, layers=[0])
    assert tokens[1] == 1 + 98 and tokens[-1] == 99


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
    ({"r": (8, 2)}, r"inflect in r=\(r, inflect\) must be in \[-1, 1\]"),
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
