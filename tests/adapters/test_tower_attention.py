"""The vision tower's attention on the VLM towers without a kept [CLS] row (vtr.adapters.vlm.tower_attention): the
attention each patch receives (SigLIP: LLaVA-OneVision, Gemma 3, SmolVLM / Idefics3) and InternViT's [CLS] row
(InternVL), computed from the feature layer's q and k under SDPA; known answers against float64 transcriptions, each
family's pooling / pixel shuffle / packing on hand-made inputs, the pass's cost in the report and expected_flops."""
from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

import vtr
from vtr.adapters.vlm import tower_attention
from vtr.adapters.vlm.run import opened

import gemma3_models
import internvl_models
import llava_video_models
import smolvlm_models

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# -- the scores themselves: float64 transcriptions ---------------------------------------------------------------

def transcribed(q: torch.Tensor, k: torch.Tensor, heads: int, scale: float, valid: torch.Tensor) -> torch.Tensor:
    """``mean_h mean_i softmax(q_i k^T * scale)`` in float64, image by image, over the valid queries and keys only."""
    out = torch.zeros(q.shape[:2], dtype=torch.float64)
    for image in range(q.shape[0]):
        keep = valid[image].nonzero()[:, 0]
        qi = q[image, keep].double().view(len(keep), heads, -1).transpose(0, 1)       # [H, n, d]
        ki = k[image, keep].double().view(len(keep), heads, -1).transpose(0, 1)
        weights = (qi @ ki.transpose(1, 2) * scale).softmax(dim=-1)                  # [H, n, n]
        out[image, keep] = weights.mean(dim=(0, 1))
    return out


@settings(max_examples=40, deadline=None)
@given(images=st.integers(1, 3), tokens=st.integers(1, 12), heads=st.integers(1, 3), width=st.integers(1, 4),
       slice_rows=st.integers(1, 40), masked=st.booleans(), data=st.data())
def test_received_is_the_mean_over_heads_and_valid_queries_of_the_softmax(images, tokens, heads, width, slice_rows,
                                                                          masked, data):
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 10 ** 6)))
    q = torch.randn(images, tokens, heads * width, generator=generator) * 2
    k = torch.randn(images, tokens, heads * width, generator=generator) * 2
    valid = torch.ones(images, tokens, dtype=torch.bool)
    mask = None
    if masked:
        valid = torch.rand(images, tokens, generator=generator) < 0.7
        valid[:, 0] = True                                                          # each image has a real patch
        mask = valid[:, None, None, :].expand(images, 1, tokens, tokens)           # as a bidirectional mask builds it
    scale = width ** -0.5
    with mock.patch.object(tower_attention, "QUERY_ELEMENTS", slice_rows):          # queries in slices of any size
        got = tower_attention.received(q, k, heads, scale, mask)
    torch.testing.assert_close(got.double(), transcribed(q, k, heads, scale, valid), atol=1e-6, rtol=0)
    assert got.dtype == torch.float32 and bool((got[~valid] == 0).all())


def test_a_boolean_an_additive_and_no_mask_give_the_same_scores():
    q, k = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    valid = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    boolean = valid[:, None, None, :].expand(2, 1, 6, 6)
    additive = torch.zeros(2, 1, 6, 6).masked_fill(~boolean, torch.finfo(torch.float32).min)
    torch.testing.assert_close(tower_attention.received(q, k, 2, 0.5, boolean),
                               tower_attention.received(q, k, 2, 0.5, additive), atol=1e-7, rtol=0)
    torch.testing.assert_close(tower_attention.received(q[1:], k[1:], 2, 0.5, boolean[1:]),
                               tower_attention.received(q[1:], k[1:], 2, 0.5), atol=1e-7, rtol=0)


def test_cls_row_is_the_first_querys_softmax_head_mean():
    q, k = torch.randn(3, 7, 12), torch.randn(3, 7, 12)
    qh, kh = (t.double().view(3, 7, 3, 4).transpose(1, 2) for t in (q, k))
    expected = (qh @ kh.transpose(-1, -2) * 0.5).softmax(dim=-1)[:, :, 0].mean(dim=1)
    torch.testing.assert_close(tower_attention.cls_row(q, k, 3, 0.5).double(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("feature_layer, layers, index", [(-1, 4, 3), (-2, 4, 2), (4, 4, 3), (1, 4, 0), (0, 4, None),
                                                          (-5, 4, None), (5, 4, None), ([-2, -1], 4, None)])
def test_feature_layer_index(feature_layer, layers, index):
    assert tower_attention.feature_layer_index(feature_layer, layers) == index


# -- each family's map from patches to the tokens the language model reads: hand-made inputs -----------------------

def blocks(per_patch: torch.Tensor, side: int, block: int, reduce: str = "sum") -> torch.Tensor:
    """``[images, side * side]`` raster scores as ``[images, (side / block) ** 2]``, each the sum (or mean) over its
    ``block x block`` square, written out by hand."""
    images, out_side = per_patch.shape[0], side // block
    out = torch.zeros(images, out_side * out_side, dtype=per_patch.dtype)
    for r in range(out_side):
        for c in range(out_side):
            cells = [per_patch[:, (block * r + i) * side + block * c + j] for i in range(block) for j in range(block)]
            out[:, r * out_side + c] = sum(cells) / (len(cells) if reduce == "mean" else 1)
    return out


def test_gemma3_sums_the_projectors_pooling_windows():
    from vtr.adapters.gemma3 import received
    model = gemma3_models.tiny_gemma3()                                       # 8 x 8 patches pooled to 4 x 4
    per_patch = torch.arange(128, dtype=torch.float32).view(2, 64) ** 1.5
    torch.testing.assert_close(received.pooled(model, per_patch), blocks(per_patch, 8, 2))


@pytest.mark.parametrize("build", [smolvlm_models.tiny_smolvlm, smolvlm_models.tiny_idefics3])
def test_smolvlm_sums_each_pixel_shuffle_block(build):
    from vtr.adapters.smolvlm import received
    per_patch = torch.arange(128, dtype=torch.float32).view(2, 64) ** 1.5
    torch.testing.assert_close(received.shuffled(build(), per_patch), blocks(per_patch, 8, 2))


def test_internvl_drops_the_cls_column_and_sums_each_pixel_shuffle_block():
    from vtr.adapters.internvl import received
    row = torch.arange(130, dtype=torch.float32).view(2, 65) ** 1.5          # [CLS] column first, then 8 x 8 patches
    torch.testing.assert_close(received.shuffled(internvl_models.tiny_internvl(), row), blocks(row[:, 1:], 8, 2))


def fake_run(scores: torch.Tensor) -> SimpleNamespace:
    return SimpleNamespace(captured={tower_attention.KEY: [(scores, 3.0)]})


def test_onevision_packs_an_images_scores_as_its_features_newlines_scoring_zero():
    """A 56 x 112 image: its base view (4 x 4 patches), then its two crops side by side, row by row (4 patches of
    crop 0, 4 of crop 1, a newline), nothing unpadded or shrunk at this size."""
    from vtr.adapters.llava import received
    model = llava_video_models.tiny_onevision()
    views = 1 + 2                                                             # image_size_to_num_patches of 56 x 112
    per_patch = torch.arange(1, views * 16 + 1, dtype=torch.float32).view(views, 16)
    features = [torch.zeros(16 + 4 * 9, 1)]
    found, macs = received.images(model, fake_run(per_patch), {}, {"image_sizes": torch.tensor([[56, 112]])},
                                  features)
    base, crop0, crop1 = per_patch.view(views, 4, 4)
    expected = torch.cat([base.flatten()] + [torch.cat([crop0[r], crop1[r], torch.zeros(1)]) for r in range(4)])
    assert macs == 3.0 and len(found) == 1
    torch.testing.assert_close(found[0], expected)


def test_onevision_pools_a_videos_frames_as_apply_pooling_does():
    """Bilinear from 4 x 4 to 2 x 2 samples each token halfway between its 2 x 2 patches: their mean."""
    from vtr.adapters.llava import received
    model = llava_video_models.tiny_onevision()
    per_patch = torch.arange(2 * 3 * 16, dtype=torch.float32).view(6, 16) ** 1.5    # 2 videos of 3 frames
    found, _ = received.videos(model, fake_run(per_patch), {}, 2, 3)
    expected = blocks(per_patch, 4, 2, reduce="mean").view(2, 12)
    torch.testing.assert_close(torch.stack(found), expected)


def test_onevision_gives_nothing_for_a_call_that_reads_another_layer():
    from vtr.adapters.llava import received
    model = llava_video_models.tiny_onevision()
    found, macs = received.videos(model, fake_run(torch.rand(3, 16)), {"vision_feature_layer": -2}, 1, 3)
    assert found is None and macs == 3.0


# -- the patched towers: the hooks' scores against float64 transcriptions of the layer's own q and k ---------------

def recording(target, seen: list):
    """An attention function that runs SDPA and, for ``target``, records its weights in float64 (the layer's own q, k
    and mask): the transcription the hooks are checked against."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if module is target:
            logits = query.double() @ key.double().transpose(-1, -2) * scaling
            if attention_mask is not None:
                logits = logits.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool \
                    else logits + attention_mask.double()
            seen.append(logits.softmax(dim=-1))                               # [images, H, N, N]
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    return attend


def scores_and_weights(model, target, method: str, call) -> tuple[torch.Tensor, float, torch.Tensor]:
    """(the hooks' ``[images, N]`` scores, their MACs, the layer's float64 weights) of one tower ``call`` of ``model``
    patched with ``method``."""
    from transformers import AttentionInterface

    seen = []
    AttentionInterface.register("vtr_test_tower_recording", recording(target, seen))
    before = target.config._attn_implementation
    target.config._attn_implementation = "vtr_test_tower_recording"
    vtr.patch(model, method, budget=4)
    try:
        with torch.no_grad(), opened(model) as run:
            call()
            scores, macs = tower_attention.take(run)
    finally:
        vtr.unpatch(model)
        target.config._attn_implementation = before
    return scores, macs, seen[0]


TOWERS = {   # family: (build, the feature layer's attention, one tower call, the mapped reference from the weights)
    "gemma3": (gemma3_models.tiny_gemma3, lambda m: m.model.vision_tower.encoder.layers[-1].self_attn,
               lambda m: m.model.get_image_features(gemma3_models.inputs()["pixel_values"])),
    "smolvlm": (smolvlm_models.tiny_smolvlm, lambda m: m.model.vision_model.encoder.layers[-1].self_attn,
                lambda m: m.model.get_image_features(smolvlm_models.inputs()["pixel_values"])),
    "llava-onevision": (llava_video_models.tiny_onevision,
                        lambda m: m.model.vision_tower.encoder.layers[-1].self_attn,
                        lambda m: m.model.get_video_features(torch.randn(2, 4, 3, 56, 56,
                                                                         generator=torch.Generator().manual_seed(0)))),
}


@pytest.mark.parametrize("family", sorted(TOWERS))
def test_received_equals_the_float64_transcription_of_the_feature_layer(family):
    build, attention, call = TOWERS[family]
    model = build()
    target = attention(model)
    scores, macs, weights = scores_and_weights(model, target, "fastervlm", lambda: call(model))
    torch.testing.assert_close(scores.double(), weights.mean(dim=(1, 2)), atol=1e-6, rtol=0)
    images, tokens = scores.shape
    assert macs == images * tokens * tokens * target.q_proj.out_features     # every query row's q . k


def test_smolvlm_padded_patches_neither_attend_nor_receive():
    """A tile whose right three patch columns are padding (``pixel_attention_mask``): the layer's own boolean mask
    reaches the hook, and the scores are the transcription over the real patches alone (0 at padding)."""
    model = smolvlm_models.tiny_smolvlm()
    target = model.model.vision_model.encoder.layers[-1].self_attn
    pixels = smolvlm_models.inputs()["pixel_values"][:1, :2]
    pixel_mask = torch.ones(1, 2, 64, 64, dtype=torch.bool)
    pixel_mask[0, 0, :, 40:] = False
    kept = {}
    hooks = [target.q_proj.register_forward_hook(lambda m, a, out: kept.__setitem__("q", out)),
             target.k_proj.register_forward_hook(lambda m, a, out: kept.__setitem__("k", out))]
    vtr.patch(model, "vispruner", budget=4)
    try:
        with torch.no_grad(), opened(model) as run:
            model.model.get_image_features(pixels, pixel_mask)
            scores, _ = tower_attention.take(run)
    finally:
        vtr.unpatch(model)
        for hook in hooks:
            hook.remove()
    valid = torch.ones(2, 64, dtype=torch.bool)
    valid[0] = torch.arange(64) % 8 < 5
    expected = transcribed(kept["q"], kept["k"], target.num_heads, target.scale, valid)
    torch.testing.assert_close(scores.double(), expected, atol=1e-6, rtol=0)
    assert bool((scores[0, ~valid[0]] == 0).all())


def test_internvl_cls_row_equals_the_float64_transcription_of_the_feature_layer():
    model = internvl_models.tiny_internvl()
    target = model.model.vision_tower.encoder.layer[-1].attention
    pixels = internvl_models.inputs()["pixel_values"]
    scores, macs, weights = scores_and_weights(model, target, "vispruner",
                                               lambda: model.model.get_image_features(pixels))
    torch.testing.assert_close(scores.double(), weights[:, :, 0].mean(dim=1), atol=1e-6, rtol=0)
    assert macs == pixels.shape[0] * 65 * target.q_proj.out_features            # the [CLS] query's row alone


# -- end to end: FasterVLM keeps the top tokens by the mapped reference --------------------------------------------

def top_k_separated(score: torch.Tensor, k: int) -> set:
    """The ``k`` best tokens, asserting a gap to the next one far above float32 rounding (no near-tie decides)."""
    ranked = score.sort(descending=True).values
    assert float(ranked[k - 1] - ranked[k]) > 1e-5 * float(ranked[0])
    return set(score.topk(k).indices.tolist())


SHARPEN = 8.0
ITEMS = {   # family: (its test module, build, the feature layer's attention, [CLS] row rather than received)
    "gemma3": (gemma3_models, gemma3_models.tiny_gemma3, TOWERS["gemma3"][1], False),
    "smolvlm": (smolvlm_models, smolvlm_models.tiny_smolvlm, TOWERS["smolvlm"][1], False),
    "internvl": (internvl_models, internvl_models.tiny_internvl,
                 lambda m: m.model.vision_tower.encoder.layer[-1].attention, True),
}


@pytest.mark.parametrize("family", sorted(ITEMS))
def test_fastervlm_keeps_each_items_top_tokens_by_the_towers_attention(family):
    """Per image / tile of a batch: the kept tokens are the top 4 by the float64 transcription, summed over each
    token's 2 x 2 patches (by hand, :func:`blocks`)."""
    module, build, attention, cls = ITEMS[family]
    model, inputs = build(), module.inputs()
    with torch.no_grad():     # random towers attend almost uniformly: sharpen the layer so that no near-tie decides
        for projection in (attention(model).q_proj, attention(model).k_proj):
            projection.weight.mul_(SHARPEN)
    _, _, weights = scores_and_weights(model, attention(model), "fastervlm",
                                       lambda: model.model.get_image_features(inputs["pixel_values"]))
    per_patch = weights[:, :, 0, 1:].mean(dim=1) if cls else weights.mean(dim=(1, 2))
    reference = blocks(per_patch, 8, 2)
    vtr.patch(model, "fastervlm", budget=4)
    module.generate(model, inputs, max_new_tokens=1)
    report = vtr.report(model)
    vtr.unpatch(model)
    assert len(reference) == len(report.assignment) > 1
    for item, score in enumerate(reference):
        kept = set((report.assignment[item] >= 0).nonzero()[:, 0].tolist())
        assert kept == top_k_separated(score, 4), item


def test_qwen_reads_the_blocks_own_qkv_projection_once():
    """Qwen-VL's received pass reuses the last block's qkv output: the projection runs as often as unpatched."""
    from qwen_vl_models import mixed_batch, tiny_qwen
    from test_one_file_method import run
    model, inputs = tiny_qwen(), mixed_batch().inputs()
    calls = []
    model.model.visual.blocks[-1].attn.qkv.register_forward_hook(lambda *args: calls.append(1))
    run(model, inputs)
    unpatched = len(calls)
    vtr.patch(model, "fastervlm", budget=4)
    run(model, inputs)
    vtr.unpatch(model)
    assert unpatched > 0 and len(calls) == 2 * unpatched


# -- cost ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, method", [("gemma3", "fastervlm"), ("smolvlm", "visionzip"),
                                            ("internvl", "vispruner"), ("llava-onevision", "fastervlm"),
                                            ("qwen2.5-vl", "fastervlm")])
def test_expected_flops_count_the_towers_pass(family, method):
    """The scores cost a pass the tower's fused kernel does not make: expected_flops adds it for one reference image
    (every query's row; InternVL: the [CLS] row), so a method that reads it costs that much more than one that keeps
    the same tokens without it (random)."""
    from test_one_file_method import FAMILIES
    model = FAMILIES[family][0]()
    vtr.patch(model, "random", budget=4)
    plain, unreduced = vtr.expected_flops(model)
    vtr.unpatch(model)
    vtr.patch(model, method, budget=4)
    reduced, total = vtr.expected_flops(model)
    decisions = sum(model._vtr.reducer.extra_macs(n, vtr.adapters.find_adapter(model).cost(model), m)
                    for n, m in zip(vtr.expected_tokens(model)[:-1], vtr.expected_tokens(model)[1:]))
    vtr.unpatch(model)
    vision = model.config.vision_config
    if family == "qwen2.5-vl":
        patches, width = (16 * vision.spatial_merge_size) ** 2, vision.hidden_size
    else:
        side = vision.image_size[0] if isinstance(vision.image_size, list) else vision.image_size
        patch = vision.patch_size[0] if isinstance(vision.patch_size, list) else vision.patch_size
        patches, width = (side // patch) ** 2, vision.hidden_size
    tower = (patches + 1) * width if family == "internvl" else patches * patches * width
    assert total == unreduced
    assert reduced - plain == pytest.approx(tower + decisions)


@pytest.mark.parametrize("family", ["gemma3", "smolvlm", "internvl", "llava-onevision", "qwen2.5-vl"])
def test_the_hooks_pickle_and_unpatch_removes_them(family):
    import pickle
    from test_one_file_method import FAMILIES
    model = FAMILIES[family][0]()
    names = {"KeepProjection", "KeepTowerAttention", "KeepQKV", "KeepReceived"}
    hooks = lambda: [type(h).__name__ for m in model.modules() for h in m._forward_hooks.values()   # noqa: E731
                     if type(h).__name__ in names]
    vtr.patch(model, "fastervlm", budget=4)
    assert len(hooks()) == (2 if family == "qwen2.5-vl" else 3)   # q, k, the attention (Qwen: qkv, the attention)
    assert pickle.loads(pickle.dumps(model))._vtr.method == "fastervlm"
    vtr.unpatch(model)
    assert hooks() == []
