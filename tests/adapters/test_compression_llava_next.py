"""vtr.compress on a tiny LLaVA-NeXT: TokenPacker's projector runs per crop (thumbnail and each AnyRes crop), and
adaptive granularity pools every part at the level its router picks; either way the packed crop grids are unpadded
and laid out with a newline per row as transformers lays out the full ones."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                          LlavaNextModel)

import vtr
from vtr.compression import anyres
from vtr.compression.granularity import relevance

from llava_models import IMAGE_TOKEN, FeatureCapture, generate, left_padded, logits, text_labels
from llava_models import assert_each_row_equals_it_alone
from llava_next_models import batch, image_counts, tiny_llava_next

SIZES = [(112, 112), (50, 120), (90, 40), (300, 20), (56, 56), (16, 400)]   # the last: unpadded to no row
ROWS = [([1, 5], [(112, 112)], [7, 8]),              # two images of different sizes, one per row
        ([1, 5, 6, 9], [(50, 120)], [7]),
        ([1, 20, 21], [], [22])]                     # and a text-only row


def six_by_six_next() -> LlavaNextForConditionalGeneration:
    """Crops of 84 px at patch 14: 6 x 6 tokens each, so scale 2 packs a crop into 3 x 3 and scale 3 into 2 x 2."""
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=84, patch_size=14)
    text = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                             image_grid_pinpoints=[[84, 168], [168, 84], [168, 168]], vision_feature_layer=-2,
                             vision_feature_select_strategy="default")
    torch.manual_seed(0)
    return LlavaNextForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


def batch84(model, rows):
    """:func:`llava_next_models.batch` for :func:`six_by_six_next`'s 84 px crops."""
    sizes = torch.tensor([size for _, row_sizes, _ in rows for size in row_sizes]).view(-1, 2)
    pixel_values = torch.randn(len(sizes), 5, 3, 84, 84, generator=torch.Generator().manual_seed(0))
    counts = iter(image_counts(model, pixel_values, sizes))
    ids, mask = left_padded([before + [IMAGE_TOKEN] * sum(next(counts) for _ in row_sizes) + after
                             for before, row_sizes, after in rows])
    return ids, mask, pixel_values, sizes


def forward(model, ids, mask, pixel_values, image_sizes):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=image_sizes).logits


# -- the packing ----------------------------------------------------------------------------------------------

def test_packing_at_the_full_side_is_transformers_own():
    model = tiny_llava_next()
    newline = torch.randn(8)
    for size in SIZES:
        parts = 1 + anyres.crop_grid(model.config, size)[0] * anyres.crop_grid(model.config, size)[1]
        features = torch.randn(parts, 16, 8)
        expected, _ = model.model.pack_image_features([features], [list(size)], "default", image_newline=newline)
        torch.testing.assert_close(anyres.pack(model.config, features, size, newline), expected[0], rtol=0, atol=0)
        assert anyres.image_tokens(model.config, size, 4) == len(expected[0])


def test_packed_crops_are_stitched_row_major_with_a_newline_per_row():
    """2 x 2 crops of 2 x 2 packed tokens (value: 10 * part + token): the map's rows run across the crops."""
    model = six_by_six_next()
    features = (10 * torch.arange(5.0)[:, None] + torch.arange(4.0)[None])[..., None]     # [5 parts, 4, 1]
    packed = anyres.pack(model.config, features, (168, 168), torch.tensor([-1.0]))[:, 0].tolist()
    assert packed == [0, 1, 2, 3,                          # the thumbnail
                      10, 11, 20, 21, -1,
                      12, 13, 22, 23, -1,
                      30, 31, 40, 41, -1,
                      32, 33, 42, 43, -1]


@pytest.mark.parametrize("scale, counts", [(2, [9 + 6 * 7, 9 + 3 * 7]), (3, [4 + 4 * 5, 4 + 2 * 5])])
def test_each_crop_keeps_the_scales_share_plus_a_newline_per_row(scale, counts):
    """168 x 168: the thumbnail and 2 x 2 crops of 6 x 6 (36 + 12 x 13 = 192 tokens); 60 x 168: 1 x 2 crops,
    unpadded to 4 rows of 12 at the full side (36 + 4 x 13 = 88), while the packed map (3 x 6 at scale 2, 2 x 4 at
    scale 3) loses no row to unpadding (transformers' rule: half the rounded excess, here 0)."""
    model = six_by_six_next()
    rows = [([1], [(168, 168)], [7]), ([1], [(60, 168)], [7])]
    ids, mask, pixel_values, image_sizes = batch84(model, rows)
    assert image_counts(model, pixel_values, image_sizes) == [192, 88]
    vtr.compress(model, "tokenpacker", scale=scale)
    forward(model, ids, mask, pixel_values, image_sizes)
    report = vtr.report(model)
    assert report.tokens_before.tolist() == [192, 88] and report.tokens_after.tolist() == counts
    assert report.levels.tolist() == [scale, scale] and report.image_rows.tolist() == [0, 1]


def test_the_projector_runs_per_crop_and_newlines_are_the_models_own():
    """A change in one crop's pixels moves that crop's packed tokens only; the thumbnail, the other crops and the
    newlines stay."""
    model = six_by_six_next()
    ids, mask, pixel_values, image_sizes = batch84(model, [([1], [(168, 168)], [7])])
    vtr.compress(model, "tokenpacker", scale=3)
    ids_of = anyres.pack(model.config, torch.arange(5.0).repeat_interleave(4).view(5, 4, 1), (168, 168),
                         torch.tensor([-1.0]))[:, 0]          # which part each packed token comes from
    seen = []
    for changed in (pixel_values, pixel_values.clone().index_fill_(1, torch.tensor([2]), 0.5)):
        capture = FeatureCapture(model)
        forward(model, ids, mask, changed, image_sizes)
        capture.remove()
        seen.append(capture.features[0])
    moved = (seen[0] - seen[1]).abs().amax(-1) > 0
    assert moved.tolist() == (ids_of == 2).tolist()
    newline = model.model.image_newline.detach()
    assert all(torch.equal(token, newline) for token in seen[0][ids_of == -1])


# -- the model ------------------------------------------------------------------------------------------------

def test_state_dict_round_trips_strictly_and_unpatch_restores_the_model():
    model = tiny_llava_next()
    ids, mask, pixel_values, image_sizes = batch(model, ROWS)
    before, keys = forward(model, ids, mask, pixel_values, image_sizes), list(model.state_dict())
    projector = model.model.multi_modal_projector
    vtr.compress(model, "tokenpacker", scale=2)
    fresh = tiny_llava_next(seed=1)
    vtr.compress(fresh, "tokenpacker", scale=2)
    fresh.load_state_dict(model.state_dict(), strict=True)
    compressed = forward(model, ids, mask, pixel_values, image_sizes)
    assert torch.equal(forward(fresh, ids, mask, pixel_values, image_sizes), compressed)
    assert torch.equal(forward(copy.deepcopy(model), ids, mask, pixel_values, image_sizes), compressed)
    with pytest.raises(RuntimeError, match="multi_modal_projector"):
        tiny_llava_next().load_state_dict(model.state_dict(), strict=True)
    vtr.unpatch(model)
    assert type(model) is LlavaNextForConditionalGeneration and type(model.model) is LlavaNextModel
    assert model.model.multi_modal_projector is projector and list(model.state_dict()) == keys
    assert torch.equal(forward(model, ids, mask, pixel_values, image_sizes), before)


def test_generate_rows_are_independent_and_return_the_callers_prompt():
    model = tiny_llava_next()
    ids, mask, pixel_values, image_sizes = batch(model, ROWS)
    vtr.compress(model, "tokenpacker", scale=2)
    batched = generate(model, ids, mask, pixel_values=pixel_values, image_sizes=image_sizes)
    assert vtr.report(model).tokens_after.tolist() == [4 + 4 * 5, 4 + 2 * 5]    # 112 x 112: 2 x 2 crops of 2 x 2
    assert torch.equal(batched.sequences[:, :ids.shape[1]], ids)
    assert_each_row_equals_it_alone(model, ids, mask, pixel_values, batched, images_per_row=[1, 1, 0],
                                    image_sizes=image_sizes)


def test_the_projector_trains_on_anyres_batches():
    model = tiny_llava_next()
    ids, mask, pixel_values, image_sizes = batch(model, ROWS)
    vtr.compress(model, "tokenpacker", scale=2)
    data = dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=image_sizes,
                labels=text_labels(ids, mask))
    with torch.no_grad():
        first = float(model(**data).loss)
    losses = vtr.compression.train_projector(model, [data] * 20, steps=20, lr=3e-3)
    assert losses[-1] < first - 0.05


# -- adaptive granularity -------------------------------------------------------------------------------------

def test_granularity_level_1_is_the_unpatched_model_and_coarser_levels_pool_every_part():
    """112 x 112 (4 x 4 thumbnail, 2 x 2 crops): level 2 -> 4 + 4 x 5 = 24 tokens, level 4 -> 1 + 2 x 3 = 7;
    50 x 120 (1 x 2 crops; no row unpadded at any of these sides, half the one spare row rounding to 0: 16 + 4 x 9
    = 52) -> level 2: 4 + 2 x 5 = 14, level 4: 1 + 1 x 3 = 4."""
    model = tiny_llava_next()
    ids, mask, pixel_values, image_sizes = batch(model, ROWS)
    unpatched = forward(model, ids, mask, pixel_values, image_sizes)
    vtr.compress(model, "granularity", levels=[1, 2, 4])
    after = {}
    for factor in (1, 2, 4):
        with vtr.compression.forced_level(model, factor):
            out = forward(model, ids, mask, pixel_values, image_sizes)
        after[factor] = vtr.report(model).tokens_after.tolist()
        if factor == 1:
            torch.testing.assert_close(out, unpatched, rtol=0, atol=0)
    assert vtr.report(model).tokens_before.tolist() == [88, 52]
    assert after == {1: [88, 52], 2: [4 + 4 * 5, 4 + 2 * 5], 4: [1 + 2 * 3, 1 + 1 * 3]}


def test_pooled_parts_are_each_parts_window_means_then_packed():
    model = six_by_six_next()
    parts = torch.arange(5 * 36, dtype=torch.float64).view(5, 36, 1)
    got = anyres.pooled(model.config, parts, (6, 6), 3, (168, 168), torch.tensor([-1.0], dtype=torch.float64))
    means = parts.view(5, 2, 3, 2, 3).mean((2, 4)).reshape(5, 4, 1)
    expected = anyres.pack(model.config, means, (168, 168), torch.tensor([-1.0], dtype=torch.float64))
    assert got[:, 0].tolist() == expected[:, 0].tolist()
    assert got[:4, 0].tolist() == [7.0, 10.0, 25.0, 28.0]           # the thumbnail's four 3 x 3 window means


def test_the_router_choice_changes_with_the_question():
    """As on LLaVA-1.5: word 50 points at the crop token that stands out most from the image's mean (over every
    part), so its question needs the finest level; word 51 is zero (uniform relevance): the coarsest. One batch."""
    model = tiny_llava_next()
    rows = [([1], [(112, 112)], [50]), ([1], [(112, 112)], [51])]
    ids, mask, pixel_values, image_sizes = batch(model, rows)
    vtr.compress(model, "granularity", levels=[1, 2, 4], tolerance=0.25, temperature=0.25)
    with torch.no_grad(), anyres.unpacked():
        parts = model.model.get_image_features(pixel_values=pixel_values[:1], image_sizes=image_sizes[:1],
                                               vision_feature_select_strategy="default").pooler_output[0]
        features = parts.flatten(0, 1)
        centred = features - features.mean(0)
        j = 16 + int(centred[16:].norm(dim=1).argmax())                     # a crop's token
        embed = model.get_input_embeddings().weight
        embed[[1, 51]] = 0.0
        embed[50] = 2 * 100 * centred[j] / centred[j].norm() ** 2
    assert parts.shape[0] == 5
    assert float(relevance(features, embed[[1, 50]].detach(), temperature=0.25)[j]) > 0.9
    forward(model, ids, mask, pixel_values, image_sizes)
    assert vtr.report(model).levels.tolist() == [1, 4] and vtr.report(model).tokens_after.tolist() == [88, 7]


def test_granularity_generate_rows_are_independent_and_the_learned_router_trains():
    model = tiny_llava_next()
    ids, mask, pixel_values, image_sizes = batch(model, ROWS)
    vtr.compress(model, "granularity", levels=[1, 2, 4])
    batched = generate(model, ids, mask, pixel_values=pixel_values, image_sizes=image_sizes)
    assert_each_row_equals_it_alone(model, ids, mask, pixel_values, batched, images_per_row=[1, 1, 0],
                                    image_sizes=image_sizes)
    vtr.unpatch(model)
    vtr.compress(model, "granularity", levels=[1, 2, 4], router="learned")
    data = dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=image_sizes,
                labels=text_labels(ids, mask))
    assert vtr.compression.answer_losses(model, data).shape == (3, 3)
    before = {n: p.clone() for n, p in model._vtr_compression.router.named_parameters()}
    assert len(vtr.compression.train_router(model, [data] * 2, steps=2)) == 2
    assert any(not torch.equal(p, before[n]) for n, p in model._vtr_compression.router.named_parameters())
    fresh = tiny_llava_next(seed=1)
    vtr.compress(fresh, "granularity", levels=[1, 2, 4], router="learned")
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(forward(fresh, ids, mask, pixel_values, image_sizes),
                       forward(model, ids, mask, pixel_values, image_sizes))
    vtr.unpatch(model)
    assert type(model) is LlavaNextForConditionalGeneration and type(model.model) is LlavaNextModel


# -- refusals -------------------------------------------------------------------------------------------------

def test_bad_calls_are_clear_errors():
    model = tiny_llava_next()
    ids, mask, pixel_values, image_sizes = batch(model, ROWS[:1])
    with pytest.raises(ValueError, match="levels must be .* at most the token grid's side 4"):
        vtr.compress(model, "granularity", levels=[1, 8])
    assert not vtr.compression.is_compressed(model) and type(model.model) is LlavaNextModel
    vtr.compress(model, "tokenpacker")
    with pytest.raises(ValueError, match="needs image_sizes"):
        forward(model, ids, mask, pixel_values, None)
    with pytest.raises(ValueError, match=r"image_sizes must be \[images, 2\]"):
        forward(model, ids, mask, pixel_values, torch.tensor([112, 112]))
    short, short_mask = left_padded([[1] + [IMAGE_TOKEN] * 16 + [7]])
    with pytest.raises(ValueError, match=r"need \[88\] \(by their image_sizes\)"):
        forward(model, short, short_mask, pixel_values, image_sizes)


def test_llava_onevision_is_refused_clearly():
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=56, patch_size=14)
    text = dict(model_type="qwen2", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2)
    model = LlavaOnevisionForConditionalGeneration._from_config(LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]]))
    for method in ("tokenpacker", "granularity"):
        with pytest.raises(vtr.UnsupportedModelError, match="LLaVA-OneVision and LLaVA-NeXT-Video are not supported"):
            vtr.compress(model, method)
