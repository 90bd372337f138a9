"""TCA (vtr.adaptive.TCA): the reservoir's update rule against a transcription of the official one, the logit
correction's known answers, plain zero-shot when nothing is remembered or condensed, the stream in order, reset,
bad options, and the FLOP count of the condensed tower."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import vtr
from vtr.adaptive.tca import TCA
from vtr.adaptive.tca_condense import _attention, _ranking, condense, coreset_average, default_layers, encode
from vtr.adaptive.tca_reservoir import Reservoir, layer_weights
from vtr.tools.clip_task import build_clip, ClipTraining
from vtr.tools.fidelity import Task
from vtr.tools.profile import count_macs

TINY = ClipTraining(embed_dim=16, width=32, depth=4, heads=2, text_width=16, text_depth=1)
TASK = Task(image_size=32, patch_size=8)   # 16 patch tokens


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    model = build_clip(TASK, TINY).eval()
    with torch.no_grad():   # "class prompts" at three images' embeddings: a random model's predictions spread over them
        text = model.encode_image(images(3, 99))
    return model, text


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# --- the reservoir ----------------------------------------------------------------------------

def official_update(reservoir: dict, pred: int, item: list, size: int) -> None:
    """A float64 transcription of the official update_reservoir_sim with div=True, token_sim=True: append; on
    overflow score = loss + mean cosine (of the layer-mean CLS tokens) to the others, pop the argmax; sort by loss."""
    reservoir[pred].append(item)
    if len(reservoir[pred]) > size:
        feats = np.stack([it[1].mean(0) for it in reservoir[pred]])
        feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        sim = feats @ feats.T
        n = len(feats)
        scores = [it[0] + (sim[i].sum() - sim[i, i]) / (n - 1) for i, it in enumerate(reservoir[pred])]
        reservoir[pred].pop(int(np.argmax(scores)))
    reservoir[pred] = sorted(reservoir[pred], key=lambda it: it[0])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10 ** 6)), min_size=1, max_size=25),
       st.integers(0, 2 ** 16))
def test_reservoir_update_matches_official_rule(size, stream, seed):
    rng = np.random.default_rng(seed)
    ours, theirs = Reservoir(3, size), {c: [] for c in range(3)}
    for step, (pred, entropy_bits) in enumerate(stream):
        entropy = entropy_bits / 1e5 + step * 1e-3            # distinct entropies: no tie decides an eviction
        tokens = rng.normal(size=(3, 5))                      # [L, D]
        ours.update(pred, torch.from_numpy(tokens), entropy)
        official_update(theirs, pred, [entropy, tokens], size)
        for c in range(3):
            assert [e.entropy for e in ours.entries[c]] == [it[0] for it in theirs[c]]
            for e, it in zip(ours.entries[c], theirs[c]):
                assert np.array_equal(e.tokens.numpy(), it[1])


def test_reservoir_evicts_the_redundant_uncertain_entry():
    r = Reservoir(1, 2)
    a, b, c = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.05]])
    r.update(0, a, 0.5)
    r.update(0, b, 0.6)
    r.update(0, c, 0.4)      # c and a are near duplicates: a (higher entropy of the two) goes, b stays
    assert [e.entropy for e in r.entries[0]] == [0.4, 0.6]


def test_anchors_wait_for_two_entries_per_class_then_are_the_class_means():
    r = Reservoir(2, 3)
    t = [torch.full((2, 4), float(i)) for i in range(4)]
    r.update(0, t[0], 0.1)
    r.update(0, t[1], 0.2)
    r.update(1, t[2], 0.3)
    assert r.anchors() is None and not r.ready()
    r.update(1, t[3], 0.4)
    anchors = r.anchors()
    assert anchors.shape == (2, 2, 4)
    assert torch.equal(anchors[0], torch.full((2, 4), 0.5)) and torch.equal(anchors[1], torch.full((2, 4), 2.5))


def test_bad_reservoir_options():
    with pytest.raises(ValueError, match="size"):
        Reservoir(3, 0)
    with pytest.raises(ValueError, match="num_classes"):
        Reservoir(0)
    with pytest.raises(ValueError, match="label"):
        Reservoir(2).update(2, torch.zeros(1, 2), 0.0)


# --- the logit correction ----------------------------------------------------------------------

def test_layer_weights_known_answer():
    w = layer_weights(2, 1.0)
    assert torch.allclose(w, torch.tensor([1 / (1 + math.e), math.e / (1 + math.e)], dtype=torch.float64))
    assert layer_weights(12, 0.01)[-1] > 0.99          # the paper's scale: the last layer decides


def test_correction_known_answer():
    r = Reservoir(3, 3)
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)          # [L=2, D=2]
    r.update(0, query.clone(), 0.1)                                               # affinity 1
    r.update(1, torch.tensor([[0.0, 2.0], [3.0, 0.0]], dtype=torch.float64), 0.2)  # orthogonal at both: 0
    r.update(1, torch.tensor([[5.0, 0.0], [1.0, 0.0]], dtype=torch.float64), 0.3)  # cos 1 then 0: w0
    lambd, beta = 2.0, 3.0
    w0 = 1 / (1 + math.e)
    expected = torch.tensor([lambd, lambd * (math.exp(-beta) + math.exp(-beta * (1 - w0))), 0.0], dtype=torch.float64)
    assert torch.allclose(r.correction(query, scale=1.0, lambd=lambd, beta=beta), expected)
    assert torch.equal(Reservoir(3).correction(query), torch.zeros(3, dtype=torch.float64))


# --- condensation pieces -----------------------------------------------------------------------

def test_ranking_is_the_cross_head_rank_consensus():
    attention = torch.tensor([[[0.85, 0.05, 0.04, 0.06], [0.01, 0.30, 0.40, 0.29], [0.02, 0.30, 0.40, 0.28]]])
    assert _ranking(attention).tolist() == [[2, 1, 3, 0]]                 # mean attention alone: 0, 2, 1, 3


def test_coreset_average_known_answer():
    tokens = torch.tensor([[0.0], [2.0], [10.0], [11.0]])
    merged = coreset_average(tokens, 2)                                   # centers 0 (first) and 11 (farthest)
    assert torch.allclose(merged, torch.tensor([[2 / 3], [10.5]]))
    assert coreset_average(tokens[:1], 4).shape == (1, 1)                 # never more centers than tokens


def test_default_layers():
    assert default_layers(12) == (3, 6, 9) and default_layers(8) == (2, 4, 6) and default_layers(4) == (1, 2, 3)


# --- the stream ----------------------------------------------------------------------------------

def test_nothing_remembered_nor_condensed_is_plain_zero_shot(clip):
    model, text = clip
    x = images(3)
    with torch.no_grad():
        plain = vtr.clip.zero_shot(model, x, text, condition=False)
        tca = TCA(model, text, rate=0.0)
        got = torch.cat([tca.step(x[i:i + 1], update=False) for i in range(3)])
        assert torch.allclose(got, plain, atol=1e-5)
        assert torch.allclose(encode(model.visual, x).features, model.encode_image(x), atol=1e-5)
        # no correction and no condensation: the whole stream stays plain zero-shot while the reservoir fills
        silent = TCA(model, text, rate=0.0, lambd=0.0)
        assert torch.allclose(silent(images(12, 1)), vtr.clip.zero_shot(model, images(12, 1), text, condition=False),
                              atol=1e-5)
        assert len(silent.reservoir) > 0


def test_rows_are_consecutive_images_of_the_stream(clip):
    model, text = clip
    x = images(24, 2)
    batched, single = TCA(model, text, reservoir=1), TCA(model, text, reservoir=1)
    together = batched(x)
    alone = torch.cat([single.step(x[i:i + 1]) for i in range(len(x))])
    assert torch.equal(together, alone)
    assert batched.reservoir.ready()                      # anchors were in use for the last rows
    reverse = TCA(model, text, reservoir=1)(x.flip(0)).flip(0)
    assert not torch.allclose(reverse, together)          # order matters: the reservoir is state


def test_anchors_change_the_condensation(clip):
    model, text = clip
    tca = TCA(model, text, reservoir=1)
    tca(images(40, 3))
    assert tca.reservoir.ready()
    x = images(1, 4)
    with torch.no_grad():
        guided = tca.encode(x).features
        tca.use_anchors = False
        blind = tca.encode(x).features
    assert not torch.allclose(guided, blind)


def test_reset_forgets_the_stream(clip):
    model, text = clip
    tca = TCA(model, text, reservoir=1)
    tca(images(30, 5))
    assert len(tca.reservoir) > 0
    tca.reset()
    assert len(tca.reservoir) == 0 and tca.reservoir.anchors() is None
    x = images(4, 6)
    assert torch.equal(tca(x), TCA(model, text, reservoir=1)(x))


@pytest.mark.parametrize("options, match", [
    (dict(rate=1.0), "rate"), (dict(rate=-0.1), "rate"), (dict(layers=[0]), "layers"), (dict(layers=[4]), "layers"),
    (dict(layers=[1, 1]), "layers"), (dict(reservoir=0), "reservoir size"), (dict(scale=0.0), "scale"),
    (dict(lambd=-1.0), "lambd"), (dict(centers=0), "centers"),
])
def test_bad_options(clip, options, match):
    model, text = clip
    with pytest.raises(ValueError, match=match):
        TCA(model, text, **options)


def test_bad_inputs(clip):
    model, text = clip
    with pytest.raises(ValueError, match="class_features"):
        TCA(model, text[0])
    with pytest.raises(ValueError, match="open_clip CLIP"):
        TCA(model.visual, text)
    with pytest.raises(ValueError, match="one image"):
        TCA(model, text).step(images(2))
    with pytest.raises(ValueError, match="rate=0.9"):
        TCA(model, text, rate=0.9)(images(1))
    with pytest.raises(ValueError, match="vtr.adaptive.TCA"):
        vtr.adaptive.patch(model, "tca")
    method = vtr.adaptive.methods()["tca"]
    assert not method.trains and method.stage == "clip-tower"


# --- FLOPs -----------------------------------------------------------------------------------------

def tower_macs(tokens_attn: list, tokens_mlp: list, width: int, patches: int, patch_dim: int, embed: int) -> float:
    """Matrix-product MACs of the tower, block by block: qkv, scores, mix and out-projection on the tokens that
    attend, the MLP (4x) on the tokens after condensation; patch embedding and the final projection."""
    total = patches * patch_dim * width + width * embed
    for n, m in zip(tokens_attn, tokens_mlp):
        total += 4 * n * width * width + 2 * n * n * width + 8 * m * width * width
    return total


def coreset_macs(m: int, c: int, d: int) -> float:
    """k-center distances (c passes of m x 1), the assignment (m x c), the weighted group sums (c x m)."""
    return c * m * d + m * c * d + c * m * d


def test_flops_count_the_condensed_tokens(clip):
    model, text = clip
    x = images(1, 7)
    width, embed, patch_dim = 32, 16, 3 * 8 * 8
    plain = TCA(model, text, rate=0.0)
    assert plain.macs(x) == count_macs(model.visual, x).total == tower_macs([17] * 4, [17] * 4, width, 16, patch_dim,
                                                                            embed)
    # rate 0.25 at blocks 1, 2, 3 (no anchors yet), the official counts: 16 patches -> keep 2, merge 10 into 4,
    # fuse 4 into 1 -> 7 patches; then 7 -> keep 2, merge 4 into 4, fuse 1 -> 7 (the count settles)
    tca = TCA(model, text, rate=0.25)
    encoded = tca.encode(x)
    assert encoded.tokens == [17, 17, 8, 8, 8]
    expected = (tower_macs([17, 17, 8, 8], [17, 8, 8, 8], width, 16, patch_dim, embed)
                + coreset_macs(10, 4, width) + coreset_macs(4, 4, width) + coreset_macs(4, 4, width)
                + (4 + 1 + 1) * width)                                      # the fused tokens' weighted sums
    assert tca.macs(x) == expected
    # with anchors each condensation block picks the closest of the 3 class anchors (cosines) and attends over
    # one more token (the anchor)
    tca(images(40, 8))
    assert tca.reservoir.ready()
    assert tca.macs(x) == expected + sum(3 * width + 4 * width * width + 2 * (2 * n + 1) * width for n in (17, 8, 8))


def test_condense_known_answer():
    # 16 patch tokens, rate 0.1 (official counts): left 15, m 2 -> keep the best 11, merge the next 4 into 4 centers
    # (each its own center: the tokens themselves), fuse the last one weighted by its mean CLS attention
    torch.manual_seed(0)
    x = torch.randn(1, 17, 6)
    attention = torch.stack([torch.arange(16.0).flip(0) / 200, torch.arange(16.0).flip(0) / 100])[None]  # [1, 2, 16]
    out = condense(x, attention, rate=0.1, centers=4)
    assert out.shape == (1, 1 + 11 + 4 + 1, 6)
    assert torch.equal(out[0, :12], x[0, :12])                          # CLS, then patches 0..10 (best first)
    band = x[0, 12:16]
    assert sorted(map(tuple, out[0, 12:16].tolist())) == sorted(map(tuple, band.tolist()))
    assert torch.allclose(out[0, 16], attention[0, :, 15].mean() * x[0, 16])


def test_attention_with_an_anchor_is_the_block_attention_over_the_longer_sequence(clip):
    model, _ = clip
    block = model.visual.transformer.resblocks[1]
    x, anchor = torch.randn(2, 17, 32), torch.randn(2, 32)
    with torch.no_grad():
        out, cls_attention = _attention(block, x, anchor)
        seq = block.ln_1(torch.cat([anchor[:, None], x], dim=1))
        reference, weights = block.attn(seq, seq, seq, need_weights=True, average_attn_weights=False)
    assert torch.allclose(out, reference[:, 1:], atol=1e-5)
    assert torch.allclose(cls_attention, weights[:, :, 1, 2:], atol=1e-6)
