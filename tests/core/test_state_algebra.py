"""The algebra of token states that adapters compose instead of editing ``assignment`` by hand: a reduction
of a reduction (``restarted`` / ``then``), parts reduced on their own and joined (crops, frames), a batch of
states (``stacked``), and the first original token each current token carries (``first_carried``)."""
import torch
from hypothesis import given, settings, strategies as st

from vtr import TokenState


@st.composite
def destinations(draw, num_tokens: int, batch: int):
    """A random destination map ``[B, N]``: each token goes to one of K outputs or is dropped (-1), every
    output receiving at least one token, so it is a valid reduction to K tokens."""
    num_kept = draw(st.integers(1, num_tokens))
    rows = []
    for _ in range(batch):
        order = draw(st.permutations(range(num_tokens)))
        row = [-1] * num_tokens
        for k in range(num_kept):                      # every output gets one token...
            row[order[k]] = k
        for i in order[num_kept:]:                      # ...the others go anywhere, or nowhere
            row[i] = draw(st.integers(-1, num_kept - 1))
        rows.append(row)
    return torch.tensor(rows), num_kept


def start(batch: int, num_tokens: int, seed: int = 0) -> TokenState:
    x = torch.randn(batch, num_tokens, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return TokenState.start(x)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), batch=st.integers(1, 3), num_tokens=st.integers(1, 12))
def test_then_composes_two_reductions_as_applying_both(data, batch, num_tokens):
    state = start(batch, num_tokens)
    first_dest, first_kept = data.draw(destinations(num_tokens, batch))
    once = state.reduce(first_dest, first_kept)
    second_dest, second_kept = data.draw(destinations(first_kept, batch))
    direct = once.reduce(second_dest, second_kept)
    composed = once.then(once.restarted().reduce(second_dest, second_kept))
    assert torch.equal(composed.assignment, direct.assignment)
    assert torch.equal(composed.size, direct.size)
    torch.testing.assert_close(composed.x, direct.x, rtol=1e-12, atol=1e-12)


def test_restarted_keeps_the_tokens_and_sizes_and_starts_provenance_afresh():
    state = start(2, 6).reduce(torch.tensor([[0, 0, 1, 2, -1, 2]] * 2), 3)
    fresh = state.restarted()
    assert torch.equal(fresh.x, state.x) and torch.equal(fresh.size, state.size)
    assert fresh.assignment.tolist() == [[0, 1, 2]] * 2 and fresh.num_original == 3
    assert torch.equal(state.then(fresh).assignment, state.assignment)   # nothing reduced: the same provenance


def test_joined_puts_each_parts_reduction_at_its_offset():
    """Two crops of an image reduced on their own, a token in no part dropped: each original token goes to its
    part's output, shifted past the earlier parts' tokens; sizes and the size-weighted sum stay per part."""
    image = start(1, 7)
    crop_a, crop_b = torch.tensor([0, 1, 2]), torch.tensor([4, 5, 6])   # token 3 belongs to no part
    reduced_a = TokenState.start(image.x[:, crop_a]).reduce(torch.tensor([[0, 0, 1]]), 2)
    reduced_b = TokenState.start(image.x[:, crop_b]).reduce(torch.tensor([[-1, 0, 0]]), 1)
    joined = image.joined([(crop_a, reduced_a), (crop_b, reduced_b)])
    assert joined.assignment.tolist() == [[0, 0, 1, -1, -1, 2, 2]]
    assert joined.size.tolist() == [[2.0, 1.0, 2.0]]
    torch.testing.assert_close((joined.x * joined.size[..., None]).sum(1),
                               image.x[:, [0, 1, 2, 5, 6]].sum(1), rtol=1e-12, atol=1e-12)


def test_joined_composes_with_an_earlier_reduction():
    """Frames of a video after a merge across frames: the parts are of the current tokens, and each original token
    follows the token that carried it."""
    video = start(1, 6)
    merged = video.reduce(torch.tensor([[0, 1, 2, 0, 3, 4]]), 5)      # original 3 merged into current token 0
    parts = [(torch.tensor([0, 1, 2]), TokenState.start(merged.x[:, :3]).reduce(torch.tensor([[0, 1, 1]]), 2)),
             (torch.tensor([3, 4]), TokenState.start(merged.x[:, 3:]).reduce(torch.tensor([[0, 0]]), 1))]
    joined = merged.joined(parts)
    assert joined.assignment.tolist() == [[0, 1, 1, 0, 2, 2]]


def test_stacked_is_a_batch_of_the_states():
    a, b = start(1, 5, seed=1), start(2, 5, seed=2)
    both = TokenState.stacked([a, b])
    assert torch.equal(both.x, torch.cat([a.x, b.x])) and both.assignment.shape == (3, 5)
    assert TokenState.stacked([a]) is a


@settings(max_examples=40, deadline=None)
@given(data=st.data(), num_tokens=st.integers(1, 12))
def test_first_carried_is_the_smallest_original_index_or_value(data, num_tokens):
    dest, num_kept = data.draw(destinations(num_tokens, 2))
    reduced = start(2, num_tokens).reduce(dest, num_kept)
    columns = torch.tensor(sorted(data.draw(st.lists(st.integers(0, 99), min_size=num_tokens,
                                                     max_size=num_tokens))))
    for row in range(2):
        for k in range(num_kept):
            carried = [i for i in range(num_tokens) if int(dest[row, i]) == k]
            assert int(reduced.first_carried()[row, k]) == min(carried)
            assert int(reduced.first_carried(columns, missing=-5)[row, k]) == int(columns[min(carried)])
