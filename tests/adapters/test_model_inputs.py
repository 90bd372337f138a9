"""Patched models on real use (issue 11): no-op amounts are bit-exact for every method, numpy amounts,
an empty batch, non-finite queries, and the patch grid read from each call's patch embedding."""
import numpy as np
import open_clip  # noqa: F401  (the adapter registry sees open_clip models once it is imported)
import pytest
import timm
import torch
from open_clip.transformer import VisionTransformer
from transformers import CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTModel

import vtr

from conftest import build_timm, tiny_vit, timm_images, vit_images

NO_OP = [{"flops": 1.0}, {"keep": 1.0}, {"r": 0}]


# -- a no-op amount changes nothing, bit for bit -----------------------------------------------------

@pytest.fixture(scope="module")
def vit_tiny():
    """vit_tiny_patch16_224 at depth 4 (197 tokens), where a near-1.0 flops schedule still removed tokens."""
    model = build_timm("tiny")
    images = timm_images(model, batch=1)
    with torch.inference_mode():
        return model, images, model(images)


@pytest.mark.parametrize("amount", NO_OP, ids=str)
@pytest.mark.parametrize("method", sorted(m for m, info in vtr.methods(details=True).items() if "tower" in info.stages))
def test_a_no_op_amount_changes_nothing_for_every_method(vit_tiny, method, amount):
    model, images, expected = vit_tiny
    if method == "pool":   # its count is set by factor=: it cannot express no reduction, and says so
        with pytest.raises(ValueError, match=r"'pool' always reduces.*no amount means 'no reduction'"):
            vtr.patch(model, method, **amount)
        assert not vtr.is_patched(model)
        return
    vtr.patch(model, method, **amount)
    try:
        with torch.inference_mode():
            out = model(images)
        assert vtr.report(model).tokens == [197] * 5
        assert vtr.expected_tokens(model) == [197] * 5
        reduced, unreduced = vtr.expected_flops(model)
        assert reduced == unreduced
        assert torch.equal(out, expected)
    finally:
        vtr.unpatch(model)


def test_numpy_and_tensor_amounts_patch_like_python_numbers():
    x = vit_images()
    for given, plain in [({"keep": np.float32(0.7)}, {"keep": 0.7}), ({"r": np.int64(4)}, {"r": 4}),
                         ({"flops": torch.tensor(0.6)}, {"flops": 0.6}),
                         ({"r": [np.int64(0), np.int64(3), np.int64(3), np.int64(0)],
                           "layers": [np.int64(1), torch.tensor(2)]},
                          {"r": [0, 3, 3, 0], "layers": [1, 2]})]:
        outputs, tokens = [], []
        for amount in (given, plain):
            model = vtr.patch(tiny_vit(), "tome", **amount)
            with torch.no_grad():
                outputs.append(model(x))
            tokens.append(vtr.report(model).tokens)
            assert model._vtr.describe() == vtr.patch(tiny_vit(), "tome", **plain)._vtr.describe()
        assert tokens[0] == tokens[1] and torch.equal(outputs[0], outputs[1])


def test_layers_with_a_fraction_is_an_error_not_block_1():
    with pytest.raises(ValueError, match=r"layers must be integer block indices in \[0, 3\], got \[1.5\]"):
        vtr.patch(tiny_vit(), "tome", r=4, layers=[1.5])


# -- an empty batch ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(m for m, info in vtr.methods(details=True).items() if "tower" in info.stages))
def test_an_empty_batch_gives_an_empty_result_for_every_method(method):
    base = tiny_vit()
    empty = vit_images(batch=0)
    with torch.no_grad():
        expected = base(empty)
    model = vtr.patch(tiny_vit(), method, **({} if method in ("pool", "none") else {"keep": 0.5}))
    with torch.no_grad():
        out = model(empty)
    assert out.shape == expected.shape == (0, 1000)
    report = vtr.report(model)
    assert report.size.shape[0] == 0 and report.assignment.shape == (0, 37)
    assert report.tokens == vtr.expected_tokens(model)


def test_an_empty_batch_under_a_query():
    model = vtr.patch(tiny_vit(), "query", keep=0.5)
    with vtr.conditioned(model, torch.randn(1, 192)), torch.no_grad():
        assert model(vit_images(batch=0)).shape == (0, 1000)


# -- a non-finite query is an error, never a silent pick ---------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_query_is_an_error_naming_query(bad):
    model = vtr.patch(tiny_vit(), "query", keep=0.5, layers=[1])
    query = torch.randn(2, 192)
    query[1, 7] = bad
    with vtr.conditioned(model, query), torch.no_grad():
        with pytest.raises(ValueError, match=r"query must be finite .*got 1 NaN or Inf of 384 values"):
            model(vit_images())
    with vtr.conditioned(model, torch.randn(2, 192)), torch.no_grad():   # a finite query still works
        model(vit_images())
    assert vtr.report(model).tokens == [37, 37, 19, 19, 19]


# -- the grid comes from the patch embedding of the call ----------------------------------------------

def dynamic_vit(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", depth=2, img_size=(160, 224), dynamic_img_size=True,
                             **kwargs).eval()


def window_assignment(rows, cols, factor, protected=1):
    """Where 2-D average pooling sends each original token: its window, row-major after the prefix."""
    windows_per_row = -(-cols // factor)
    patches = [protected + (r // factor) * windows_per_row + c // factor for r in range(rows) for c in range(cols)]
    return torch.tensor(list(range(protected)) + patches)


@pytest.mark.parametrize("size, grid", [((224, 160), (14, 10)), ((160, 224), (10, 14)), ((224, 224), (14, 14)),
                                        ((96, 128), (6, 8))])
def test_timm_dynamic_size_grid_is_the_real_one(size, grid):
    model = vtr.patch(dynamic_vit(), "pool", factor=2)
    with torch.no_grad():
        model(torch.randn(2, 3, *size))
    report = vtr.report(model)
    assert report.grid == grid
    assert torch.equal(report.assignment[0], window_assignment(*grid, factor=2))


def test_timm_pool_names_the_unknown_grid_not_the_order():
    # Patch dropout (training) removes patches before the blocks: no grid is left to pool.
    model = vtr.patch(dynamic_vit(patch_drop_rate=0.5).train(), "pool", factor=2)
    with pytest.raises(ValueError, match=r"pool needs signals.grid, and the patch grid of this input is "
                                         r"unknown") as error:
        model(torch.randn(1, 3, 224, 160))
    assert "first reduction step" not in str(error.value)


def test_open_clip_grid_is_read_from_the_patch_convolution():
    torch.manual_seed(0)
    tower = VisionTransformer(image_size=32, patch_size=4, width=32, layers=2, heads=4, mlp_ratio=2.0,
                              output_dim=16).eval()
    vtr.patch(tower, "pool", factor=2)
    with torch.no_grad():
        tower(torch.randn(1, 3, 16, 64))   # 4 x 16 patches: as many as the 8 x 8 default
    assert vtr.report(tower).grid == (4, 16)
    assert torch.equal(vtr.report(tower).assignment[0], window_assignment(4, 16, factor=2))


@pytest.mark.parametrize("family", ["clip", "vit"])
def test_hf_grid_is_read_from_the_pixels_of_the_call(family):
    torch.manual_seed(0)
    config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=4)
    model = (CLIPVisionModel(CLIPVisionConfig(**config)) if family == "clip" else ViTModel(ViTConfig(**config))).eval()
    vtr.patch(model, "pool", factor=2)
    for size, grid in [((16, 64), (4, 16)), ((32, 16), (8, 4)), ((32, 32), (8, 8))]:
        with torch.no_grad():
            model(pixel_values=torch.randn(1, 3, *size), interpolate_pos_encoding=True)
        assert vtr.report(model).grid == grid
        assert torch.equal(vtr.report(model).assignment[0], window_assignment(*grid, factor=2))
