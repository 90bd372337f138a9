"""DyT (vtr.adaptive, dispatch per block): skipped tokens come back unchanged, inference computes only the
activated tokens (and the FLOP counter sees only them), the parameters are the model's, unpatch undoes it."""
from __future__ import annotations

import copy

import pytest
import torch

import vtr
from vtr.tools.profile import count_macs

from conftest import tiny_vit, vit_images


def dispatching(model, scale=100.0, bias=0.0, seed=1):
    """Dispatchers with large random weights: logits far from 0, so no decision hinges on rounding."""
    generator = torch.Generator().manual_seed(seed)
    for linear in model._vtr_adaptive.dispatchers.values():
        with torch.no_grad():
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * scale)
            linear.bias.fill_(bias)
    return model


def block_inputs(model, images):
    """Tokens entering each block and leaving the last (eval, batch as given), and each block's logits."""
    seen = []
    hooks = [block.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach())) for block in model.blocks]
    hooks.append(model.blocks[-1].register_forward_hook(lambda m, args, out: seen.append(out.detach())))
    try:
        with torch.no_grad():
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def logits_of(model, layer, x):
    with torch.no_grad():
        return model._vtr_adaptive.dispatchers[str(layer)](x[:, 1:]).squeeze(-1)


@pytest.mark.parametrize("training", [False, True])
def test_skipped_tokens_reach_later_blocks_unchanged(training):
    torch.manual_seed(0)
    model = dispatching(vtr.adaptive.patch(tiny_vit(), "dyt", dispatch="block"))
    with torch.no_grad():   # trained adapters: a skipped token must not get one either
        for adapter in model._vtr_adaptive.adapters.values():
            adapter.up.weight.normal_()
    model.train(training)
    seen = block_inputs(model, vit_images(2))
    skipped_somewhere = 0
    for layer in range(len(model.blocks)):
        before, after = seen[layer], seen[layer + 1]
        logit = logits_of(model, layer, before)
        assert float(logit.abs().min()) > 1e-2
        if training:   # the decision is sampled: read it back from what changed
            skipped = (after[:, 1:] == before[:, 1:]).all(-1)
        else:
            skipped = logit < 0
            assert not (after[:, 1:][~skipped] == before[:, 1:][~skipped]).all(-1).any()   # activated: changed
        assert torch.equal(after[:, 1:][skipped], before[:, 1:][skipped])
        skipped_somewhere += int(skipped.sum())
        if not training:   # later blocks get the unchanged token: every later input holds it until it runs
            assert 0 < int(skipped.sum()) < skipped.numel()
    assert skipped_somewhere > 0


def test_mlp_dispatch_skips_only_the_mlp():
    """A token the dispatcher skips gets the attention and the adapter, not the MLP (the paper's default)."""
    model = vtr.adaptive.patch(tiny_vit(), "dyt")
    assert model._vtr_adaptive.dispatch == "mlp"
    reference = tiny_vit()
    with torch.no_grad():
        for linear in model._vtr_adaptive.dispatchers.values():
            linear.bias.fill_(-10.0)   # every patch token skips every MLP
            linear.weight.zero_()
        x = reference.patch_embed(vit_images(1))
        x = reference.norm_pre(reference._pos_embed(x))
        for block in reference.blocks:
            mid = x + block.ls1(block.attn(block.norm1(x)))
            full = mid + block.ls2(block.mlp(block.norm2(mid)))
            x = torch.cat([full[:, :1], mid[:, 1:]], dim=1)
        expected = reference.forward_head(reference.norm(x))
        assert torch.allclose(model(vit_images(1)), expected, atol=1e-5)


@pytest.mark.parametrize("dispatch", ["mlp", "block"])
def test_all_activated_or_complete_is_the_backbone(dispatch):
    """Adapters start at zero: with every token activated (or under vtr.adaptive.complete) the patched model
    computes what the backbone does."""
    images = vit_images(2)
    with torch.no_grad():
        expected = tiny_vit()(images)
        model = vtr.adaptive.patch(tiny_vit(), "dyt", dispatch=dispatch)
        with vtr.adaptive.complete(model):
            assert torch.allclose(model(images), expected, atol=1e-5)
        dispatching(model, scale=0.0, bias=10.0)
        assert torch.allclose(model(images), expected, atol=1e-5)


def test_block_dispatch_runs_the_block_on_the_activated_tokens_only():
    """Inference equals the original block called on the activated tokens alone, scattered back; and a row
    computes the same alone as in a batch whose other row activates another count (padding is -inf keys)."""
    model = dispatching(vtr.adaptive.patch(tiny_vit(), "dyt", dispatch="block"), scale=30.0)
    original = tiny_vit()
    images = vit_images(2, seed=3)
    seen = block_inputs(model, images[:1])
    for layer, block in enumerate(original.blocks):
        x = seen[layer]
        keep = torch.cat([torch.ones(1, 1, dtype=torch.bool), logits_of(model, layer, x) > 0], dim=1)[0]
        expected = x.clone()
        with torch.no_grad():
            expected[:, keep] = block(x[:, keep])
        assert torch.allclose(seen[layer + 1], expected, atol=1e-5)
    with torch.no_grad():
        together = model(images)
        counts = [sum(int((logits_of(model, i, s) > 0).sum()) for i, s in enumerate(block_inputs(model, images[r:r + 1])[:-1]))
                  for r in range(2)]
        assert counts[0] != counts[1]
        for row in range(2):
            assert torch.allclose(model(images[row:row + 1])[0], together[row], atol=1e-5)


@pytest.mark.parametrize("dispatch", ["mlp", "block"])
def test_flops_count_only_the_activated_tokens(dispatch):
    """The FLOP counter on a real eval pass (batch 1) sees the backbone on the activated tokens plus the
    dispatchers and adapters: a skipped token's MLP (or block) costs nothing."""
    model = dispatching(vtr.adaptive.patch(tiny_vit(), "dyt", dispatch=dispatch), scale=30.0)
    images = vit_images(1, seed=5)
    original = tiny_vit()
    base = count_macs(original, images).total
    seen = block_inputs(model, images)
    width, bottleneck = model.embed_dim, model._vtr_adaptive.bottleneck
    expected = base
    for layer, block in enumerate(original.blocks):
        x = seen[layer]
        n = x.shape[1]
        if dispatch == "mlp":   # the dispatcher reads the tokens after the attention residual
            with torch.no_grad():
                x = x + block.ls1(block.attn(block.norm1(x)))
        kept = 1 + int((logits_of(model, layer, x) > 0).sum())
        assert 1 < kept < n
        dispatcher, adapter = (n - 1) * width, 2 * width * bottleneck
        if dispatch == "block":
            full = count_macs(block, torch.randn(1, n, width)).total
            expected += count_macs(block, torch.randn(1, kept, width)).total - full + dispatcher + kept * adapter
        else:
            mlp = count_macs(block.mlp, torch.randn(1, 1, width)).total
            expected += -(n - kept) * mlp + dispatcher + n * adapter
    assert count_macs(model, images).total == pytest.approx(expected, rel=1e-9)


def test_training_gradient_reaches_dispatchers_and_adapters_only():
    torch.manual_seed(0)
    model = vtr.adaptive.trainable(vtr.adaptive.patch(tiny_vit(), "dyt", dispatch="block", rate=0.25)).train()
    with vtr.adaptive.decisions(model) as found:
        out = model(vit_images(2))
    assert len(found) == len(model.blocks) and found[0].rate == 0.25
    loss = out.square().mean() + vtr.adaptive.rate_loss(found)
    loss.backward()
    own = {id(p) for p in model._vtr_adaptive.parameters()}
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == (id(parameter) in own), name
    for linear in model._vtr_adaptive.dispatchers.values():
        assert linear.weight.grad is not None and bool(linear.weight.grad.abs().sum() > 0)
    assert 0.0 < vtr.adaptive.activation_rate(found) < 1.0


def test_without_noise_training_makes_evals_decisions():
    """noise=0: the training decision is eval's (logit > 0); with the paper's noise some differ. Block 0's: later
    blocks' inputs differ by training's masked attention (skipped keys weigh 1e-6), so could flip a near-0 logit."""
    images = vit_images(2)
    decided = {}
    for noise in (0.0, 1.0):
        torch.manual_seed(0)
        model = dispatching(vtr.adaptive.patch(tiny_vit(), "dyt", dispatch="block", noise=noise), scale=0.5)
        for mode in ("train", "eval"):
            getattr(model, mode)()
            with torch.no_grad(), vtr.adaptive.decisions(model) as found:
                model(images)
            decided[noise, mode] = found[0].keep.bool()
    assert torch.equal(decided[0.0, "train"], decided[0.0, "eval"])
    assert not torch.equal(decided[1.0, "train"], decided[1.0, "eval"])


def test_state_dict_round_trip_and_unpatch():
    images = vit_images(2)
    with torch.no_grad():
        before = tiny_vit()(images)
    model = dispatching(vtr.adaptive.patch(tiny_vit(), "dyt", dispatch="block", bottleneck=3), scale=30.0)
    with torch.no_grad():
        for adapter in model._vtr_adaptive.adapters.values():
            adapter.up.weight.normal_()
    state = model.state_dict()
    assert {k for k in state if k.startswith("_vtr_adaptive.")} and not any("_vtr_dyt" in k for k in state)
    fresh = vtr.adaptive.patch(tiny_vit(), "dyt", dispatch="block", bottleneck=3)
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))
        assert not torch.allclose(model(images), before, atol=1e-3)
    copied = copy.deepcopy(model)
    assert copied.blocks[0].__dict__["_vtr_adaptive_ref"] is copied._vtr_adaptive
    vtr.unpatch(model)
    assert not vtr.adaptive.is_patched(model) and not any(k.startswith("_vtr_") for k in model.state_dict())
    assert all(type(block).__name__ == "Block" for block in model.blocks)
    with torch.no_grad():
        assert torch.equal(model(images), before)


def test_bad_options_and_double_patching_are_clear_errors():
    with pytest.raises(ValueError, match="dispatch must be one of"):
        vtr.adaptive.patch(tiny_vit(), "dyt", dispatch="attention")
    with pytest.raises(ValueError, match=r"rate must be a number in \(0, 1\]"):
        vtr.adaptive.patch(tiny_vit(), "dyt", rate=0)
    with pytest.raises(ValueError, match="tau must be"):
        vtr.adaptive.patch(tiny_vit(), "dyt", tau=-1.0)
    with pytest.raises(ValueError, match="noise must be a finite number >= 0"):
        vtr.adaptive.patch(tiny_vit(), "dyt", noise=-1.0)
    with pytest.raises(ValueError, match="bottleneck must be"):
        vtr.adaptive.patch(tiny_vit(), "dyt", bottleneck=0)
    with pytest.raises(ValueError, match="takes no option keep"):
        vtr.adaptive.patch(tiny_vit(), "dyt", keep=0.5)
    with pytest.raises(ValueError, match="unknown adaptive method"):
        vtr.adaptive.patch(tiny_vit(), "dyn")
    model = vtr.adaptive.patch(tiny_vit(), "dyt")
    with pytest.raises(ValueError, match="already patched"):
        vtr.adaptive.patch(model, "dyt")
    with pytest.raises(ValueError, match="already patched"):
        vtr.patch(model, "tome", r=2)
    with pytest.raises(ValueError, match="already patched"):
        vtr.adaptive.patch(vtr.patch(tiny_vit(), "tome", r=2), "dyt")


def test_methods_list_stage_and_training():
    method = vtr.adaptive.methods()["dyt"]
    assert method.stage == "tower" and method.trains and "2403.11808" in method.paper
