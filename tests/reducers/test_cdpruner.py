"""CDPruner (``cdpruner``): its kept set equals a float64 transcription of the official conditional-DPP greedy MAP
(relevance by the negative cosine with the instruction, min-max normalised; kernel diag(r) S diag(r)); rows are
independent; the budget is exact; bad options and queries are refused."""
import pytest
import torch

import vtr
from vtr.core.state import TokenState
from vtr.reducers import Signals

from conftest import make_state


def official(features: torch.Tensor, text: torch.Tensor, count: int, margin: float = 1e-6) -> list[int]:
    """The official code's encode_images step for one image, transcribed: ``features`` [N, D] (projector output),
    ``text`` [M, D] (the instruction's embeddings), in float64; asserts no near-tie at any greedy step."""
    features, text = features.double(), text.double()
    normalized = features / features.norm(dim=-1, keepdim=True)
    similarity = normalized @ normalized.t()
    relevance = (-(normalized @ (text / text.norm(dim=-1, keepdim=True)).t())).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance[:, None] * similarity * relevance[None, :]
    cis = torch.zeros(count, len(features), dtype=torch.float64)
    di2s = kernel.diagonal().clone()
    chosen = []
    for i in range(count):
        top2 = di2s.topk(2).values
        assert top2[0] - top2[1] > margin * top2[0], "near-tie in the greedy step: choose another seed"
        j = int(di2s.argmax())
        chosen.append(j)
        eis = (kernel[j] - cis[:i, j] @ cis[:i]) / di2s[j].sqrt()
        cis[i] = eis
        di2s = di2s - eis.square()
        di2s[j] = float("-inf")
    return sorted(chosen)


def kept_tokens(state: TokenState) -> list[list[int]]:
    """Original index of each kept token, per row (dropping: each kept token carries itself)."""
    return [row[row >= 0].tolist() for row in state.first_carried(missing=-1)]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("count", [1, 5, 12])
def test_kept_set_equals_the_official_greedy_map(seed, count):
    generator = torch.Generator().manual_seed(seed)
    features, text = torch.randn(24, 32, generator=generator), torch.randn(3, 32, generator=generator)
    reducer = vtr.make_reducer("cdpruner")
    state = reducer(TokenState.start(features[None]), count, Signals(metric=features[None], query=text[None]))
    assert state.num_tokens == count
    assert kept_tokens(state) == [official(features, text, count)]


def test_without_negate_relevance_follows_the_cosine():
    generator = torch.Generator().manual_seed(5)
    features, text = torch.randn(24, 32, generator=generator), torch.randn(2, 32, generator=generator)
    reducer = vtr.make_reducer("cdpruner", negate=False)
    state = reducer(TokenState.start(features[None]), 6, Signals(metric=features[None], query=text[None]))
    assert kept_tokens(state) == [official(features, -text, 6)]   # cos(x, -t) = -cos(x, t)
    assert kept_tokens(state) != [official(features, text, 6)]


def test_rows_are_independent_of_the_batch_and_padding_goes_last():
    batch = make_state(batch=3, tokens=20, channels=16, protected=0, padding=4, seed=3)
    query = torch.randn(3, 2, 16, generator=torch.Generator().manual_seed(4))
    reducer = vtr.make_reducer("cdpruner")
    together = reducer(batch, 18, Signals(metric=batch.x, query=query))
    assert kept_tokens(together) == [list(range(18))] * 3    # all 16 real tokens, then 2 padding slots
    # a budget under the real tokens: each row keeps what it keeps alone
    together = reducer(batch, 7, Signals(metric=batch.x, query=query))
    for row in range(3):
        alone = TokenState.start(batch.x[row:row + 1, :16])
        alone = reducer(alone, 7, Signals(metric=alone.x, query=query[row:row + 1]))
        assert kept_tokens(together)[row] == kept_tokens(alone)[0]


def test_more_tokens_than_the_kernel_rank_are_all_distinct_and_follow_relevance():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(12, 3, generator=generator)       # rank 3: the fourth pick has no gain left
    text = torch.randn(1, 3, generator=generator)
    state = vtr.make_reducer("cdpruner")(TokenState.start(features[None]), 8,
                                         Signals(metric=features[None], query=text[None]))
    first = official(features, text, 3)                      # the DPP's own picks while it has gains
    unit = features.double() / features.double().norm(dim=-1, keepdim=True)
    relevance = -(unit @ (text.double() / text.double().norm())[0])
    rest = [i for i in relevance.argsort(descending=True).tolist() if i not in first][:5]
    assert kept_tokens(state) == [sorted(first + rest)] and torch.isfinite(state.x).all()


def test_without_a_query_it_is_a_dpp_over_similarity():
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(16, 8, generator=generator)
    state = vtr.make_reducer("cdpruner")(TokenState.start(features[None]), 4, Signals(metric=features[None]))
    # relevance 1 everywhere: the greedy MAP of S alone; every first gain is exactly 1, so the first token leads
    unit = features.double() / features.double().norm(dim=-1, keepdim=True)
    kernel = (unit @ unit.t()).fill_diagonal_(1.0)
    cis, di2s, chosen = torch.zeros(4, 16, dtype=torch.float64), kernel.diagonal().clone(), []
    for i in range(4):
        if i:
            top2 = di2s.topk(2).values
            assert top2[0] - top2[1] > 1e-6, "near-tie: choose another seed"
        j = int(di2s.argmax())
        chosen.append(j)
        eis = (kernel[j] - cis[:i, j] @ cis[:i]) / di2s[j].sqrt()
        cis[i] = eis
        di2s = di2s - eis.square()
        di2s[j] = float("-inf")
    assert chosen[0] == 0 and kept_tokens(state) == [sorted(chosen)]


@pytest.mark.parametrize("options, message", [
    ({"negate": 1}, r"cdpruner: negate must be True or False"),
    ({"fuse": "merge"}, r"cdpruner: fuse must be one of \('drop', 'one', 'nearest'\)"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        vtr.make_reducer("cdpruner", **options)


def test_a_query_of_another_width_is_refused():
    state = make_state(batch=1, tokens=8, channels=16, protected=0)
    with pytest.raises(ValueError, match=r"cdpruner: the query has width 4 but the tokens have width 16"):
        vtr.make_reducer("cdpruner")(state, 4, Signals(metric=state.x, query=torch.randn(1, 4)))
