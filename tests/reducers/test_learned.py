"""Learned reducers on hand-made token states (issue 12): dynamicvit's eval top-k and training-time masks,
sit's soft slimming (sizes, provenance), their options and errors. Model-level behaviour (registration,
state_dict, FLOPs, distillation) is in tests/adapters/test_finetune.py."""
import pytest
import torch

import vtr
from vtr.core.state import MASK_FLOOR, TokenState
from vtr.reducers import DynamicViT, EViT, SiT, Signals
from vtr.reducers.dynamicvit import budget_cutoff

from conftest import make_state

WIDTH, TOKENS = 8, 17


def distinct_attention(batch: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """A CLS attention row per image with well-separated values (no near-ties to round differently)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(tokens, generator=generator) for _ in range(batch)])
    return (order.float() + 1).softmax(dim=1)


def built(reducer, counts=(TOKENS, 9), protected=1):
    """Built for a model whose blocks reduce as ``counts`` say, plus one block after them (a learned
    reducer never reduces at the last block)."""
    reducer.build(WIDTH, [*counts, counts[-1]], protected)
    return reducer


# -- dynamicvit -------------------------------------------------------------------------------------

def test_untrained_dynamicvit_keeps_evits_tokens_in_eval():
    """init='cls_attention' (the default) starts as EViT: the same kept tokens as evit with fuse='drop'."""
    state = make_state(batch=3, tokens=TOKENS, channels=WIDTH, padding=2)
    signals = Signals(metric=state.x, cls_attention=distinct_attention(3, TOKENS))
    ours = built(DynamicViT()).eval()(state, 9, signals)
    evit = EViT(fuse="drop")(state, 9, signals)
    assert torch.equal(ours.assignment, evit.assignment) and torch.equal(ours.x, evit.x)
    assert ours.num_tokens == 9


def test_dynamicvit_eval_keeps_the_top_predicted_tokens_per_row():
    """init='random': eval keeps exactly num_kept tokens, the best by the module's own logit."""
    reducer = built(DynamicViT(init="random")).eval()
    state = make_state(batch=2, tokens=TOKENS, channels=WIDTH)
    out = reducer(state, 9, Signals(metric=state.x))
    predictor = reducer.predictors["0"]
    with torch.no_grad():
        logit = predictor(state.x[:, 1:], state.size[:, 1:])
    for row in range(2):
        kept = out.assignment[row, 1:] >= 0
        assert int(kept.sum()) == 8
        assert logit[row][kept].min() > logit[row][~kept].max()


def test_dynamicvit_training_keeps_what_eval_keeps_by_default():
    """No noise (the default): each row's training mask keeps exactly the tokens eval keeps (well-separated
    scores: the untrained module ranks by CLS attention)."""
    reducer = built(DynamicViT())
    state = make_state(batch=3, tokens=TOKENS, channels=WIDTH, padding=2)
    signals = Signals(metric=state.x, cls_attention=distinct_attention(3, TOKENS, seed=4))
    masked = reducer.train()(state, 9, signals)
    kept = reducer.eval()(state, 9, signals)
    assert torch.equal(masked.mask.bool(), kept.assignment >= 0)
    assert masked.mask.sum(1).tolist() == [9.0] * 3


@pytest.mark.parametrize("init,noise", [("random", 0.0), ("cls_attention", 0.0), ("cls_attention", 1.0)])
def test_dynamicvit_training_masks_keep_shape_and_let_each_row_choose(init, noise):
    torch.manual_seed(0)
    reducer = built(DynamicViT(init=init, noise=noise), counts=(TOKENS, 9, 5)).train()
    state = make_state(batch=4, tokens=TOKENS, channels=WIDTH, padding=3)
    signals = Signals(metric=state.x, cls_attention=distinct_attention(4, TOKENS))
    first = reducer(state, 9, signals)
    assert first.num_tokens == TOKENS and first.scheduled_tokens == 9
    assert set(first.mask.unique().tolist()) <= {0.0, 1.0}
    assert (first.mask[:, 0] == 1).all()                       # the CLS token is never masked
    assert (first.mask[:, -3:] == 0).all()                     # padding is never kept
    assert len({tuple(row.tolist()) for row in first.mask}) > 1   # rows decide on their own
    signals.layer = 1
    second = reducer(first, 5, signals)
    assert (second.mask <= first.mask).all()                   # masks compose: a masked token stays masked
    assert second.scheduled_tokens == 5
    # The straight-through gradient reaches both prediction modules: every parameter, or, from the
    # EViT start (a zero output layer), the output layer and the prior's scale (the rest from step 2 on).
    (second.mask * torch.arange(float(TOKENS))).sum().backward()
    for name, parameter in reducer.named_parameters():
        reached = parameter.grad is not None and parameter.grad.abs().sum() > 0
        assert reached == (init == "random" or "score.4" in name or "prior_scale" in name), name


def test_budget_cutoff_separates_exactly_the_scheduled_count():
    score = torch.tensor([[0.3, 2.0, -1.0, 0.9, 5.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    alive = torch.tensor([[True, True, True, True, False], [True, True, False, False, False]])
    cutoff = budget_cutoff(score, alive, 2)
    assert cutoff[0].item() == pytest.approx((0.9 + 0.3) / 2)    # between the 2nd and 3rd; the dead 5.0 does not count
    assert cutoff[1].item() == float("-inf")                     # only 2 alive: keep both
    assert ((score > cutoff) & alive).sum(1).tolist() == [2, 2]


def test_masked_tokens_get_almost_no_attention_and_cannot_be_reduced():
    state = make_state(batch=1, tokens=5, channels=4)
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0]])
    masked = state.masked(mask, 3)
    bias = masked.attention_bias(proportional=True)[0, 0, 0]
    assert bias[2].item() == pytest.approx(torch.tensor(MASK_FLOOR).log().item(), rel=1e-4)
    assert bias[0].abs().item() < 1e-5
    assert masked.num_scheduled == 3 and torch.equal(masked.weight(), mask)
    with pytest.raises(ValueError, match="masked token state .* cannot be reduced"):
        masked.reduce(torch.zeros(1, 5, dtype=torch.long), 1)


# -- sit --------------------------------------------------------------------------------------------

def test_sit_slims_softly_conserving_size_with_dominant_provenance():
    torch.manual_seed(0)
    reducer = built(SiT(), counts=(TOKENS, 6)).eval()
    state = make_state(batch=2, tokens=TOKENS, channels=WIDTH, padding=2, requires_grad=True)
    out = reducer(state, 6, Signals(metric=state.x))
    assert out.x.shape == (2, 6, WIDTH) and torch.equal(out.x[:, 0], state.x[:, 0])
    torch.testing.assert_close(out.size.sum(1), state.size.sum(1))        # each input's size is shared out
    weight = reducer.slimmers["0"](state.x[:, 1:], state.size[:, 1:] > 0, 1.0)
    assert torch.equal(weight[:, -2:], torch.zeros(2, 2, 5))                # padding gives no weight
    torch.testing.assert_close(out.x[:, 1:], weight.transpose(1, 2) @ state.x[:, 1:])
    dominant = weight.argmax(dim=2) + 1
    assert torch.equal(out.assignment[:, 1:-2], dominant[:, :-2]) and (out.assignment[:, -2:] == -1).all()
    out.x.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in reducer.parameters())


def test_sit_refuses_another_token_count_than_it_learned():
    reducer = built(SiT(), counts=(TOKENS, 6)).eval()
    state = make_state(tokens=TOKENS, channels=WIDTH)
    with pytest.raises(ValueError, match=r"sit: block 0 learned to slim to 5 tokens, but this call keeps 7"):
        reducer(state, 8, Signals(metric=state.x))


# -- options and errors -----------------------------------------------------------------------------

@pytest.mark.parametrize("method, options, message", [
    ("dynamicvit", {"init": "evit"}, r"dynamicvit: init must be one of \('random', 'cls_attention'\)"),
    ("dynamicvit", {"threshold": "half"}, r"dynamicvit: threshold must be one of \('budget', 'zero'\)"),
    ("dynamicvit", {"temperature": 0}, r"dynamicvit: temperature must be a finite number > 0, got 0"),
    ("dynamicvit", {"noise": -1}, r"dynamicvit: noise must be a finite number >= 0 .*got -1"),
    ("sit", {"temperature": float("nan")}, r"sit: temperature must be a finite number > 0, got nan"),
])
def test_bad_options_name_the_option_and_what_it_takes(method, options, message):
    with pytest.raises(ValueError, match=message):
        vtr.make_reducer(method, **options)


@pytest.mark.parametrize("method", ["dynamicvit", "sit"])
def test_an_unbuilt_learned_reducer_says_how_it_gets_its_modules(method):
    reducer = vtr.make_reducer(method).eval()
    state = make_state(tokens=TOKENS, channels=WIDTH)
    with pytest.raises(ValueError, match=rf"{method}: no learned module for block 0 \(built for blocks: none\); "
                                         "a learned reducer is built for a model by vtr.patch"):
        reducer(state, 9, Signals(metric=state.x, cls_attention=distinct_attention(2, TOKENS)))
    with pytest.raises(ValueError, match=rf"{method}: a learned reducer needs the token width"):
        reducer.build(0, [TOKENS, 9], 1)


def test_only_init_cls_attention_reads_the_cls_attention():
    assert DynamicViT().needs == {vtr.Need.CLS_ATTENTION}
    assert DynamicViT(init="random").needs == frozenset() and SiT().needs == frozenset()
