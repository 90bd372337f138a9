"""FEATHER (``feather``): its kept sets equal a transcription of the official code's rule (the last prompt token's
attention without the rotary embedding, a softmax over the image's tokens, head mean; the first stage keeps a
uniform grid besides the top tokens), its grid and stage counts follow the paper's settings, bad options are
refused, and it runs on a batch with padding, several images and a text-only row."""
import math

import pytest
import torch

import vtr
from vtr.budget.visual import stage_budgets
from vtr.reducers.feather import feather_layers, grid_stride, uniform_grid

from in_lm_reference import stage_columns, top
from llava_models import IMAGE_TOKEN, generate, left_padded, mixed_batch, prompt_row, tiny_llava


def image_attention(layer, hidden, image):
    """The official ``calculate_attention_weight`` with ``fastV_use_rope = False``: the last position's query
    against the image positions' keys, no rotary embedding, ``softmax`` over the image keys only, head mean."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    length = hidden.shape[1]
    q = attn.q_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)[0, :, -1:]        # [H, 1, d]
    k = attn.k_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)[0]
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)[:, image]                       # [H, N, d]
    weights = (q @ k.transpose(1, 2) / math.sqrt(attn.head_dim)).softmax(dim=-1)
    return weights.mean(dim=0)[0]                                                             # [N]


def feather_rule(counts, stride, grid_side):
    """The official rule at each stage, for vtr's count: at the first, ``top-k attention ∪ grid[::s, ::s]``
    (``torch.unique``) with the smallest k whose union has the stage's count; after it, the top count."""
    def rule(layer, hidden, present, image, stage, cos, sin, language, embedded):
        score = image_attention(layer, hidden, image)
        count = counts[stage]
        if stage > 0:
            return present[image][top(score, count)]
        strided = torch.arange(grid_side * grid_side).view(grid_side, grid_side)[::stride, ::stride].flatten()
        for k in range(count + 1):
            union = torch.unique(torch.cat([top(score, k), strided]), sorted=True)
            if len(union) == count:
                return present[image][union]
        raise AssertionError("no k gives the stage's count")
    return rule


def kept_columns(model, ids, mask, pixels):
    generate(model, ids, mask, pixel_values=pixels)
    return [columns[0][columns[0] >= 0] for columns in vtr.report(model).stage_positions]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("budget, layers, counts, stride", [
    (8, [1], [8], 3),               # one stage: grid[::3, ::3] of 4 x 4 (4 tokens, half the count), 4 by attention
    (2, [1, 2], [8, 2], 3),         # two stages (ratio 0.5): the grid only at the first
    (4, [2], [4], 3),               # grid[::3, ::3] has 4 > ceil(4 / 2): the stride grows to 4 (1 token)
])
def test_kept_sets_equal_the_published_rule(seed, budget, layers, counts, stride):
    model = tiny_llava(seed=seed)
    ids, mask = left_padded([prompt_row([1, 5], 1, [7, 8, 9])])
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(seed))
    vtr.patch(model, "feather", budget=budget, layers=layers, ratio=0.5)
    got = kept_columns(model, ids, mask, pixels)
    used = grid_stride(4, 4, stride, counts[0])
    rule = feather_rule(counts, used, 4)
    expected = stage_columns(vtr.unpatch(model) or model, ids, pixels, {layer: rule for layer in layers})
    assert [c.tolist() for c in got] == [c.tolist() for c in expected]
    assert [int((ids[0, c] == IMAGE_TOKEN).sum()) for c in got] == counts


def test_grid_is_the_official_stride_and_grows_to_half_the_count():
    assert uniform_grid(27, 27, 3).tolist() == [r * 27 + c for r in range(0, 27, 3) for c in range(0, 27, 3)]
    assert len(uniform_grid(24, 24, 3)) == 64
    assert grid_stride(27, 27, 3, 218) == 3            # the paper's first stage (30% of 729): 81 grid tokens fit
    assert grid_stride(24, 24, 3, 64) == 5             # 64 kept of 576: 64, then 36 grid tokens > 32; 25 fit
    assert grid_stride(8, 8, 3, 7) == 4 and grid_stride(8, 8, 3, 16) == 4 and grid_stride(8, 8, 3, 32) == 3
    assert grid_stride(8, 8, 3, 1) == 8                # one token: the top-left one


def test_stage_counts_and_layers_follow_the_paper():
    reducer = vtr.make_reducer("feather")
    assert stage_budgets(64, 729, 0, 2, reducer) == [218, 64]    # 30% of 729 at the first stage, then the budget
    assert stage_budgets(300, 729, 0, 2, reducer) == [300, 300]  # never below the budget
    assert feather_layers(32) == [8, 16] and feather_layers(28) == [7, 14] and feather_layers(3) == [1]
    assert feather_layers(1) == [0]


@pytest.mark.parametrize("option, value, message", [
    ("stride", 0, r"feather: stride must be an int >= 1"), ("stride", 2.5, r"feather: stride must be an int >= 1"),
    ("ratio", 1.0, r"feather: ratio must be in \(0, 1\)"), ("ratio", float("nan"), r"feather: ratio must be in"),
])
def test_bad_options_are_refused(option, value, message):
    with pytest.raises(ValueError, match=message):
        vtr.make_reducer("feather", **{option: value})


def test_default_layers_inside_the_language_model():
    model = vtr.patch(tiny_llava(), "feather", budget=2)   # 4 decoder layers: a quarter and half in, 1 and 2
    assert model._vtr.visual.layers == (1, 2)


def test_a_mixed_batch_gives_each_row_its_count():
    """Two images, one image, no image: every image keeps the budget, the text-only row is untouched."""
    ids, mask, pixels = mixed_batch()
    model = vtr.patch(tiny_llava(), "feather", budget=5, layers=[1])
    generate(model, ids, mask, pixel_values=pixels)
    columns = vtr.report(model).stage_positions[0]
    images = [int((ids[row, columns[row][columns[row] >= 0]] == IMAGE_TOKEN).sum()) for row in range(3)]
    assert images == [10, 5, 0]
