"""VisionZip, DivPrune, VisPruner and FasterVLM against direct transcriptions of their published rules (each
official repository's code, written here with loops, in float64, on well-separated attention), plus exact
budgets, row independence in a padded batch, bad options and NaN signals."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import vtr
from vtr.core.state import TokenState
from vtr.reducers import DivPrune, FasterVLM, QueryPrune, Signals, VisionZip, VisPruner

METHODS = ["visionzip", "divprune", "vispruner", "fastervlm"]


def inputs(seed: int, tokens: int = 30, channels: int = 6, protected: int = 1, batch: int = 1):
    """float64 features and keys, and a [CLS] attention row whose values are a permutation of 1..N (no ties,
    distinct in float32 too)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=generator, dtype=torch.float64)
    keys = torch.randn(batch, tokens, channels, generator=generator, dtype=torch.float64)
    attention = torch.stack([torch.randperm(tokens, generator=generator) for _ in range(batch)]).double() + 1
    return TokenState.start(x, protected), keys, attention / attention.sum(dim=1, keepdim=True)


def kept_originals(out: TokenState, row: int = 0) -> dict[int, int]:
    """Original token -> the output token carrying it."""
    return {i: int(d) for i, d in enumerate(out.assignment[row].tolist()) if d >= 0}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


# -- the published rules, transcribed (one row; token indices relative to the first unprotected token) ----------

def fastervlm_rule(attention: list, k: int) -> set:
    """FasterVLM's encode_images: topk of the head-mean [CLS] row."""
    return set(sorted(range(len(attention)), key=lambda i: -attention[i])[:k])


def divprune_rule(features: torch.Tensor, k: int) -> set:
    """DivPrune's code: D = 1 - cos; first the argmax of each column's second smallest entry, then the argmax of
    the minimum over the picked rows."""
    normed = features / features.norm(dim=1, keepdim=True)
    distance = 1.0 - normed @ normed.T
    picked = []
    for i in range(k):
        if i == 0:
            scores = torch.topk(distance, 2, dim=0, largest=False).values[1, :]
        else:
            scores = distance[picked].min(dim=0).values
        picked.append(int(torch.argmax(scores)))
    return set(picked)


def vispruner_rule(attention: list, features: torch.Tensor, k: int, ratio: float) -> set:
    """VisPruner's encode_images, with Python lists."""
    important_num = int(k * ratio)
    diverse_num = k - important_num
    order = sorted(range(len(attention)), key=lambda i: -attention[i])
    important, residual = order[:important_num], order[important_num:]
    while diverse_num > 0:
        r = min(8, len(residual) - diverse_num)
        if r <= 0:
            break
        a, b = residual[0::2], residual[1::2]
        scores = [max(cosine(features[i], features[j]) for j in b) for i in a]
        ranked = sorted(range(len(a)), key=lambda t: -scores[t])
        residual = [a[t] for t in ranked[r:]] + b
    return set(important + (residual if diverse_num > 0 else []))


def visionzip_rule(attention: list, keys: torch.Tensor, x: torch.Tensor, dominant_num: int, contextual_num: int):
    """VisionZip's CLIPVisionTower forward: (kept tokens, {merged token: its target}, {target: its feature})."""
    dominant = set(sorted(range(len(attention)), key=lambda i: -attention[i])[:dominant_num])
    rest = [i for i in range(len(attention)) if i not in dominant]       # position order, as masked_select
    if contextual_num == 0:   # the code divides by zero here; vtr drops the rest
        return dominant, {}, {}
    step = max(1, len(rest) // contextual_num)
    target_places = list(range(0, len(rest), step))[:contextual_num]
    targets = [rest[t] for t in target_places]
    merged = [rest[t] for t in range(len(rest)) if t not in target_places]
    into = {}
    for m in merged:
        similarity = [cosine(keys[m], keys[t]) for t in targets]
        into[m] = targets[similarity.index(max(similarity))]
    features = {}
    for t in targets:
        group = [x[m] for m in merged if into[m] == t]
        features[t] = x[t] + (torch.stack(group).mean(dim=0) if group else 0.0)
    return dominant | set(targets), into, features


# -- the reference tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("protected", [0, 1])
@pytest.mark.parametrize("k", [1, 5, 12, 22])
def test_fastervlm_keeps_the_published_top_k(seed, protected, k):
    state, _, attention = inputs(seed, protected=protected)
    out = FasterVLM(fuse="drop")(state, protected + k, Signals(metric=state.x, cls_attention=attention))
    kept = {i - protected for i in kept_originals(out) if i >= protected}
    assert kept == fastervlm_rule(attention[0, protected:].tolist(), k)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("protected", [0, 1])
@pytest.mark.parametrize("k", [1, 2, 7, 20])
def test_divprune_keeps_the_published_max_min_set(seed, protected, k):
    state, _, _ = inputs(seed, protected=protected)
    out = DivPrune(fuse="drop")(state, protected + k, Signals(metric=state.x))
    kept = {i - protected for i in kept_originals(out) if i >= protected}
    assert kept == divprune_rule(state.x[0, protected:], k)


def test_divprune_first_pick_differs_from_query_without_a_query():
    """The two rules differ only in their first pick (DivPrune: the most isolated token; query: the token
    farthest from the mean token); a seed where that changes the kept set shows they are not the same."""
    differ = 0
    for seed in range(10):
        state, _, _ = inputs(seed, protected=0)
        signals = Signals(metric=state.x)
        divprune = kept_originals(DivPrune(fuse="drop")(state, 4, signals))
        query = kept_originals(QueryPrune(relevance_weight=0.0, fuse="drop")(state, 4, signals))
        differ += set(divprune) != set(query)
        assert set(divprune) == divprune_rule(state.x[0], 4)
    assert differ > 0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("protected", [0, 1])
@pytest.mark.parametrize("k, ratio", [(4, 0.5), (9, 0.5), (10, 0.75), (7, 0.0), (6, 1.0), (27, 0.5)])
def test_vispruner_keeps_the_published_important_and_diverse_set(seed, protected, k, ratio):
    state, _, attention = inputs(seed, protected=protected, tokens=30)
    out = VisPruner(important_ratio=ratio, fuse="drop")(state, protected + k,
                                                       Signals(metric=state.x, cls_attention=attention))
    kept = {i - protected for i in kept_originals(out) if i >= protected}
    assert kept == vispruner_rule(attention[0, protected:].tolist(), state.x[0, protected:], k, ratio)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("protected", [0, 1])
@pytest.mark.parametrize("k", [3, 8, 13, 29])
def test_visionzip_keeps_and_merges_as_published(seed, protected, k):
    state, keys, attention = inputs(seed, protected=protected, tokens=protected + 29)
    out = VisionZip()(state, protected + k, Signals(metric=keys, cls_attention=attention))
    dominant_num = k - int(k * 10 / 64 + 0.5)
    kept, into, features = visionzip_rule(attention[0, protected:].tolist(), keys[0, protected:],
                                          state.x[0, protected:], dominant_num, k - dominant_num)
    carried = kept_originals(out)
    assert {i - protected for i in carried if i >= protected} == set(into) | kept   # nothing else dropped...
    slots = {carried[protected + i]: i for i in kept}
    assert len(slots) == len(kept) == k                                              # ...and k slots carry them
    for merged, target in into.items():
        assert carried[protected + merged] == carried[protected + target]
    for target, feature in features.items():
        torch.testing.assert_close(out.x[0, carried[protected + target]], feature, rtol=1e-12, atol=1e-12)
    assert out.size.sum() == (state.size.sum() if features else k + protected)   # the contextual tokens carry the rest


def test_visionzip_paper_split_and_mean_merge():
    """54 dominant + 10 contextual of 64 (and 108 + 20 of 128); merge="mean" is the size-weighted mean."""
    from vtr.reducers.visionzip import split_budget
    assert split_budget(64, 10 / 64) == (54, 10) and split_budget(128, 10 / 64) == (108, 20)
    assert split_budget(192, 10 / 64) == (162, 30)
    state, keys, attention = inputs(1, protected=0, tokens=40)
    signals = Signals(metric=keys, cls_attention=attention)
    mean = VisionZip(merge="mean")(state, 12, signals)
    add = VisionZip()(state, 12, signals)
    assert torch.equal(mean.assignment, add.assignment)
    for slot in range(12):
        carried = (mean.assignment[0] == slot).nonzero()[:, 0]
        torch.testing.assert_close(mean.x[0, slot], state.x[0, carried].mean(dim=0))


# -- budgets, rows, options, NaN ---------------------------------------------------------------------------

def padded_batch(seed: int, tokens: int, padding: int, protected: int = 1):
    """A row alone, and a batch of [that row with ``padding`` padding tokens appended, another full row]."""
    alone, keys, attention = inputs(seed, tokens=tokens, protected=protected)
    other, other_keys, other_attention = inputs(seed + 1000, tokens=tokens + padding, protected=protected)
    pad = lambda t: torch.cat([t, t.new_zeros(1, padding, *t.shape[2:])], dim=1)   # noqa: E731
    mask = torch.ones(2, tokens + padding, dtype=torch.bool)
    mask[0, tokens:] = False
    batch = TokenState.start(torch.cat([pad(alone.x), other.x]), protected, padding_mask=mask)
    signals = Signals(metric=torch.cat([pad(keys), other_keys]),
                      cls_attention=torch.cat([pad(attention), other_attention]))
    return alone, Signals(metric=keys, cls_attention=attention), batch, signals


@settings(max_examples=12, deadline=None)
@given(method=st.sampled_from(METHODS), seed=st.integers(0, 50), padding=st.integers(0, 6),
       k=st.integers(1, 16), fuse=st.sampled_from(["drop", "nearest"]))
def test_a_row_decides_alone_what_it_decides_in_a_padded_batch(method, seed, padding, k, fuse):
    tokens = 20
    alone, alone_signals, batch, batch_signals = padded_batch(seed, tokens, padding)
    reducer = vtr.make_reducer(method, **({} if method == "visionzip" else {"fuse": fuse}))
    one = reducer(alone, 1 + k, alone_signals)
    both = reducer(batch, 1 + k, batch_signals)
    assert one.x.shape[1] == both.x.shape[1] == 1 + k                  # the exact budget, in every row
    row = 0
    assert torch.equal(both.assignment[row, :tokens], one.assignment[0])
    assert (both.assignment[row, tokens:] == -1).all()
    torch.testing.assert_close(both.x[row], one.x[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(both.size[row], one.size[0])


@pytest.mark.parametrize("method, options, message", [
    ("visionzip", {"contextual": 1.5}, r"visionzip: contextual must be the fraction .* in \[0, 1\], got 1.5"),
    ("visionzip", {"contextual": "a"}, r"visionzip: contextual must be"),
    ("visionzip", {"merge": "sum"}, r"visionzip: merge must be one of \('add', 'mean'\)"),
    ("vispruner", {"important_ratio": -0.1}, r"vispruner: important_ratio must be in \[0, 1\], got -0.1"),
    ("vispruner", {"important_ratio": float("nan")}, r"vispruner: important_ratio must be in \[0, 1\]"),
    ("vispruner", {"fuse": "all"}, r"vispruner: fuse must be one of"),
    ("divprune", {"fuse": "x"}, r"divprune: fuse must be one of"),
    ("fastervlm", {"fuse": 1}, r"fastervlm: fuse must be one of"),
])
def test_bad_options_are_refused_with_the_option_named(method, options, message):
    with pytest.raises(ValueError, match=message):
        vtr.make_reducer(method, **options)


@pytest.mark.parametrize("method, signal", [("visionzip", "metric"), ("visionzip", "cls_attention"),
                                            ("divprune", "metric"), ("vispruner", "metric"),
                                            ("vispruner", "cls_attention"), ("fastervlm", "cls_attention")])
def test_nan_signals_are_refused(method, signal):
    state, keys, attention = inputs(0)
    signals = Signals(metric=keys.clone(), cls_attention=attention.clone())
    getattr(signals, signal)[0, 3] = float("nan")
    message = rf"{method}: signals.{signal} must be finite on the real tokens, got \d+ NaN or Inf of"
    with pytest.raises(ValueError, match=message):
        vtr.make_reducer(method)(state, 8, signals)


@pytest.mark.parametrize("method", ["visionzip", "divprune", "vispruner", "fastervlm"])
def test_nan_on_padding_is_ignored_and_counted_on_real_tokens_only(method):
    """Padding holds whatever the batch filled it with: only the real tokens' signals are checked and counted (the
    check masks padding rather than indexing it out, so a weightless copy on the meta device can run it)."""
    state, keys, attention = inputs(0, batch=2)
    real = torch.ones(2, 30, dtype=torch.bool)
    real[1, -10:] = False
    state = TokenState.start(state.x, 1, padding_mask=real)
    metric, cls_attention = keys.clone(), attention.clone()
    metric[1, -1], cls_attention[1, -1] = float("nan"), float("inf")     # padding: ignored
    vtr.make_reducer(method)(state, 8, Signals(metric=metric, cls_attention=cls_attention))
    signal = "metric" if method == "divprune" else "cls_attention"
    values = 50 * 6 if signal == "metric" else 50
    bad = Signals(metric=metric, cls_attention=cls_attention)
    getattr(bad, signal)[0, 3, ...].view(-1)[0] = float("nan")     # one value of a real token
    with pytest.raises(ValueError, match=rf"{method}: signals.{signal} must be finite on the real tokens, got 1 NaN "
                                         rf"or Inf of {values} values"):
        vtr.make_reducer(method)(state, 8, bad)


def test_metadata():
    for method in METHODS:
        cls = vtr.reducers.REDUCERS[method]
        assert "arXiv" in cls.paper and set(cls.stages) <= {"tower", "before_lm", "in_lm"}
        assert {"tower", "before_lm"} <= set(cls.stages)
        assert cls().default_layers(12) == [11]
    assert VisionZip().patch_defaults() == {"metric": "keys"}


def test_what_they_cannot_run_without_is_declared():
    """VisionZip, VisPruner, FasterVLM cannot run without the [CLS] row or the attention received (a family that
    offers neither refuses them at patch time); DivPrune reads features only. A requirement outside needs is a
    class-definition error."""
    from vtr.core.signals import Need
    for method in METHODS:
        expected = set() if method == "divprune" else {Need.CLS_ATTENTION, Need.ATTENTION_RECEIVED}
        assert vtr.reducers.REDUCERS[method].requires_one_of == expected
    with pytest.raises(TypeError, match="requires_one_of must be a subset of its needs"):
        type("Bad", (vtr.Reducer,), {"needs": frozenset({"metric"}), "requires_one_of": frozenset({"query"})})
