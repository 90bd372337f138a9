"""The InternVL adapter (transformers' format): each tile (the thumbnail included) reduced on the projector's output
before the language model, or pruned inside it.

Exact when nothing is reduced; an exact budget per tile; an image's tiles keep their order, each tile's kept tokens
taken from its own placeholders; a tile's tokens are its pixel-shuffled patch grid in raster order; each row of a
left-padded batch computes what it computes alone; beams and static caches; clear errors.
"""
import pytest
import torch
from torch import nn

import vtr

from internvl_models import END, IMAGE, START, TOKENS, generate, inputs, logits, tiny_internvl

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
LEARNED = {m for m in vtr.methods() if vtr.reducers.REDUCERS[m].learned}


@pytest.fixture(scope="module")
def model():
    return tiny_internvl()


@pytest.fixture(autouse=True)
def unpatched(model):
    yield
    if vtr.is_patched(model):
        vtr.unpatch(model)


@pytest.mark.parametrize("method, amount", [("none", {}), ("tome", {"budget": 16}),
                                            ("fastv", {"budget": 1000, "layers": [1]})])
def test_a_budget_that_keeps_every_token_equals_the_unpatched_model(model, method, amount):
    expected = generate(model, inputs())
    vtr.patch(model, method, **amount)
    out = generate(model, inputs())
    assert torch.equal(out.sequences, expected.sequences) and torch.equal(logits(out), logits(expected))
    report = vtr.report(model)
    assert report.visual_tokens_before.tolist() == report.visual_tokens_after.tolist() == [80, 64, 0]


@pytest.mark.parametrize("method, layers", [("tome", None), ("random", None), ("fastv", [1])])
def test_each_tile_keeps_its_budget_from_its_own_placeholders_in_order(model, method, layers):
    """Row 0 holds one image of 5 tiles (2 x 2 and the thumbnail) between <img> and </img>: the language model sees
    5 x 5 of its tokens there, the k-th five from the k-th tile's placeholders."""
    vtr.patch(model, method, budget=5, layers=layers)
    data = inputs()
    generate(model, data)
    report = vtr.report(model)
    assert report.image_tokens_before.tolist() == [16] * 9 and report.image_tokens_after.tolist() == [5] * 9
    ids, columns = data["input_ids"][0], report.kept_positions[0]
    seen = ids[columns.clamp_min(0)].masked_fill(columns < 0, -1).tolist()
    start = seen.index(START)
    assert seen[start + 1:start + 26] == [IMAGE] * 25 and seen[start + 26] == END
    first = int((ids == IMAGE).nonzero()[0])               # the image's first placeholder in the caller's prompt
    tile_of = (columns[start + 1:start + 26] - first) // TOKENS
    assert tile_of.tolist() == [t for t in range(5) for _ in range(5)]


def test_a_tiles_tokens_are_its_pixel_shuffled_grid_in_raster_order(model):
    """Token k of a tile holds the 2 x 2 block of patches at (k // 4, k % 4): the 4 x 4 grid vtr hands the
    reducers; ``pool`` with factor 2 averages that grid's 2 x 2 blocks."""
    where = torch.arange(64, dtype=torch.float32).view(1, 8, 8, 1)      # patch index, raster order
    shuffled = model.model.pixel_shuffle(where, 0.5).reshape(16, 4)
    for k in range(16):
        r, c = divmod(k, 4)
        assert set(shuffled[k].long().tolist()) == {8 * (2 * r + i) + 2 * c + j for i in range(2) for j in range(2)}
    vtr.patch(model, "pool", factor=2)
    data = inputs()
    with torch.no_grad():
        tile = model.model.get_image_features(data["pixel_values"]).pooler_output[0]
    given = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: given.append(kwargs.get("mm_encoder_outputs")), with_kwargs=True)
    generate(model, data, max_new_tokens=1)
    hook.remove()
    expected = tile.view(2, 2, 2, 2, -1).mean(dim=(1, 3)).reshape(4, -1)
    torch.testing.assert_close(given[0]["image"].pooler_output[0], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("attn, method, layers", [("sdpa", "tome", None), ("eager", "query", None),
                                                  ("sdpa", "fastv", [1]), ("eager", "tome", [1, 2])])
def test_each_row_of_a_left_padded_batch_equals_the_row_alone(attn, method, layers):
    model = vtr.patch(tiny_internvl(attn), method, budget=5, layers=layers)
    batched = generate(model, inputs())
    assert vtr.report(model).visual_tokens_after.tolist() == [25, 20, 0]
    for row in range(3):
        alone = generate(model, inputs(only=[row]))
        torch.testing.assert_close(logits(batched)[row], logits(alone)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("layers", [None, [1]])
def test_beams_and_a_static_cache(model, layers):
    vtr.patch(model, "fastv", budget=5, layers=layers)
    data = inputs()
    width = data["input_ids"].shape[1]
    with torch.inference_mode():
        out = model.generate(**data, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    assert out.shape == (6, width + 3) and torch.equal(out[:, :width], data["input_ids"].repeat_interleave(2, dim=0))
    dynamic = generate(model, data)
    static = generate(model, data, cache_implementation="static")
    torch.testing.assert_close(logits(static), logits(dynamic), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", sorted(set(vtr.methods()) - {"none", "pool"} - LEARNED))
def test_every_method_reduces_each_tile_to_the_budget(model, method):
    vtr.patch(model, method, budget=5)
    generate(model, inputs(), max_new_tokens=1)
    assert vtr.report(model).image_tokens_after.tolist() == [5] * 9


def test_report_and_analytic_counts(model):
    unreduced, _ = vtr.expected_flops(model)
    vtr.patch(model, "tome", budget=4)
    assert vtr.expected_tokens(model) == [16, 8, 4]                # one tile
    reduced, total = vtr.expected_flops(model)
    assert total == unreduced and reduced < unreduced
    generate(model, inputs(), max_new_tokens=1)
    report = vtr.report(model)
    assert report.image_rows.tolist() == [0] * 5 + [1] * 4 and report.grids == [(1, 4, 4)] * 9
    assert report.size.sum(1).tolist() == [16.0] * 9
    assert report.prefill_macs[2] == report.prefill_macs_unreduced[2] and 0 < report.prefill_flops_saved < 1


def test_bad_settings_and_unsupported_models_are_clear_errors(model):
    with pytest.raises(ValueError, match="takes budget="):
        vtr.patch(model, "tome", flops=0.5)
    with pytest.raises(ValueError, match="leave out frames="):
        vtr.patch(model, "tome", budget=4, frames="uniform")
    with pytest.raises(vtr.UnsupportedModelError, match="InternVLForConditionalGeneration"):
        vtr.patch(model.model, "tome", budget=4)
    with pytest.raises(vtr.UnsupportedModelError, match="supported: .*InternVL"):
        vtr.patch(nn.Linear(2, 2), "tome", budget=4)
    assert not vtr.is_patched(model)


@pytest.mark.parametrize("method, amount", [("tome", {"budget": 1000}), ("fastv", {"budget": 1000, "layers": [1]})])
def test_beam_search_at_a_budget_that_keeps_everything_equals_the_unpatched_model(model, method, amount):
    data = inputs()
    beams = dict(max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    with torch.inference_mode():
        expected = model.generate(**data, **beams)
        vtr.patch(model, method, **amount)
        assert torch.equal(model.generate(**data, **beams), expected)
