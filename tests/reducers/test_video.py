"""Video: the temporal merge and the frame budget split, on hand-made tokens whose answers are known."""
import pytest
import torch

from vtr.core.signals import Signals
from vtr.core.state import TokenState
from vtr.budget.visual import frame_budgets
from vtr.reducers.video import TemporalMerge, frame_weights


def video(frames: list[torch.Tensor]) -> tuple[TokenState, Signals]:
    """A one-video state from frames ``[n, D]`` each, with each token's frame as the partition."""
    x = torch.cat(frames)[None]
    partition = torch.arange(len(frames)).repeat_interleave(frames[0].shape[0])[None]
    return TokenState.start(x), Signals(metric=x, partition=partition)


def distinct(n: int, seed: int) -> torch.Tensor:
    """``n`` tokens far apart from each other and from other seeds' (random directions in 64 dimensions)."""
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(seed))


def test_temporal_merges_the_tokens_that_repeat_the_previous_frame():
    a, b = distinct(4, 0), distinct(4, 1)
    still = b.clone()
    still[2:] = a[2:]                      # frame 1 repeats frame 0 at places 2 and 3
    state, signals = video([a, still, still.clone()])
    out = TemporalMerge()(state, 6, signals)
    # Frame 2 repeats frame 1 everywhere (4 pairs of similarity 1), frame 1 repeats frame 0 at 2 places:
    # the 6 most alike pairs merge: places 2, 3 chain over the three frames, places 0, 1 of frames 1-2 pair up.
    assert out.num_tokens == 6
    assignment = out.assignment[0].view(3, 4)
    assert torch.equal(assignment[2], assignment[1])
    assert torch.equal(assignment[1, 2:], assignment[0, 2:])
    assert len(set(assignment[:, :2].flatten().tolist())) == 4
    assert out.size.sum() == 12 and sorted(out.size[0].tolist()) == [1, 1, 2, 2, 3, 3]
    torch.testing.assert_close(out.x[0, assignment[0, 2]], a[2])


def test_temporal_keeps_at_least_the_first_frame_and_needs_frames():
    state, signals = video([distinct(4, 0), distinct(4, 1)])
    assert TemporalMerge()(state, 4, signals).num_tokens == 4
    with pytest.raises(ValueError, match="keeps at least one frame's 4 tokens"):
        TemporalMerge()(state, 3, signals)
    with pytest.raises(ValueError, match="needs signals.metric and signals.partition"):
        TemporalMerge()(state, 6, Signals(metric=state.x))
    bad = Signals(metric=state.x, partition=torch.tensor([[0, 1, 0, 1, 0, 1, 0, 1]]))
    with pytest.raises(ValueError, match="frames 0..T-1 of equal size in order"):
        TemporalMerge()(state, 6, bad)


def test_uniform_split_gives_every_frame_its_share():
    weights = frame_weights(torch.randn(3, 4, 8), "uniform")
    assert frame_budgets(7, torch.tensor([4, 4, 4]), weights).tolist() == [3, 2, 2]
    assert frame_budgets(20, torch.tensor([4, 4, 4]), weights).tolist() == [4, 4, 4]     # all there is
    assert frame_budgets(5, torch.tensor([4, 0, 4]), weights).tolist() == [3, 0, 2]      # an emptied frame


def test_novelty_gives_a_repeated_frame_only_its_one_token():
    a, b = distinct(4, 0), distinct(4, 1)
    weights = frame_weights(torch.stack([a, a, b, b]), "novelty")
    assert weights[1] == pytest.approx(0.0, abs=1e-6) and weights[3] == pytest.approx(0.0, abs=1e-6)
    assert weights[0] == 1.0 and weights[2] > 0.5
    assert frame_budgets(8, torch.tensor([4, 4, 4, 4]), weights).tolist() == [3, 1, 3, 1]


def test_relevance_follows_the_query():
    frames = torch.stack([distinct(4, 0), distinct(4, 1), distinct(4, 2)])
    weights = frame_weights(frames, "relevance", query=frames[2, :2])
    assert weights.argmax() == 2 and weights[2] > 0.5 > max(weights[0], weights[1])
    assert frame_budgets(6, torch.tensor([4, 4, 4]), weights).tolist()[2] == 4
    with pytest.raises(ValueError, match="needs a query"):
        frame_weights(frames, "relevance")


def test_fewer_tokens_than_frames_go_to_the_heaviest_frames():
    weights = torch.tensor([0.1, 0.9, 0.5, 0.2], dtype=torch.float64)
    assert frame_budgets(2, torch.tensor([4, 4, 4, 4]), weights).tolist() == [0, 1, 1, 0]


def test_unknown_split_is_an_error():
    with pytest.raises(ValueError, match="frames must be one of uniform, novelty, relevance|frames must be one of"):
        frame_weights(torch.randn(2, 4, 8), "motion")
