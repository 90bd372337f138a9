"""The Qwen-VL adapter (Qwen2.5-VL and Qwen2-VL): reduction after the vision merger, before the language model.

Exact when nothing is reduced; an exact budget per image whatever its size; every token the language model
sees sits at the M-RoPE position it had in the caller's prompt (a merged token at its representative's);
each row of a left-padded batch computes what it computes alone; beams and static caches; clear errors.
The ordinary-model checks (threads, pickle, deepcopy, nothing of a call left) are in test_ordinary_model.py.
"""
import pytest
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vtr

from qwen_vl_models import (IMAGE, LanguageInputs, batch, generate, logits, mixed_batch, segment_reference, tiny_qwen,
                            tiny_qwen2, video_batch, with_frames)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
BUILDERS = {"qwen2.5-vl": tiny_qwen, "qwen2-vl": tiny_qwen2}


@pytest.mark.parametrize("family", BUILDERS)
def test_a_budget_that_keeps_every_token_equals_the_unpatched_model(family):
    model = BUILDERS[family]()
    inputs = mixed_batch().inputs()
    expected = generate(model, inputs)
    for method, amount in [("none", {}), ("tome", {"budget": 16}), ("random", {"budget": 1000})]:
        vtr.patch(model, method, **amount)
        out = generate(model, inputs)
        assert torch.equal(out.sequences, expected.sequences), method
        assert torch.equal(logits(out), logits(expected)), method
        report = vtr.report(model)
        assert report.visual_tokens_before.tolist() == report.visual_tokens_after.tolist() == [22, 9, 0]
        assert report.prefill_flops_saved == pytest.approx(0.0)
        vtr.unpatch(model)


@pytest.mark.parametrize("family", BUILDERS)
def test_images_of_different_sizes_each_keep_the_budget(family):
    model = vtr.patch(BUILDERS[family](), "tome", budget=8)
    data = mixed_batch()
    inputs = data.inputs()
    out = generate(model, inputs)
    assert torch.equal(out.sequences[:, :data.input_ids.shape[1]], data.input_ids)      # the caller's prompt
    report = vtr.report(model)
    assert report.grids == [(1, 4, 4), (1, 2, 3), (1, 3, 3)] and report.kinds == ["image"] * 3
    assert report.image_tokens_before.tolist() == [16, 6, 9]
    assert report.image_tokens_after.tolist() == [8, 6, 8]           # 6 <= 8: passes untouched
    assert report.visual_tokens_after.tolist() == [14, 8, 0]
    assert report.image_rows.tolist() == [0, 0, 1]
    # Merged tokens count as what they are: sizes add up to each image's own tokens.
    assert report.size.sum(1).tolist() == [16.0, 6.0, 9.0]
    assert (report.prefill_macs < report.prefill_macs_unreduced)[:2].all()
    assert report.prefill_macs[2] == report.prefill_macs_unreduced[2]                # the text-only row
    assert 0 < report.prefill_flops_saved < 1


def _expected_positions(model, inputs, report):
    """``[B, L', 3]``-style expectation, computed here from the model's own ``get_rope_index`` on the caller's
    prompt and the report's provenance: per row, the (t, h, w) position of each column of the compacted prompt
    (a text column: its own; the k-th kept placeholder of an image: the image's first original token carried
    by its k-th output token)."""
    ids = inputs["input_ids"]
    with torch.no_grad():
        full, _ = model.model.get_rope_index(ids, inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
                                             attention_mask=inputs["attention_mask"])
    source = torch.arange(ids.shape[1]).expand_as(ids).clone()
    rows, columns = (ids == IMAGE).nonzero(as_tuple=True)
    counts = report.image_tokens_before.tolist()
    for image, (row, cols) in enumerate(zip(rows.split(counts), columns.split(counts))):
        assignment, kept = report.assignment[image, :counts[image]], int(report.image_tokens_after[image])
        first = [min(j for j in range(counts[image]) if assignment[j] == k) for k in range(kept)]
        source[row[0], cols[:kept]] = cols[first]
    kept = report.kept_positions
    expected = full.gather(2, source.gather(1, kept.clamp_min(0))[None].expand(3, -1, -1))
    return expected.masked_fill(kept[None] < 0, 0), full


@pytest.mark.parametrize("method", ["random", "tome", "pool"])
def test_the_language_model_sees_every_token_at_its_original_mrope_position(method):
    """Dropping: a kept token keeps its (t, h, w); merging and pooling: a merged token sits at the first original
    token it carries; text keeps its own position (past the image's full extent); the first generated
    token continues after the prompt's largest position."""
    model = tiny_qwen()
    inputs = mixed_batch().inputs()
    vtr.patch(model, method, **({"factor": 2} if method == "pool" else {"budget": 3}))
    seen = LanguageInputs(model)
    generate(model, inputs)
    seen.remove()
    report = vtr.report(model)
    assert report.image_tokens_after.tolist() == ([4, 2, 4] if method == "pool" else [3, 3, 3])
    expected, full = _expected_positions(model, inputs, report)
    prefill = seen.calls[0]["position_ids"]
    assert prefill.shape == (4, 3, report.kept_positions.shape[1])
    assert torch.equal(prefill[1:], expected)
    mask = (report.kept_positions >= 0).long()
    assert torch.equal(prefill[0], (mask.cumsum(1) - 1).clamp_min(0) * mask)         # 1-D text positions
    for image, positions in enumerate(report.visual_positions):   # in raster order, as the LM reads them
        assert positions.shape == (3, int(report.image_tokens_after[image]))
        rows, cols = positions[1].tolist(), positions[2].tolist()
        assert list(zip(rows, cols)) == sorted(zip(rows, cols))
    decode = seen.calls[1]["position_ids"]
    assert torch.equal(decode[1:, :, 0], full.amax(dim=(0, 2))[None].expand(3, -1) + 1)


@pytest.mark.parametrize("method", ["tome", "fastv"])
def test_generate_equals_the_unpatched_model_on_the_compacted_prompt(method):
    """Independent reference: the unpatched model, given each row's compacted prompt, the reduced features
    the patched model handed its language model and the positions computed in this test, gives the same
    logits at the prefill and every decode step."""
    model = tiny_qwen()
    data = mixed_batch()
    inputs = data.inputs()
    vtr.patch(model, method, budget=4)
    captured = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.append(kwargs.get("mm_encoder_outputs")), with_kwargs=True)
    batched = generate(model, inputs)
    hook.remove()
    report = vtr.report(model)
    expected, _ = _expected_positions(model, inputs, report)
    features = list(captured[0]["image"].pooler_output)
    vtr.unpatch(model)
    for row in range(3):
        columns = report.kept_positions[row]
        real = columns >= 0
        ids = data.input_ids[row, columns[real]][None]
        text = torch.arange(ids.shape[1])[None]
        row_inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                      "position_ids": torch.cat([text[None], expected[:, row:row + 1, real]])}
        images = [f for f, r in zip(features, report.image_rows.tolist()) if r == row]
        if images:
            row_inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=images)}
        alone = generate(model, row_inputs)
        torch.testing.assert_close(logits(batched)[row], logits(alone)[0], atol=1e-5, rtol=0)


def rows_equal_each_row_alone(model):
    """Generate the mixed batch, then each row alone: each row's logits equal its own call's. Returns the
    batched call's report."""
    data = mixed_batch()
    batched = generate(model, data.inputs())
    report = vtr.report(model)
    for row in range(3):
        alone = generate(model, data.inputs([row]))
        torch.testing.assert_close(logits(batched)[row], logits(alone)[0], atol=1e-5, rtol=0)
    return report


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["tome", "pitome", "query"])
def test_each_row_of_a_left_padded_batch_equals_the_row_alone(attn, method):
    """Rows hold two images of different sizes, one image, and text only; each row's logits (prefill and
    decode) equal the row's own call, unpadded, with its own images."""
    report = rows_equal_each_row_alone(vtr.patch(tiny_qwen(attn), method, budget=5))
    assert report.visual_tokens_after.tolist() == [10, 5, 0]


def test_beam_search_and_several_sequences_per_prompt():
    model = vtr.patch(tiny_qwen(), "tome", budget=5)
    data = mixed_batch()
    with torch.inference_mode():
        out = model.generate(**data.inputs(), max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    width = data.input_ids.shape[1]
    assert out.shape == (6, width + 3)
    assert torch.equal(out[:, :width], data.input_ids.repeat_interleave(2, dim=0))
    with torch.inference_mode():   # one beam per prompt is greedy search
        single = model.generate(**data.inputs(), max_new_tokens=3, num_beams=1, do_sample=False)
    assert vtr.report(model).visual_tokens_after.tolist() == [10, 5, 0]
    assert single.shape == (3, width + 3)


def test_static_cache_gives_the_dynamic_cache_logits():
    model = vtr.patch(tiny_qwen(), "tome", budget=5)
    inputs = mixed_batch().inputs()
    dynamic = generate(model, inputs)
    static = generate(model, inputs, cache_implementation="static")
    torch.testing.assert_close(logits(static), logits(dynamic), atol=1e-5, rtol=0)


def test_forward_runs_on_the_compacted_prompt_with_labels():
    model = vtr.patch(tiny_qwen(), "tome", budget=4)
    inputs = mixed_batch().inputs()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.inference_mode():
        out = model(**inputs, labels=labels)
        first = generate(model, inputs)
    report = vtr.report(model)
    assert out.logits.shape[:2] == report.kept_positions.shape
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.logits[:, -1], logits(first)[:, 0], atol=1e-5, rtol=0)



def test_a_decode_step_by_hand_continues_after_the_compacted_prompt():
    """forward() with pixel values, then one token on its cache without position_ids (transformers' own way for an
    unpadded prompt, from the rope_deltas the forward leaves): the step's logits are generate()'s second step."""
    model = vtr.patch(tiny_qwen(), "tome", budget=4)
    inputs = mixed_batch().inputs([0])            # one row, unpadded
    expected = generate(model, inputs)
    token = expected.sequences[:, inputs["input_ids"].shape[1]:][:, :1]
    with torch.inference_mode():
        out = model(**{k: v for k, v in inputs.items() if k != "attention_mask"}, use_cache=True)
        step = model(input_ids=token, cache=out.cache, use_cache=True)
    torch.testing.assert_close(step.logits[:, -1], logits(expected)[:, 1], atol=1e-5, rtol=0)

LEARNED = {m for m in vtr.methods() if vtr.reducers.REDUCERS[m].learned}   # refused on VLMs (issue 12)


@pytest.mark.parametrize("method", sorted(set(vtr.methods()) - {"none", "pool"} - LEARNED))
def test_every_method_reduces_qwen_images_to_the_budget(method):
    """Each registered method, fed the signals the Qwen-VL adapter has (no CLS token: CLS-attention methods
    score by feature norm), lands on the budget of every image."""
    model = vtr.patch(tiny_qwen(), method, budget=5)
    generate(model, mixed_batch().inputs())
    assert vtr.report(model).image_tokens_after.tolist() == [5, 5, 5]


@pytest.mark.parametrize("factor, kept", [(2, [4, 2, 4]), (3, [4, 1, 1])])
def test_pool_keeps_what_its_factor_leaves_of_each_images_grid(factor, kept):
    model = vtr.patch(tiny_qwen(), "pool", factor=factor)   # grids 4x4, 2x3, 3x3
    generate(model, mixed_batch().inputs())
    report = vtr.report(model)
    assert report.image_tokens_after.tolist() == kept
    assert report.size.sum(1).tolist() == [16.0, 6.0, 9.0]


def test_query_is_each_rows_text_embeddings(recording):
    cls = recording("_rec_qwen_query", {"query"})
    model = vtr.patch(tiny_qwen(), "_rec_qwen_query", budget=4)
    data = mixed_batch()
    generate(model, data.inputs())
    ids, mask = data.input_ids, data.attention_mask
    embed = model.get_input_embeddings()
    for image, row in enumerate([0, 0, 1]):
        text = ids[row][(mask[row] == 1) & (ids[row] != IMAGE)]
        torch.testing.assert_close(cls.seen[image].query[0], embed(text))
    given = torch.randn(3, 2, 64)
    cls.seen.clear()
    with vtr.conditioned(model, given):
        generate(model, data.inputs())
    for image, row in enumerate([0, 0, 1]):
        assert torch.equal(cls.seen[image].query[0], given[row])


def test_text_only_calls_pass_through():
    model = tiny_qwen()
    data = batch([[1, 5, 6], [1, 7, 8, 9, 10]])
    inputs = {"input_ids": data.input_ids, "attention_mask": data.attention_mask}
    expected = generate(model, inputs)
    vtr.patch(model, "tome", budget=4)
    out = generate(model, inputs)
    assert torch.equal(logits(out), logits(expected))
    report = vtr.report(model)
    assert report.visual_tokens_before.tolist() == report.visual_tokens_after.tolist() == [0, 0]
    assert type(report).__name__ == "QwenVLReport"


def test_expected_counts_follow_the_reference_image():
    """The analytic counts use a 16 x 16-token reference image (448 x 448 at patch 14)."""
    model = tiny_qwen()
    unreduced, _ = vtr.expected_flops(model)
    vtr.patch(model, "tome", budget=64)
    assert vtr.expected_tokens(model) == [256, 128, 64]
    reduced, total = vtr.expected_flops(model)
    assert total == unreduced and reduced < unreduced
    vtr.unpatch(model)
    vtr.patch(model, "pool", factor=4)
    assert vtr.expected_tokens(model) == [256, 16]


@pytest.mark.parametrize("amount, message", [
    ({"budget": 0}, r"budget must be an int >= 1"), ({"budget": 2.5}, r"budget must be an int >= 1"),
    ({"budget": True}, r"budget must be an int >= 1"), ({}, "needs budget="), ({"r": 4}, "takes budget="),
    ({"budget": 4, "metric": "keys"}, "metric='x'"),
])
def test_bad_amounts_are_clear_errors(amount, message):
    model = tiny_qwen()
    with pytest.raises(ValueError, match=message):
        vtr.patch(model, "tome", **amount)
    assert not vtr.is_patched(model)


def test_pool_and_none_take_no_budget():
    model = tiny_qwen()
    with pytest.raises(ValueError, match="takes factor=, not budget="):
        vtr.patch(model, "pool", budget=4)
    with pytest.raises(ValueError, match="does not reduce"):
        vtr.patch(model, "none", budget=4)


def test_unsupported_models_are_clear_errors():
    model = tiny_qwen()
    with pytest.raises(vtr.UnsupportedModelError, match="Qwen2_5_VLForConditionalGeneration"):
        vtr.patch(model.model, "tome", budget=4)
    with pytest.raises(vtr.UnsupportedModelError, match="supported: .*Qwen2-VL, Qwen2.5-VL and Qwen3-VL"):
        vtr.patch(nn.Linear(2, 2), "tome", budget=4)


def test_a_call_without_mm_token_type_ids_derives_them_as_the_processor_does():
    """Regression (issue 19): the patched model refused a call without ``mm_token_type_ids`` that the unpatched
    Qwen2.5-VL accepts; it now derives them from ``input_ids``, so the call equals the one with them."""
    model = vtr.patch(tiny_qwen(), "tome", budget=4)
    inputs = mixed_batch().inputs()
    with_types = generate(model, inputs)
    without_types = generate(model, {k: v for k, v in inputs.items() if k != "mm_token_type_ids"})
    assert torch.equal(with_types.sequences, without_types.sequences)
    assert torch.equal(logits(with_types), logits(without_types))


def test_bad_calls_are_clear_errors():
    model = vtr.patch(tiny_qwen(), "tome", budget=4)
    inputs = mixed_batch().inputs()
    with pytest.raises(ValueError, match="mm_token_type_ids must mark"):
        generate(model, inputs | {"mm_token_type_ids": torch.zeros_like(inputs["input_ids"])})
    with pytest.raises(ValueError, match="image_grid_thw is needed"):
        generate(model, {k: v for k, v in inputs.items() if k != "image_grid_thw"})
    with pytest.raises(ValueError, match="position_ids"):
        model(**inputs, position_ids=torch.zeros(3, *inputs["input_ids"].shape, dtype=torch.long))
    with pytest.raises(ValueError, match="image tokens but the 2 images"):
        generate(model, inputs | {"pixel_values": inputs["pixel_values"][:64 + 24],
                                  "image_grid_thw": inputs["image_grid_thw"][:2]})
    with pytest.raises(ValueError, match="mm_encoder_outputs"):
        generate(model, {"input_ids": inputs["input_ids"], "mm_encoder_outputs": {"image": None}})



# -- in-LLM pruning (layers=) ---------------------------------------------------------------------------

def test_in_llm_pruning_that_keeps_every_token_equals_the_unpatched_model():
    model = tiny_qwen()
    inputs = mixed_batch().inputs()
    expected = generate(model, inputs)
    vtr.patch(model, "fastv", budget=1000, layers=[1])
    out = generate(model, inputs)
    assert torch.equal(out.sequences, expected.sequences) and torch.equal(logits(out), logits(expected))
    assert vtr.report(model).image_tokens_after.tolist() == [16, 6, 9]


@pytest.mark.parametrize("method, layers, budget, stage_tokens", [
    ("fastv", [1], 5, [16, 5]),
    ("tome", [1, 2], 4, [16, 8, 4]),      # progressive: 16 -> 8 -> 4 for the largest image
])
def test_in_llm_pruning_keeps_each_images_budget(method, layers, budget, stage_tokens):
    model = vtr.patch(tiny_qwen(), method, budget=budget, layers=layers)
    generate(model, mixed_batch().inputs())
    report = vtr.report(model)
    assert report.where == f"in the language model at layer{'s' if len(layers) > 1 else ''} " + \
        ", ".join(map(str, layers))
    assert report.image_tokens_before.tolist() == [16, 6, 9]
    assert report.image_tokens_after.tolist() == [budget] * 3
    assert report.stage_tokens == stage_tokens and report.kinds == ["image"] * 3
    assert report.grids == [(1, 4, 4), (1, 2, 3), (1, 3, 3)]
    assert 0 < report.prefill_flops_saved < 1


@pytest.mark.parametrize("method, layers", [("fastv", [1]), ("fastv", [1, 2])])
def test_in_llm_pruning_equals_the_unpatched_layers_on_the_kept_tokens(method, layers):
    """Independent reference, row by row, for dropping (a kept token is one of the prompt's): the unpatched decoder
    layers, each stage's layer onwards on the columns the report says it kept plus the generated tokens, every
    token at its own M-RoPE position (``qwen_vl_models.segment_reference``), give the patched model's logits at
    the last decode step."""
    model = vtr.patch(tiny_qwen(), method, budget=4, layers=layers)
    data = mixed_batch()
    for row in range(2):
        inputs = data.inputs([row])
        out = generate(model, inputs)
        report = vtr.report(model)
        stages = {layer: columns[0][columns[0] >= 0] for layer, columns in zip(layers, report.stage_positions)}
        generated = out.sequences[0, inputs["input_ids"].shape[1]:-1]
        vtr.unpatch(model)
        expected = segment_reference(model, inputs, stages, generated)
        vtr.patch(model, method, budget=4, layers=layers)
        torch.testing.assert_close(logits(out)[0, -1], expected[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method, layers", [("fastv", [1]), ("tome", [1, 2])])
def test_in_llm_each_row_of_a_left_padded_batch_equals_the_row_alone(attn, method, layers):
    report = rows_equal_each_row_alone(vtr.patch(tiny_qwen(attn), method, budget=5, layers=layers))
    assert report.image_tokens_after.tolist() == [5, 5, 5]


def test_in_llm_pruning_with_beams_and_a_static_cache():
    model = vtr.patch(tiny_qwen(), "fastv", budget=5, layers=[1])
    data = mixed_batch()
    with torch.inference_mode():
        out = model.generate(**data.inputs(), max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    assert out.shape == (6, data.input_ids.shape[1] + 3)
    dynamic = generate(model, data.inputs())
    static = generate(model, data.inputs(), cache_implementation="static")
    torch.testing.assert_close(logits(static), logits(dynamic), atol=1e-5, rtol=0)


def test_in_llm_bad_settings_are_clear_errors():
    model = tiny_qwen()
    with pytest.raises(ValueError, match="reduces before the language model on Qwen-VL"):
        vtr.patch(model, "pool", factor=2, layers=[1])
    with pytest.raises(ValueError, match="budget as a list must give one count per layer"):
        vtr.patch(model, "fastv", budget=[4, 8], layers=[1, 2])
    with pytest.raises(ValueError, match="budget must be an int >= 1 or a list"):
        vtr.patch(model, "fastv", budget=0, layers=[1])
    with pytest.raises(ValueError, match="layers must be language-model layers"):
        vtr.patch(model, "fastv", budget=4, layers=[5])
    assert not vtr.is_patched(model)
    vtr.patch(model, "fastv", budget=4, layers=[1])
    inputs = mixed_batch().inputs()
    with pytest.raises(ValueError, match="image_grid_thw is needed"):
        generate(model, {k: v for k, v in inputs.items() if k != "image_grid_thw"})


# -- videos ------------------------------------------------------------------------------------------------

def test_videos_with_a_budget_that_keeps_every_token_equal_the_unpatched_model():
    model = tiny_qwen()
    inputs = video_batch().inputs()
    expected = generate(model, inputs)
    vtr.patch(model, "tome", budget=16, frames="novelty")
    out = generate(model, inputs)
    assert torch.equal(out.sequences, expected.sequences) and torch.equal(logits(out), logits(expected))
    assert vtr.report(model).kinds == ["image", "video", "video"]


@pytest.mark.parametrize("frames", ["uniform", "novelty", "relevance"])
def test_videos_of_different_sizes_each_keep_the_budget(frames):
    model = vtr.patch(tiny_qwen(), "tome", budget=6, frames=frames)
    data = video_batch()
    out = generate(model, data.inputs())
    assert torch.equal(out.sequences[:, :data.input_ids.shape[1]], data.input_ids)
    report = vtr.report(model)
    assert report.grids == [(1, 2, 3), (4, 2, 2), (2, 3, 2)]          # images first, then videos
    assert report.image_tokens_before.tolist() == [6, 16, 12]
    assert report.image_tokens_after.tolist() == [6, 6, 6]
    assert report.visual_tokens_after.tolist() == [12, 6]
    assert [sum(f) for f in report.frame_tokens] == [6, 6, 6]
    assert all(min(f) >= 1 for f in report.frame_tokens)              # every frame keeps a token
    assert report.size.sum(1).tolist() == [6.0, 16.0, 12.0]
    temporal = report.visual_positions[1][0].tolist()                  # the language model reads frame by frame
    assert temporal == sorted(temporal)


def test_novelty_gives_a_repeated_frame_one_token():
    """Frames 0, 0, 2, 2: the repeats are identical to the frame before (so are their features), and keep one token
    each; the new frames share the rest."""
    model = tiny_qwen()
    inputs = with_frames(video_batch().inputs(), [0, 0, 2, 2])
    with torch.no_grad():
        features = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    first = features.pooler_output[0].view(4, 4, -1)
    assert torch.equal(first[1], first[0]) and torch.equal(first[3], first[2])
    vtr.patch(model, "tome", budget=8, frames="novelty")
    generate(model, inputs)
    assert vtr.report(model).frame_tokens[1] == [3, 1, 3, 1]


def test_temporal_merges_repeated_frames_before_the_budget_split():
    model = vtr.patch(tiny_qwen(), "none", temporal=0.5)
    inputs = with_frames(video_batch().inputs(), [0, 0, 2, 2])
    generate(model, inputs)
    report = vtr.report(model)
    assert report.frame_tokens[1] == [4, 0, 4, 0]                      # each repeat merged into its frame
    assert report.size[1, :8].tolist() == [2.0] * 8
    vtr.unpatch(model)
    vtr.patch(model, "tome", budget=6, temporal=0.5)
    generate(model, inputs)
    assert vtr.report(model).frame_tokens[1] == [3, 0, 3, 0]


def test_relevance_gives_the_frame_the_query_shows_the_most_tokens():
    model = tiny_qwen()
    inputs = video_batch().inputs()
    with torch.no_grad():
        features = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    query = torch.zeros(2, 4, 64)
    query[0] = features.pooler_output[0].view(4, 4, -1)[3]            # row 0 asks about its video's last frame
    query[1] = torch.randn(4, 64)
    vtr.patch(model, "tome", budget=8, frames="relevance")
    with vtr.conditioned(model, query):
        generate(model, inputs)
    shares = vtr.report(model).frame_tokens[1]
    assert shares[3] == max(shares) and shares[3] > max(shares[:3])


def test_pool_pools_every_frame():
    model = vtr.patch(tiny_qwen(), "pool", factor=2)
    generate(model, video_batch().inputs())
    report = vtr.report(model)
    assert report.frame_tokens == [[2], [1, 1, 1, 1], [2, 2]]


def test_in_llm_pruning_of_videos_keeps_each_ones_budget():
    model = vtr.patch(tiny_qwen(), "fastv", budget=5, layers=[1])
    data = video_batch()
    batched = generate(model, data.inputs())
    report = vtr.report(model)
    assert report.kinds == ["image", "video", "video"] and report.image_tokens_after.tolist() == [5, 5, 5]
    assert report.grids == [(1, 2, 3), (4, 2, 2), (2, 3, 2)]           # (frames, rows, cols) after the merger
    assert [len(f) for f in report.frame_tokens] == [1, 4, 2]          # per frame
    assert [sum(f) for f in report.frame_tokens] == [5, 5, 5]
    for row in range(2):
        alone = generate(model, data.inputs([row]))
        torch.testing.assert_close(logits(batched)[row], logits(alone)[0], atol=1e-5, rtol=0)


def test_video_settings_are_checked():
    model = tiny_qwen()
    with pytest.raises(ValueError, match="frames must be one of uniform, novelty, relevance"):
        vtr.patch(model, "tome", budget=4, frames="motion")
    with pytest.raises(ValueError, match=r"temporal must be a fraction in \(0, 1\]"):
        vtr.patch(model, "tome", budget=4, temporal=1.5)
    with pytest.raises(ValueError, match="leave out temporal="):
        vtr.patch(model, "pool", factor=2, temporal=0.5)
    with pytest.raises(ValueError, match="leave them out with layers="):
        vtr.patch(model, "fastv", budget=4, layers=[1], frames="novelty")
