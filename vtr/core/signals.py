"""What the model offers a reducer at one step: the closed set of signal names and their values."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor


class Need(str, enum.Enum):
    """The signals a reducer may read (``Reducer.needs``). A closed set: a misspelt need is an error
    when the reducer class is defined, never a silent fallback at run time."""

    METRIC = "metric"
    CLS_ATTENTION = "cls_attention"
    QUERY = "query"
    PARTITION = "partition"
    GRID = "grid"
    ATTENTION_RECEIVED = "attention_received"
    KEYS = "keys"
    INSTRUCTION = "instruction"
    TEXT_ATTENTION = "text_attention"   # the instruction with its attention to the tokens (Instruction.attention)
    # inside a language model, cls_attention computed without the rotary embedding, a softmax over the visual
    # tokens only (FEATHER's criterion); elsewhere not offered
    UNROTATED_ATTENTION = "unrotated_attention"

    def __str__(self) -> str:
        return self.value


def needs(*names: str | Need) -> frozenset:
    """``needs("metric", "query")`` as a frozenset of :class:`Need`; unknown names are a ValueError."""
    allowed = ", ".join(n.value for n in Need)
    result = set()
    for name in names:
        try:
            result.add(Need(name))
        except ValueError:
            raise ValueError(f"unknown signal {name!r} in needs; the signals are: {allowed}") from None
    return frozenset(result)


@dataclass
class Instruction:
    """The prompt's text after an image, as a language model holds it at the decoder layer where in-LM pruning
    acts (DART's text pivots, SparseVLM's raters). Rows pair with the image rows of the state.

    hidden: ``[B, T, D]`` hidden states entering the layer of the real text tokens after the image, in prompt
        order; ``valid``: ``[B, T]`` False past a row's own count (rows have different texts).
    keys: ``[B, T, Dk]`` their attention keys at the layer (after the rotary embedding, heads concatenated).
    norm: the language model's final norm (DART compares hidden states after it), or None.
    attention: ``[B, T, N]`` the attention each text token pays to each of the state's tokens at the layer (its
        softmax row over the whole causal prefix, head mean; SparseVLM's raters), for reducers that need
        ``"text_attention"`` (it costs T query rows over the sequence); else None.
    input_text, input_image: ``[B, T, D]`` and ``[B, N0, D]`` the text's and the image's *original* tokens as they
        entered the language model (SparseVLM picks its raters from them, once per prompt), or None.
    """

    hidden: Tensor
    valid: Tensor
    keys: Optional[Tensor] = None
    norm: Optional[Callable[[Tensor], Tensor]] = None
    attention: Optional[Tensor] = None
    input_text: Optional[Tensor] = None
    input_image: Optional[Tensor] = None


@dataclass
class Signals:
    """What the model offers a reducer at one layer. Adapters fill what they can.

    metric: ``[B, N, D]`` features whose cosine similarity says which tokens are alike (the
        block's hidden states or its attention keys averaged over heads).
    layer, num_layers: where in the model the step happens (PiToMe's margin decays with depth).
    cls_attention: ``[B, N]`` attention the first (CLS) token pays to each token, head mean;
        None when the model has no CLS token.
    query: ``[B, D]`` or ``[B, Q, D]`` query embedding(s) for query-conditioned pruning.
    partition: ``[B, N]`` int partition (crop) id per token for budget-allocating reducers.
    grid: ``(rows, cols)`` of the patch tokens while they are still in their original spatial
        order (no earlier step has reduced), else None.
    attention_received: ``[B, N]`` the attention each token receives in a vision tower's last layer, averaged over
        the queries and heads: what a tower without a CLS token offers as importance (VisPruner's rule for
        SigLIP towers); None where the model does not compute it (it costs a pass over the full attention).
    keys: the tokens' attention keys, where a family computes them apart from the metric. Before a language model:
        ``[B, N, d]``, head mean, of the vision layer the importance comes from (VisionZip matches its contextual
        tokens by them). Inside a language model: ``[B, N, Hk * d]``, the pruning layer's keys after the rotary
        embedding, heads concatenated (DART ranks pivots by their L1 norm, as its code). None elsewhere (on a ViT
        tower ``metric="keys"`` gives them as the metric).
    query_projection: maps token features ``[B, N, C]`` into the query's space ``[B, N, D]`` when
        the two differ (CLIP: each token as the image embedding it would give if it were the pooled
        token, i.e. the tower's final norm and projection); None when tokens and query share a space.
        A callable, so it costs nothing unless a reducer uses it.
    instruction: the prompt's text after the image (:class:`Instruction`), inside a language model; else None.
    """

    metric: Optional[Tensor] = None
    layer: int = 0
    num_layers: int = 1
    cls_attention: Optional[Tensor] = None
    query: Optional[Tensor] = None
    partition: Optional[Tensor] = None
    grid: Optional[tuple] = None
    query_projection: Optional[Callable[[Tensor], Tensor]] = None
    attention_received: Optional[Tensor] = None
    keys: Optional[Tensor] = None
    instruction: Optional[Instruction] = None


def cls_attention(q: Tensor, k: Tensor, bias: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """Attention the first token (CLS) pays to every token, averaged over heads: ``[B, N]``.

    Only the CLS row is computed, ``softmax(q_cls . K^T * scale + bias)``: O(N d) instead of the
    O(N^2 d) full matrix, and identical to row 0 of it, so the block keeps its fused kernel.
    ``q``, ``k``: ``[B, H, N, D]`` after any q/k norm; ``bias``: additive key bias ``[B, 1, 1, N]``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q[:, :, :1].float() * scale) @ k.float().transpose(-1, -2)  # [B, H, 1, N]
    if bias is not None:
        logits = logits + bias.float()
    return logits.softmax(dim=-1)[:, :, 0].mean(dim=1)
