"""End to end on timm ViTs: every dropping, query and pooling method patches, runs, hits its FLOPs,
chooses per row, passes gradients and unpatches cleanly."""
import copy

import pytest
import timm
import torch

import vtr
from vtr.tools.profile import count_macs

from conftest import tiny_vit, vit_images as images

CASES = {
    "evit": dict(flops=0.5),
    "hired": dict(flops=0.5),
    "atf": dict(flops=0.5, layers=[0]),
    "query": dict(flops=0.5),
    "pool": dict(factor=2),
}


@pytest.fixture(scope="module")
def model():
    return tiny_vit()


def run(model, x, method, rows=slice(None)):
    """Forward pass of ``x[rows]``, with a per-row query for the query method."""
    if method != "query":
        return model(x[rows])
    query = torch.randn(x.shape[0], model.embed_dim, generator=torch.Generator().manual_seed(7))
    with vtr.conditioned(model, query[rows]):
        return model(x[rows])


def test_methods_are_registered():
    assert set(CASES) <= set(vtr.methods())


@pytest.mark.parametrize("method", CASES)
def test_patch_run_flops_rows_and_unpatch(model, method):
    model = copy.deepcopy(model)
    x = images(3)
    reference = model(x)
    base = count_macs(model, x).per_image
    vtr.patch(model, method, **CASES[method])
    out = run(model, x, method)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    assert vtr.report(model).tokens == vtr.expected_tokens(model)
    assert vtr.report(model).tokens[-1] < vtr.report(model).tokens[0]
    counted = count_macs(model, x).per_image
    reduced, unreduced = vtr.expected_flops(model)
    assert abs(counted / reduced - 1) < 0.02 and abs(unreduced / base - 1) < 0.02
    if "flops" in CASES[method]:
        assert abs(counted / base - CASES[method]["flops"]) < 0.02
    assert torch.equal(run(model, x, method), out)  # deterministic
    for row in range(3):  # each row's choice does not depend on the rest of the batch
        torch.testing.assert_close(run(model, x, method, slice(row, row + 1))[0], out[row], rtol=1e-4, atol=1e-5)
    vtr.unpatch(model)
    assert torch.equal(model(x), reference)


@pytest.mark.parametrize("method", CASES)
def test_gradients_reach_the_weights(model, method):
    model = copy.deepcopy(model).train()
    vtr.patch(model, method, **CASES[method])
    run(model, images(2), method).sum().backward()
    grads = [p.grad for p in (model.patch_embed.proj.weight, model.blocks[-1].mlp.fc2.weight, model.cls_token)]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("method", CASES)
def test_vit_b16_shapes(method):
    """ViT-B/16 at 224 (197 tokens, width 768), two blocks to keep the test fast."""
    model = timm.create_model("vit_base_patch16_224", depth=2, pretrained=False).eval()
    options = dict(CASES[method])
    vtr.patch(model, method, **options)
    with torch.no_grad():
        out = run(model, images(1, size=224), method)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    assert vtr.report(model).tokens == vtr.expected_tokens(model)
