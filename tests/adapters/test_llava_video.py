"""LLaVA-OneVision and LLaVA-NeXT-Video: a budget per image and per video before the language model, split across
each video's frames, or inside it (``layers=``); exact when nothing is reduced; each row of a left-padded batch
equals the row alone; without a KV cache generate() gives what it gives with one."""
import pytest
import torch

import vtr

from llava_video_models import IMAGE, ROWS, VIDEO, VIDEO_ROWS, inputs, tiny_next_video, tiny_onevision
from qwen_vl_models import generate, logits

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
BUILDERS = {"onevision": tiny_onevision, "next-video": tiny_next_video}
IN_LLM = {"fastv-1": dict(method="fastv", layers=[1]), "tome-0-1": dict(method="tome", layers=[0, 1])}
WHERE = {"before-lm": dict(method="tome", frames="novelty"), **IN_LLM}


@pytest.mark.parametrize("where", ["before-lm", "fastv-1"])
@pytest.mark.parametrize("family", BUILDERS)
def test_a_budget_that_keeps_every_token_equals_the_unpatched_model(family, where):
    model = BUILDERS[family]()
    batch = inputs(model, ROWS)
    expected = generate(model, batch)
    vtr.patch(model, budget=1000, **WHERE[where])
    out = generate(model, batch)
    assert torch.equal(out.sequences, expected.sequences) and torch.equal(logits(out), logits(expected))
    assert vtr.report(model).kinds == ["image", "video", "video"]
    vtr.patch(vtr.unpatch(model), budget=4, **WHERE[where])
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


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("family", BUILDERS)
def test_each_row_of_a_left_padded_batch_equals_the_row_alone(family, where):
    model = vtr.patch(BUILDERS[family](), budget=5, **WHERE[where])
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
    with pytest.raises(ValueError, match="leave them out with layers="):
        vtr.patch(model, "fastv", budget=4, layers=[1], frames="novelty")
    with pytest.raises(ValueError, match="reduces before the language model on LLaVA-OneVision / NeXT-Video"):
        vtr.patch(model, "pool", factor=2, layers=[1])
    with pytest.raises(ValueError, match="layers must be language-model layers"):
        vtr.patch(model, "fastv", budget=4, layers=[2])
    with pytest.raises(ValueError, match="takes factor=, not budget="):
        vtr.patch(model, "pool", budget=4)
    assert not vtr.is_patched(model)
    vtr.patch(model, "tome", budget=4)
    batch = inputs(model, ROWS)
    with pytest.raises(ValueError, match="image_sizes"):
        generate(model, {k: v for k, v in batch.items() if k != "image_sizes"})
    vtr.patch(vtr.unpatch(model), "fastv", budget=4, layers=[1])   # in-LLM: a forward encodes the pixels itself
    with torch.no_grad():
        features = model.model.get_video_features(batch["pixel_values_videos"], return_dict=True)
    with pytest.raises(ValueError, match=r"pixel_values_videos or mm_encoder_outputs\['video'\], not both"):
        model(**batch, mm_encoder_outputs={"video": features})
    from llava_models import tiny_llava
    with pytest.raises(ValueError, match="takes no videos"):
        vtr.patch(tiny_llava(), "tome", budget=4, frames="novelty")


def test_pool_pools_video_frames_and_refuses_packed_images():
    model = vtr.patch(tiny_next_video(), "pool", factor=2)
    generate(model, inputs(model, VIDEO_ROWS))
    assert vtr.report(model).frame_tokens == [[1, 1, 1, 1]] * 2
    with pytest.raises(ValueError, match="these images' tokens form none"):
        generate(model, inputs(model, ROWS))


# -- in-LLM pruning (layers=) ---------------------------------------------------------------------------

@pytest.mark.parametrize("where", IN_LLM)
@pytest.mark.parametrize("family", BUILDERS)
def test_in_llm_pruning_keeps_each_images_and_videos_budget(family, where):
    model = vtr.patch(BUILDERS[family](), budget=5, **IN_LLM[where])
    batch = inputs(model, ROWS)
    out = generate(model, batch)
    assert torch.equal(out.sequences[:, :batch["input_ids"].shape[1]], batch["input_ids"])
    report = vtr.report(model)
    layers = IN_LLM[where]["layers"]
    assert report.where == f"in the language model at layer{'s' * (len(layers) > 1)} {', '.join(map(str, layers))}"
    assert report.image_tokens_after.tolist() == [5, 5, 5]
    assert report.visual_tokens_after.tolist() == [5, 5, 5, 0]
    assert report.stage_layers == layers and report.kinds == ["image", "video", "video"]
    # Tokens kept per frame (4 frames a video; an image is one count), 5 in all for each.
    assert report.grids[1:] == [(4, 2, 2)] * 2
    assert [len(f) for f in report.frame_tokens] == [1, 4, 4]
    assert [sum(f) for f in report.frame_tokens] == [5, 5, 5]


@pytest.mark.parametrize("where", IN_LLM)
@pytest.mark.parametrize("family", BUILDERS)
def test_in_llm_generate_without_a_cache_equals_the_cached_run(family, where):
    """use_cache=False sends the prompt (and its pixel values) and every generated token in each forward: they
    keep what the prefill decided from the prompt, so the tokens and logits are the cached run's."""
    model = vtr.patch(BUILDERS[family](), budget=5, **IN_LLM[where])
    batch = inputs(model, ROWS)
    visual = [IMAGE, VIDEO]   # a random model may generate a placeholder id, which no prompt may hold unpaired
    cached = generate(model, batch, suppress_tokens=visual)
    uncached = generate(model, batch, suppress_tokens=visual, use_cache=False)
    assert torch.equal(uncached.sequences, cached.sequences)
    torch.testing.assert_close(logits(uncached), logits(cached), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", BUILDERS)
def test_in_llm_forward_encodes_the_pixel_values_as_generate_does(family):
    """A forward with pixel values gives the logits generate()'s prefill gives (which encodes them first)."""
    model = vtr.patch(BUILDERS[family](), "fastv", budget=5, layers=[1])
    batch = inputs(model, ROWS)
    first = logits(generate(model, batch))[:, 0]
    with torch.inference_mode():
        out = model(**batch)
    assert vtr.report(model).image_tokens_after.tolist() == [5, 5, 5]
    assert out.logits.shape[:2] == vtr.report(model).kept_positions.shape
    torch.testing.assert_close(out.logits[:, -1], first, atol=1e-5, rtol=0)


def test_frame_tokens_count_each_kept_token_in_its_first_members_frame():
    from vtr.adapters.vlm.video import tokens_per_frame
    assert tokens_per_frame(torch.tensor([0, 2, 4, 7]), 2, 4) == [2, 2]
    assert tokens_per_frame(torch.tensor([0, 1]), 2, 2) == [2, 0]        # merged across frames: the first's frame
    assert tokens_per_frame(torch.tensor([0, 1, 2, 3, 4]), 2, 2) == [2, 3]   # a trailing newline: the last frame
    assert tokens_per_frame(torch.tensor([], dtype=torch.long), 2, 2) == [0, 0]
