"""open_clip adapter: exact at zero reduction, unpatch, fast path kept, FLOPs, conditioning, errors.

What a patched model is as a PyTorch model (threads, a thread's own query, no autograd state,
activation checkpointing, block hooks, pickle / deepcopy): tests/adapters/test_ordinary_model.py."""
import pytest
import torch
import open_clip
from hypothesis import given, settings, strategies as st
from open_clip.transformer import VisionTransformer
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import vtr
from vtr.adapters import open_clip_vit
from vtr.core import run as runs
from vtr.tools.profile import count_macs

from conftest import (assert_kept_top_k_by_projected_cosine, check_text_conditioning, float64_projection, kept_positions,
                      probe, signal_probe, spy_steps)

TINY = dict(image_size=32, patch_size=4, width=32, layers=4, heads=4, mlp_ratio=2.0, output_dim=16)
TOWERS = {
    "default": {},
    "qk_norm": {"qk_norm": True},
    "custom_norms": {"scale_heads": True, "scale_attn": True, "scale_fc": True, "scale_attn_inner": True,
                     "ls_init_value": 0.1},
    "avg": {"pool_type": "avg"},
    "avg_ln_after": {"pool_type": "avg", "final_ln_after_pool": True},
    "tokens": {"output_tokens": True},
    "attn_pool": {"attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 2},
    "parallel": {"attentional_pool": "parallel", "attn_pooler_heads": 2, "output_dim": 32},
    "cascade": {"attentional_pool": "cascade", "attn_pooler_queries": 5, "attn_pooler_heads": 2, "output_dim": 32},
}


def tiny_tower(**overrides) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(**(TINY | overrides)).eval()


def tiny_clip(**vision_overrides) -> open_clip.CLIP:
    """A whole CLIP model from configs (CLIPVisionCfg fields; qk_norm=True builds the custom block)."""
    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=4, width=32, head_width=8, layers=3, mlp_ratio=2.0) | vision_overrides
    text = dict(context_length=8, vocab_size=64, width=32, heads=4, layers=2)
    return open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()


def images(batch=2, size=32, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def same(a, b) -> bool:
    if isinstance(a, tuple):
        return all(torch.equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


class WithGrad(nn.Module):
    """Counts what MHA computes: with grad enabled MHA leaves its fused fast path (which torch's
    FlopCounterMode cannot see) for the SDPA path that vtr.tools.profile counts."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        with torch.enable_grad():
            return self.fn(x)


@pytest.fixture(scope="module")
def vit_b32():
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    return model


@pytest.mark.parametrize("kind", sorted(TOWERS))
@pytest.mark.parametrize("metric", ["x", "keys"])
def test_exact_at_zero_reduction(kind, metric):
    tower = tiny_tower(**TOWERS[kind])
    x = images()
    with torch.no_grad():
        reference = tower(x)
        vtr.patch(tower, "none", metric=metric)
        assert same(tower(x), reference)
        vtr.patch(vtr.unpatch(tower), "tome", r=0, metric=metric)
        assert same(tower(x), reference)
        vtr.unpatch(tower)


def test_vit_b32_exact_and_flops(vit_b32):
    x = images(1, 224)
    with torch.no_grad():
        reference = vit_b32.encode_image(x)
        vtr.patch(vit_b32, "none")
        assert torch.equal(vit_b32.encode_image(x), reference)
        vtr.unpatch(vit_b32)
    base = count_macs(WithGrad(vit_b32.encode_image), x).per_image
    assert base == pytest.approx(4.41e9, rel=0.01)   # open_clip's own profile table
    vtr.patch(vit_b32, "tome", flops=0.5)
    reduced = count_macs(WithGrad(vit_b32.encode_image), x).per_image
    assert abs(reduced / base - 0.5) < 0.02
    vtr.unpatch(vit_b32)
    with torch.no_grad():
        assert torch.equal(vit_b32.encode_image(x), reference)


@pytest.mark.parametrize("kind", ["default", "qk_norm", "attn_pool", "avg"])
@pytest.mark.parametrize("method,target", [("tome", 0.5), ("pitome", 0.6), ("random", 0.4)])
def test_flops_target(kind, method, target):
    tower = tiny_tower(**TOWERS[kind])
    x = images(1)
    base = count_macs(WithGrad(tower), x).per_image
    assert base == pytest.approx(open_clip_vit.OpenClipViT().cost(tower).unreduced(), rel=1e-6)
    vtr.patch(tower, method, flops=target)
    counted = count_macs(WithGrad(tower), x).per_image
    assert abs(counted / base - target) < 0.02
    assert counted == pytest.approx(vtr.expected_flops(tower)[0], rel=1e-6)


@pytest.mark.parametrize("kind", ["default", "qk_norm", "attn_pool"])
def test_unpatch_restores_everything(kind):
    tower = tiny_tower(**TOWERS[kind])
    x = images()
    keys = list(tower.state_dict())
    with torch.no_grad():
        reference = tower(x)
        vtr.patch(tower, "tome", r=6, metric="keys")
        assert list(tower.state_dict()) == keys
        reduced = tower(x)
        assert not torch.allclose(reduced, reference)
        assert vtr.report(tower).tokens == [65, 59, 53, 47, 41]
        vtr.unpatch(tower)
        assert type(tower) is VisionTransformer and not hasattr(tower, "_vtr")
        assert all(not m._forward_hooks for m in tower.modules())
        assert not any(type(m).__name__.startswith("Vtr") or any(k.startswith("_vtr") for k in vars(m))
                       for m in tower.modules())
        assert torch.equal(tower(x), reference)


class AtenLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("metric,fused", [("x", 3), ("keys", 2)])
def test_unreduced_layers_keep_the_fused_fast_path(metric, fused):
    tower = tiny_tower()
    vtr.patch(tower, "tome", r=8, layers=[2], metric=metric)
    with torch.no_grad(), AtenLog() as log:
        tower(images())
    # Layers 0-1 (and 2, unless its reducer needs keys) attend with MHA's fused kernel; layer 3 sees
    # merged tokens and attends through SDPA with the log(size) mask.
    assert log.ops.count("aten._native_multi_head_attention") == fused
    assert log.ops.count("aten._scaled_dot_product_flash_attention_for_cpu") == 4 - fused


def test_mha_reimplementation_matches_the_module():
    attn = tiny_tower().transformer.resblocks[0].attn
    h = torch.randn(2, 9, 32)
    ours, q, k = open_clip_vit._mha_attention(attn, h, None)
    with torch.no_grad():
        fast = attn(h, h, h, need_weights=False)[0]
    slow = attn(h, h, h, need_weights=False)[0]   # grad enabled: MHA's slow path
    assert torch.allclose(ours, fast, atol=1e-6) and torch.allclose(ours, slow, atol=1e-6)
    assert q.shape == k.shape == (2, 4, 9, 8)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 4), min_size=2, max_size=8), seed=st.integers(0, 2**16))
def test_proportional_attention_equals_attention_over_copies(sizes, seed):
    """A token of size s attends and is attended to like s copies of itself (both block kinds)."""
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(1, len(sizes), 32, generator=generator, dtype=torch.float64)
    size = torch.tensor([sizes], dtype=torch.float64)
    copies = h.repeat_interleave(size[0].long(), dim=1)
    first = torch.cumsum(size[0].long(), 0) - size[0].long()
    for kind in ("default", "qk_norm"):
        attn = tiny_tower(**TOWERS[kind]).double().transformer.resblocks[0].attn
        with torch.no_grad():
            if kind == "default":
                merged = open_clip_vit._mha_attention(attn, h, size.log()[:, None, None])[0]
                expanded = attn(copies, copies, copies, need_weights=False)[0]
            else:
                merged = attn(h, attn_mask=size.log()[:, None, None])
                expanded = attn(copies)
        assert torch.allclose(merged, expanded[:, first], atol=1e-10)


def test_size_weighted_pooling():
    """Merging the patch tokens of an image where all are equal changes no pooled output."""
    for kind in ("avg", "attn_pool"):
        tower = tiny_tower(**TOWERS[kind])
        state = vtr.TokenState.start(torch.randn(1, 5, 32), 1)
        state = state.with_x(torch.cat([state.x[:, :1], state.x[:, 1:2].expand(1, 4, 32)], 1))
        dest = torch.tensor([[0, 1, 1, 2, 2]])
        merged = state.reduce(dest, 3)
        vtr.patch(tower, "none")
        with torch.no_grad():
            with runs.opened(tower._vtr) as run:       # the pass's run, ending with these tokens
                run.begin(merged, 0)
                pooled = tower._pool(merged.x)[0]
            with runs.opened(tower._vtr) as run:
                run.begin(state, 0)
                unmerged = tower._pool(state.x)[0]
        vtr.unpatch(tower)
        assert torch.allclose(pooled, unmerged, atol=1e-6)


@pytest.mark.parametrize("vision", [{}, {"qk_norm": True, "ls_init_value": 0.1}], ids=["default", "custom"])
def test_image_text_similarity_with_reduced_tower(vision):
    model = tiny_clip(**vision)
    x, text = images(3), torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        text_before = model.encode_text(text)
        vtr.patch(model, "tome", flops=0.5)
        image_features, text_features, logit_scale = model(x, text)[:3]
        assert torch.equal(text_features, torch.nn.functional.normalize(text_before, dim=-1))
        assert image_features.shape == (3, 16)
        assert vtr.report(model).tokens[-1] < vtr.report(model).tokens[0]
        logits = logit_scale * image_features @ text_features.t()
        assert torch.allclose(logits, vtr.clip.zero_shot(model, x, text_before, condition=False), atol=1e-5)
    vtr.unpatch(model)
    assert type(model.visual) is VisionTransformer and not hasattr(model, "_vtr")


def test_batched_conditioning_with_a_query_per_image():
    model = tiny_clip()
    x = images(2)
    text = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    with probe() as reducer, torch.no_grad():
        queries = model.encode_text(text)                                # [2, 16]: one query per image
        vtr.patch(model, "query_probe", keep=0.5, layers=[1])
        with vtr.clip.text_query(model, queries, per_image=True):
            batched = model.encode_image(x)
            assignment = vtr.report(model).assignment
        seen = reducer.seen[-1]
        assert torch.equal(seen.query, queries)
        assert seen.query_projection(torch.randn(2, 5, 32)).shape == (2, 5, 16)
        for row in range(2):
            with vtr.conditioned(model, queries[row:row + 1]):
                alone = model.encode_image(x[row:row + 1])
            assert torch.allclose(alone[0], batched[row], atol=1e-5)
            assert torch.equal(vtr.report(model).assignment[0], assignment[row])
        with vtr.conditioned(model, queries.flip(0)):
            model.encode_image(x)
        assert not torch.equal(vtr.report(model).assignment, assignment)   # the query changes the kept set
        vtr.unpatch(model)


def test_token_projection_is_the_pooled_embedding():
    model = tiny_clip()
    vtr.patch(model, "none")
    final = []
    model.visual.transformer.resblocks[-1].register_forward_hook(lambda module, args, output: final.append(output))
    with torch.no_grad():
        features = model.encode_image(images())
        assert torch.allclose(model.visual.project_tokens(final[0])[:, 0], features, atol=1e-6)
    vtr.unpatch(model)


def test_zero_shot_conditions_on_every_class_prompt():
    model = tiny_clip()
    classes = torch.randint(0, 64, (5, 8), generator=torch.Generator().manual_seed(4))
    with probe() as reducer, torch.no_grad():
        class_features = model.encode_text(classes)
        vtr.patch(model, "query_probe", keep=0.5)
        logits = vtr.clip.zero_shot(model, images(3), class_features)
        assert logits.shape == (3, 5)
        query = reducer.seen[0].query
        assert query.shape == (3, 5, 16) and torch.equal(query[2], class_features)
        assert runs.query_of(model._vtr) is None                         # the condition ends with the call
        vtr.unpatch(model)


def test_bad_inputs_have_clear_errors():
    model = tiny_clip()
    with pytest.raises(vtr.UnsupportedModelError, match="text tower"):
        text_tower = open_clip.transformer.TextTransformer(context_length=8, vocab_size=64, width=32, heads=4, layers=1)
        vtr.patch(text_tower, "tome", r=2)
    with pytest.raises(vtr.UnsupportedModelError, match="scaled cosine"):
        vtr.patch(tiny_tower(scaled_cosine_attn=True), "tome", r=2)
    resnet = open_clip.modified_resnet.ModifiedResNet(layers=(1, 1, 1, 1), output_dim=16, heads=2, image_size=64,
                                                      width=8)
    with pytest.raises(vtr.UnsupportedModelError, match="ViT image towers"):
        vtr.patch(resnet, "tome", r=2)
    with probe():
        vtr.patch(model, "query_probe", keep=0.5)
        with pytest.raises(ValueError, match="query width must be 16"):
            with vtr.clip.text_query(model, torch.randn(3, 32)):
                model.encode_image(images())
        with pytest.raises(ValueError, match="one row per image"):
            with vtr.conditioned(model, torch.randn(3, 16)):
                model.encode_image(images(2))
        with pytest.raises(ValueError, match="already patched"):
            vtr.patch(model.visual, "tome", r=2)
        vtr.unpatch(model)
    attn_pool = tiny_tower(**TOWERS["attn_pool"])
    with probe():
        vtr.patch(attn_pool, "query_probe", keep=0.5)
        with pytest.raises(ValueError, match="cannot be conditioned"):
            with vtr.conditioned(attn_pool, torch.randn(2, 16)):
                attn_pool(images())
        vtr.unpatch(attn_pool)


@pytest.mark.parametrize("kind", ["default", "qk_norm"])
def test_cls_attention_is_row_zero_of_the_full_attention(kind):
    """The CLS row handed to reducers equals the eager attention's row 0 (head mean), and the block
    computes it without eager attention."""
    tower = tiny_tower(**TOWERS[kind])
    x = images()
    block = tower.transformer.resblocks[0]
    with torch.no_grad():
        h = block.ln_1(tower._embeds(x))
        if kind == "default":
            full = block.attn(h, h, h, need_weights=True)[1]                       # [B, N, N], head mean
        else:
            attn = block.attn
            q, k, _ = torch.nn.functional.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
            q, k = (attn.ln_q(t.view(2, 65, 4, 8).transpose(1, 2)) for t in (q, k))
            full = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1).mean(1)
        with signal_probe() as reducer:
            vtr.patch(tower, "signal_probe", r=4, layers=[0])
            tower(x)
            vtr.unpatch(tower)
            seen = reducer.seen[0]
    assert torch.allclose(seen.cls_attention, full[:, 0], atol=1e-6)
    assert seen.grid == (8, 8) and seen.layer == 0 and seen.num_layers == 4


# -- the real "query" reducer: tokens reach the text's space through the tower's ln_post and proj ----

CLIP_KINDS = pytest.mark.parametrize("vision", [{}, {"qk_norm": True, "ls_init_value": 0.1}],
                                     ids=["default", "custom"])


def encode_texts(model, count, seed):
    return model.encode_text(torch.randint(0, 64, (count, 8), generator=torch.Generator().manual_seed(seed)))


@CLIP_KINDS
def test_query_reducer_conditions_on_text_wider_tower_than_embedding(vision):
    """The tower is 32 wide, the embedding 16 (as in every real CLIP): zero-shot and text_query run the
    real reducer, whose kept tokens follow the text and the tower's projection."""
    model = tiny_clip(**vision)
    x = images(2)
    with torch.no_grad():
        classes, texts = encode_texts(model, 5, 4), encode_texts(model, 2, 7)
        assert model.visual.transformer.width != classes.shape[-1]
        vtr.patch(model, "query", keep=0.5)
        check_text_conditioning(model, x, classes, texts, 16, model.visual.proj)
    vtr.unpatch(model)


@CLIP_KINDS
def test_query_reducer_keeps_the_patches_closest_to_the_text(vision):
    """(d) Queries made of the projected features of some object patches at the reducing layer: those
    patches are kept, and the kept set is exactly the float64 top-k by projected cosine, with a margin.
    The budget keeps as many patches as the object has, so the k-th boundary is object / background."""
    model = tiny_clip(**vision)
    x = images(2)
    objects = [[9, 10, 11, 17, 18, 19, 25, 27], [40, 41, 48, 49, 50, 56, 57, 60]]   # positions (1 = first patch)
    with torch.no_grad():
        vtr.patch(model, "query", keep=8 / 64, layers=[1], relevance_weight=1.0, fuse="drop")
        seen = spy_steps(model)
        model.encode_image(x)                                                 # no query: the layer-1 tokens
        tokens = seen[-1][0]
        query = torch.stack([model.visual.project_tokens(tokens[row, cells]) for row, cells in enumerate(objects)])
        with vtr.clip.text_query(model, query, per_image=True):               # [2, 8, 16]
            vtr.clip.image_features(model, x)
        kept = kept_positions(model)
        again, signals = seen[-1]
        assert torch.equal(again, tokens) and signals.query_projection is not None
        for row, cells in enumerate(objects):
            assert kept[row] == [0] + cells
        assert_kept_top_k_by_projected_cosine(kept, tokens, query, float64_projection(model, lambda m: m.visual))
    vtr.unpatch(model)
