"""LLaVA-OneVision and LLaVA-NeXT-Video: a budget per image and per video before the language model, split across
each video's frames; exact when nothing is reduced; each row of a left-padded batch equals the row alone."""
import pytest
import torch

import vtr

from llava_video_models import ROWS, VIDEO_ROWS, inputs, tiny_next_video, tiny_onevision
from qwen_vl_models import generate, logits

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
BUILDERS = {"onevision": tiny_onevision, "next-video": tiny_next_video}


@pytest.mark.parametrize("family", BUILDERS)
def test_a_budget_that_keeps_every_token_equals_the_unpatched_model(family):
    model = BUILDERS[family]()
    batch = inputs(model, ROWS)
    expected = generate(model, batch)
    vtr.patch(model, "tome", budget=1000, frames="novelty")
    out = generate(model, batch)
    assert torch.equal(out.sequences, expected.sequences) and torch.equal(logits(out), logits(expected))
    assert vtr.report(model).kinds == ["image", "video", "video"]
    vtr.patch(vtr.unpatch(model), "tome", budget=4)
    assert not torch.equal(logits(generate(model, batch)), logits(expected))
    vtr.unpatch(model)
    assert not vtr.is_patched(model) and type(model) is BUILDERS[family]().__class__
    assert torch.equal(logits(generate(model, batch)), logits(expected))


@pytest.mark.parametrize("family", BUILDERS)
@pytest.mark.parametrize("method", ["tome", "query", "fastv"])
def test_each_image_and_video_keeps_the_budget(family, method):
    model = BUILDERS[family]()
    batch = inputs(model, ROWS)
    vtr.patch(model, method, budget=6)
    out = generate(model, batch)
    assert torch.equal(out.sequences[:, :batch["input_ids"].shape[1]], batch["input_ids"])
    report = vtr.report(model)
    assert report.image_tokens_after.tolist() == [6, 6, 6]
    assert report.visual_tokens_after.tolist() == [6, 6, 6, 0]
    newline = family == "onevision"
    assert report.grids[1:] == [(4, 2, 2)] * 2
    assert [sum(f) for f in report.frame_tokens[1:]] == [6 - newline] * 2    # OneVision's newline counts in it
    assert all(min(f) >= 1 for f in report.frame_tokens[1:])


def test_onevision_keeps_each_videos_newline_last():
    model = tiny_onevision()
    batch = inputs(model, VIDEO_ROWS)
    vtr.patch(model, "tome", budget=5)
    seen = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("mm_encoder_outputs")), with_kwargs=True)
    generate(model, batch)
    hook.remove()
    videos = seen[0]["video"].pooler_output
    assert videos.shape[:2] == (2, 5)
    assert torch.equal(videos[:, -1], model.model.image_newline.expand(2, -1))


@pytest.mark.parametrize("family", BUILDERS)
def test_each_row_of_a_left_padded_batch_equals_the_row_alone(family):
    model = vtr.patch(BUILDERS[family](), "tome", budget=5, frames="novelty")
    batch = inputs(model, ROWS)
    batched = generate(model, batch)
    for row in range(len(ROWS)):
        alone = generate(model, inputs(model, ROWS, only=[row]))
        torch.testing.assert_close(logits(batched)[row], logits(alone)[0], atol=1e-5, rtol=0)


def test_temporal_merges_repeated_frames():
    model = tiny_next_video()
    batch = inputs(model, VIDEO_ROWS)
    batch["pixel_values_videos"] = batch["pixel_values_videos"][:, [0, 0, 2, 2]]
    vtr.patch(model, "none", temporal=0.5)
    generate(model, batch)
    report = vtr.report(model)
    assert report.frame_tokens[:2] == [[4, 0, 4, 0]] * 2
    assert report.image_tokens_after.tolist() == [8, 8]


def test_beam_search_keeps_the_callers_prompt():
    model = vtr.patch(tiny_onevision(), "tome", budget=5)
    batch = inputs(model, ROWS)
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    width = batch["input_ids"].shape[1]
    assert out.shape == (8, width + 3)
    assert torch.equal(out[:, :width], batch["input_ids"].repeat_interleave(2, dim=0))


def test_what_the_video_models_refuse():
    model = tiny_onevision()
    with pytest.raises(ValueError, match="in-LLM pruning .* not available on LLaVA-OneVision"):
        vtr.patch(model, "fastv", budget=4, layers=[1])
    with pytest.raises(ValueError, match="takes factor=, not budget="):
        vtr.patch(model, "pool", budget=4)
    assert not vtr.is_patched(model)
    vtr.patch(model, "tome", budget=4)
    batch = inputs(model, ROWS)
    with pytest.raises(ValueError, match="image_sizes"):
        generate(model, {k: v for k, v in batch.items() if k != "image_sizes"})
    from llava_models import tiny_llava
    with pytest.raises(ValueError, match="takes no videos"):
        vtr.patch(tiny_llava(), "tome", budget=4, frames="novelty")


def test_pool_pools_video_frames_and_refuses_packed_images():
    model = vtr.patch(tiny_next_video(), "pool", factor=2)
    generate(model, inputs(model, VIDEO_ROWS))
    assert vtr.report(model).frame_tokens == [[1, 1, 1, 1]] * 2
    with pytest.raises(ValueError, match="these images' tokens form none"):
        generate(model, inputs(model, ROWS))
