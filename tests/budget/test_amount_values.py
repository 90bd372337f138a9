"""Amounts as users really pass them (issue 11): a no-op amount schedules nothing, layer indices are
integers, numpy and 0-d tensor scalars are the numbers they hold, non-scalar arrays are errors."""
import re

import numpy as np
import pytest
import torch

import vtr
from vtr.budget.cost import EncoderCost
from vtr.budget.schedule import make_schedule

# vit_tiny_patch16_224 cut to 4 blocks: a decision's own MACs (similarity matrices) outweigh the few
# tokens a near-1.0 keep ratio removes, so a solver that "nearly" reduces costs more than not reducing.
VIT_TINY = EncoderCost(num_tokens=197, num_protected=1, num_layers=4, attn_linear=4 * 192 * 192, attn_dim=192,
                       mlp_linear=2 * 192 * 768, fixed=196 * 192 * 768 + 192 * 1000, metric_dim=192)
# ViT-B/16 at 224, as in test_schedule.py.
VIT_B = EncoderCost(num_tokens=197, num_protected=1, num_layers=12, attn_linear=4 * 768 * 768,
                    attn_dim=768, mlp_linear=2 * 768 * 3072, fixed=196 * 768 * 768 + 768 * 1000,
                    metric_dim=768)
COUNTED = [m for m, info in vtr.methods(details=True).items() if m != "pool" and "tower" in info.stages]   # pool: factor=


def schedule(method, cost=VIT_B, **amount):
    return make_schedule(vtr.make_reducer(method), cost, **amount)


def counts(method, cost=VIT_B, **amount):
    reducer = vtr.make_reducer(method)
    return make_schedule(reducer, cost, **amount).token_counts(reducer, cost.num_tokens, cost.num_protected)


# -- a no-op amount changes nothing ---------------------------------------------------------------

@pytest.mark.parametrize("cost", [VIT_TINY, VIT_B], ids=["vit_tiny_d4", "vit_b"])
@pytest.mark.parametrize("amount", [{"flops": 1.0}, {"flops": 1}, {"keep": 1.0}, {"keep": 1}, {"r": 0},
                                    {"r": (0, -1)}], ids=str)
@pytest.mark.parametrize("method", COUNTED)
def test_a_no_op_amount_schedules_no_reduction_for_every_method(method, amount, cost):
    assert counts(method, cost, **amount) == [cost.num_tokens] * (cost.num_layers + 1)


@pytest.mark.parametrize("method", ["tome", "pitome", "query"])
def test_flops_near_one_never_costs_more_than_the_unreduced_model(method):
    from vtr.budget.schedule import reduced_macs
    reducer = vtr.make_reducer(method)
    for target in (0.999, 0.9995, 0.99999):
        tokens = make_schedule(reducer, VIT_TINY, flops=target).token_counts(reducer, 197, 1)
        assert reduced_macs(VIT_TINY, reducer, tokens) <= VIT_TINY.unreduced()


@pytest.mark.parametrize("amount", [{"flops": 1.0}, {"keep": 1.0}, {"r": 0}], ids=str)
def test_pool_says_it_cannot_express_no_reduction(amount):
    cost = EncoderCost(**{**VIT_B.__dict__, "grid": (14, 14)})
    with pytest.raises(ValueError, match=r"'pool' always reduces.* no amount means 'no reduction'.* "
                                         r"method 'none'"):
        make_schedule(vtr.make_reducer("pool"), cost, **amount)


def test_none_accepts_every_no_op_amount():
    for amount in ({"r": 0}, {"r": [0] * 12}, {"keep": 1}, {"keep": [1.0] * 12}, {"flops": 1.0},
                   {"flops": np.float32(1.0)}):
        assert counts("none", **amount) == [197] * 13


# -- layers are integer block indices -------------------------------------------------------------

@pytest.mark.parametrize("layers", [[1.5], [1.0], [True], [0, False], [np.float64(2.0)], [torch.tensor(1.5)]],
                         ids=repr)
def test_layers_must_be_integers(layers):
    with pytest.raises(ValueError, match=r"layers must be integer block indices in \[0, 11\], got"):
        schedule("tome", r=4, layers=layers)


def test_layers_must_be_a_list():
    with pytest.raises(ValueError, match=r"layers must be a list of distinct integer block indices in \[0, 11\]"):
        schedule("tome", r=4, layers=3)


# -- numpy and 0-d tensor scalars are numbers -----------------------------------------------------

@pytest.mark.parametrize("given, plain", [
    ({"keep": np.float32(0.9)}, {"keep": 0.9}),
    ({"keep": np.float64(0.7)}, {"keep": 0.7}),
    ({"keep": np.float16(0.5)}, {"keep": 0.5}),
    ({"keep": torch.tensor(0.9)}, {"keep": 0.9}),
    ({"keep": np.array(0.8)}, {"keep": 0.8}),
    ({"keep": [np.float32(0.9)] * 12}, {"keep": [0.9] * 12}),
    ({"keep": list(np.full(12, 0.6, dtype=np.float32))}, {"keep": [0.6] * 12}),
    ({"r": np.int64(4)}, {"r": 4}),
    ({"r": torch.tensor(4)}, {"r": 4}),
    ({"r": [np.int32(3)] * 12}, {"r": [3] * 12}),
    ({"r": [torch.tensor(2)] * 12}, {"r": [2] * 12}),
    ({"r": (np.int64(8), np.float32(-1))}, {"r": (8, -1.0)}),
    ({"flops": torch.tensor(0.5)}, {"flops": 0.5}),
    ({"flops": np.float32(0.7)}, {"flops": 0.7}),
    ({"r": 4, "layers": [np.int64(1), torch.tensor(3)]}, {"r": 4, "layers": [1, 3]}),
], ids=repr)
def test_numpy_and_0d_tensor_scalars_behave_like_python_numbers(given, plain):
    assert schedule("tome", **given) == schedule("tome", **plain)


@pytest.mark.parametrize("amount, name", [
    ({"keep": np.array([0.9, 0.8])}, "keep"),
    ({"keep": torch.tensor([0.9])}, "keep"),
    ({"flops": torch.tensor([0.5, 0.5])}, "flops"),
    ({"r": np.arange(12)}, "r"),
    ({"r": [torch.tensor([1, 2])] * 12}, "r"),
    ({"r": 4, "layers": np.array([1, 2])}, "layers"),
], ids=repr)
def test_non_scalar_arrays_and_tensors_are_errors_naming_the_parameter(amount, name):
    with pytest.raises(ValueError, match=rf"{name} takes numbers .* got a .* of shape"):
        schedule("tome", **amount)


def test_bools_are_not_numbers_even_as_numpy_or_tensor_scalars():
    for value in (np.bool_(True), torch.tensor(True)):
        with pytest.raises(ValueError, match="r must be a non-negative int"):
            schedule("tome", r=value)
        with pytest.raises(ValueError, match=r"flops must be a fraction in \(0, 1\]"):
            schedule("tome", flops=value)
        with pytest.raises(ValueError, match=r"keep must be a fraction in \[0.5, 1\] for 'tome'"):
            schedule("tome", keep=value)
    with pytest.raises(ValueError, match=r"keep must be a fraction in \[0.5, 1\] for 'tome'"):
        schedule("tome", keep=[True] * 12)


@pytest.mark.parametrize("keep", ["a", "0.5", "abcdefghijkl", {"a": 1}], ids=repr)
def test_keep_that_is_no_number_nor_list_says_it_must_be_a_fraction(keep):
    """Only a list (tuple, range) is one keep per layer: a string is one wrong value, not a list of characters
    (issue 26; ``keep="a"`` said "keep as a list needs one value per layer (12), got 1")."""
    says = rf"keep must be a fraction in \[0.5, 1\] for 'tome' .*got {re.escape(repr(keep))}"
    with pytest.raises(ValueError, match=says):
        schedule("tome", keep=keep)
