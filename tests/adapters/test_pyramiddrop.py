"""PyramidDrop (``pyramiddrop``): its kept sets equal a transcription of the published rule, its stage counts
follow the paper's ratio, and it is ``fastv`` with drop and those counts, exactly."""
import pytest
import torch

import vtr
from vtr.budget.visual import stage_budgets
from vtr.reducers.pyramiddrop import quarters

from in_lm_reference import attention, stage_columns, top
from llava_models import IMAGE_TOKEN, generate, left_padded, mixed_batch, prompt_row, tiny_llava


def pyramiddrop_rule(counts):
    """The official code's rank-and-drop at a stage: the last instruction token's attention row of the layer
    (its input norm, q/k projections and rotary, softmax over the causal row), mean over heads, the image
    columns' top ``counts[stage]``."""
    def rule(layer, hidden, present, image, stage, cos, sin, language, embedded):
        last = attention(layer, hidden, cos, sin).mean(dim=0)[-1]
        return present[image][top(last[image], counts[stage])]
    return rule


def kept_columns(model, ids, mask, pixels):
    generate(model, ids, mask, pixel_values=pixels)
    return [columns[0][columns[0] >= 0] for columns in vtr.report(model).stage_positions]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kept_sets_equal_the_published_rule(seed):
    model = tiny_llava(seed=seed)
    ids, mask = left_padded([prompt_row([1, 5], 1, [7, 8, 9])])
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(seed))
    vtr.patch(model, "pyramiddrop", budget=2)             # 16 image tokens, layers 1, 2, 3 of 4: 8, 4, 2
    assert model._vtr.visual.layers == (1, 2, 3)
    got = kept_columns(model, ids, mask, pixels)
    rule = pyramiddrop_rule([8, 4, 2])
    expected = stage_columns(vtr.unpatch(model) or model, ids, pixels, {1: rule, 2: rule, 3: rule})
    assert [c.tolist() for c in got] == [c.tolist() for c in expected]
    assert [int((ids[0, c] == IMAGE_TOKEN).sum()) for c in got] == [8, 4, 2]


def test_stage_counts_follow_the_ratio_and_end_on_the_budget():
    reducer = vtr.make_reducer("pyramiddrop")
    assert stage_budgets(72, 576, 0, 3, reducer) == [288, 144, 72]     # the paper's LLaVA-1.5 setting
    assert stage_budgets(64, 576, 0, 3, reducer) == [288, 144, 64]     # another budget: only the last changes
    assert stage_budgets(200, 576, 0, 3, reducer) == [288, 200, 200]   # never below the budget
    assert stage_budgets(7, 100, 0, 3, vtr.make_reducer("pyramiddrop", ratio=0.3)) == [30, 9, 7]
    assert stage_budgets(7, 100, 0, 3) == [41, 17, 7]                   # vtr's geometric default, for contrast


def test_default_layers_are_the_papers_quarters():
    assert quarters(32) == [8, 16, 24] and quarters(28) == [7, 14, 21] and quarters(4) == [1, 2, 3]
    assert quarters(2) == [1] and quarters(1) == [0]


def test_it_is_fastv_with_drop_at_its_layers_and_counts():
    ids, mask, pixels = mixed_batch()
    chosen = []
    for method, options in [("pyramiddrop", {"budget": 2}),
                            ("fastv", {"budget": [8, 4, 2], "layers": [1, 2, 3], "fuse": "drop"})]:
        model = vtr.patch(tiny_llava(), method, **options)
        out = generate(model, ids, mask, pixel_values=pixels)
        chosen.append(([c.tolist() for c in vtr.report(model).stage_positions], out.sequences))
    assert chosen[0][0] == chosen[1][0] and torch.equal(chosen[0][1], chosen[1][1])


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.5, "half", float("nan"), True])
def test_bad_ratio_is_refused(ratio):
    with pytest.raises(ValueError, match=r"pyramiddrop: ratio must be in \(0, 1\) \(the fraction of the visual "
                                         r"tokens each stage keeps\), got"):
        vtr.make_reducer("pyramiddrop", ratio=ratio)
