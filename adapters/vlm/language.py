"""What the language model costs: the MACs the visual tokens cost it, and a prompt's analytic prefill MACs."""
from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor, nn

from vtr.budget.cost import EncoderCost

from ..steps import linear_macs


def decoder(model: nn.Module) -> nn.Module:
    """The model's language model (its ``layers`` are the decoder layers): ``model.model.language_model``, or
    ``model.model.text_model`` on the families that call it so (SmolVLM, Idefics3)."""
    inner = model.model
    language = getattr(inner, "language_model", None)
    return language if language is not None else inner.text_model


def language_cost(model: nn.Module, num_tokens: int = 0, num_protected: int = 0, has_cls: bool = True) -> EncoderCost:
    """Language-model MACs per layer of ``num_tokens`` visual tokens (what a reduction saves).

    :func:`decoder` ``(model).layers`` are pre-norm decoder layers with ``self_attn.q_proj`` and an
    ``mlp`` (LLaMA, Qwen2); ``has_cls``: the visual tokens start with a CLS feature (LLaVA's 'full').
    """
    language = decoder(model)
    layer = language.layers[0]
    return EncoderCost(
        num_tokens=num_tokens,
        num_protected=num_protected,
        num_layers=len(language.layers),
        attn_linear=linear_macs(layer.self_attn),
        attn_dim=layer.self_attn.q_proj.out_features,
        mlp_linear=linear_macs(layer.mlp),
        fixed=0.0,
        metric_dim=model.config.text_config.hidden_size,
        has_cls=has_cls,
    )


def prefill_macs(model: nn.Module, num_tokens: Tensor, kept_tokens: Optional[Union[Tensor, Sequence[Tensor]]] = None,
                 from_layer: Union[int, Sequence[int]] = 0) -> Tensor:
    """Analytic language-model prefill MACs for prompts of ``num_tokens`` real tokens (per row).

    Linear layers per token, causal attention scores and values over ``T(T+1)/2`` query-key
    pairs, and the head on the last position (what ``generate()`` computes). Norms, activations
    and softmax are left out, as every counter does. With ``kept_tokens``, layers from
    ``from_layer`` on run on that many tokens (in-LLM pruning); with lists (progressive pruning),
    layers from ``from_layer[i]`` on run on ``kept_tokens[i]`` tokens.
    """
    c = language_cost(model)

    def layer(t: Tensor) -> Tensor:
        t = t.double()
        return (c.attn_linear + c.mlp_linear) * t + c.attn_dim * t * (t + 1)

    kept_tokens = num_tokens if kept_tokens is None else kept_tokens
    counts = [num_tokens, *(kept_tokens if isinstance(kept_tokens, (list, tuple)) else [kept_tokens])]
    bounds = [0, *(from_layer if isinstance(from_layer, (list, tuple)) else [from_layer]), c.num_layers]
    segments = sum(layer(t) * (end - start) for t, start, end in zip(counts, bounds[:-1], bounds[1:]))
    return segments + linear_macs(model.lm_head)
