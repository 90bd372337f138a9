"""Text-guided sparsification inside the language model (SparseVLM: Zhang et al., "SparseVLM: Visual Token
Sparsification for Efficient Vision-Language Model Inference", arXiv 2410.04417; code github.com/Gumpest/SparseVLMs).

Text *raters* are chosen among the prompt's text after the image, once, from the language model's input: the
tokens whose share of the visual tokens' attention (each visual token's softmax over the text of their dot
products, averaged over the visual tokens) is above the mean. At each stage (layers 2, 6 and 15 of LLaVA-1.5's 32 in the official code, scaled to the depth)
the raters' attention to the visual tokens (head mean, each rater's softmax over its whole causal row, averaged
over the raters) ranks them: the best stay, and of the rest the best 30% are *recycled*: clustered by density
peaks (DPC-kNN) into a tenth as many tokens, each the mean of its cluster, which stay too.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.state import TokenState
from .base import Reducer, Signals, check_number, register
from .select import keep_first, real_tokens


@register
class SparseVLM(Reducer):
    """Rank the visual tokens by the text raters' attention, keep the best, recycle the best of the rest.

    raters: among ``signals.instruction`` (the text after the image as the layer holds it), those whose mean
    softmax share ``softmax_t(v . t)`` over the visual tokens ``v`` exceeds the mean share. relevance: the mean over
    the raters of ``instruction.attention`` (each rater's attention to each visual token). The budget is exact:
    of ``num_kept``, ``t`` are the most relevant tokens and ``c`` are recycled clusters, with ``t`` the largest
    count for which ``t + c == num_kept``, where of the ``p = n - t`` pruned tokens the ``int(recycle * p) + 1``
    most relevant are clustered into ``int(m / 10) + 1`` (the official ``0.3`` and ``/ 10``). ``recycle=0`` turns
    recycling off (pure top-k).

    The raters come from the prompt as it entered the language model (``instruction.input_text`` and
    ``input_image``, all of the image's original tokens), once per prompt, as the official code picks them; without
    those, from the states entering the layer. Where this differs from the official code, and why: it ranks with
    layer l's attention and drops after layer l; vtr ranks with
    layer l's projections and drops before it (its convention for every in-LM method). Stage counts: the official
    code reads them from a table per target (e.g. 300, 200, 110 for 192); here ``budget=`` is the count after the
    last stage and the stages before decay geometrically (vtr's default), or a list gives each. Density ties in the
    clustering go to the earlier token (the official code adds 1e-6 random noise). The recycled clusters take
    the position of their first token (vtr keeps positions); the official code appends them after the kept ones.
    The paper's rank-based adaptive counts (its v1: tokens deleted per layer from the rank of the text-visual
    attention) are not implemented, as in the official code's release, which has no rank computation either
    (``llava/model/language_model/score.py``: fixed counts per target, ``sparse_token_list_192 = [300, 200, 110]``,
    read 2026-12-07): budgets are exact.
    """

    name = "sparsevlm"
    description = "text raters' attention ranks the visual tokens at several LM layers; the best pruned recycled (SparseVLM)"
    paper = "Zhang et al. 2024, arXiv 2410.04417"
    stages = ("in_lm",)
    needs = frozenset({"metric", "instruction", "text_attention"})
    max_step = 1.0

    def __init__(self, recycle: float = 0.3):
        super().__init__()
        self.recycle = float(check_number(self, "recycle", recycle, "in [0, 1] (the fraction of the pruned tokens "
                                          "recycled into clusters)", lambda r: 0 <= r <= 1))

    def default_layers(self, num_layers: int) -> Optional[list[int]]:
        """The official layers 2, 6 and 15 of 32, scaled to the depth (never layer 0, never past the last)."""
        return sorted({min(max(1, round(num_layers * layer / 32)), num_layers - 1) for layer in (2, 6, 15)}) \
            if num_layers > 1 else [0]

    def extra_macs(self, num_tokens: int, cost, num_kept: Optional[int] = None) -> float:
        """The recycled tokens' distance matrix (m^2 d); the raters' attention comes with the layer's scoring."""
        kept = (num_tokens + cost.num_protected) // 2 if num_kept is None else num_kept
        pruned = num_tokens - kept
        recycled = int(self.recycle * pruned) + 1 if self.recycle and pruned else 0
        return float(recycled * recycled * cost.metric_dim)

    def step(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        instruction = signals.instruction
        if signals.metric is None or instruction is None or instruction.attention is None:
            raise ValueError("sparsevlm needs signals.metric and signals.instruction with its attention (the text "
                             "after the image): it acts inside a language model (layers=)")
        protected = state.num_protected
        hidden = signals.metric[:, protected:].float()
        # raters from the prompt as it entered the language model (the official code), else from the layer's states
        if instruction.input_text is not None and instruction.input_image is not None:
            image, text = instruction.input_image.float(), instruction.input_text.float()
        else:
            image, text = hidden, instruction.hidden.float()
        relevance = rated_relevance(image, text, instruction.valid, instruction.attention[:, :, protected:].float(),
                                    real_tokens(state) if image is hidden else None)
        valid = real_tokens(state)
        k = num_kept - protected
        batch, unprotected = valid.shape
        dest = torch.full((batch, unprotected), -1, dtype=torch.long, device=valid.device)
        for row in range(batch):   # rows differ in how many tokens they cluster: one at a time
            dest[row] = self._row_dest(relevance[row], valid[row], hidden[row], k)
        head = torch.arange(protected, device=dest.device).expand(batch, protected)
        dest = torch.cat([head, torch.where(dest >= 0, dest + protected, dest)], dim=1)
        return state.reduce(dest, num_kept, weight=torch.ones_like(state.size))   # clusters: plain means

    def _row_dest(self, relevance: Tensor, valid: Tensor, hidden: Tensor, k: int) -> Tensor:
        """One row's destinations ``[U]``: the top ``t`` by relevance, then ``c`` recycled clusters."""
        real = int(valid.sum())
        top, clusters = split_budget(real, k, self.recycle) if k < real else (k, 0)
        order = relevance.masked_fill(~valid, float("-inf")).argsort(descending=True, stable=True)
        kept = order[:top].sort().values if k < real else keep_first(valid.float()[None], k)[0]
        dest = torch.full_like(order, -1)
        dest[kept] = torch.arange(len(kept), device=dest.device)
        if clusters:
            recycled = order[top:real][:recycled_count(real - top, self.recycle)]
            assignment, _ = density_peaks(hidden[recycled], clusters)
            # cluster slots after the kept tokens, in the order of each cluster's first token
            first = torch.full((clusters,), len(dest), dtype=torch.long, device=dest.device)
            first = first.scatter_reduce(0, assignment, recycled, reduce="amin")
            rank = first.argsort().argsort()
            dest[recycled] = len(kept) + rank[assignment]
        return dest


def rated_relevance(image: Tensor, text: Tensor, text_valid: Tensor, attention: Tensor,
                    image_valid: Optional[Tensor] = None) -> Tensor:
    """``[B, U]``: the raters' mean attention to each visual token (``attention`` ``[B, T, U]``). Raters: the text
    tokens whose mean softmax share of the dot products with the ``image`` tokens ``[B, M, D]`` (``image_valid``:
    the real ones) is above the mean share; with no text, every token 1."""
    if text.shape[1] == 0:
        return torch.ones(attention.shape[0], attention.shape[2], device=attention.device)
    logits = (image @ text.transpose(1, 2)).masked_fill(~text_valid[:, None, :], float("-inf"))   # [B, M, T]
    shares = logits.softmax(dim=-1)
    if image_valid is None:
        share = shares.mean(dim=1)                                                                   # [B, T]
    else:
        weights = image_valid.float() / image_valid.sum(dim=1, keepdim=True).clamp_min(1)
        share = (weights[:, :, None] * shares).sum(dim=1)
    mean = (share * text_valid).sum(dim=1, keepdim=True) / text_valid.sum(dim=1, keepdim=True).clamp_min(1)
    raters = (share > mean) & text_valid
    raters = torch.where(raters.any(dim=1, keepdim=True), raters, text_valid)   # all shares equal: every token rates
    weights = raters.float() / raters.sum(dim=1, keepdim=True).clamp_min(1)
    return (weights[:, :, None] * attention).sum(dim=1)


def recycled_count(pruned: int, recycle: float) -> int:
    """Pruned tokens recycled: the official ``int(0.3 * p) + 1``, never more than there are (0 without recycling)."""
    return 0 if pruned == 0 or recycle == 0 else min(int(recycle * pruned) + 1, pruned)


def cluster_count(recycled: int) -> int:
    """Clusters the recycled tokens make: the official ``int(m / 10) + 1``, never more than the tokens."""
    return 0 if recycled == 0 else min(recycled // 10 + 1, recycled)


def split_budget(real: int, budget: int, recycle: float) -> tuple[int, int]:
    """(kept by relevance, recycled clusters) summing to ``budget`` < ``real``: the most kept by relevance."""
    for top in range(budget, -1, -1):
        clusters = cluster_count(recycled_count(real - top, recycle))
        if top + clusters == budget:
            return top, clusters
    return budget, 0


def density_peaks(x: Tensor, clusters: int) -> tuple[Tensor, Tensor]:
    """DPC-kNN as the official ``cluster_and_merge``: ``(assignment [m], centers [clusters])`` of ``x`` ``[m, d]``.

    Distances scaled by ``sqrt(d)``; density ``exp(-mean of the squared distances to the `clusters` nearest)``
    (itself included); each token's distance to the nearest denser token (the largest distance for the densest);
    the ``clusters`` highest ``distance * density`` are the centers, every token joins its nearest center (a
    center itself). Density ties: the earlier token counts as denser (the official code breaks them by noise).
    """
    m = x.shape[0]
    distance = torch.cdist(x[None].double(), x[None].double())[0] / x.shape[-1] ** 0.5
    nearest = distance.topk(min(clusters, m), dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(dim=-1)).exp()
    index = torch.arange(m, device=x.device)
    denser = (density[None, :] > density[:, None]) | ((density[None, :] == density[:, None]) & (index[None] < index[:, None]))
    to_denser = torch.where(denser, distance, distance.max()).amin(dim=-1)
    centers = (to_denser * density).topk(clusters).indices
    assignment = distance[centers].argmin(dim=0)
    assignment[centers] = torch.arange(clusters, device=x.device)
    return assignment, centers
