"""MSViT (vtr.adaptive): the gate's all-fine choice is the unpatched model bit for bit, a coarse token is the mean
of the fine tokens it replaces (on a constant image) and weighs as they do under proportional attention, rows
are independent with different token counts, training's masks compute what inference's gathered tokens do, the
batch-shaping loss matches a float64 transcription and holds the gate's fine share near its target."""
from __future__ import annotations

import math

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vtr
from vtr.adaptive.msvit import PDF_CLIP, batch_shaping
from vtr.tools.profile import count_macs

from conftest import tiny_vit, vit_images


def gated(model, bias=0.0, scale=0.0, seed=1):
    """The gate's last layer set: ``bias`` alone decides when ``scale`` is 0; a large ``scale`` gives random
    logits far from the threshold (no choice hinges on rounding)."""
    layers = [m for m in model._vtr_adaptive.gate.score if isinstance(m, torch.nn.Linear)]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():   # every layer drawn here: the choices do not depend on the tests run before
        for linear in layers[:-1]:
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) / linear.in_features ** 0.5)
            linear.bias.zero_()
        layers[-1].weight.copy_(torch.randn(layers[-1].weight.shape, generator=generator) * scale)
        layers[-1].bias.fill_(bias)
    return model


def choices(model, images):
    with torch.no_grad(), vtr.adaptive.decisions(model) as found:
        out = model(images)
    return out, found[0]


def constant_images(batch=2):
    colours = torch.randn(batch, 3, 1, 1, generator=torch.Generator().manual_seed(7))
    return colours.expand(batch, 3, 96, 96).contiguous()


def test_all_fine_is_the_unpatched_model_bit_for_bit():
    images = vit_images(3)
    with torch.no_grad():
        expected = tiny_vit()(images)
        model = gated(vtr.adaptive.patch(tiny_vit(), "msvit"), bias=50.0)
        out, found = choices(model, images)
        assert torch.equal(out, expected)
        assert bool(found.fine.all()) and found.tokens.tolist() == [37, 37, 37]
        with vtr.adaptive.complete(model):   # the teacher: the unpatched model, whatever the gate says
            assert torch.equal(gated(model, bias=-50.0)(images), expected)


def reference_all_coarse(model, images):
    """The fine tokens (embedding + position) averaged over each 2x2 region, in region order, through the blocks
    with proportional attention (log 4 on the merged tokens' keys)."""
    tokens = model._pos_embed(model.patch_embed(images))
    cls, fine = tokens[:, :1], tokens[:, 1:]
    merged = fine.reshape(-1, 3, 2, 3, 2, fine.shape[-1]).mean((2, 4)).reshape(len(images), 9, -1)
    x = torch.cat([cls, merged], dim=1)
    bias = torch.tensor([0.0] + [math.log(4)] * 9)[None, None, None, :]
    for block in model.blocks:
        x = block(x, attn_mask=bias)
    return model.forward_head(model.norm(x))


def test_all_coarse_on_a_constant_image_is_the_fine_tokens_merged_with_proportional_attention():
    images = constant_images()
    with torch.no_grad():
        expected = reference_all_coarse(tiny_vit(), images)
        out, found = choices(gated(vtr.adaptive.patch(tiny_vit(), "msvit"), bias=-50.0), images)
    assert not bool(found.fine.any()) and found.tokens.tolist() == [10, 10]
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("proportional", [True, False])
def test_a_coarse_token_weighs_as_the_four_fine_tokens_it_replaces(proportional):
    """Constant image and position embeddings constant over each 2x2 region: the four fine tokens of a region are
    copies, so attention over them equals attention over one token of size 4 with proportional attention, and
    all-coarse computes the unpatched model's output. Without proportional attention it does not."""
    backbone = tiny_vit()
    with torch.no_grad():
        grid = backbone.pos_embed[:, 1:].reshape(1, 3, 2, 3, 2, -1).mean((2, 4), keepdim=True)
        backbone.pos_embed[:, 1:] = grid.expand(1, 3, 2, 3, 2, grid.shape[-1]).reshape(1, 36, -1)
    images = constant_images()
    with torch.no_grad():
        expected = backbone(images)
        model = gated(vtr.adaptive.patch(backbone, "msvit", proportional=proportional), bias=-50.0)
        out = model(images)
    assert torch.allclose(out, expected, atol=1e-5) is proportional


def test_rows_are_independent_with_different_token_counts():
    model = gated(vtr.adaptive.patch(tiny_vit(), "msvit"), scale=30.0)
    images = vit_images(4, seed=3)
    together, found = choices(model, images)
    assert float(found.probabilities.logit().abs().min()) > 1e-2
    assert len(set(found.tokens.tolist())) > 1   # different counts: the batch is padded
    for row in range(len(images)):
        alone, one = choices(model, images[row:row + 1])
        assert one.tokens.item() == found.tokens[row].item()
        assert torch.allclose(alone[0], together[row], atol=1e-5)


def test_training_masks_compute_what_inference_gathers():
    """``noise=0``: training makes eval's choices; its masked keys (weight 1e-6) and its token order give eval's
    output; the gate gets a gradient from the task loss."""
    model = gated(vtr.adaptive.patch(tiny_vit(), "msvit", noise=0.0), scale=30.0)
    images = vit_images(3, seed=5)
    evaluated, chosen = choices(model.eval(), images)
    model.train()
    with vtr.adaptive.decisions(model) as found:
        trained = model(images)
    assert torch.equal(found[0].fine.detach().bool(), chosen.fine)
    assert 0 < int(chosen.fine.sum()) < chosen.fine.numel()
    assert torch.allclose(trained, evaluated, atol=1e-4)
    trained.square().sum().backward()
    assert float(model._vtr_adaptive.gate.score[0].weight.grad.abs().sum()) > 0


def transcribed_loss_and_grad(values: list[float], rate: float):
    """Batch shaping in float64 by hand: sort, empirical CDF i/(N+1), the Beta CDF by mpmath's incomplete beta;
    the gradient (2/N) (F(x) - i/(N+1)) times the density clipped as the released code does."""
    a, b, n = rate, 1 - rate, len(values)
    order = sorted(range(n), key=lambda i: values[i])
    loss, grad = 0.0, [0.0] * n
    for rank, index in enumerate(order, start=1):
        x = mpmath.mpf(values[index])
        cdf = float(mpmath.betainc(a, b, 0, x, regularized=True))
        density = float(x ** (a - 1) * (1 - x) ** (b - 1) / mpmath.beta(a, b))
        density = min(max(density, PDF_CLIP[0]), PDF_CLIP[1])
        loss += (rank / (n + 1) - cdf) ** 2 / n
        grad[index] = 2 / n * (cdf - rank / (n + 1)) * density
    return loss, grad


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.001, 0.999), min_size=1, max_size=40, unique=True), st.floats(0.05, 0.95))
def test_batch_shaping_matches_a_float64_transcription(values, rate):
    x = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    loss = batch_shaping(x, rate)
    loss.backward()
    expected, grad = transcribed_loss_and_grad(values, rate)
    assert math.isclose(loss.item(), expected, rel_tol=1e-9, abs_tol=1e-12)
    assert torch.allclose(x.grad, torch.tensor(grad, dtype=torch.float64), rtol=1e-7, atol=1e-12)


def test_batch_shaping_keeps_the_fine_share_near_its_target():
    """The gate alone trained with the batch-shaping loss (Beta(0.25, 0.75) prior) on 64 random images: the share of
    regions the patched model then sends to fine tokens in eval is near the prior's mass above 0.5 (21.9%), from
    100% at the start. (The gate is trained on its own input, what the model's forward feeds it, to stay fast.)"""
    torch.manual_seed(0)
    model = gated(vtr.adaptive.patch(tiny_vit(), "msvit", rate=0.25, hidden=32), bias=2.0, scale=1.0)
    gate = model._vtr_adaptive
    images = vit_images(64, seed=11)
    _, start = choices(model, images)
    with torch.no_grad():
        regions = gate.regions(model.patch_embed(images))
    optimizer = torch.optim.Adam(gate.parameters(), lr=3e-3)
    for _ in range(60):
        loss = batch_shaping(gate.gate(regions).sigmoid(), gate.rate)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _, end = choices(model, images)
    assert float(start.fine.float().mean()) > 0.9
    assert abs(float(end.fine.float().mean()) - 0.219) < 0.05


def test_state_dict_round_trip_and_unpatch():
    images = vit_images(2, seed=2)
    with torch.no_grad():
        expected = tiny_vit()(images)
    model = gated(vtr.adaptive.patch(tiny_vit(), "msvit"), scale=30.0)
    state = model.state_dict()
    assert any(key.startswith("_vtr_adaptive.gate.") for key in state)
    fresh = vtr.adaptive.patch(tiny_vit(), "msvit")
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))
        assert not torch.equal(model(images), expected)
    vtr.unpatch(model)
    assert type(model).__name__ == "VisionTransformer"
    assert not any("_vtr_adaptive" in key for key in model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(images), expected)


def test_flops_follow_the_token_count():
    """All-coarse saves exactly the blocks' cost of 27 tokens (37 -> 10); all-fine costs the backbone plus the gate
    and the coarse embedding (the fine patches are embedded either way: the gate reads them)."""
    images = vit_images(1)
    backbone = tiny_vit()
    base = count_macs(backbone, images).total
    fine = count_macs(gated(vtr.adaptive.patch(tiny_vit(), "msvit"), bias=50.0), images).total
    coarse = count_macs(gated(vtr.adaptive.patch(tiny_vit(), "msvit"), bias=-50.0), images).total

    def blocks(count):
        return count_macs(backbone.blocks, torch.randn(1, count, backbone.embed_dim)).total

    assert fine - coarse == blocks(37) - blocks(10)
    assert base < fine < 1.05 * base


@pytest.mark.parametrize("options, message", [
    ({"coarse": 1}, "coarse must be an int >= 2"),
    ({"coarse": 4}, "coarse=4 must divide the model's patch grid 6x6"),
    ({"rate": 0.0}, r"rate must be a number in \(0, 1\)"),
    ({"rate": 1.5}, r"rate must be a number in \(0, 1\)"),
    ({"threshold": 1.0}, r"threshold must be a number in \(0, 1\)"),
    ({"tau": 0.0}, r"tau must be a number in \(0, inf\)"),
    ({"noise": -1.0}, r"noise must be a number in \[0, inf\)"),
    ({"hidden": 0}, "hidden must be an int >= 1"),
    ({"proportional": "yes"}, "proportional must be True or False"),
    ({"batch_rate": 1}, "batch_rate must be True or False"),
    ({"scale": 2}, "msvit takes no option scale"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        vtr.adaptive.patch(tiny_vit(), "msvit", **options)


def test_refuses_what_it_cannot_tokenize():
    with pytest.raises(ValueError, match="global_pool='token'"):
        vtr.adaptive.patch(tiny_vit(global_pool="avg"), "msvit")
    with pytest.raises(ValueError, match="rate must be in"):
        batch_shaping(torch.rand(4), 1.0)
    model = vtr.adaptive.patch(tiny_vit(), "msvit")
    with pytest.raises(ValueError, match="attn_mask"):
        model(vit_images(1), attn_mask=torch.zeros(1, 1, 37, 37))
    assert vtr.adaptive.methods()["msvit"].stage == "tower" and vtr.adaptive.methods()["msvit"].trains


def test_batch_rate_trains_with_the_target_share_fine():
    """``batch_rate=True``: in training the batch's ``rate`` share of regions with the highest logits are fine,
    whatever the gate's scale (here it would send every region to fine tokens)."""
    model = gated(vtr.adaptive.patch(tiny_vit(), "msvit", rate=0.25, noise=0.0, batch_rate=True), bias=30.0,
                  scale=1.0).train()
    with vtr.adaptive.decisions(model) as found:
        model(vit_images(8, seed=6))
    assert int(found[0].fine.detach().sum()) == 18   # a quarter of 8 x 9 regions
    model.eval()
    _, chosen = choices(model, vit_images(8, seed=6))
    assert bool(chosen.fine.all())                   # eval follows the threshold
