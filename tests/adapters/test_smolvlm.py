"""The SmolVLM / Idefics3 adapter: each tile (the global view included) reduced on the connector's output before
the language model, or pruned inside it.

Exact when nothing is reduced; an exact budget per tile; each tile's kept tokens stay right after its own
row/column marker; the tile's tokens are its pixel-shuffled patch grid in raster order (what ``pool`` and the
spatial methods rely on); each row of a left-padded batch computes what it computes alone; beams and static
caches; clear errors.
"""
import pytest
import torch
from torch import nn

import vtr

from smolvlm_models import FAKE, GLOBAL, IMAGE, generate, inputs, logits, tiny_idefics3, tiny_smolvlm

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
LEARNED = {m for m in vtr.methods() if vtr.reducers.REDUCERS[m].learned}
BUILDERS = {"smolvlm": tiny_smolvlm, "idefics3": tiny_idefics3}


@pytest.fixture(scope="module")
def model():
    return tiny_smolvlm()


@pytest.fixture(autouse=True)
def unpatched(model):
    yield
    if vtr.is_patched(model):
        vtr.unpatch(model)


@pytest.mark.parametrize("family", BUILDERS)
def test_a_budget_that_keeps_every_token_equals_the_unpatched_model(family):
    model = BUILDERS[family]()
    expected = generate(model, inputs())
    for method, amount in [("none", {}), ("tome", {"budget": 16}), ("fastv", {"budget": 1000, "layers": [1]})]:
        vtr.patch(model, method, **amount)
        out = generate(model, inputs())
        assert torch.equal(out.sequences, expected.sequences) and torch.equal(logits(out), logits(expected)), method
        report = vtr.report(model)
        assert report.visual_tokens_before.tolist() == report.visual_tokens_after.tolist() == [80, 64, 0]
        assert report.image_tokens_after.tolist() == [16] * 9
        vtr.unpatch(model)


@pytest.mark.parametrize("method, layers", [("tome", None), ("fastv", None), ("fastv", [1])])
def test_each_tiles_kept_tokens_stay_after_its_own_marker(model, method, layers):
    """Row 0 holds one image of 2 x 2 tiles and its global view: in what the language model sees, each marker is
    followed by exactly its tile's kept tokens, each taken from that tile's own placeholders."""
    vtr.patch(model, method, budget=5, layers=layers)
    data = inputs()
    generate(model, data)
    report = vtr.report(model)
    ids = data["input_ids"][0]
    columns = report.kept_positions[0]
    seen = ids[columns.clamp_min(0)].masked_fill(columns < 0, -1).tolist()
    markers = [10, 11, 20, 21, GLOBAL]                       # <row_1_col_1>, <row_1_col_2>, ..., <global-img>
    for tile, marker in enumerate(markers):
        at = seen.index(marker)
        assert seen[at - 1] == FAKE and seen[at + 1:at + 6] == [IMAGE] * 5 and seen[at + 6] != IMAGE
        start = int((ids == marker).nonzero()[0]) + 1        # the tile's 16 placeholders in the caller's prompt
        assert bool(((columns[at + 1:at + 6] >= start) & (columns[at + 1:at + 6] < start + 16)).all())
    assert report.image_tokens_before.tolist() == [16] * 9 and report.image_tokens_after.tolist() == [5] * 9


def test_a_tiles_tokens_are_its_pixel_shuffled_grid_in_raster_order(model):
    """The connector's pixel shuffle turns a tile's 8 x 8 patches into 16 tokens: token k holds the 2 x 2 block of
    patches at (k // 4, k % 4), so the tile's tokens form the 4 x 4 grid vtr hands the reducers; and ``pool`` with
    factor 2 averages that grid's 2 x 2 blocks."""
    where = torch.arange(64, dtype=torch.float32).view(1, 64, 1)          # patch index in raster order
    shuffled = model.model.connector.pixel_shuffle(where, 2)[0]           # [16, 4]
    for k in range(16):
        r, c = divmod(k, 4)
        block = {8 * (2 * r + i) + 2 * c + j for i in range(2) for j in range(2)}
        assert set(shuffled[k].long().tolist()) == block
    vtr.patch(model, "pool", factor=2)
    data = inputs()
    with torch.no_grad():
        tiles = model.model.get_image_features(data["pixel_values"]).pooler_output[0][:16]   # row 0's first tile
    given = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: given.append(kwargs.get("mm_encoder_outputs")), with_kwargs=True)
    generate(model, data, max_new_tokens=1)
    hook.remove()
    expected = tiles.view(2, 2, 2, 2, -1).mean(dim=(1, 3)).reshape(4, -1)   # rows (2 x 2), cols (2 x 2) -> 2 x 2
    torch.testing.assert_close(given[0]["image"].pooler_output[0][:4], expected, atol=1e-6, rtol=0)
    assert vtr.report(model).image_tokens_after.tolist() == [4] * 9


@pytest.mark.parametrize("attn, method, layers", [("sdpa", "tome", None), ("eager", "query", None),
                                                  ("sdpa", "fastv", [1]), ("eager", "tome", [1, 2])])
def test_each_row_of_a_left_padded_batch_equals_the_row_alone(attn, method, layers):
    model = vtr.patch(tiny_smolvlm(attn), method, budget=5, layers=layers)
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
    assert (report.prefill_macs < report.prefill_macs_unreduced)[:2].all()
    assert report.prefill_macs[2] == report.prefill_macs_unreduced[2] and 0 < report.prefill_flops_saved < 1


def test_bad_settings_and_unsupported_models_are_clear_errors(model):
    with pytest.raises(ValueError, match="takes budget="):
        vtr.patch(model, "tome", keep=0.5)
    with pytest.raises(ValueError, match="leave out frames="):
        vtr.patch(model, "tome", budget=4, temporal=0.5)
    with pytest.raises(ValueError, match="budget must be an int >= 1"):
        vtr.patch(model, "tome", budget=0)
    with pytest.raises(vtr.UnsupportedModelError, match="SmolVLMForConditionalGeneration"):
        vtr.patch(model.model, "tome", budget=4)
    with pytest.raises(vtr.UnsupportedModelError, match="supported: .*SmolVLM and Idefics3"):
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
