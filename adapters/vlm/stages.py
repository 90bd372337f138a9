"""The settings of in-LLM pruning, fixed at patch time: each stage's decoder layer and budgets
(:class:`Stages`, on the model as ``_vtr_stages``), and what the mode cannot do."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from torch import nn

from vtr.budget.visual import stage_budgets, stage_layers
from vtr.core.plan import Reduction

from .language import decoder
from .visuals import Visuals

# generate() options that send the prompt in pieces or verify several candidate tokens per forward.
MULTI_TOKEN_OPTIONS = {
    "assistant_model": "assisted generation",
    "prompt_lookup_num_tokens": "prompt lookup decoding (assisted generation)",
    "assistant_early_exit": "self-speculative decoding (assisted generation)",
    "use_mtp": "multi-token prediction (assisted generation)",
    "prefill_chunk_size": "chunked prefill",
}
WHY = ("in-LLM pruning decides which visual tokens stay from the last prompt token in one forward of the whole "
        "prompt on an empty cache, then needs one new token per forward")


@dataclass(frozen=True)
class Stages:
    """Where and how much in-LLM pruning prunes (settings, fixed at patch time; on the model as ``_vtr_stages``).

    layers: the decoder layer of each stage. budgets: visual tokens an image of the largest count
    keeps after each stage. budget: what each image's own counts follow (:func:`image_budgets`): the
    count after the last stage, or the user's list of counts.
    """

    layers: tuple
    budgets: tuple
    budget: Union[int, tuple]
    visuals: Visuals

    @property
    def where(self) -> str:
        return f"in the language model at layer{'s' if len(self.layers) > 1 else ''} {', '.join(map(str, self.layers))}"


def make_stages(model: nn.Module, reduction: Reduction, visuals: Visuals) -> Stages:
    layers = stage_layers(reduction.visual.layers, len(decoder(model).layers))
    num_tokens, protected = visuals.tokens(model)
    budget = reduction.visual.budget
    # Stage budgets of the largest image, or of one the size of the budget where images have no largest (Qwen-VL).
    largest = max([num_tokens, *(budget if isinstance(budget, (list, tuple)) else [budget or 0])])
    budgets = stage_budgets(num_tokens if budget is None else budget, largest, protected, len(layers),
                            reduction.reducer)
    budget = tuple(budget) if isinstance(budget, (list, tuple)) else budgets[-1]  # an int, or all of the largest
    return Stages(tuple(layers), tuple(budgets), budget, visuals)


def stages_of(model: nn.Module) -> Optional[Stages]:
    """The in-LLM settings of a patched model; None when it reduces before the language model."""
    return getattr(model, "_vtr_stages", None)
