"""Attention-guided dropping: the CLS-row signal, EViT (fused token) and HiRED (partition budgets)."""
import dataclasses
import pytest
import torch
from hypothesis import given, settings, strategies as st

import vtr
from vtr.reducers import EViT, HiRED, Signals
from vtr.reducers.drop import allocate
from vtr.core.signals import cls_attention

from conftest import make_state, tiny_vit, vit_images as images


def eager_cls_row(q, k, bias, scale):
    attention = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        attention = attention + bias
    return attention.softmax(dim=-1)[:, :, 0].mean(dim=1)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), heads=st.integers(1, 4), tokens=st.integers(2, 20), dim=st.integers(1, 16),
       seed=st.integers(0, 1000), padded=st.integers(0, 3))
def test_cls_attention_is_row_zero_of_the_full_softmax(batch, heads, tokens, dim, seed, padded):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, tokens, dim, generator=generator, dtype=torch.float64)
    k = torch.randn(batch, heads, tokens, dim, generator=generator, dtype=torch.float64)
    size = torch.randint(1, 5, (batch, tokens), generator=generator).double()
    size[:, tokens - min(padded, tokens - 1):] = 0
    bias = size.log()[:, None, None, :]
    got = cls_attention(q, k, bias)
    torch.testing.assert_close(got, eager_cls_row(q, k, bias, dim ** -0.5).float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(cls_attention(q, k), eager_cls_row(q, k, None, dim ** -0.5).float())


class Recording(EViT):
    """EViT that keeps the cls_attention signal it was given at each layer."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def forward(self, state, num_kept, signals):
        self.seen[signals.layer] = signals.cls_attention
        return super().forward(state, num_kept, signals)


def test_adapter_cls_attention_matches_eager_attention_of_the_block():
    """What the timm adapter hands a reducer equals row 0 of the block's full eager attention,
    including the log(size) bias of an already reduced state and qk_norm."""
    model = tiny_vit(qk_norm=True)
    vtr.patch(model, "evit", keep=0.6, layers=[0, 2])
    recorder = Recording()
    model._vtr = dataclasses.replace(model._vtr, reducer=recorder)
    inputs = {}
    handle = model.blocks[2].attn.register_forward_pre_hook(
        lambda module, args, kwargs: inputs.update(x=args[0], mask=kwargs.get("attn_mask")), with_kwargs=True)
    model(images())
    handle.remove()
    attn, x = model.blocks[2].attn, inputs["x"]
    batch, tokens, _ = x.shape
    q, k, _ = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    assert inputs["mask"] is not None  # the state was reduced at layer 0, so sizes bias the logits
    expected = eager_cls_row(q, k, inputs["mask"], attn.scale)
    torch.testing.assert_close(recorder.seen[2], expected, rtol=1e-4, atol=1e-6)


def scored_signals(state, seed=1):
    score = torch.rand(state.x.shape[:2], generator=torch.Generator().manual_seed(seed))
    return Signals(cls_attention=score.softmax(dim=1), metric=state.x)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), tokens=st.integers(3, 24), protected=st.integers(0, 2), padding=st.integers(0, 4),
       fraction=st.floats(0, 1), seed=st.integers(0, 1000), fuse_weight=st.sampled_from(["attention", "size"]))
def test_evit_budget_protected_sizes_and_fused_mass(batch, tokens, protected, padding, fraction, seed, fuse_weight):
    padding = min(padding, tokens - protected - 1)
    state = make_state(batch, tokens, 6, protected, padding, seed)
    reducer = EViT(fuse="one", fuse_weight=fuse_weight)
    low = protected + 1
    num_kept = low + int(fraction * (tokens - low))
    signals = scored_signals(state, seed)
    out = reducer(state, num_kept, signals)
    assert out.x.shape == (batch, num_kept, 6)
    torch.testing.assert_close(out.x[:, :protected], state.x[:, :protected])
    assert torch.equal(out.assignment[:, :protected], state.assignment[:, :protected])
    if num_kept == tokens:
        return
    # Total size is conserved: dropped real tokens went into the fused (last) token.
    torch.testing.assert_close(out.size.sum(1), state.size.sum(1))
    fused = (out.assignment == num_kept - 1)
    score = signals.cls_attention[:, protected:]
    score = score * (state.size[:, protected:] > 0)
    score = torch.cat([torch.zeros(batch, protected), score / score.sum(1, keepdim=True)], dim=1)
    weight = state.size if fuse_weight == "size" else state.size * score
    mass = (state.x * (weight * fused)[..., None]).sum(1)
    torch.testing.assert_close(mass, out.x[:, -1] * (weight * fused).sum(1)[:, None], rtol=1e-4, atol=1e-5)
    if fuse_weight == "size":  # the size-weighted feature sum of the whole sequence is unchanged
        torch.testing.assert_close((out.x * out.size[..., None]).sum(1), (state.x * state.size[..., None]).sum(1),
                                   rtol=1e-4, atol=1e-4)
    # Kept tokens are the best-scored real ones, padding only if real tokens ran out.
    real = state.size[:, protected:] > 0
    for row in range(batch):
        kept = out.assignment[row, protected:]
        kept_real = (kept >= 0) & (kept < num_kept - 1) & real[row]
        slots = num_kept - protected - 1
        assert int(kept_real.sum()) == min(slots, int(real[row].sum()))
        if kept_real.any() and (real[row] & ~kept_real).any():
            assert score[row, protected:][kept_real].min() >= score[row, protected:][real[row] & ~kept_real].max()
        assert (kept[~real[row]] != num_kept - 1).all()  # padding is never fused


def test_evit_per_row_deterministic_and_differentiable():
    state = make_state(2, 12, 4, 1, requires_grad=True)
    attention = torch.stack([torch.linspace(0, 1, 12), torch.linspace(1, 0, 12)]).softmax(dim=1)
    signals = Signals(cls_attention=attention, metric=state.x)
    out = EViT(fuse="one")(state, 6, signals)
    again = EViT(fuse="one")(state, 6, signals)
    assert torch.equal(out.assignment, again.assignment) and torch.equal(out.x, again.x)
    assert torch.equal(out.assignment[0, 8:], torch.arange(1, 5))  # row 0 keeps the last tokens
    assert torch.equal(out.assignment[1, 1:5], torch.arange(1, 5))   # row 1 keeps the first ones
    out.x.sum().backward()
    assert state.x.grad.abs().sum(dim=-1).gt(0).all()  # kept and fused tokens all pass gradients


def test_evit_without_cls_uses_the_metric_norm_and_needs_some_score():
    state = make_state(1, 10, 4, 0)
    metric = torch.ones(1, 10, 4) * torch.arange(10.0)[None, :, None]
    out = EViT(fuse="one")(state, 4, Signals(metric=metric))
    assert torch.equal(out.assignment[0, 7:], torch.arange(3))  # largest norms kept, in order
    assert (out.assignment[0, :7] == 3).all()
    with pytest.raises(ValueError, match="cls_attention.*metric"):
        EViT()(state, 4, Signals())
    with pytest.raises(ValueError, match=r"metric must start with \[B, N\]"):
        EViT()(state, 4, Signals(metric=metric[:, :5]))


@pytest.mark.parametrize("method", ["evit", "fastv", "hired"])
def test_without_cls_the_attention_received_wins_over_the_metric_norm(method):
    """A tower without a CLS token that offers the attention each token receives (Qwen-VL before the LM): the
    ranking follows it, not the feature norm (which scored below random on the Qwen yardstick)."""
    state = make_state(1, 10, 4, 0)
    metric = torch.ones(1, 10, 4) * torch.arange(10.0)[None, :, None]      # norms favour the last tokens
    received = torch.arange(10.0, 0.0, -1)[None]                             # the attention favours the first
    reducer = vtr.reducers.base.REDUCERS[method](fuse="drop")
    out = reducer(state, 4, Signals(metric=metric, attention_received=received))
    assert out.assignment[0].ge(0).nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert "attention_received" in {str(need) for need in reducer.needs}


def test_evit_rejects_budgets_out_of_range_and_bad_options():
    state = make_state(1, 10, 4, 1)
    signals = scored_signals(state)
    with pytest.raises(ValueError, match=r"num_kept must be in \[2, 10\]"):
        EViT()(state, 11, signals)
    with pytest.raises(ValueError, match=r"num_kept must be in \[2, 10\]"):
        EViT()(state, 1, signals)
    with pytest.raises(ValueError, match="fuse must be one of"):
        EViT(fuse="mean")
    with pytest.raises(ValueError, match="fuse_weight must be one of"):
        EViT(fuse_weight="mean")
    model = tiny_vit()
    for keep in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="keep must be a fraction"):
            vtr.patch(model, "evit", keep=keep)


def test_evit_budget_larger_than_tokens_via_r_is_clamped():
    """r beyond what a step can remove is clamped by the schedule: CLS + one fused token remain."""
    model = vtr.patch(tiny_vit(), "evit", r=1000, layers=[1])
    model(images())
    assert vtr.report(model).tokens == [37, 37, 2, 2, 2]
    assert torch.allclose(vtr.report(model).size[:, 1], torch.full((2,), 36.0))


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), parts=st.integers(1, 6), seed=st.integers(0, 1000), fraction=st.floats(0, 1))
def test_allocate_sums_to_total_within_capacity(batch, parts, seed, fraction):
    generator = torch.Generator().manual_seed(seed)
    capacity = torch.randint(0, 8, (batch, parts), generator=generator).double()
    weight = torch.rand(batch, parts, generator=generator) * (torch.rand(batch, parts, generator=generator) > 0.2)
    total = (capacity.sum(1) * fraction).floor()
    budget = allocate(weight, capacity, total)
    assert torch.equal(budget.sum(1), total.long())
    assert (budget >= 0).all() and (budget <= capacity.long()).all()
    # Proportional up to rounding wherever no capacity binds.
    ideal = total[:, None] * weight / weight.sum(1, keepdim=True).clamp_min(1e-12)
    loose = (ideal <= capacity - 1).all(dim=1) & (weight.sum(1) > 0)
    assert ((budget - ideal).abs()[loose] < 1 + 1e-6).all()


def test_allocate_hands_capped_excess_on_and_rejects_overflow():
    budget = allocate(torch.tensor([[0.9, 0.1, 0.0]]), torch.tensor([[2.0, 10.0, 10.0]]), torch.tensor([8.0]))
    assert budget.tolist() == [[2, 6, 0]]
    budget = allocate(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 5.0]]), torch.tensor([4.0]))
    assert budget.tolist() == [[2, 2]]  # a zero-weight partition absorbs what the others cannot hold
    with pytest.raises(ValueError, match="total must not exceed"):
        allocate(torch.ones(1, 2), torch.ones(1, 2), torch.tensor([3.0]))


def test_hired_partitions_get_their_allocation():
    batch, tokens = 2, 25
    state = make_state(batch, tokens, 4, 1, padding=2)
    signals = scored_signals(state, seed=3)
    partition = torch.tensor([0] + [0] * 8 + [1] * 8 + [3] * 8).expand(batch, -1).clone()
    partition[1, 1:] = partition[1, 1:].flip(0)
    signals.partition = partition
    num_kept = 11
    out = HiRED(fuse="drop")(state, num_kept, signals)
    assert out.x.shape[1] == num_kept
    real = state.size[:, 1:] > 0
    score = signals.cls_attention[:, 1:] * real
    part = partition[:, 1:]
    capacity = torch.zeros(batch, 4).scatter_add(1, part, real.float())
    mass = torch.zeros(batch, 4).scatter_add(1, part, score / score.sum(1, keepdim=True))
    expected = allocate(mass, capacity, torch.full((batch,), 10.0))
    kept = out.assignment[:, 1:] >= 0
    got = torch.zeros(batch, 4, dtype=torch.long).scatter_add(1, part, kept.long())
    assert torch.equal(got, expected) and expected[:, 2].eq(0).all()  # id 2 has no tokens: budget 0
    assert not (kept & ~real).any()
    for row in range(batch):  # inside each partition the best-scored tokens are the kept ones
        for p in (0, 1, 3):
            inside = (part[row] == p) & real[row]
            chosen, rest = score[row][inside & kept[row]], score[row][inside & ~kept[row]]
            if len(chosen) and len(rest):
                assert chosen.min() >= rest.max()


def test_hired_without_partition_is_top_k_and_keeps_padding_only_when_needed():
    state = make_state(2, 12, 4, 1, padding=3)
    signals = scored_signals(state, seed=5)
    out = HiRED(fuse="drop")(state, 6, signals)
    score = signals.cls_attention[:, 1:].masked_fill(state.size[:, 1:] == 0, -1)
    expected = score.argsort(dim=1, descending=True, stable=True)[:, :5].sort(dim=1).values + 1
    for row in range(2):
        assert torch.equal((out.assignment[row] >= 0).nonzero().flatten()[1:], expected[row])
    big = HiRED(fuse="drop")(state, 11, signals)  # 10 slots, 8 real tokens: all real kept, padding fills the rest
    assert int((big.size[:, 1:] > 0).sum(1).min()) == 8 and big.x.shape[1] == 11


def test_hired_rejects_bad_partitions():
    state = make_state(1, 8, 4, 1)
    signals = scored_signals(state)
    for partition, match in [(torch.full((1, 8), -1), "must be >= 0"), (torch.zeros(1, 8), "integer tensor"),
                             (torch.zeros(1, 5, dtype=torch.long), r"must start with \[B, N\]")]:
        signals.partition = partition
        with pytest.raises(ValueError, match=match):
            HiRED(fuse="drop")(state, 4, signals)


@pytest.mark.parametrize("method", ["evit", "hired"])
def test_dropping_runs_on_a_model_without_cls_token(method):
    model = tiny_vit(class_token=False, global_pool="avg")
    vtr.patch(model, method, flops=0.5)
    out = model(images())
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    assert vtr.report(model).tokens == vtr.expected_tokens(model)
