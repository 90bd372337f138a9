"""Reducers on real use (issue 11): options named from the real signature, numpy option values,
an empty batch, non-finite priors/projections/options refused at construction, pool's grid errors."""
import math
import re

import numpy as np
import pytest
import torch

import vtr
from vtr.core.signals import Instruction
from vtr.core.state import TokenState
from vtr.reducers import REDUCERS, GridPool, Signals

from conftest import make_state

# What each method really takes (its own __init__), or nothing.
OPTIONS = {"atf": "prior, prior_weight, fuse", "evit": "fuse, fuse_weight", "fastv": "fuse",
           "hired": "fuse, allocate_layer", "none": "none", "pitome": "margin, alpha, variant", "pool": "factor",
           "query": "relevance_weight, projection, fuse", "random": "seed", "tome": "none",
           "dynamicvit": "init, temperature, threshold, noise", "sit": "temperature",
           "visionzip": "contextual, merge", "divprune": "fuse", "vispruner": "important_ratio, fuse",
           "fastervlm": "fuse", "pyramiddrop": "ratio, fuse", "cdpruner": "negate, fuse",
           "dart": "pivot_image, pivot_text, fuse", "sparsevlm": "recycle",
           "feather": "stride, ratio, fuse"}


def test_every_method_is_listed_here():
    assert set(OPTIONS) == set(vtr.methods())


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_unknown_option_lists_the_real_options_never_args_or_kwargs(method):
    with pytest.raises(ValueError) as error:
        vtr.make_reducer(method, foo=1)
    message = str(error.value)
    assert message == f"method {method!r} takes no option foo; its options: {OPTIONS[method]}"
    assert "args" not in message and "kwargs" not in message


@pytest.mark.parametrize("method", ["tome", "none"])
def test_args_and_kwargs_are_not_options_either(method):
    for name in ("args", "kwargs"):
        with pytest.raises(ValueError, match=f"takes no option {name}; its options: none"):
            vtr.make_reducer(method, **{name: 1})


def test_numpy_and_0d_tensor_option_values_are_numbers():
    assert vtr.make_reducer("pool", factor=np.int64(3)).factor == 3
    assert vtr.make_reducer("pitome", margin=np.float32(0.8)).margin == 0.8
    assert vtr.make_reducer("random", seed=torch.tensor(7)).seed == 7
    assert vtr.make_reducer("query", relevance_weight=np.float32(0.3)).relevance_weight == 0.3


# -- an empty batch ---------------------------------------------------------------------------------

def _signals(state: TokenState, **extra) -> Signals:
    batch, tokens = state.x.shape[:2]
    attention = torch.rand(batch, tokens).softmax(dim=-1)
    text = torch.randn(batch, 3, state.x.shape[-1])   # the text after the image, for in-LM methods
    instruction = Instruction(text, torch.ones(batch, 3, dtype=torch.bool), keys=text,
                              attention=torch.rand(batch, 3, tokens))
    return Signals(metric=state.x, cls_attention=attention, grid=(4, 4), keys=state.x, instruction=instruction,
                   **extra)


@pytest.mark.parametrize("method", sorted(REDUCERS))
def test_every_reducer_returns_an_empty_state_for_an_empty_batch(method):
    reducer = vtr.make_reducer(method)
    state = make_state(batch=0, tokens=17, channels=8)
    num_kept = 1 + 4 if method == "pool" else 9   # pool: 4x4 grid, factor 2
    if method == "none":
        num_kept = 17
    # learned reducers: a module for block 0 (layer 0 in _signals), of two blocks (never the last one)
    reducer.build(8, [17, 9, 9], 1)
    reducer.eval()                 # as in an eval-mode model (dynamicvit masks in training mode)
    out = reducer(state, num_kept, _signals(state))
    assert out.x.shape == (0, num_kept, 8) and out.size.shape == (0, num_kept)
    assert out.assignment.shape == (0, 17)


def test_hired_with_partitions_on_an_empty_batch():
    state = make_state(batch=0, tokens=17, channels=8)
    partition = torch.zeros(0, 17, dtype=torch.long)
    out = vtr.make_reducer("hired")(state, 9, _signals(state, partition=partition))
    assert out.x.shape == (0, 9, 8)


# -- non-finite priors, projections and options are refused at construction ----------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_atf_prior_must_be_finite(bad):
    prior = torch.full((36,), 1 / 36)
    prior[5] = bad
    with pytest.raises(ValueError, match=r"atf: prior must be finite \(an importance per patch "
                                         r"position\), got 1 NaN or Inf of 36 values"):
        vtr.make_reducer("atf", prior=prior)
    with pytest.raises(ValueError, match="atf: prior must be finite"):
        vtr.make_reducer("atf", prior=prior.numpy())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_query_projection_must_be_finite(bad):
    projection = torch.randn(8, 4)
    projection[2, 1] = bad
    with pytest.raises(ValueError, match=r"query: projection must be finite, got 1 NaN or Inf of 32 values"):
        vtr.make_reducer("query", projection=projection)


@pytest.mark.parametrize("method, option, allowed", [
    ("pitome", "alpha", r"a finite number > 0"),
    ("pitome", "margin", r"in \[0, 1\)"),
    ("atf", "prior_weight", r"in \[0, 1\]"),
    ("query", "relevance_weight", r"in \[0, 1\]"),
])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_options_name_the_option_and_its_range(method, option, allowed, bad):
    with pytest.raises(ValueError, match=rf"{method}: {option} must be {allowed}, got {bad}"):
        vtr.make_reducer(method, **{option: bad})


# -- pool says why it has no grid -------------------------------------------------------------------

def test_pool_without_a_grid_on_unreduced_tokens_says_the_grid_is_unknown():
    state = make_state(tokens=17)
    with pytest.raises(ValueError, match=r"pool needs signals.grid, and the patch grid of this input is "
                                         r"unknown") as error:
        GridPool(2)(state, 5, Signals(metric=state.x))
    assert "first reduction step" not in str(error.value)


def test_pool_after_another_reduction_blames_the_order():
    state = make_state(tokens=17)
    kept = torch.arange(12).expand(2, -1)
    from vtr.reducers import dest_from_choice
    reduced = state.reduce(dest_from_choice(state, kept), 13)
    with pytest.raises(ValueError, match=r"pool needs signals.grid, and these tokens are no longer the patch "
                                         r"grid.*first reduction step"):
        GridPool(2)(reduced, 5, Signals(metric=reduced.x))


# -- options of the wrong type name the option and what it takes (issue 26) -----------------------

NUMBER_OPTIONS = [   # (method, option, what it takes, as the error says it)
    ("random", "seed", "an integer"),
    ("atf", "prior_weight", r"in \[0, 1\]"),
    ("pitome", "margin", r"in \[0, 1\)"),
    ("pitome", "alpha", "a finite number > 0"),
    ("query", "relevance_weight", r"in \[0, 1\]"),
    ("hired", "allocate_layer", "a vision-tower layer index >= 0"),
    ("pool", "factor", "an integer >= 2"),
    ("dynamicvit", "temperature", "a finite number > 0"),
    ("dynamicvit", "noise", r"a finite number >= 0 \(the scale of the Gumbel noise in training\)"),
    ("sit", "temperature", "a finite number > 0"),
]


@pytest.mark.parametrize("method, option, allowed", NUMBER_OPTIONS)
@pytest.mark.parametrize("bad", ["a", "0.5", True, [0.5]], ids=repr)
def test_an_option_that_is_no_number_names_the_option_and_what_it_takes(method, option, allowed, bad):
    """Never Python's own words ("invalid literal for int()", "'<=' not supported"), never a bool as 1."""
    with pytest.raises(ValueError, match=rf"^{method}: {option} must be {allowed}, got {re.escape(repr(bad))}$"):
        vtr.make_reducer(method, **{option: bad})


@pytest.mark.parametrize("method, option", [("random", "seed"), ("hired", "allocate_layer"), ("pool", "factor")])
def test_an_integer_option_is_never_truncated(method, option):
    with pytest.raises(ValueError, match=rf"^{method}: {option} must be .*, got 2.5$"):
        vtr.make_reducer(method, **{option: 2.5})


def test_every_integer_seed_works():
    """torch's manual_seed takes [-2**63, 2**64) and reads a negative seed modulo 2**64; the random method's seed
    is taken modulo 2**64 too, so a larger seed runs (it failed inside the forward pass) and every seed that
    ran before draws what it drew."""
    state = make_state(tokens=17)

    def kept(seed):
        return vtr.make_reducer("random", seed=seed)(state, 9, Signals(metric=state.x, layer=1)).assignment

    assert torch.equal(kept(2**70), kept(0))   # 2**70 * 10007 is 0 modulo 2**64
    assert torch.equal(kept(-3), kept(2**64 - 3))
