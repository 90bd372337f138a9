"""CLCA (vtr.adaptive "clca"): the cache holds exactly what each reduction step removed, the head at its
initialisation changes nothing, its parameters are the model's, its MACs are counted, unpatch undoes it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import vtr
from vtr.adaptive.clca import CacheEntry
from vtr.tools.profile import count_macs

from conftest import tiny_vit, vit_images


def randomized(model, seed=1):
    """A head as after training: every parameter random, so its logits are far from zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model._vtr_adaptive.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model


def steps_of(model, images):
    """(layer, state before, state after) of every reduction step of one call, and the cache entries."""
    seen = []
    hook = model._vtr.reducer.register_forward_hook(
        lambda module, args, out: seen.append((args[2].layer, args[0], out)) if out is not args[0] else None)
    try:
        with torch.no_grad(), vtr.adaptive.decisions(model) as found:
            model(images)
    finally:
        hook.remove()
    return seen, [f for f in found if isinstance(f, CacheEntry)]


def test_untrained_head_is_the_reduced_model_and_with_nothing_removed_the_unpatched_one():
    images = vit_images(2)
    plain = tiny_vit()
    with torch.no_grad():
        expected = plain(images)
        model = vtr.adaptive.patch(tiny_vit(), "clca", reducer="tome", keep=1.0)
        assert torch.equal(model(images), expected)
        reduced = vtr.patch(tiny_vit(), "tome", flops=0.5)(images)
        model = vtr.adaptive.patch(tiny_vit(), "clca", reducer="tome", flops=0.5)
        assert torch.equal(model(images), reduced)
        assert not torch.allclose(reduced, expected, atol=1e-3)   # the reduction did change the logits
        randomized(model)
        assert not torch.allclose(model(images), reduced, atol=1e-3)   # and a trained head changes them again


@pytest.mark.parametrize("reducer, options", [("tome", {}), ("evit", {"fuse": "one"}), ("evit", {"fuse": "drop"})])
def test_cache_holds_exactly_the_removed_tokens(reducer, options):
    images = vit_images(3, seed=2)
    model = vtr.adaptive.patch(tiny_vit(), "clca", reducer=reducer, flops=0.5, reducer_options=options)
    steps, found = steps_of(model, images)
    assert [f.layer for f in found] == [layer for layer, _, _ in steps] and found
    for (layer, before, after), cached in zip(steps, found):
        # An original is removed at this step when its token is dropped, or shares its new token with originals
        # it did not share one with before (it was merged): read from provenance alone.
        a, b = before.assignment, after.assignment
        together_before = a[:, :, None] == a[:, None, :]
        together_after = (b[:, :, None] == b[:, None, :]) & (b[:, :, None] >= 0)
        expected = (b < 0) | (together_before != together_after).any(2)
        assert torch.equal(cached.originals, expected)
        assert not cached.originals[:, :model.num_prefix_tokens].any()    # the CLS token is never removed
        # The summary is the size-weighted mean of those tokens' features (float64 reference).
        removed = cached.removed
        weight = (before.size * removed).double()
        mean = (before.x.double() * weight[..., None]).sum(1) / weight.sum(1)[:, None]
        torch.testing.assert_close(cached.removed_mean.double(), mean, rtol=1e-5, atol=1e-6)
        assert torch.equal(cached.removed_size, (before.size * removed).sum(1))
        if options.get("fuse") == "drop":   # dropping: what is removed is what is gone
            gone = (b < 0) & (a >= 0)
            assert torch.equal(cached.originals, gone)
        assert torch.equal(cached.kept, after.x[:, 0])


def test_rows_are_independent():
    images = vit_images(3, seed=4)
    model = randomized(vtr.adaptive.patch(tiny_vit(), "clca", reducer="tome", flops=0.4))
    with torch.no_grad():
        together = model(images)
        alone = torch.cat([model(images[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-4)


def test_state_dict_round_trip_is_strict():
    images = vit_images(2)
    model = randomized(vtr.adaptive.patch(tiny_vit(), "clca", reducer="evit", flops=0.5, hidden=3))
    keys = [k for k in model.state_dict() if k.startswith("_vtr_adaptive.")]
    assert len(keys) == 6 and model._vtr_adaptive.mix.shape == (1 + 2 * 4, 192, 3)
    other = vtr.adaptive.patch(tiny_vit(), "clca", reducer="evit", flops=0.5, hidden=3)
    other.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(other(images), model(images))
    with pytest.raises(RuntimeError):
        tiny_vit().load_state_dict(model.state_dict(), strict=True)


def test_unpatch_restores_the_model():
    images = vit_images(2)
    plain = tiny_vit()
    with torch.no_grad():
        expected = plain(images)
    model = randomized(vtr.adaptive.patch(tiny_vit(), "clca", reducer="tome", flops=0.5))
    reducer = model._vtr.reducer
    vtr.unpatch(model)
    assert not vtr.is_patched(model) and not vtr.adaptive.is_patched(model)
    assert not model._forward_hooks and not model._forward_pre_hooks and not model.head._forward_hooks
    assert not reducer._forward_hooks
    assert list(model.state_dict()) == list(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(model(images), expected)
    vtr.adaptive.patch(model, "clca", reducer="pitome", flops=0.5)   # and it can be patched again


def test_trainable_is_the_head_only_and_it_learns():
    images = vit_images(4, seed=5)
    model = vtr.adaptive.trainable(vtr.adaptive.patch(tiny_vit(), "clca", reducer="tome", flops=0.5))
    own = {id(p) for p in model._vtr_adaptive.parameters()}
    assert all(p.requires_grad == (id(p) in own) for p in model.parameters())
    model(images).logsumexp(1).sum().backward()
    assert model._vtr_adaptive.out.weight.grad.abs().sum() > 0
    assert model.blocks[0].mlp.fc1.weight.grad is None


def test_flops_count_the_head():
    images = vit_images(2)
    hidden, width, layers, classes = 2, 192, 4, 1000
    reduced = count_macs(vtr.patch(tiny_vit(), "tome", flops=0.5), images).total
    total = count_macs(vtr.adaptive.patch(tiny_vit(), "clca", reducer="tome", flops=0.5, hidden=hidden), images).total
    head = (1 + 2 * layers) * width * hidden + width * hidden * classes   # the mix across slots, then the linear map
    assert total - reduced == 2 * head


@pytest.mark.parametrize("options, message", [
    ({"reducer": "nope"}, "reducer must be the name of a vtr reducer"),
    ({"reducer": "dynamicvit", "flops": 0.5}, "is a learned reducer"),
    ({"reducer": "tome", "hidden": 0}, "hidden must be an int >= 1"),
    ({"reducer": "tome", "hidden": 1.5}, "hidden must be an int >= 1"),
    ({"reducer": "tome", "flops": 0.5, "reducer_options": 3}, "reducer_options must be a dict"),
    ({"reducer": "tome", "flops": 0.5, "rate": 0.5}, "clca takes no option rate"),
    ({"reducer": "tome", "flops": 1.5}, "flops"),
])
def test_bad_options_are_clear_errors_and_leave_the_model_unpatched(options, message):
    model = tiny_vit()
    with pytest.raises(ValueError, match=message):
        vtr.adaptive.patch(model, "clca", **options)
    assert not vtr.is_patched(model) and not vtr.adaptive.is_patched(model)


def test_needs_a_classifier_and_refuses_a_patched_model():
    model = tiny_vit()
    model.head = nn.Identity()
    with pytest.raises(ValueError, match="model.head must be the classifier"):
        vtr.adaptive.patch(model, "clca", reducer="tome", flops=0.5)
    model = vtr.patch(tiny_vit(), "tome", flops=0.5)
    with pytest.raises(ValueError, match="already patched"):
        vtr.adaptive.patch(model, "clca", reducer="tome", flops=0.5)
    model = vtr.adaptive.patch(tiny_vit(), "clca", reducer="tome", flops=0.5)
    with pytest.raises(ValueError, match="already patched"):
        vtr.patch(model, "tome", flops=0.5)


def test_listed_as_a_trained_tower_method():
    method = vtr.adaptive.methods()["clca"]
    assert method.trains and method.stage == "tower" and "2501.00243" in method.paper


def test_a_deep_copy_has_its_own_head_and_hooks():
    import copy

    images = vit_images(2)
    model = randomized(vtr.adaptive.patch(tiny_vit(), "clca", reducer="tome", flops=0.5))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        expected = model(images)
        assert torch.equal(twin(images), expected)
        twin._vtr_adaptive.out.bias.add_(1.0)          # the copy's head is its own
        assert torch.equal(model(images), expected)
        vtr.unpatch(twin)
        assert torch.equal(model(images), expected)   # unpatching the copy leaves the original patched


def test_the_cache_lives_for_one_call_only():
    from vtr.adaptive import clca

    model = vtr.adaptive.patch(tiny_vit(), "clca", reducer="tome", flops=0.5)
    head = model._vtr_adaptive
    model(vit_images(1))
    assert head not in clca._OPEN.get()          # nothing (no tensor, no graph) outlives the call
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 5, 96, 96))         # fails inside the call: the cache is closed all the same
    assert head not in clca._OPEN.get()
