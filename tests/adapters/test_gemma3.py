"""The Gemma 3 adapter: reduction on the projector's pooled tokens, before the language model.

Exact when nothing is reduced; an exact budget per image; each image's kept tokens still attend to each other
both ways in the language model (Gemma 3's bidirectional image attention survives the compaction); each row of a
left-padded batch computes what it computes alone; beams and static caches; clear errors.
"""
import pytest
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vtr

from gemma3_models import IMAGE, generate, inputs, logits, tiny_gemma3

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
LEARNED = {m for m in vtr.methods() if vtr.reducers.REDUCERS[m].learned}


@pytest.fixture(scope="module")
def model():
    return tiny_gemma3()


@pytest.fixture(autouse=True)
def unpatched(model):
    yield
    if vtr.is_patched(model):
        vtr.unpatch(model)


@pytest.mark.parametrize("method, amount", [("none", {}), ("tome", {"budget": 16}), ("random", {"budget": 1000})])
def test_a_budget_that_keeps_every_token_equals_the_unpatched_model(model, method, amount):
    expected = generate(model, inputs())
    vtr.patch(model, method, **amount)
    out = generate(model, inputs())
    assert torch.equal(out.sequences, expected.sequences) and torch.equal(logits(out), logits(expected))
    report = vtr.report(model)
    assert report.visual_tokens_before.tolist() == report.visual_tokens_after.tolist() == [32, 16, 0]
    assert report.prefill_flops_saved == pytest.approx(0.0)


def _image_blocks(report, ids):
    """Per image: (row, compacted columns holding its kept tokens), in image order."""
    blocks = []
    for image, row in enumerate(report.image_rows.tolist()):
        kept = report.kept_positions[row]
        visual = (kept >= 0) & (ids[row, kept.clamp_min(0)] == IMAGE)
        columns = visual.nonzero().flatten()
        first = sum(int(report.image_tokens_after[i]) for i in range(image) if report.image_rows[i] == row)
        blocks.append((row, columns[first:first + int(report.image_tokens_after[image])]))
    return blocks


@pytest.mark.parametrize("method", ["tome", "fastv"])
def test_a_reduced_images_tokens_still_see_each_other(model, method):
    """The mask the language model gets lets every kept token of an image attend to every other one, later ones
    included (full and sliding layers), while the text before the image does not see it; and the logits are the
    unpatched model's on the compacted prompt with its token types (an independent reference, row by row)."""
    vtr.patch(model, method, budget=5)
    masks, given = [], []
    hooks = [model.model.language_model.register_forward_pre_hook(
                 lambda module, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True),
             model.model.register_forward_pre_hook(
                 lambda module, args, kwargs: given.append(kwargs.get("mm_encoder_outputs")), with_kwargs=True)]
    data = inputs()
    batched = generate(model, data)
    for hook in hooks:
        hook.remove()
    report = vtr.report(model)
    assert report.image_tokens_after.tolist() == [5, 5, 5]
    for row, columns in _image_blocks(report, data["input_ids"]):
        for kind in ("full_attention", "sliding_attention"):
            allowed = masks[0][kind][row, 0]
            assert bool(allowed[columns[:, None], columns[None, :]].all()), kind      # both ways, within the image
            assert not bool(allowed[columns[0] - 1, columns].any())                   # <start_of_image> sees none
    features = given[0]["image"].pooler_output
    vtr.unpatch(model)
    for row in range(3):
        columns = report.kept_positions[row][report.kept_positions[row] >= 0]
        ids = data["input_ids"][row, columns][None]
        own = [i for i, r in enumerate(report.image_rows.tolist()) if r == row]
        alone = dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=(ids == IMAGE).long())
        if own:
            alone["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(
                pooler_output=features[own[0]:own[-1] + 1])}
        torch.testing.assert_close(logits(batched)[row], logits(generate(model, alone))[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn, method", [("sdpa", "tome"), ("eager", "pitome"), ("sdpa", "query")])
def test_each_row_of_a_left_padded_batch_equals_the_row_alone(attn, method):
    model = vtr.patch(tiny_gemma3(attn), method, budget=5)
    batched = generate(model, inputs())
    assert vtr.report(model).visual_tokens_after.tolist() == [10, 5, 0]
    for row in range(3):
        alone = generate(model, inputs(only=[row]))
        torch.testing.assert_close(logits(batched)[row], logits(alone)[0], atol=1e-5, rtol=0)


def test_beams_and_a_static_cache(model):
    vtr.patch(model, "tome", budget=5)
    data = inputs()
    width = data["input_ids"].shape[1]
    with torch.inference_mode():
        out = model.generate(**data, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    assert out.shape == (6, width + 3) and torch.equal(out[:, :width], data["input_ids"].repeat_interleave(2, dim=0))
    dynamic = generate(model, data)
    static = generate(model, data, cache_implementation="static")
    torch.testing.assert_close(logits(static), logits(dynamic), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", sorted(m for m, info in vtr.methods(details=True).items()
                                           if "before_lm" in info.stages
                                           and m not in {"none", "pool"} | LEARNED))
def test_every_method_reduces_each_image_to_the_budget(model, method):   # in-LM-only ones: test_gemma3_in_llm
    vtr.patch(model, method, budget=5)
    generate(model, inputs(), max_new_tokens=1)
    assert vtr.report(model).image_tokens_after.tolist() == [5, 5, 5]


def test_pool_pools_the_pooled_grid_again_and_the_report(model):
    vtr.patch(model, "pool", factor=2)
    generate(model, inputs(), max_new_tokens=1)
    report = vtr.report(model)
    assert report.image_tokens_after.tolist() == [4, 4, 4] and report.grids == [(1, 4, 4)] * 3
    assert report.size.sum(1).tolist() == [16.0] * 3 and report.image_rows.tolist() == [0, 0, 1]
    assert (report.prefill_macs < report.prefill_macs_unreduced)[:2].all()
    assert report.prefill_macs[2] == report.prefill_macs_unreduced[2]


def test_forward_with_labels_runs_on_the_compacted_prompt(model):
    vtr.patch(model, "tome", budget=4)
    data = inputs()
    with torch.inference_mode():
        out = model(**data, labels=data["input_ids"].masked_fill(data["attention_mask"] == 0, -100))
        first = generate(model, data)
    assert out.logits.shape[:2] == vtr.report(model).kept_positions.shape and torch.isfinite(out.loss)
    torch.testing.assert_close(out.logits[:, -1], logits(first)[:, 0], atol=1e-5, rtol=0)


def test_expected_counts(model):
    unreduced, _ = vtr.expected_flops(model)
    vtr.patch(model, "tome", budget=4)
    assert vtr.expected_tokens(model) == [16, 8, 4]
    reduced, total = vtr.expected_flops(model)
    assert total == unreduced and reduced < unreduced


def test_bad_settings_and_calls_are_clear_errors(model):
    with pytest.raises(ValueError, match="images only"):
        vtr.patch(model, "tome", budget=4, frames="novelty")
    with pytest.raises(ValueError, match="takes budget="):
        vtr.patch(model, "tome", r=4)
    with pytest.raises(ValueError, match="budget must be an int >= 1"):
        vtr.patch(model, "tome", budget=0)
    assert not vtr.is_patched(model)
    vtr.patch(model, "tome", budget=4)
    data = inputs()
    with pytest.raises(ValueError, match="token_type_ids must mark"):
        generate(model, data | {"token_type_ids": torch.zeros_like(data["input_ids"])})
    with pytest.raises(ValueError, match="image tokens but the 2 images"):
        generate(model, data | {"pixel_values": data["pixel_values"][:2]})


def test_unsupported_models_name_the_supported_ones(model):
    with pytest.raises(vtr.UnsupportedModelError, match="Gemma3ForConditionalGeneration"):
        vtr.patch(model.model, "tome", budget=4)
    with pytest.raises(vtr.UnsupportedModelError, match="supported: .*Gemma 3"):
        vtr.patch(nn.Linear(2, 2), "tome", budget=4)


@pytest.mark.parametrize("method, amount", [("tome", {"budget": 1000})])
def test_beam_search_at_a_budget_that_keeps_everything_equals_the_unpatched_model(model, method, amount):
    data = inputs()
    beams = dict(max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    with torch.inference_mode():
        expected = model.generate(**data, **beams)
        vtr.patch(model, method, **amount)
        assert torch.equal(model.generate(**data, **beams), expected)
