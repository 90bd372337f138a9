"""VisionZip, DivPrune, VisPruner and FasterVLM before the language model on every VLM family vtr patches
(LLaVA, LLaVA-NeXT, Qwen2.5-VL, Qwen3-VL, Gemma 3, SmolVLM, InternVL, LLaVA-OneVision, LLaVA-NeXT-Video): batched,
each image at exactly its budget, each row of a left-padded batch what it is alone; on LLaVA the [CLS] row they
rank by is the feature layer's, computed from q/k under SDPA, the row an eager tower returns."""
from __future__ import annotations

import pytest
import torch

import vtr

from llava_models import logits, mixed_batch, tiny_llava
from test_one_file_method import FAMILIES, run

METHODS = ["visionzip", "divprune", "vispruner", "fastervlm"]


# Every family gives them the tower's attention at its feature layer: the [CLS] row (LLaVA, LLaVA-NeXT, NeXT-Video's
# CLIP, InternViT) or the attention each token receives (Qwen-VL; the SigLIP towers of LLaVA-OneVision, Gemma 3 and
# SmolVLM: vtr.adapters.vlm.tower_attention, tested in test_tower_attention).
CASES = [(m, f) for m in METHODS for f in FAMILIES]


@pytest.mark.parametrize("method, family", CASES)
def test_runs_before_the_lm_on_every_family_batched_and_row_by_row(family, method):
    build, rows, num_rows = FAMILIES[family]
    model = vtr.patch(build(), method, budget=4)
    batched = run(model, rows(model))
    report = vtr.report(model)
    assert report.image_tokens_after.tolist() == [min(4, n) for n in report.image_tokens_before.tolist()]
    assert (report.image_tokens_before > 4).any()
    for row in range(num_rows):
        alone = run(model, rows(model, row))
        torch.testing.assert_close(logits(batched)[row], logits(alone)[0], atol=1e-5, rtol=0)
    vtr.unpatch(model)


def eager_cls_row(pixels: torch.Tensor) -> torch.Tensor:
    """The head-mean [CLS] row of LLaVA's feature layer (-2) over the patches, from an eager tower's own
    attention weights (same weights as :func:`tiny_llava`'s)."""
    eager = tiny_llava(attn="eager")
    with torch.no_grad():
        out = eager.model.vision_tower(pixels, output_attentions=True)
    return out.attentions[-2][:, :, 0, 1:].mean(dim=1)


@pytest.mark.parametrize("method, dominant", [("fastervlm", 4), ("vispruner", 2), ("visionzip", 3)])
def test_on_llava_the_important_tokens_are_the_feature_layers_cls_top_k(method, dominant):
    """budget 4: FasterVLM keeps the top 4, VisPruner's important half the top 2, VisionZip's dominant 3 (+ 1
    contextual token carrying the rest)."""
    ids, mask, pixels = mixed_batch()
    model = vtr.patch(tiny_llava(), method, budget=4)     # SDPA: the row comes from the layer's q and k
    run(model, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels))
    report = vtr.report(model)
    cls_row = eager_cls_row(pixels)
    for image in range(3):
        kept = report.assignment[image]
        carries = kept[kept >= 0].bincount(minlength=4)                        # originals per output token
        single = {i for i, d in enumerate(kept.tolist()) if d >= 0 and carries[d] == 1}   # kept as they were
        top = set(cls_row[image].topk(dominant).indices.tolist())
        assert top <= single, (image, top, single)
        if method != "visionzip":
            assert len(single) == 4 and int((kept >= 0).sum()) == 4            # the others dropped
        else:
            assert int((kept >= 0).sum()) == 16                                # the contextual token carries the rest
    vtr.unpatch(model)


def test_on_towers_they_reduce_once_at_the_last_block():
    """On a ViT tower the default step is the last block (the layer a VLM reads); flops= that needs more is out
    of reach with the layers named."""
    import timm
    model = timm.create_model("vit_tiny_patch16_224", depth=4, img_size=64, pretrained=False).eval()
    for method in METHODS:
        vtr.patch(model, method, keep=0.25)
        with torch.no_grad():
            model(torch.randn(2, 3, 64, 64))
        assert vtr.report(model).tokens == [17] * 4 + [5]
        vtr.unpatch(model)
        with pytest.raises(ValueError, match=r"flops=0.5 is out of reach .* only layers \[3\] reduce"):
            vtr.patch(model, method, flops=0.5)


# -- Qwen-VL: no [CLS] token, the attention each token receives in the tower's last block ---------------------

def eager_received(model, pixels: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
    """Per image, the attention each merged token receives in the last vision block (mean over heads and queries,
    its 2x2 patches summed), in the tower's output order: from the eager attention weights themselves, and the
    window order read off the block's input (which patch-embedding row each of its rows is)."""
    from transformers import AttentionInterface
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import eager_attention_forward

    visual, last, seen, embedded, entered = model.model.visual, model.model.visual.blocks[-1].attn, [], [], []

    def recording(module, *args, **kwargs):
        out, weights = eager_attention_forward(module, *args, **kwargs)
        if module is last:
            seen.append(weights[0].mean(dim=0).mean(dim=0))                # [n]: mean over heads, then queries
        return out, weights

    AttentionInterface.register("vtr_test_recording", recording)
    visual.config._attn_implementation = "vtr_test_recording"
    hooks = [visual.patch_embed.register_forward_hook(lambda m, a, out: embedded.append(out)),
             visual.blocks[0].register_forward_pre_hook(lambda m, args: entered.append(args[0]))]
    try:
        with torch.no_grad():
            visual(pixels, grid_thw=grid_thw)
    finally:
        for hook in hooks:
            hook.remove()
        visual.config._attn_implementation = "sdpa"
    per_patch = torch.cat(seen)                                                   # block (window) order
    source = (entered[0][:, None, :] == embedded[0][None, :, :]).all(-1).float().argmax(dim=1)   # raster patch
    raster = torch.zeros_like(per_patch).index_add_(0, source, per_patch)
    per_token = raster.view(-1, 4).sum(dim=1)
    return list(per_token.split((grid_thw.prod(-1) // 4).tolist()))


@pytest.mark.parametrize("qwen", ["qwen2.5-vl", "qwen2-vl"])
def test_on_qwen_fastervlm_keeps_the_tokens_that_receive_most_attention(qwen):
    from qwen_vl_models import mixed_batch as qwen_batch, tiny_qwen, tiny_qwen2
    model = (tiny_qwen if qwen == "qwen2.5-vl" else tiny_qwen2)()
    inputs = qwen_batch().inputs()
    reference = eager_received(model, inputs["pixel_values"], inputs["image_grid_thw"])
    vtr.patch(model, "fastervlm", budget=4)
    run(model, inputs)
    report = vtr.report(model)
    for image, received in enumerate(reference):
        kept = set((report.assignment[image, :len(received)] >= 0).nonzero()[:, 0].tolist())
        assert kept == set(received.topk(4).indices.tolist()), image
    vtr.unpatch(model)
    assert not any(type(h).__name__ == "KeepReceived" for m in model.modules() for h in m._forward_hooks.values())


@pytest.mark.parametrize("family, setting, why", [
    ("llava-onevision", {"vision_feature_layer": [-2, -1]},
     r"attention_received: vision_feature_layer selects the embeddings or several layers.*; cls_attention: its SigLIP "
     r"tower has no \[CLS\] token"),
    ("internvl", {"vision_feature_select_strategy": "full"},
     r"attention_received: InternViT has a \[CLS\] token.*; cls_attention: the features are not one attention "
     r"layer's patches")])
@pytest.mark.parametrize("method", ["visionzip", "vispruner", "fastervlm"])
def test_features_from_no_single_attention_layer_are_a_clear_error(family, setting, why, method):
    """Where the language model's features are not one attention layer's patches (several layers concatenated,
    InternVL keeping its [CLS] feature), there is no row to give: these methods refuse at patch time rather than
    rank by something their papers never used, naming both signals and why each is missing."""
    build, rows, _ = FAMILIES[family]
    model = build()
    for key, value in setting.items():
        setattr(model.config, key, value)
    with pytest.raises(vtr.adapters.UnsupportedModelError,
                       match=rf"method '{method}' needs one of attention_received, cls_attention and the \w+ adapter "
                             rf"offers none before the language model \({why}"):
        vtr.patch(model, method, budget=4)     # at patch time, not on the first call
    assert not vtr.is_patched(model)


@pytest.mark.parametrize("method", ["visionzip", "vispruner", "fastervlm"])
def test_methods_of_the_tower_refuse_in_llm_layers(method):
    """Inside the language model the only attention row is the last prompt token's (FastV's signal): these methods,
    whose ``stages`` are the tower and before the LM, refuse layers= instead of quietly becoming FastV."""
    with pytest.raises(ValueError, match=rf"method '{method}' applies in the vision tower and before the language "
                                         r"model, not inside the language model: leave out layers="):
        vtr.patch(tiny_llava(), method, budget=4, layers=[1])


def test_divprune_runs_inside_the_lm_too():
    """DivPrune's code takes the LLM layer to prune at (its LAYER_INDEX; its runs use 0, before the LLM): with
    layers= it compares the hidden states of that layer."""
    ids, mask, pixels = mixed_batch()
    model = vtr.patch(tiny_llava(), "divprune", budget=4, layers=[1])
    run(model, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels))
    assert vtr.report(model).visual_tokens_after.tolist() == [8, 4, 0]
    vtr.unpatch(model)


def test_on_llava_visionzip_merges_by_the_feature_layers_keys():
    """Each merged token joins the target whose feature-layer key (head mean, as VisionZip's code) is most similar,
    not the one whose projected feature is: the two differ on these images, and the report follows the keys."""
    ids, mask, pixels = mixed_batch()
    model = tiny_llava()
    attention = model.model.vision_tower.encoder.layers[0].self_attn   # feature layer -2 of 2
    keys, projected = [], []
    hooks = [attention.k_proj.register_forward_hook(lambda m, a, out: keys.append(out)),
             model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: projected.append(out))]
    vtr.patch(model, "visionzip", budget=8, contextual=0.5)          # 4 dominant, 4 targets, 8 merged
    run(model, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels))
    for hook in hooks:
        hook.remove()
    report = vtr.report(model)
    head_mean = keys[0].view(3, 17, 4, -1).mean(dim=2)[:, 1:]
    cls_row = eager_cls_row(pixels)
    differ = 0
    for image in range(3):
        assignment = report.assignment[image]
        dominant = set(cls_row[image].topk(4).indices.tolist())
        rest = [i for i in range(16) if i not in dominant]
        targets = rest[0::3][:4]                                   # step 12 // 4, as the code
        merged = [i for i in rest if i not in targets]
        expected = {}
        for name, vectors in (("keys", head_mean[image]), ("projected", projected[0][image])):
            unit = torch.nn.functional.normalize(vectors.double(), dim=-1)
            expected[name] = {m: targets[int((unit[targets] @ unit[m]).argmax())] for m in merged}
        assert all(assignment[m] == assignment[t] for m, t in expected["keys"].items()), image
        assert len(set(assignment[targets].tolist())) == 4
        differ += expected["keys"] != expected["projected"]
    assert len(merged) == 8 and differ > 0
    vtr.unpatch(model)


def test_on_llava_next_video_fastervlm_keeps_the_top_cls_attention_of_each_frame_and_image():
    """Videos: each pooled token carries its 2x2 window's CLS attention, each frame keeps its share (1 of budget 4
    over 4 frames) by it. Images: each packed token the CLS attention of its patch (newlines 0)."""
    from transformers import LlavaNextVideoForConditionalGeneration
    from llava_video_models import ROWS, inputs as video_inputs, tiny_next_video
    from vtr.adapters.llava.common import layout

    model = tiny_next_video()
    eager = LlavaNextVideoForConditionalGeneration._from_config(model.config, attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    data = video_inputs(model, ROWS)

    def cls_row(pixels):
        with torch.no_grad():
            out = eager.model.vision_tower(pixels, output_attentions=True)
        return out.attentions[-2][:, :, 0, 1:].mean(dim=1)                   # [pictures, 16]

    videos = data["pixel_values_videos"]
    frames = cls_row(videos.flatten(0, 1)).view(len(videos), -1, 1, 4, 4)
    per_frame = torch.nn.functional.avg_pool2d(frames.flatten(0, 1), 2).view(len(videos), -1, 4)   # [V, F, 4]
    geometry = layout(model, data["image_sizes"][0].tolist())
    parts = cls_row(data["pixel_values"][0, :geometry.num_crops + 1]).flatten()
    packed = torch.where(geometry.source >= 0, parts[geometry.source.clamp_min(0)], -1.0)

    vtr.patch(model, "fastervlm", budget=4)
    run(model, data)
    report = vtr.report(model)
    for video in range(len(videos)):                                         # items: the images, then the videos
        kept = (report.assignment[1 + video, :16] >= 0).view(-1, 4)
        assert torch.equal(kept.nonzero()[:, 1], per_frame[video].argmax(dim=1))
    kept = set((report.assignment[0, :geometry.num_tokens] >= 0).nonzero()[:, 0].tolist())
    assert kept == set(packed.topk(4).indices.tolist())
    vtr.unpatch(model)


def test_on_qwen_the_received_attention_is_counted_in_the_reducer_macs():
    """fastervlm decides for free given the signal (no [CLS] row, nothing fused); the report counts the signal's own
    pass: the q . k of every patch pair of each image in the last block (64, 24, 36 patches, width 32)."""
    from qwen_vl_models import mixed_batch as qwen_batch, tiny_qwen
    model = vtr.patch(tiny_qwen(), "fastervlm", budget=4)
    run(model, qwen_batch().inputs())
    assert vtr.report(model).reducer_macs == (64 ** 2 + 24 ** 2 + 36 ** 2) * 32
