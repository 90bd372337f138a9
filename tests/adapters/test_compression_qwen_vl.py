"""Adaptive granularity on a tiny Qwen2.5-VL / Qwen2-VL: images of any size, rows independent, M-RoPE positions."""
from __future__ import annotations

import pytest
import torch

import vtr
from vtr.compression.granularity import relevance

from qwen_vl_models import END, IMAGE, START, batch, generate, logits, mixed_batch, tiny_qwen, tiny_qwen2


def run(model, inputs: dict):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("build", [tiny_qwen, tiny_qwen2])
def test_each_image_pools_its_own_grid_and_unpatch_restores(build):
    model = build()
    data = mixed_batch()
    before = run(model, data.inputs())
    with vtr.compression.forced_level(vtr.compress(model, "granularity", levels=[1, 2]), 2):
        run(model, data.inputs())
    report = vtr.report(model)
    assert report.tokens_before.tolist() == [16, 6, 9]          # 4x4, 2x3, 3x3 merged grids
    assert report.tokens_after.tolist() == [4, 2, 4]            # ceil(rows / 2) * ceil(cols / 2)
    assert report.image_rows.tolist() == [0, 0, 1] and report.levels.tolist() == [2, 2, 2]
    vtr.unpatch(model)
    assert torch.equal(run(model, data.inputs()), before)


def test_level_1_is_the_unpatched_model():
    model = tiny_qwen()
    data = mixed_batch()
    before = run(model, data.inputs())
    vtr.compress(model, "granularity", levels=[1, 2, 4])
    with vtr.compression.forced_level(model, 1):
        torch.testing.assert_close(run(model, data.inputs()), before, atol=1e-5, rtol=0)


def test_a_pooled_token_sits_at_its_windows_first_position():
    """One 4x4-token image at level 2: its four tokens carry the M-RoPE (t, h, w) positions of the tokens at (0, 0),
    (0, 2), (2, 0), (2, 2) of the caller's prompt, and the text after it keeps its own."""
    model = tiny_qwen()
    data = batch([[1, 5, ("image", 0), 7, 8]], image_grids=[(1, 8, 8)])
    inputs = data.inputs()
    full, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                         image_grid_thw=inputs["image_grid_thw"],
                                         attention_mask=inputs["attention_mask"])
    vtr.compress(model, "granularity", levels=[1, 2])
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(position_ids=kwargs["position_ids"]), with_kwargs=True)
    with vtr.compression.forced_level(model, 2):
        run(model, inputs)
    hook.remove()
    columns = (inputs["input_ids"][0] == IMAGE).nonzero()[:, 0]
    firsts = columns[torch.tensor([0, 2, 8, 10])]
    kept = vtr.report(model).kept_positions[0]
    source = [int(c) for c in kept]
    expected = torch.cat([full[:, 0, :columns[0]], full[:, 0, firsts], full[:, 0, columns[-1] + 1:]], dim=1)
    assert source[:3] == [0, 1, 2] and len(source) == len(inputs["input_ids"][0]) - 12
    assert torch.equal(seen["position_ids"][1:, 0], expected)


def test_generate_rows_are_independent():
    model = tiny_qwen()
    vtr.compress(model, "granularity", levels=[1, 2])
    data = mixed_batch()
    with vtr.compression.forced_level(model, 2):
        batched = generate(model, data.inputs())
        assert torch.equal(batched.sequences[:, :data.input_ids.shape[1]], data.input_ids)
        for row in range(3):
            alone = generate(model, data.inputs([row]))
            real = int(data.attention_mask[row].sum())
            torch.testing.assert_close(logits(batched)[row], logits(alone)[0], atol=1e-5, rtol=0)
            assert torch.equal(batched.sequences[row, data.input_ids.shape[1]:], alone.sequences[0, real:])


def test_the_router_choice_changes_with_the_question():
    model = tiny_qwen()
    data = batch([[1, ("image", 0), 50], [1, ("image", 0), 51]], image_grids=[(1, 8, 8)])
    inputs = data.inputs()
    inputs["pixel_values"] = torch.cat([data.pixels("image", 0)] * 2)
    inputs["image_grid_thw"] = torch.tensor([[1, 8, 8]] * 2)
    with torch.no_grad():
        features = model.model.get_image_features(data.pixels("image", 0), torch.tensor([[1, 8, 8]]),
                                                  return_dict=True).pooler_output[0]
        centred = features - features.mean(0)
        j = int(centred.norm(dim=1).argmax())
        embed = model.get_input_embeddings().weight
        embed[[1, 51, START, END]] = 0.0        # the rows' other text: <vision_start>, <vision_end>
        embed[50] = 2 * 100 * centred[j] / centred[j].norm() ** 2
    assert float(relevance(features, embed[[1, START, END, 50]], temperature=0.25)[j]) > 0.9
    vtr.compress(model, "granularity", levels=[1, 2, 4], temperature=0.25)
    run(model, inputs)
    assert vtr.report(model).levels.tolist() == [1, 4]


def test_the_learned_router_trains_on_qwen():
    model = tiny_qwen()
    vtr.compress(model, "granularity", levels=[1, 2], router="learned")
    data = mixed_batch()
    inputs = data.inputs()
    labels = inputs["input_ids"].masked_fill((inputs["attention_mask"] == 0) | (inputs["input_ids"] == IMAGE), -100)
    losses = vtr.compression.train_router(model, [inputs | {"labels": labels}] * 2, steps=2)
    assert len(losses) == 2 and all(l == l for l in losses)


def test_qwen_refuses_tokenpacker_and_videos():
    model = tiny_qwen()
    with pytest.raises(vtr.UnsupportedModelError, match="tokenpacker replaces a LLaVA-format projector"):
        vtr.compress(model, "tokenpacker")
    vtr.compress(model, "granularity")
    video = batch([[1, ("video", 0), 7]], video_grids=[(2, 4, 4)]).inputs()
    with pytest.raises(vtr.UnsupportedModelError, match="images only"):
        run(model, video)
