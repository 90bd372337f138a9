"""A naive transcription of in-LM pruning for reference tests of in-LM methods (PyramidDrop, DART, SparseVLM):
one unpadded LLaVA row run layer by layer through the unpatched decoder layers in float64, with the full eager
attention matrix where a rule needs attention, and at each stage layer a ``rule`` (the published method, written
in the test) choosing which image columns stay. What vtr's hooks decide must equal what this decides."""
from __future__ import annotations

import copy
import sys
from typing import Callable

import torch

from llava_models import IMAGE_TOKEN

# rule(layer, hidden [1, L, D] entering it, present [L] prompt columns, image [L] bool, stage index, cos, sin,
# language model, embedded [1, L0, D]: the language model's input, every prompt column) -> the image columns that stay
Rule = Callable[..., torch.Tensor]


def causal(n: int, dtype=torch.float64) -> torch.Tensor:
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.zeros(1, 1, n, n, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def queries_keys(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The layer's own q and k of every position, ``[H, L, d]`` each (k repeated over the query groups), after
    its input norm and rotary embedding: what its attention computes."""
    attn = layer.self_attn
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    x = layer.input_layernorm(hidden)
    length = hidden.shape[1]
    q = attn.q_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)
    q, k = rotate(q, k, cos, sin)
    return q[0], k[0].repeat_interleave(q.shape[1] // k.shape[1], dim=0)


def keys_of(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``[L, Hk * d]``: the layer's keys of every position after its rotary embedding, heads concatenated (the
    key states DART's code reads), before any repetition over query groups."""
    attn = layer.self_attn
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    k = attn.k_proj(layer.input_layernorm(hidden)).view(1, hidden.shape[1], -1, attn.head_dim).transpose(1, 2)
    k = rotate(k, k, cos, sin)[0]
    return k[0].transpose(0, 1).reshape(hidden.shape[1], -1)


def attention(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The layer's full causal attention matrix ``[H, L, L]`` (eager: q k^T * scale + mask, softmax)."""
    q, k = queries_keys(layer, hidden, cos, sin)
    logits = q @ k.transpose(-1, -2) * layer.self_attn.scaling + causal(hidden.shape[1])[0]
    return logits.softmax(dim=-1)


def stage_columns(model, ids: torch.Tensor, pixels: torch.Tensor, rules: dict[int, Rule],
                  last_logits: torch.Tensor = None) -> list[torch.Tensor]:
    """Prompt columns kept after each stage (``rules``: decoder layer -> its rule), for one row ``ids`` ``[1, L]``;
    a rule may also merge columns (it returns ``(kept, groups)``). ``last_logits``: filled with the last
    position's logits (float32), if given."""
    last_logits = torch.empty(model.config.text_config.vocab_size) if last_logits is None else last_logits
    model = copy.deepcopy(model).double()
    inner, language = model.model, model.model.language_model
    kept = []
    with torch.inference_mode():
        hidden = language.embed_tokens(ids)
        features = inner.get_image_features(pixel_values=pixels.double()).pooler_output
        hidden[ids == IMAGE_TOKEN] = torch.cat(list(features))
        present = torch.arange(ids.shape[1])
        embedded = hidden.clone()
        for index, decoder in enumerate(language.layers):
            cos, sin = language.rotary_emb(hidden, present[None])
            if index in rules:
                image = ids[0, present] == IMAGE_TOKEN
                chosen = rules[index](decoder, hidden, present, image, len(kept), cos, sin, language, embedded)
                groups = []
                if isinstance(chosen, tuple):    # (kept columns, groups of columns each merged into one token)
                    chosen, groups = chosen
                    hidden = hidden.clone()
                    for group in groups:         # a merged token: the mean, at its first token's column
                        slots = torch.searchsorted(present, torch.tensor(sorted(group)))
                        hidden[:, slots[0]] = hidden[:, slots].mean(dim=1)
                    chosen = torch.cat([chosen, torch.tensor([min(g) for g in groups], dtype=torch.long)])
                wanted = torch.cat([present[~image], chosen]).sort().values
                hidden, present = hidden[:, torch.searchsorted(present, wanted)], wanted
                kept.append(present)
                cos, sin = language.rotary_emb(hidden, present[None])
            hidden = decoder(hidden, attention_mask=causal(hidden.shape[1]), position_ids=present[None],
                             position_embeddings=(cos, sin))
        last_logits[:] = model.lm_head(language.norm(hidden[:, -1]))[0].float()
    return kept


def top(scores: torch.Tensor, k: int, margin: float = 1e-6) -> torch.Tensor:
    """Indices of the ``k`` largest ``scores`` (float64), asserting no near-tie at the cut: a reference decision
    must never hinge on rounding."""
    order = scores.argsort(descending=True)
    if 0 < k < len(scores):
        gap = float(scores[order[k - 1]] - scores[order[k]])
        assert gap > margin * float(scores.abs().max()), f"near-tie at the cut ({gap:.3g}): choose another seed"
    return order[:k]
