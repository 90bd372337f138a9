"""The granularity scaler, the training-free router's rule and RGLF's ranking loss on hand-made inputs."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from vtr.compression.granularity import (LearnedRouter, RelevanceRouter, blur, check_levels, pool_level,
                                         ranking_loss, relevance, windows)

GRID = (4, 4)
LEVELS = (1, 2, 4)


def test_pool_level_averages_windows_row_major():
    x = torch.arange(16.0).view(16, 1)
    assert pool_level(x, GRID, 2)[:, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    assert pool_level(x, GRID, 4)[:, 0].tolist() == [7.5]
    assert pool_level(x, GRID, 1) is x


def test_blur_known_answers():
    uniform = torch.full((16,), 1 / 16, dtype=torch.float64)
    assert [float(blur(uniform, GRID, f)) for f in LEVELS] == pytest.approx([0, 0, 0], abs=1e-15)
    one = torch.zeros(16, dtype=torch.float64)
    one[5] = 1.0
    assert [float(blur(one, GRID, f)) for f in LEVELS] == pytest.approx([0, 0.75, 15 / 16])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.01, 1.0), min_size=16, max_size=16))
def test_blur_is_at_most_what_a_one_hot_window_loses(weights):
    """Per window of mass w and k tokens the blur is at most w (1 - 1/k) (all of it on one token), so a level's
    blur lies in [0, 1 - 1/f**2]; it need not grow with f (a coarser window can be more even)."""
    p = torch.tensor(weights, dtype=torch.float64)
    p = p / p.sum()
    for f in LEVELS:
        assert 0.0 <= float(blur(p, GRID, f)) <= 1 - 1 / f ** 2 + 1e-12


def test_the_relevance_router_choice_follows_the_question():
    """One token stands out (a small object); a question about it needs the finest level, a question about
    nothing in particular gets the coarsest."""
    tokens = torch.zeros(16, 8)
    tokens[6, 0] = 10.0
    router = RelevanceRouter(tolerance=0.25)
    about_the_object = torch.zeros(2, 8)
    about_the_object[:, 0] = 10.0
    about_nothing = torch.zeros(2, 8)
    about_nothing[:, 1] = 10.0
    assert LEVELS[router.choose(tokens, about_the_object, GRID, LEVELS)] == 1
    assert LEVELS[router.choose(tokens, about_nothing, GRID, LEVELS)] == 4


def test_a_2x2_object_gets_the_middle_level():
    tokens = torch.zeros(16, 8)
    tokens[[0, 1, 4, 5], 0] = 10.0        # exactly one 2 x 2 window
    question = torch.zeros(1, 8)
    question[0, 0] = 10.0
    assert LEVELS[RelevanceRouter(tolerance=0.25).choose(tokens, question, GRID, LEVELS)] == 2


def test_pooling_a_grid_the_factor_does_not_divide_averages_smaller_edge_windows():
    x = torch.arange(9.0).view(9, 1)          # a 3 x 3 grid
    assert pool_level(x, (3, 3), 2)[:, 0].tolist() == [2.0, 3.5, 6.5, 8.0]
    assert windows((3, 3), 2).tolist() == [0, 0, 1, 0, 0, 1, 2, 2, 3]
    one = torch.zeros(9, dtype=torch.float64)
    one[8] = 1.0                                # alone in its window: pooling places it exactly
    assert float(blur(one, (3, 3), 2)) == 0.0
    one = torch.zeros(9, dtype=torch.float64)
    one[0] = 1.0
    assert float(blur(one, (3, 3), 2)) == pytest.approx(0.75)


@pytest.mark.parametrize("levels", [[1], [1, 1], [1, 5], 2, "124", [0, 2], [1, 2.0]])
def test_bad_levels_are_clear_errors(levels):
    with pytest.raises(ValueError, match="levels must"):
        check_levels(levels, GRID)


@pytest.mark.parametrize("options, name", [({"tolerance": 1.5}, "tolerance"), ({"temperature": 0.0}, "temperature")])
def test_bad_router_options_are_clear_errors(options, name):
    with pytest.raises(ValueError, match=name):
        RelevanceRouter(**options)


def test_ranking_loss_pulls_the_router_towards_the_lowest_answer_loss():
    answer_loss = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.4]])
    logits = torch.zeros(2, 3, requires_grad=True)
    optimizer = torch.optim.SGD([logits], lr=1.0)
    for _ in range(20):
        optimizer.zero_grad()
        ranking_loss(logits, answer_loss).backward()
        optimizer.step()
    order = logits.detach().argsort(-1, descending=True)
    assert order.tolist() == answer_loss.argsort(-1).tolist()


def test_ranking_pairs_cost_nothing_when_the_router_agrees():
    answer_loss = torch.tensor([[0.1, 0.5, 0.9]])
    agreeing = torch.tensor([[5.0, 2.0, 0.0]])
    disagreeing = torch.tensor([[0.0, 2.0, 5.0]])
    ce = torch.nn.functional.cross_entropy
    best = torch.tensor([0])
    assert float(ranking_loss(agreeing, answer_loss, margin=0.0)) == pytest.approx(float(ce(agreeing, best)))
    assert float(ranking_loss(disagreeing, answer_loss, margin=0.0)) > float(ce(disagreeing, best))


def test_learned_router_gives_one_logit_per_level_and_depends_on_the_question():
    torch.manual_seed(0)
    router = LearnedRouter(16, 3).eval()
    tokens = torch.randn(16, 16)
    a, b = router(tokens, torch.randn(3, 16)), router(tokens, torch.randn(5, 16))
    assert a.shape == (3,) and not torch.allclose(a, b)


def test_relevance_does_not_depend_on_the_features_scale():
    """Text and visual tokens share the LM's input space but not a scale: tiny projected features must not make
    every map uniform (raw products did, on the trained yardstick)."""
    torch.manual_seed(0)
    tokens, question = torch.randn(16, 8), torch.randn(3, 8)
    for scale in (1e-3, 1.0, 1e3):
        torch.testing.assert_close(relevance(scale * tokens, question), relevance(tokens, question))
    assert float(relevance(tokens, torch.zeros(3, 8)).std()) == 0.0


def test_blur_over_several_grids_pools_each_on_its_own():
    """An AnyRes image's thumbnail and crops, one grid after another: no window spans two grids, so the blur is the
    sum of each grid's (a one-hot per grid loses 3/4 of its mass at level 2); a length that fills no whole grid is
    an error."""
    torch.manual_seed(0)
    p = torch.rand(3 * 16, dtype=torch.float64)
    p = p / p.sum()
    parts = sum(float(blur(p[16 * k:16 * (k + 1)], GRID, 2)) for k in range(3))
    assert float(blur(p, GRID, 2)) == pytest.approx(parts, abs=1e-15)
    one_each = torch.zeros(32, dtype=torch.float64)
    one_each[[5, 16 + 10]] = 0.5
    assert float(blur(one_each, GRID, 2)) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="no whole number of 4 x 4 grids"):
        blur(torch.ones(20, dtype=torch.float64) / 20, GRID, 2)
