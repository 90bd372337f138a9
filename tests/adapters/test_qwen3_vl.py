"""Qwen3-VL on the Qwen-VL adapter: images and videos before the language model and inside it.

Qwen3-VL's own structure is kept, not flattened away: DeepStack adds features of several tower layers to the
visual tokens after the first language-model layers, and every such level keeps exactly the tokens the
language model's input kept (a merged token the mean of the same originals); each video frame sits between
its own timestamp tokens, and its kept tokens stay there; positions are the model's interleaved M-RoPE ones.
"""
import pytest
import torch
from torch import nn

import vtr
from vtr.adapters.vlm.sequence import last_token_attention

from qwen3_vl_models import (END, IMAGE, PATCH_VALUES, SECONDS, START, VIDEO, generate, logits, mixed_batch,
                             tiny_qwen3)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread", "unpatched")
LEARNED = {m for m in vtr.methods() if vtr.reducers.REDUCERS[m].learned}


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3()


@pytest.mark.parametrize("method, amount", [("none", {}), ("tome", {"budget": 1000}),
                                            ("fastv", {"budget": 1000, "layers": [2]})])
def test_a_budget_that_keeps_every_token_equals_the_unpatched_model(model, method, amount):
    inputs = mixed_batch().inputs()
    expected = generate(model, inputs)
    vtr.patch(model, method, **amount)
    out = generate(model, inputs)
    assert torch.equal(out.sequences, expected.sequences) and torch.equal(logits(out), logits(expected))
    report = vtr.report(model)
    assert report.kinds == ["image", "image", "image", "video"]
    assert report.image_tokens_after.tolist() == [16, 6, 9, 12]
    assert report.frame_tokens[3] == [4, 4, 4]


def _encoded(model, inputs):
    with torch.no_grad():
        image = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        video = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    return [(image.pooler_output[i], [level[i] for level in image.deepstack_features]) for i in range(3)] + \
        [(video.pooler_output[0], [level[0] for level in video.deepstack_features])]


@pytest.mark.parametrize("method", ["tome", "random"])
def test_every_deepstack_level_keeps_the_tokens_the_language_models_input_kept(model, method):
    """Reference in float64 from the report's provenance: each output token (LM input and every DeepStack level)
    is the mean of the original tokens it carries (a dropped-to token: its own)."""
    inputs = mixed_batch().inputs()
    original = _encoded(model, inputs)
    vtr.patch(model, method, budget=5)
    seen = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("mm_encoder_outputs")), with_kwargs=True)
    generate(model, inputs)
    hook.remove()
    report = vtr.report(model)
    given = seen[0]
    image, video = given["image"], given["video"]
    handed = [(image.pooler_output[i], [level[i] for level in image.deepstack_features]) for i in range(3)] + \
        [(video.pooler_output[0], [level[0] for level in video.deepstack_features])]
    assert len(given["image"].deepstack_features) == 2
    for item, ((features, levels), (out, out_levels)) in enumerate(zip(original, handed)):
        count, kept = int(report.image_tokens_before[item]), int(report.image_tokens_after[item])
        assignment = report.assignment[item, :count]
        carry = torch.zeros(kept, count, dtype=torch.float64)
        carry[assignment[assignment >= 0], torch.arange(count)[assignment >= 0]] = 1.0
        carry /= carry.sum(1, keepdim=True)
        assert out.shape[0] == kept == 5
        if method == "tome":     # ToMe's features are size-weighted means: the same means
            torch.testing.assert_close(out.double(), carry @ features.double(), atol=1e-5, rtol=0)
        for level, out_level in zip(levels, out_levels):
            torch.testing.assert_close(out_level.double(), carry @ level.double(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method, amount", [("tome", {"budget": 5}), ("fastv", {"budget": 5}),
                                            ("fastv", {"budget": 5, "layers": [2]})])
def test_a_videos_kept_tokens_stay_between_their_own_frames_timestamps(model, method, amount):
    """Row 1 holds a 3-frame video (``<t> <start> 4 tokens <end>`` per frame). Each frame's kept tokens sit in its
    own span (a frame that keeps none keeps its timestamp and markers), and each comes from its own frame."""
    inputs = mixed_batch().inputs()
    vtr.patch(model, method, **amount)
    generate(model, inputs)
    report = vtr.report(model)
    frames = report.frame_tokens[3]
    assert sum(frames) == 5
    ids = inputs["input_ids"][1]
    columns = report.kept_positions[1]
    seen = ids[columns.clamp_min(0)].masked_fill(columns < 0, -1).tolist()
    stamps = [seen.index(SECONDS + f) for f in range(3)]
    for f, start in enumerate(stamps):
        assert seen[start + 1] == START
        assert seen[start + 2:start + 2 + frames[f]] == [VIDEO] * frames[f] and seen[start + 2 + frames[f]] == END
        first = int((ids == SECONDS + f).nonzero()) + 2                  # the frame's placeholders in the caller's
        source = columns[start + 2:start + 2 + frames[f]]                # prompt: first, ..., first + 3
        assert bool(((source >= first) & (source < first + 4)).all())
    if "layers" not in amount:        # before the LM: each token takes its representative's M-RoPE position
        video = report.visual_positions[3]
        assert video.shape == (3, 5) and video[0].tolist() == sorted(video[0].tolist())


def test_the_language_model_sees_each_token_at_its_representatives_mrope_position(model):
    inputs = mixed_batch().inputs()
    vtr.patch(model, "tome", budget=5)
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True)
    generate(model, inputs)
    hook.remove()
    report = vtr.report(model)
    ids = inputs["input_ids"]
    with torch.no_grad():
        full, _ = model.model.get_rope_index(ids, inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
                                             video_grid_thw=inputs["video_grid_thw"],
                                             attention_mask=inputs["attention_mask"])
    prefill, kept = seen[0], report.kept_positions
    visual = (ids == IMAGE) | (ids == VIDEO)
    for row in range(3):            # text keeps its own position
        text = (kept[row] >= 0) & ~visual[row, kept[row].clamp_min(0)]
        assert torch.equal(prefill[1:, row, text], full[:, row, kept[row, text]])
    order = [(0, IMAGE), (0, IMAGE), (1, IMAGE), (1, VIDEO)]    # items: images, then videos
    taken = {}
    for item, (row, token) in enumerate(order):
        placeholders = (ids[row] == token).nonzero().flatten()
        n = int(report.image_tokens_before[item])
        skip = taken.get((row, token), 0)
        own = placeholders[skip:skip + n]
        taken[(row, token)] = skip + n
        assignment = report.assignment[item, :n]
        first = [int((assignment == k).nonzero()[0]) for k in range(int(report.image_tokens_after[item]))]
        expected = full[:, row, own[first]]
        assert torch.equal(report.visual_positions[item], expected)
        at = ((kept[row][:, None] == own[None]).any(1)).nonzero().flatten()   # compacted columns of this item
        assert torch.equal(prefill[1:, row, at], expected)
    assert torch.equal(seen[1][1:, :, 0], full.amax(dim=(0, 2))[None].expand(3, -1) + 1)   # decode continues


@pytest.mark.parametrize("attn, method, layers", [("sdpa", "tome", None), ("eager", "pitome", None),
                                                  ("sdpa", "fastv", [2]), ("eager", "tome", [2, 3])])
def test_each_row_of_a_left_padded_batch_equals_the_row_alone(attn, method, layers):
    model = vtr.patch(tiny_qwen3(attn), method, budget=5, layers=layers)
    data = mixed_batch()
    batched = generate(model, data.inputs())
    assert vtr.report(model).image_tokens_after.tolist() == [5, 5, 5, 5]
    for row in range(3):
        alone = generate(model, data.inputs([row]))
        torch.testing.assert_close(logits(batched)[row], logits(alone)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("layers", [None, [2]])
def test_beams_and_a_static_cache(model, layers):
    vtr.patch(model, "fastv", budget=5, layers=layers)
    data = mixed_batch()
    with torch.inference_mode():
        out = model.generate(**data.inputs(), max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    assert out.shape == (6, data.input_ids.shape[1] + 3)
    assert torch.equal(out[:, :data.input_ids.shape[1]], data.input_ids.repeat_interleave(2, dim=0))
    dynamic = generate(model, data.inputs())
    static = generate(model, data.inputs(), cache_implementation="static")
    torch.testing.assert_close(logits(static), logits(dynamic), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", sorted(set(vtr.methods()) - {"none", "pool"} - LEARNED))
def test_every_method_reduces_each_image_and_video_to_the_budget(model, method):
    in_lm_only = "before_lm" not in vtr.methods(details=True)[method].stages   # from layer 2 on (after DeepStack)
    vtr.patch(model, method, budget=5, layers=[2, 3] if in_lm_only else None)
    generate(model, mixed_batch().inputs(), max_new_tokens=1)
    assert vtr.report(model).image_tokens_after.tolist() == [5, 5, 5, 5]


def test_pool_pools_every_image_and_frame(model):
    vtr.patch(model, "pool", factor=2)
    generate(model, mixed_batch().inputs(), max_new_tokens=1)
    report = vtr.report(model)
    assert report.image_tokens_after.tolist() == [4, 2, 4, 3] and report.frame_tokens[3] == [1, 1, 1]
    assert report.size.sum(1).tolist() == [16.0, 6.0, 9.0, 12.0]


def test_last_token_attention_is_the_layers_own_with_its_q_and_k_norms():
    """In-LLM pruning ranks by the last prompt token's attention recomputed from the layer's projections: on Qwen3
    that includes the per-head q/k RMSNorms (their weights made far from 1 so leaving them out would show)."""
    model = tiny_qwen3("eager")
    layer = model.model.language_model.layers[2]
    with torch.no_grad():
        layer.self_attn.q_norm.weight.uniform_(0.2, 3.0)
        layer.self_attn.k_norm.weight.uniform_(0.2, 3.0)
    inputs = mixed_batch().inputs([1])
    seen = {}
    hook = layer.register_forward_pre_hook(lambda m, args, kwargs: seen.update(hidden=args[0] if args else
                                           kwargs["hidden_states"], rope=kwargs["position_embeddings"]),
                                           with_kwargs=True)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    hook.remove()
    cos, sin = seen["rope"]
    mine = last_token_attention(layer, seen["hidden"], cos, sin, torch.ones(seen["hidden"].shape[:2], dtype=torch.bool))
    torch.testing.assert_close(mine, out.attentions[2][:, :, -1].mean(1), atol=1e-6, rtol=0)


def test_report_and_analytic_counts(model):
    unreduced, _ = vtr.expected_flops(model)
    vtr.patch(model, "tome", budget=64)
    assert vtr.expected_tokens(model) == [256, 128, 64]      # the 16 x 16-token reference image (512 px at patch 16)
    reduced, total = vtr.expected_flops(model)
    assert total == unreduced and reduced < unreduced
    vtr.unpatch(model)
    vtr.patch(model, "tome", budget=5)
    generate(model, mixed_batch().inputs(), max_new_tokens=1)
    report = vtr.report(model)
    assert report.grids == [(1, 4, 4), (1, 2, 3), (1, 3, 3), (3, 2, 2)]
    assert report.image_tokens_before.tolist() == [16, 6, 9, 12]
    assert report.visual_tokens_after.tolist() == [10, 10, 0]
    assert (report.prefill_macs < report.prefill_macs_unreduced)[:2].all() and 0 < report.prefill_flops_saved < 1


def test_in_llm_pruning_before_deepstack_is_done_is_refused(model):
    with pytest.raises(ValueError, match=r"layers= on Qwen3-VL must be >= 2: DeepStack"):
        vtr.patch(model, "fastv", budget=4, layers=[1])
    assert not vtr.is_patched(model)


def test_unsupported_models_name_the_supported_ones(model):
    with pytest.raises(vtr.UnsupportedModelError, match="Qwen3VLForConditionalGeneration"):
        vtr.patch(model.model, "tome", budget=4)
    with pytest.raises(vtr.UnsupportedModelError, match="supported: .*Qwen3-VL"):
        vtr.patch(nn.Linear(2, 2), "tome", budget=4)


@pytest.mark.parametrize("method, amount", [("tome", {"budget": 1000}), ("fastv", {"budget": 1000, "layers": [2]})])
def test_beam_search_at_a_budget_that_keeps_everything_equals_the_unpatched_model(model, method, amount):
    data = mixed_batch().inputs()
    beams = dict(max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    with torch.inference_mode():
        expected = model.generate(**data, **beams)
        vtr.patch(model, method, **amount)
        assert torch.equal(model.generate(**data, **beams), expected)


def _with_frames(inputs: dict, order: list[int]) -> dict:
    """``inputs`` whose video's temporal patches are its patches ``order`` (e.g. [0, 0, 2]: the first shown twice)."""
    grid = inputs["video_grid_thw"][0].tolist()
    per_frame = grid[1] * grid[2]
    pixels = inputs["pixel_values_videos"].view(grid[0], per_frame, -1)[order].reshape(-1, PATCH_VALUES)
    return inputs | {"pixel_values_videos": pixels}


@pytest.mark.parametrize("frames", ["uniform", "novelty", "relevance"])
def test_frames_split_a_videos_budget_and_each_frame_keeps_its_share_in_its_own_span(model, frames):
    vtr.patch(model, "tome", budget=6, frames=frames)
    data = mixed_batch().inputs([1])
    generate(model, data, max_new_tokens=1)
    report = vtr.report(model)
    shares = report.frame_tokens[1]
    assert report.kinds == ["image", "video"] and sum(shares) == 6 and min(shares) >= 1
    seen = data["input_ids"][0, report.kept_positions[0]].tolist()
    spans = [seen[seen.index(SECONDS + f) + 2:] for f in range(3)]
    assert [span.index(END) for span in spans] == shares and all(set(s[:s.index(END)]) == {VIDEO} for s in spans)


def test_temporal_merges_a_repeated_frame_into_the_one_before_and_its_span_stays_empty(model):
    """Temporal patches 0, 0, 2: the repeat merges into the patch before it (its tokens carried by patch 0's), so
    patch 1 keeps no token; its timestamp and markers stay, with nothing between them."""
    vtr.patch(model, "none", temporal=2 / 3)
    data = _with_frames(mixed_batch().inputs([1]), [0, 0, 2])
    out = generate(model, data, max_new_tokens=1)
    report = vtr.report(model)
    assert report.frame_tokens[1] == [4, 0, 4] and report.size[1, :8].tolist() == [2.0] * 4 + [1.0] * 4
    seen = data["input_ids"][0, report.kept_positions[0]].tolist()
    assert seen[seen.index(SECONDS + 1):seen.index(SECONDS + 1) + 3] == [SECONDS + 1, START, END]
    assert torch.isfinite(logits(out)).all()
