"""ToMe and PiToMe on hand-made inputs whose answer is known by hand.

Metrics are one-hot (or 45-degree) vectors, so every cosine is exactly 0, 1 or 0.707 and no choice
can hinge on float32 rounding; features are float64 small integers, so expected means are exact.
"""
import torch

from vtr.reducers import PiToMe, Signals, ToMe

from vtr import TokenState


def onehot(*rows, dim=6):
    """[len(rows), dim] float64 metric; each row is an axis index or a tuple of axes (summed)."""
    out = torch.zeros(len(rows), dim, dtype=torch.float64)
    for i, axes in enumerate(rows):
        out[i, list(axes) if isinstance(axes, tuple) else axes] = 1.0
    return out


def features(batch, tokens):
    """Distinct float64 features: token i of row b is [100 b + i, (100 b + i)^2]."""
    v = torch.arange(batch * tokens, dtype=torch.float64).view(batch, tokens) + 100 * torch.arange(batch)[:, None]
    return torch.stack([v, v**2], dim=-1)


def check_conserved(start, out):
    """Sizes and size-weighted feature sums are conserved; each output is the mean of what it carries."""
    torch.testing.assert_close(out.size.sum(1), start.size.sum(1))
    w0, w1 = start.size.double()[..., None], out.size.double()[..., None]
    torch.testing.assert_close((out.x * w1).sum(1), (start.x * w0).sum(1))
    for b in range(start.x.shape[0]):
        for j in range(out.num_tokens):
            carried = out.assignment[b] == j
            torch.testing.assert_close(out.size[b, j], start.size[b, carried].sum())
            if out.size[b, j] > 0:
                torch.testing.assert_close(out.x[b, j], (start.x[b, carried] * w0[b, carried]).sum(0) / out.size[b, j])


# 1 CLS + 6 tokens. ToMe's sets: A = tokens 1, 3, 5 and B = tokens 2, 4, 6 (CLS is protected).
ROW_A = onehot(5, 0, 0, 1, 2, 3, 3)   # pairs (1, 2) and (5, 6) are duplicates; 3 matches nothing
ROW_B = onehot(5, 0, 1, 2, 2, 3, 3)   # pairs (3, 4) and (5, 6) are duplicates; 1 matches nothing


def test_tome_merges_the_duplicate_pairs():
    """r=2 on two duplicate A->B pairs: 1 merges into 2 and 5 into 6; exact means, sizes, provenance; CLS untouched."""
    x = features(1, 7)
    start = TokenState.start(x, num_protected=1)
    out = ToMe()(start, 5, Signals(metric=ROW_A[None]))
    expected = torch.stack([x[0, 0], (x[0, 1] + x[0, 2]) / 2, x[0, 3], x[0, 4], (x[0, 5] + x[0, 6]) / 2])
    assert torch.equal(out.x[0], expected)
    assert out.size.tolist() == [[1, 2, 1, 1, 2]]
    assert out.assignment.tolist() == [[0, 1, 1, 2, 3, 4, 4]]
    check_conserved(start, out)


def test_tome_r0_is_the_identity():
    """Keeping every token returns the state unchanged (same features, sizes, provenance)."""
    start = TokenState.start(features(1, 7), num_protected=1)
    out = ToMe()(start, 7, Signals(metric=ROW_A[None]))
    assert torch.equal(out.x, start.x) and torch.equal(out.size, start.size)
    assert torch.equal(out.assignment, start.assignment)


def test_tome_rows_choose_independently():
    """A batch of two rows with different duplicates: each row merges its own pairs."""
    x = features(2, 7)
    start = TokenState.start(x, num_protected=1)
    out = ToMe()(start, 5, Signals(metric=torch.stack([ROW_A, ROW_B])))
    assert out.assignment.tolist() == [[0, 1, 1, 2, 3, 4, 4], [0, 1, 2, 3, 3, 4, 4]]
    assert out.size.tolist() == [[1, 2, 1, 1, 2], [1, 1, 1, 2, 2]]
    assert torch.equal(out.x[1, 3], (x[1, 3] + x[1, 4]) / 2) and torch.equal(out.x[1, 1], x[1, 1])
    check_conserved(start, out)


def test_tome_padding_merges_first_and_never_attracts():
    """Padding A token 5 goes first; token 3 picks real token 4 (cos 0.707) over identical padding token 6."""
    x = features(1, 7)
    metric = onehot(5, 0, 0, 1, (1, 2), 4, 1)[None]
    start = TokenState.start(x, 1, padding_mask=torch.tensor([[True] * 5 + [False] * 2]))
    first = ToMe()(start, 6, Signals(metric=metric))   # r=1: the padding goes, not the duplicate 1 -> 2
    assert first.size.tolist() == [[1, 1, 1, 1, 1, 0]] and first.assignment[0, :5].tolist() == [0, 1, 2, 3, 4]
    check_conserved(start, first)
    out = ToMe()(start, 4, Signals(metric=metric))      # r=3: every A token merges
    assert out.size.tolist() == [[1, 2, 2, 0]]
    assert out.assignment[0, :5].tolist() == [0, 1, 1, 2, 2] and out.assignment[0, 6] == 3
    assert torch.equal(out.x[0, 1], (x[0, 1] + x[0, 2]) / 2) and torch.equal(out.x[0, 2], (x[0, 3] + x[0, 4]) / 2)
    check_conserved(start, out)


def test_pitome_merges_a_pair_inside_the_cluster():
    """Adjacent identical tokens 3, 4 (highest energy) merge into output token 3; the distinct ones pass through."""
    x = features(1, 7)
    start = TokenState.start(x, num_protected=1)
    out = PiToMe()(start, 6, Signals(metric=onehot(5, 0, 1, 2, 2, 3, 4)[None], layer=0, num_layers=1))
    expected = torch.cat([x[0, :3], ((x[0, 3] + x[0, 4]) / 2)[None], x[0, 5:]])
    assert torch.equal(out.x[0], expected)
    assert out.size.tolist() == [[1, 1, 1, 2, 1, 1]]
    assert out.assignment.tolist() == [[0, 1, 2, 3, 3, 4, 5]]
    check_conserved(start, out)


def test_pitome_keeps_the_distinct_tokens():
    """Cluster {2, 4, 6, 8} of identical metrics, distinct 1, 3, 5, 7: r=2 removes two cluster tokens only."""
    x = features(1, 9)
    start = TokenState.start(x, num_protected=1)
    out = PiToMe()(start, 7, Signals(metric=onehot(5, 1, 0, 2, 0, 3, 0, 4, 0, dim=6)[None], layer=0, num_layers=1))
    assignment = out.assignment[0]
    for token in [0, 1, 3, 5, 7]:   # CLS and the distinct tokens keep their features, alone
        assert (assignment == assignment[token]).sum() == 1
        assert torch.equal(out.x[0, assignment[token]], x[0, token]) and out.size[0, assignment[token]] == 1
    cluster = assignment[[2, 4, 6, 8]]
    assert len(set(cluster.tolist())) == 2 and out.size[0, cluster.unique()].sum() == 4
    check_conserved(start, out)
