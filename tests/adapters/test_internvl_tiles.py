"""InternVL with ``split="thumbnail"``: one budget per image, split over its thumbnail and tiles by the thumbnail.

The tile grid the prompt does not record is read from the pixels; the thumbnail's importance over each tile's area
(a float64 hand check) sets the tiles' shares, so a thumbnail whose importance lies on one tile gives that tile the
larger share; every image keeps exactly its budget, its thumbnail the share its token count gives it (as on
LLaVA-NeXT); rows alone equal rows in a batch; a budget that keeps everything is the unpatched model; clear errors.
"""
import pytest
import torch
import torch.nn.functional as F

import vtr
from vtr.adapters.vlm.thumbnail import grid_importance

from internvl_models import END, IMAGE, START, TOKENS, generate, inputs, logits, tiny_internvl

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
SIDE = 64


@pytest.fixture(scope="module")
def model():
    return tiny_internvl()


@pytest.fixture(autouse=True)
def unpatched(model):
    yield
    if vtr.is_patched(model):
        vtr.unpatch(model)


def tiled(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """``[rows * cols + 1, 3, 64, 64]``: a smooth random image cut into a ``rows x cols`` grid of tiles (row-major),
    then the whole image resized to one tile (antialiased bilinear, as an image processor resizes): its thumbnail."""
    coarse = torch.randn(1, 3, 3 * rows, 3 * cols, generator=torch.Generator().manual_seed(seed))
    image = F.interpolate(coarse, size=(rows * SIDE, cols * SIDE), mode="bilinear", align_corners=False)[0]
    tiles = image.view(3, rows, SIDE, cols, SIDE).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, SIDE, SIDE)
    thumbnail = F.interpolate(image[None], size=(SIDE, SIDE), mode="bilinear", antialias=True)
    return torch.cat([tiles, thumbnail])


def one_image(pixels: torch.Tensor) -> dict:
    """One unpadded row: text, ``<img>``, the placeholders of every tile of ``pixels``, ``</img>``, text."""
    row = [1, 5, START] + [IMAGE] * (TOKENS * len(pixels)) + [END, 6, 7]
    ids = torch.tensor([row])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


@pytest.mark.parametrize("rows, cols", [(1, 2), (2, 1), (1, 3), (3, 1), (2, 2), (2, 3), (3, 2)])
def test_the_tile_grid_is_read_from_the_pixels(model, rows, cols):
    """1 x 3 and 3 x 1 give the prompt the same count: only the pixels tell them apart."""
    vtr.patch(model, "random", budget=8, split="thumbnail")
    generate(model, one_image(tiled(rows, cols, seed=rows * 10 + cols)), max_new_tokens=1)
    split = vtr.report(model).tiles[0]
    assert (split.rows, split.cols) == (rows, cols)


def test_the_thumbnails_importance_over_each_tiles_area_by_hand():
    """All of a 4 x 4 thumbnail's importance on its top-left 2 x 2 tokens (the image's top-left quarter): on a 2 x 2
    grid it all falls on tile 0; on a 1 x 3 grid, 2/3 on the first tile and 1/3 on the second, by area."""
    scores = torch.zeros(4, 4, dtype=torch.float64)
    scores[:2, :2] = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    assert torch.allclose(grid_importance(scores.flatten(), 2, 2), torch.tensor([[1.0, 0.0], [0.0, 0.0]],
                                                                                   dtype=torch.float64))
    # column cells of width 1/4 against tiles of width 1/3: cell 0 lies in tile 0; cell 1 ([1/4, 1/2]) 1/3 in tile 0
    third = torch.tensor([[0.1 + 0.3 + (0.2 + 0.4) / 3, (0.2 + 0.4) * 2 / 3, 0.0]], dtype=torch.float64)
    assert torch.allclose(grid_importance(scores.flatten(), 1, 3), third)


def test_a_thumbnail_whose_importance_lies_on_one_tile_gives_it_the_larger_share(model):
    """The thumbnail's top-left tokens made to dominate its scores (their projected features scaled up): tile 0, the
    top-left one, gets the largest share; the image keeps exactly its budget, its thumbnail round(12 * 16 / 80) = 2,
    and the language model reads each tile's kept tokens in its own placeholders, tile after tile."""
    data = one_image(tiled(2, 2))
    top_left = torch.tensor([0, 1, 4, 5])                    # of the thumbnail's 4 x 4 token grid

    def louder(module, args, output):
        output = output.clone()
        output[-1, top_left] *= 50.0
        return output

    hook = model.model.multi_modal_projector.register_forward_hook(louder)
    vtr.patch(model, "random", budget=12, split="thumbnail")
    try:
        generate(model, data, max_new_tokens=1)
    finally:
        hook.remove()
    report = vtr.report(model)
    split = report.tiles[0]
    assert (split.rows, split.cols) == (2, 2) and split.thumbnail_kept == 2
    assert split.tile_weights[0] > 10 * max(split.tile_weights[1:])
    assert split.tile_budgets[0] > max(split.tile_budgets[1:]) and sum(split.tile_budgets) == 10
    assert report.image_tokens_after.tolist() == split.tile_budgets + [2]
    assert report.visual_tokens_after.tolist() == [12]
    ids, columns = data["input_ids"][0], report.kept_positions[0]
    kept = columns[ids[columns] == IMAGE]
    tile_of = ((kept - int((ids == IMAGE).nonzero()[0])) // TOKENS).tolist()
    assert tile_of == [t for t, n in enumerate(split.tile_budgets + [2]) for _ in range(n)]


@pytest.mark.parametrize("attn, method, budget", [("sdpa", "tome", 20), ("eager", "fastv", 9), ("sdpa", "query", 40)])
def test_each_image_keeps_its_budget_and_rows_alone_equal_rows_in_a_batch(attn, method, budget):
    """Row 0: an image of 4 tiles and its thumbnail (80 tokens); row 1: a one-tile image (16: min(budget, 16), no
    thumbnail) and an image of 2 tiles and its thumbnail (48)."""
    model = vtr.patch(tiny_internvl(attn), method, budget=budget, split="thumbnail")
    batched = generate(model, inputs())
    report = vtr.report(model)
    after = report.image_tokens_after.tolist()
    assert sum(after[:5]) == min(budget, 80) and after[5] == min(budget, 16) and sum(after[6:]) == min(budget, 48)
    assert report.tiles[1] is None
    for split, tiles in ((report.tiles[0], 4), (report.tiles[2], 2)):
        assert split.thumbnail_kept == min(TOKENS, max(1, int(budget / (tiles + 1) + 0.5)))
    for row in range(3):
        alone = generate(model, inputs(only=[row]))
        torch.testing.assert_close(logits(batched)[row], logits(alone)[0], atol=1e-5, rtol=0)


def test_a_budget_that_keeps_every_token_equals_the_unpatched_model(model):
    data = inputs()
    beams = dict(max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    expected = generate(model, data)
    with torch.inference_mode():
        expected_beams = model.generate(**data, **beams)
    vtr.patch(model, "tome", budget=80, split="thumbnail")
    out = generate(model, data)
    assert torch.equal(out.sequences, expected.sequences) and torch.equal(logits(out), logits(expected))
    with torch.inference_mode():
        assert torch.equal(model.generate(**data, **beams), expected_beams)


def test_beams_with_tiles_of_different_counts(model):
    """Tiles that keep different counts go in as one token per entry, which generate() still expands by row."""
    vtr.patch(model, "tome", budget=9, split="thumbnail")
    data = inputs()
    width = data["input_ids"].shape[1]
    with torch.inference_mode():
        out = model.generate(**data, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    assert out.shape == (6, width + 3) and torch.equal(out[:, :width], data["input_ids"].repeat_interleave(2, dim=0))
    assert len(set(vtr.report(model).image_tokens_after.tolist())) > 1


def test_bad_settings_are_clear_errors(model):
    with pytest.raises(ValueError, match="split must be one of 'thumbnail'"):
        vtr.patch(model, "tome", budget=8, split="tiles")
    with pytest.raises(ValueError, match="before the language model: leave out layers="):
        vtr.patch(model, "fastv", budget=8, layers=[1], split="thumbnail")
    with pytest.raises(ValueError, match="choose a method that takes a budget"):
        vtr.patch(model, "pool", factor=2, split="thumbnail")
    with pytest.raises(ValueError, match="budget must be an int >= 2"):
        vtr.patch(model, "tome", budget=1, split="thumbnail")
    assert not vtr.is_patched(model)
