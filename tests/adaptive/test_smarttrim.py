"""SmartTrim (vtr.adaptive): per-image token and head trimming; heads are cut out of the projections at
inference (the FLOP counter sees the smaller matrices), and inference computes what training's masks do."""
from __future__ import annotations

import pytest
import torch

import vtr
from vtr.tools.profile import count_macs

from conftest import tiny_vit, vit_images


def trimming(model, token_scale=30.0, heads=(5.0, -5.0, 5.0), seed=1):
    """Token trimmers with large random weights (logits far from 0) and head trimmers with fixed decisions."""
    generator = torch.Generator().manual_seed(seed)
    trim = model._vtr_adaptive
    with torch.no_grad():
        for layer, trimmer in trim.tokens.items():
            last = trimmer.score[-1]
            last.weight.copy_(torch.randn(last.weight.shape, generator=generator) * token_scale)
            last.bias.fill_(2.0 * token_scale)   # most tokens stay
        for trimmer in trim.heads.values():
            trimmer.score[-1].weight.zero_()
            trimmer.score[-1].bias.copy_(torch.tensor(heads))
    return model


def decided(model, images):
    with torch.no_grad(), vtr.adaptive.decisions(model) as found:
        out = model(images)
    return out, found


def test_untrained_is_the_backbone():
    images = vit_images(2)
    with torch.no_grad():
        expected = tiny_vit()(images)
        model = vtr.adaptive.patch(tiny_vit(), "smarttrim")
        assert torch.allclose(model(images), expected, atol=1e-5)
        with vtr.adaptive.complete(model):
            assert torch.allclose(model(images), expected, atol=1e-6)
        low = vtr.adaptive.patch(tiny_vit(), "smarttrim", start=0.5)   # a lower first keep logit: still everything
        assert float(low._vtr_adaptive.heads["0"].score[-1].bias[0]) == 0.5
        assert torch.allclose(low(images), expected, atol=1e-5)


def test_inference_with_heads_cut_out_equals_trainings_masks():
    """Eval (tokens gathered, pruned heads' rows and columns left out of qkv and proj, fused attention) computes what
    training computes with the same decisions as masks (noise=0: the decisions are eval's)."""
    model = trimming(vtr.adaptive.patch(tiny_vit(), "smarttrim", noise=0.0))
    images = vit_images(2, seed=4)
    pruned, found = decided(model.eval(), images)
    assert all(int(d.heads.sum(1).min()) == 2 for d in found)   # one head of three cut out everywhere
    assert 0 < int(found[-1].tokens.sum()) < found[-1].tokens.numel()
    masked, trained = decided(model.train(), images)
    for a, b in zip(found, trained):
        assert torch.equal(a.tokens.bool(), b.tokens.bool())
    assert torch.allclose(pruned, masked, atol=1e-4)
    with torch.no_grad():
        assert not torch.allclose(pruned, tiny_vit()(images), atol=1e-3)


def test_flops_count_the_kept_tokens_and_heads_only():
    model = trimming(vtr.adaptive.patch(tiny_vit(), "smarttrim"))
    images = vit_images(1, seed=6)
    _, found = decided(model.eval(), images)
    original = tiny_vit()
    width, heads, head_dim = model.embed_dim, 3, original.blocks[0].attn.head_dim
    mlp = 2 * width * 4 * width
    full_block = count_macs(original.blocks[0], torch.randn(1, 37, width)).total
    expected, alive = count_macs(original, images).total, 37
    for d in found:
        k, h = int(d.tokens.sum()), int(d.heads.sum())
        expected += k * (4 * width * h * head_dim + mlp) + 2 * k * k * h * head_dim - full_block
        expected += alive * (2 * width * width // 2 + width // 2) + width * width // 2 + width // 2 * heads
        alive = k
    assert count_macs(model, images).total == pytest.approx(expected, rel=1e-9)


def test_pruned_tokens_stay_pruned_and_unchanged():
    model = trimming(vtr.adaptive.patch(tiny_vit(), "smarttrim"), token_scale=60.0)
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone())) for b in model.blocks]
    _, found = decided(model.eval(), vit_images(1, seed=2))
    for hook in hooks:
        hook.remove()
    for before, after in zip(found, found[1:]):
        assert bool((after.tokens <= before.tokens).all())
    gone = ~found[0].tokens.bool()
    assert bool(gone.any())
    for x in seen[1:]:
        assert torch.equal(x[gone], seen[0][gone])


def test_rows_are_independent():
    model = trimming(vtr.adaptive.patch(tiny_vit(), "smarttrim"), heads=(5.0, 5.0, -5.0))
    images = vit_images(3, seed=8)
    together, _ = decided(model.eval(), images)
    for row in range(3):
        alone, _ = decided(model, images[row:row + 1])
        assert torch.allclose(alone[0], together[row], atol=1e-5)


def test_training_reaches_the_trimmers_and_flops_loss():
    torch.manual_seed(0)
    model = vtr.adaptive.trainable(vtr.adaptive.patch(tiny_vit(), "smarttrim", flops=0.3)).train()
    with vtr.adaptive.decisions(model) as found:
        out = model(vit_images(2))
    loss = out.square().mean() + vtr.adaptive.flops_loss(found)
    loss.backward()
    assert found[0].target == 0.3 and 0.5 < float(found[0].spent.detach().mean()) <= 1.0
    for trimmer in model._vtr_adaptive.heads.values():
        assert trimmer.score[-1].bias.grad is not None and bool(trimmer.score[-1].bias.grad.abs().sum() > 0)
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("_vtr_adaptive."))


def test_state_dict_round_trip_unpatch_and_errors():
    images = vit_images(2)
    with torch.no_grad():
        before = tiny_vit()(images)
    model = trimming(vtr.adaptive.patch(tiny_vit(), "smarttrim", flops=0.4))
    fresh = vtr.adaptive.patch(tiny_vit(), "smarttrim", flops=0.4)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))
    vtr.unpatch(model)
    assert type(model).__name__ == "VisionTransformer" and not any(k.startswith("_vtr") for k in model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(images), before)
    with pytest.raises(ValueError, match=r"flops must be a number in \(0, 1\]"):
        vtr.adaptive.patch(tiny_vit(), "smarttrim", flops=1.5)
    with pytest.raises(ValueError, match="start must be a finite number > 0"):
        vtr.adaptive.patch(tiny_vit(), "smarttrim", start=0.0)
    with pytest.raises(ValueError, match="must pool its class token"):
        vtr.adaptive.patch(tiny_vit(global_pool="avg"), "smarttrim")
    with pytest.raises(ValueError, match="takes no option rate"):
        vtr.adaptive.patch(tiny_vit(), "smarttrim", rate=0.5)
    assert vtr.adaptive.methods()["smarttrim"].trains and vtr.adaptive.methods()["smarttrim"].stage == "tower"
