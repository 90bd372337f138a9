"""TokenPacker's parts on hand-made inputs whose answers are known."""
from __future__ import annotations

import pytest
import torch

from vtr.compression.tokenpacker import TokenPacker, point_queries, region_to_point, regions

GRID = (4, 4)


def test_regions_are_each_cells_tokens_row_major():
    x = torch.arange(16.0).view(1, 16, 1)
    got, real = regions(x, GRID, 2)
    assert got[0, :, :, 0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    assert bool(real.all())


def test_a_scale_that_does_not_divide_the_grid_leaves_smaller_edge_regions():
    x = torch.arange(1.0, 17.0).view(1, 16, 1)
    got, real = regions(x, GRID, 3)
    assert got[0, :, :, 0].tolist() == [[1, 2, 3, 5, 6, 7, 9, 10, 11], [4, 0, 0, 8, 0, 0, 12, 0, 0],
                                        [13, 14, 15, 0, 0, 0, 0, 0, 0], [16, 0, 0, 0, 0, 0, 0, 0, 0]]
    assert real.sum(1).tolist() == [9, 3, 3, 1]
    value = torch.arange(1.0, 17.0, dtype=torch.float64).view(1, 16, 1)
    out = region_to_point(torch.zeros(1, 4, 2, dtype=torch.float64), torch.zeros(1, 16, 2, dtype=torch.float64),
                          value, GRID, 3)
    assert out[0, :, 0].tolist() == pytest.approx([6.0, 8.0, 14.0, 16.0], abs=1e-12)   # padding never attended


def test_point_queries_are_window_means_at_scale_2_and_centres_at_scale_3():
    x = torch.randn(2, 36, 3, dtype=torch.float64)
    two = point_queries(x, (6, 6), 2)
    windows = x.view(2, 3, 2, 3, 2, 3).mean((2, 4)).reshape(2, 9, 3)
    torch.testing.assert_close(two, windows.float().double(), atol=1e-6, rtol=0)
    three = point_queries(x, (6, 6), 3)
    centres = x.view(2, 6, 6, 3)[:, 1::3, 1::3].reshape(2, 4, 3)
    torch.testing.assert_close(three, centres.float().double(), atol=1e-6, rtol=0)


def test_equal_keys_give_each_point_the_mean_of_its_own_region_only():
    value = torch.arange(16.0, dtype=torch.float64).view(1, 16, 1)
    key = torch.zeros(1, 16, 2, dtype=torch.float64)
    query = torch.randn(1, 4, 2, dtype=torch.float64)
    out = region_to_point(query, key, value, GRID, 2)
    assert out[0, :, 0].tolist() == pytest.approx([2.5, 4.5, 10.5, 12.5], abs=1e-12)


def test_each_point_attends_to_the_token_its_query_matches_in_its_region():
    """Keys: one-hot on the token's place within its region (scaled by 30); query m matches place m: point m
    reads the value of region m's token m, to within softmax(30 * 30 / sqrt(4)) tails (e^-450)."""
    place = regions(torch.arange(16.0).view(1, 16, 1), GRID, 2)[0][0, :, :, 0].long()   # token index of (cell, place)
    key = torch.zeros(1, 16, 4, dtype=torch.float64)
    for cell in range(4):
        for j in range(4):
            key[0, place[cell, j], j] = 30.0
    query = 30.0 * torch.eye(4, dtype=torch.float64)[None]
    value = torch.arange(16.0, dtype=torch.float64).view(1, 16, 1) * 10
    out = region_to_point(query, key, value, GRID, 2)[0, :, 0]
    expected = [10.0 * float(place[m, m]) for m in range(4)]
    assert expected == [0.0, 30.0, 120.0, 150.0]            # tokens 0, 3, 12, 15
    assert out.tolist() == pytest.approx(expected, abs=1e-9)


def test_the_module_is_local_a_change_in_one_region_moves_only_its_token():
    torch.manual_seed(0)
    packer = TokenPacker(vision_width=8, levels=2, hidden_size=12, grid=(6, 6), scale=3).double()
    x = torch.randn(2, 36, 24, dtype=torch.float64)
    before = packer(x)
    assert before.shape == (2, 4, 12)
    changed = x.clone()
    changed[0, 3 * 6 + 4] += 1.0      # row 3, col 4: region (1, 1) = token 3 of image 0
    after = packer(changed)
    moved = (after - before).abs().amax(-1)
    assert moved[0, 3] > 1e-6
    assert float(moved[0, :3].max()) == 0.0 and float(moved[1].max()) == 0.0


def test_the_module_packs_an_8x8_grid_at_scale_3_into_9_tokens():
    packer = TokenPacker(vision_width=8, levels=1, hidden_size=8, grid=(8, 8), scale=3)
    assert packer.num_tokens == 9 and packer(torch.randn(2, 64, 16)).shape == (2, 9, 8)


@pytest.mark.parametrize("scale, message", [(1, "integer >= 2"), (2.0, "integer >= 2"), (7, "at most the patch grid")])
def test_bad_scales_are_clear_errors(scale, message):
    with pytest.raises(ValueError, match=message):
        TokenPacker(vision_width=8, levels=1, hidden_size=8, grid=(6, 6), scale=scale)


def test_wrong_feature_width_is_a_clear_error():
    packer = TokenPacker(vision_width=8, levels=2, hidden_size=8, grid=(4, 4))
    with pytest.raises(ValueError, match=r"expects \[B, 16, 24\]"):
        packer(torch.randn(1, 16, 16))
