"""SparseVLM (``sparsevlm``): its kept and recycled tokens equal a float64 transcription of the official step
(text raters, their attention ranking the visual tokens, the best 30% of the pruned clustered by DPC-kNN and
merged), stage by stage on a tiny LLaVA, with exact budgets; the budget split and bad options."""
import pytest
import torch

import vtr
from vtr.reducers.sparsevlm import split_budget

from in_lm_reference import attention, stage_columns, top
from llava_models import IMAGE_TOKEN, generate, left_padded, logits, prompt_row, tiny_llava


def official_clusters(x: torch.Tensor, clusters: int) -> list[int]:
    """The official cluster_and_merge's assignment (float64; density ties by position, as documented)."""
    if clusters == 1:      # one cluster holds them all, whichever center (every density is 1 at k = 1: a tie)
        return [0] * len(x)
    distance = torch.cdist(x[None], x[None])[0] / x.shape[-1] ** 0.5
    density = (-(distance.topk(clusters, dim=-1, largest=False).values ** 2).mean(dim=-1)).exp()
    m = len(x)
    denser = torch.tensor([[density[j] > density[i] or (density[j] == density[i] and j < i) for j in range(m)]
                           for i in range(m)])
    to_denser = torch.where(denser, distance, distance.max()).amin(dim=-1)
    centers = top(to_denser * density, clusters).tolist()
    assignment = distance[centers].argmin(dim=0)
    assignment[centers] = torch.arange(clusters)
    return assignment.tolist()


def sparsevlm_rule(counts, ids):
    """One stage of the official inference step, for one image of the prompt ``ids``."""
    def rule(layer, hidden, present, image, stage, cos, sin, language, embedded):
        columns = image.nonzero().flatten()       # slots of the image's tokens (present[slot]: its prompt column)
        after = (~image & (torch.arange(len(present)) > columns.max())).nonzero().flatten()
        # the raters, from the language model's input (the official code, once per prompt): m_v_t
        image0 = ids[0] == IMAGE_TOKEN
        after0 = (~image0 & (torch.arange(ids.shape[1]) > image0.nonzero().max())).nonzero().flatten()
        share = (embedded[0, image0] @ embedded[0, after0].t()).softmax(dim=1).mean(dim=0)
        raters = torch.searchsorted(present, after0[share > share.mean()])   # their slots now (text stays)
        v = hidden[0, columns]
        relevance = attention(layer, hidden, cos, sin).mean(dim=0)[raters][:, columns].mean(dim=0)
        n, budget = len(columns), counts[stage]
        keep, clusters = split_budget(n, budget, 0.3)
        order = relevance.argsort(descending=True)
        kept = present[columns[top(relevance, keep)]].sort().values
        pruned = order[keep:]
        recycled_n = min(int(0.3 * len(pruned)) + 1, len(pruned))
        recycled = pruned[top(relevance[pruned], recycled_n)]
        assignment = official_clusters(v[recycled], clusters)
        groups = [[int(present[columns[recycled[i]]]) for i in range(recycled_n) if assignment[i] == c]
                  for c in range(clusters)]
        return kept, groups
    return rule


@pytest.mark.parametrize("seed, budget", [(0, 6), (1, 3), (2, 9)])
def test_kept_and_recycled_tokens_equal_the_official_step(seed, budget):
    model = tiny_llava(seed=seed)
    ids, mask = left_padded([prompt_row([1, 5], 1, [7, 8, 9, 10, 11, 12, 13])])
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(seed))
    vtr.patch(model, "sparsevlm", budget=budget)         # 4 layers: its layers 1 and 2
    layers = model._vtr.visual.layers
    counts = vtr.budget.visual.stage_budgets(budget, 16, 0, len(layers), model._vtr.reducer)
    out = generate(model, ids, mask, pixel_values=pixels)
    got = [c[0].tolist() for c in vtr.report(model).stage_positions]
    vtr.unpatch(model)
    expected_logits = torch.empty(100)
    rule = sparsevlm_rule(counts, ids)
    expected = stage_columns(model, ids, pixels, {layer: rule for layer in layers}, expected_logits)
    assert got == [c.tolist() for c in expected]
    assert [int((ids[0, torch.tensor(c)] == IMAGE_TOKEN).sum()) for c in got] == counts
    torch.testing.assert_close(logits(out)[0, 0], expected_logits, atol=1e-4, rtol=1e-4)   # merged means too


def test_the_budget_splits_into_kept_and_recycled_exactly():
    assert split_budget(576, 300, 0.3) == (291, 9)      # 285 pruned: 86 recycled into 9 clusters
    assert split_budget(576, 64, 0.3)[0] + split_budget(576, 64, 0.3)[1] == 64
    for real in (16, 100, 576):
        for budget in range(1, real):
            top, clusters = split_budget(real, budget, 0.3)
            assert top + clusters == budget and top >= 0
    assert split_budget(100, 40, 0.0) == (40, 0)


def test_default_layers_scale_the_official_ones():
    reducer = vtr.make_reducer("sparsevlm")
    assert reducer.default_layers(32) == [2, 6, 15] and reducer.default_layers(28) == [2, 5, 13]
    assert reducer.default_layers(4) == [1, 2]


@pytest.mark.parametrize("recycle", [-0.1, 1.5, "x", None])
def test_bad_recycle_is_refused(recycle):
    with pytest.raises(ValueError, match=r"sparsevlm: recycle must be in \[0, 1\]"):
        vtr.make_reducer("sparsevlm", recycle=recycle)


@pytest.mark.parametrize("seed, clusters", [(0, 2), (1, 3), (2, 5)])
def test_density_peaks_equal_the_official_clustering(seed, clusters):
    from vtr.reducers.sparsevlm import density_peaks
    x = torch.randn(31, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assignment, centers = density_peaks(x, clusters)
    assert assignment.tolist() == official_clusters(x, clusters)
    assert sorted(set(assignment.tolist())) == list(range(clusters))


def test_unpatch_removes_the_input_hook():
    model = tiny_llava()
    first = model.model.language_model.layers[0]
    before = len(first._forward_pre_hooks)
    vtr.patch(model, "sparsevlm", budget=4)
    assert len(first._forward_pre_hooks) == before + 1      # the LM's input, for the raters
    vtr.unpatch(model)
    assert len(first._forward_pre_hooks) == before
