"""The timm adapter: exact when nothing is reduced, honest when something is."""
import copy

import pytest
import timm
import torch

import vtr
from vtr.tools.profile import count_macs

from conftest import FEATURE_MODELS, build_timm as build, timm_images as images, tiny_vit, vit_images


@pytest.mark.parametrize("kind", ["vit_b16"] + FEATURE_MODELS)
def test_zero_reduction_is_bit_exact(kind):
    model = build(kind)
    x = images(model)
    with torch.inference_mode():
        expected = model(x)
        for method, amount in [("none", {}), ("tome", {"r": 0}), ("pitome", {"keep": 1.0})]:
            vtr.patch(model, method, **amount)
            assert torch.equal(model(x), expected), method
            vtr.unpatch(model)


@pytest.mark.parametrize("kind", FEATURE_MODELS)
def test_unpatch_restores_class_outputs_and_state_dict(kind):
    model = build(kind)
    x = images(model)
    cls, keys = type(model), list(model.state_dict())
    with torch.inference_mode():
        expected = model(x)
        vtr.patch(model, "tome", r=8, metric="keys")
        assert list(model.state_dict()) == keys
        reduced = model(x)
        assert not torch.allclose(reduced, expected)
        vtr.unpatch(model)
        assert type(model) is cls and not hasattr(model, "_vtr")
        assert all(not m._forward_hooks for m in model.modules())
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize("kind", FEATURE_MODELS)
@pytest.mark.parametrize("method", ["tome", "pitome", "random"])
def test_protected_tokens_survive_and_report_is_true(kind, method):
    model = vtr.patch(build(kind), method, keep=0.6)
    with torch.inference_mode():
        model(images(model))
    report = vtr.report(model)
    p = model.num_prefix_tokens
    assert report.tokens == vtr.expected_tokens(model)
    assert report.tokens[-1] < report.tokens[0]
    assert torch.equal(report.assignment[:, :p], torch.arange(p).expand(2, p))
    assert torch.equal(report.size[:, :p], torch.ones(2, p))
    if method != "random":
        assert torch.equal(report.size.sum(1), torch.full((2,), float(report.tokens[0])))
    assert report.grid == tuple(model.patch_embed.grid_size)


def _paired_image(model):
    """An image whose horizontally adjacent patch pairs are identical, with positions zeroed,
    so patch tokens come in exact duplicate pairs (A token 2i, B token 2i+1)."""
    with torch.no_grad():
        model.pos_embed.zero_()
    x = images(model, batch=2)
    patch = model.patch_embed.patch_size[1]
    cols = x.shape[-1] // patch
    for c in range(0, cols, 2):
        x[..., c * patch + patch : (c + 2) * patch] = x[..., c * patch : (c + 1) * patch]
    return x


@pytest.mark.parametrize("kind, pool", [("tiny", "token"), ("tiny", "avg"), ("tiny", "avgmax"),
                                        ("map_head", None), ("registers_avg", None)])
def test_merged_duplicates_with_proportional_attention_change_nothing(kind, pool):
    """Merging a token with its exact duplicate and weighting it by size 2 must reproduce the
    unreduced model (attention, pooling heads); without proportional attention it must not."""
    model = build(kind)
    if pool:
        model.reset_classifier(model.num_classes, global_pool=pool)
    x = _paired_image(model)
    # Merge half of the pairs: a uniformly duplicated sequence would hide a missing log(size).
    r = model.patch_embed.num_patches // 4
    with torch.inference_mode():
        expected = model(x)
        vtr.patch(model, "tome", r=r, layers=[0])
        merged = model(x)
        assert vtr.report(model).tokens[1] == model.num_prefix_tokens + model.patch_embed.num_patches - r
        assert int((vtr.report(model).size == 2).sum()) == 2 * r
        vtr.unpatch(model)
        vtr.patch(model, "tome", r=r, layers=[0], prop_attn=False)
        unweighted = model(x)
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(unweighted, expected, rtol=1e-4, atol=1e-4)


def test_fused_and_eager_attention_agree_under_reduction():
    """In float64, so no float32 near-tie can flip which tokens merge between the two paths (one did on
    an AVX-512 CPU, and the rows then differed by 0.135)."""
    fused = vtr.patch(build("qk_norm").double(), "pitome", flops=0.5)
    eager = vtr.patch(build("qk_norm").double(), "pitome", flops=0.5)
    for block in eager.blocks:
        block.attn.fused_attn = False
    x = images(fused).double()
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), eager(x), rtol=1e-9, atol=1e-9)
        assert torch.equal(vtr.report(fused).assignment, vtr.report(eager).assignment)


def _check_flops(model, method, targets):
    x = images(model, batch=1)
    unreduced = count_macs(model, x).total
    for target in targets:
        vtr.patch(model, method, flops=target)
        counted = count_macs(model, x).total
        assert counted / unreduced == pytest.approx(target, rel=0.02), (target, counted / unreduced)
        assert vtr.expected_flops(model)[0] == pytest.approx(counted, rel=1e-3)
        vtr.unpatch(model)


@pytest.mark.parametrize("kind", ["tiny", "registers_avg", "map_head"])
@pytest.mark.parametrize("method", ["tome", "pitome", "random"])
def test_flops_target_lands_within_2_percent_of_an_independent_count(kind, method):
    _check_flops(build(kind, depth=12), method, (0.7, 0.5, 0.35))


def test_flops_target_on_vit_b16():
    _check_flops(build("vit_b16"), "pitome", (0.5,))


def test_metric_keys_and_x_both_work_and_differ():
    model = build("tiny")
    x = images(model)
    with torch.inference_mode():
        by_x = vtr.patch(copy.deepcopy(model), "tome", r=20)(x)
        by_keys = vtr.patch(copy.deepcopy(model), "tome", r=20, metric="keys")(x)
    assert by_x.shape == by_keys.shape and not torch.allclose(by_x, by_keys)


def test_inference_mode_autocast_and_no_nan():
    model = vtr.patch(build("layerscale"), "pitome", flops=0.5)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images(model))
    assert torch.isfinite(out.float()).all()
    assert vtr.report(model).size.dtype == torch.float32


def test_gradients_flow_in_training_and_checkpointing_agrees():
    model = build("layerscale").train()
    for module in model.modules():  # dropout-free so both runs compute the same thing
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    vtr.patch(model, "tome", r=16)
    x = images(model)
    model(x).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert model.blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0 and model.patch_embed.proj.weight.grad.abs().sum() > 0
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().mean().backward()
    for name, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)


def test_key_padding_attn_mask_hides_padded_patches():
    model = build("tiny")
    x = images(model)
    mask = torch.ones(2, 197, dtype=torch.bool)
    mask[0, 150:] = False
    garbage = x.clone()
    garbage[0, :, 160:, :] = 100.0  # pixels of the last 4 patch rows (patches 140+), padded from 150 on
    with torch.inference_mode():
        vtr.patch(model, "tome", r=10)
        padded = model(x, attn_mask=mask)
        # Only patches 149+ are hidden, and rows 160+ of pixels are patches 140+: hide all of them.
        mask[0, 141:] = False
        a, b = model(x, attn_mask=mask), model(garbage, attn_mask=mask)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(padded[0], model(x)[0])
    with pytest.raises(ValueError, match=r"attn_mask: with token reduction vtr accepts key-padding masks"):
        model(x, attn_mask=torch.ones(2, 197, 197, dtype=torch.bool))


def test_torch_compile_fixed_schedule():
    """Dynamo captures the reduced forward (aot_eager keeps the test fast; inductor works too)."""
    model = vtr.patch(timm.create_model("vit_tiny_patch16_224", depth=2, img_size=64).eval(), "tome", r=4)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, backend="aot_eager")
        torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-4)


def _symbolic(value) -> bool:
    """A value dynamo traced symbolically: a SymInt or SymFloat, or a tensor with a symbolic dimension."""
    if isinstance(value, (torch.SymInt, torch.SymFloat)):
        return True
    return isinstance(value, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in value.shape)


def test_torch_compile_sweep_of_methods_recompiles_once_each_with_static_shapes():
    """Methods patched in turn into a model under one compiled wrapper (issue 26): each patch recompiles
    the blocks once, into a graph with static token counts. Dynamo's automatic dynamic shapes made the
    settings that changed symbolic, and with them the token counts: tracing ``query`` then took over
    three minutes instead of seconds. Every step of the sweep keeps the same tokens ([17, 13, 9]), so
    nothing else about the call changes and only the blocks recompile."""
    torch._dynamo.reset()   # dynamo remembers, per function and process-wide, which values have changed
    graphs = []

    def counting(graph, example_inputs):   # a backend: the number of symbolic values in each graph it gets
        graphs.append(sum(_symbolic(node.meta.get("example_value")) for node in graph.graph.nodes))
        return graph.forward

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=64).eval()
    compiled = torch.compile(model, backend=counting)
    x = torch.randn(2, 3, 64, 64)
    sweep = [("tome", {"r": 4}), ("tome", {"keep": [0.75, 0.67]}), ("query", {"keep": [0.75, 0.67]})]
    try:
        for step, (method, amount) in enumerate(sweep):
            vtr.patch(model, method, **amount)
            before = len(graphs)
            with torch.no_grad():
                expected = model(x)
                torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-4)
            assert vtr.report(model).tokens == [17, 13, 9], method
            new = graphs[before:]
            assert not any(new), f"{method} {amount}: new graphs with {new} symbolic values"
            assert step == 0 or len(new) == 1, f"{method} {amount}: {len(new)} new graphs, want the blocks' alone"
            vtr.unpatch(model)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("name, kwargs, message", [
    ("vit_base_patch16_rpn_224", {"depth": 2}, r"blocks\[0\] is ResPostBlock"),
    ("vit_small_patch16_18x2_224", {"depth": 2}, r"blocks\[0\] is ParallelThingsBlock"),
    ("vit_relpos_small_patch16_224", {"depth": 2}, r"cannot patch .*VisionTransformerRelPos; supported: timm"),
    ("resnet18", {}, "cannot patch .*ResNet"),
])
def test_unsupported_models_are_refused_by_name(name, kwargs, message):
    model = timm.create_model(name, **kwargs)
    with pytest.raises(vtr.UnsupportedModelError, match=message):
        vtr.patch(model, "tome", r=4)
    assert not vtr.is_patched(model)


def test_bad_patch_arguments():
    model = build("tiny")
    with pytest.raises(ValueError, match="unknown method 'tme'; choose one of: .*tome"):
        vtr.patch(model, "tme", r=4)
    with pytest.raises(ValueError, match="method 'tome' takes no option margin"):
        vtr.patch(model, "tome", r=4, margin=0.5)
    with pytest.raises(ValueError, match=r"metric must be one of \('x', 'keys'\)"):
        vtr.patch(model, "tome", r=4, metric="values")
    vtr.patch(model, "tome", r=4)
    with pytest.raises(ValueError, match=r"already patched with 'tome' \(r=4\); call vtr.unpatch"):
        vtr.patch(model, "pitome", r=4)
    with pytest.raises(NotImplementedError, match="forward_intermediates"):
        model.forward_intermediates(images(model))
    vtr.unpatch(model)
    with pytest.raises(ValueError, match="not patched"):
        vtr.unpatch(model)
    with pytest.raises(ValueError, match="not patched"):
        vtr.report(model)

# -- dropping, query and pooling methods end to end: patch, run, FLOPs, rows, gradients, unpatch --------

DROP_CASES = {
    "evit": dict(flops=0.5),
    "hired": dict(flops=0.5),
    "atf": dict(flops=0.5, layers=[0]),
    "query": dict(flops=0.5),
    "pool": dict(factor=2),
}


@pytest.fixture(scope="module")
def small_vit():
    return tiny_vit()


def run(model, x, method, rows=slice(None)):
    """Forward pass of ``x[rows]``, with a per-row query for the query method."""
    if method != "query":
        return model(x[rows])
    query = torch.randn(x.shape[0], model.embed_dim, generator=torch.Generator().manual_seed(7)).to(x.dtype)
    with vtr.conditioned(model, query[rows]):
        return model(x[rows])


def test_methods_are_registered():
    assert set(DROP_CASES) <= set(vtr.methods())


@pytest.mark.parametrize("method", DROP_CASES)
def test_patch_run_flops_rows_and_unpatch(small_vit, method):
    """In float64, so a row alone and in its batch cannot pick different tokens on a float32 near-tie."""
    model = copy.deepcopy(small_vit).double()
    x = vit_images(3).double()
    reference = model(x)
    base = count_macs(model, x).per_image
    vtr.patch(model, method, **DROP_CASES[method])
    out = run(model, x, method)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    assert vtr.report(model).tokens == vtr.expected_tokens(model)
    assert vtr.report(model).tokens[-1] < vtr.report(model).tokens[0]
    counted = count_macs(model, x).per_image
    reduced, unreduced = vtr.expected_flops(model)
    assert abs(counted / reduced - 1) < 0.02 and abs(unreduced / base - 1) < 0.02
    if "flops" in DROP_CASES[method]:
        assert abs(counted / base - DROP_CASES[method]["flops"]) < 0.02
    assert torch.equal(run(model, x, method), out)  # deterministic
    for row in range(3):  # each row's choice does not depend on the rest of the batch
        torch.testing.assert_close(run(model, x, method, slice(row, row + 1))[0], out[row], rtol=1e-4, atol=1e-5)
    vtr.unpatch(model)
    assert torch.equal(model(x), reference)


@pytest.mark.parametrize("method", DROP_CASES)
def test_gradients_reach_the_weights(small_vit, method):
    model = copy.deepcopy(small_vit).train()
    vtr.patch(model, method, **DROP_CASES[method])
    run(model, vit_images(2), method).sum().backward()
    grads = [p.grad for p in (model.patch_embed.proj.weight, model.blocks[-1].mlp.fc2.weight, model.cls_token)]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("method", DROP_CASES)
def test_vit_b16_shapes(method):
    """ViT-B/16 at 224 (197 tokens, width 768), two blocks to keep the test fast."""
    model = timm.create_model("vit_base_patch16_224", depth=2, pretrained=False).eval()
    options = dict(DROP_CASES[method])
    if method in ("evit", "hired"):   # two blocks: their default (block 1 only) cannot reach 50% of the FLOPs
        options["layers"] = [0, 1]
    vtr.patch(model, method, **options)
    with torch.no_grad():
        out = run(model, vit_images(1, size=224), method)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    assert vtr.report(model).tokens == vtr.expected_tokens(model)
