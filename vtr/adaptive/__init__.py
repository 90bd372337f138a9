"""Adaptive computation: methods that decide per token and per image how much of the model runs (DyT: a token
skips a block and comes back unchanged; SmartTrim: learned per-image pruning; MSViT: a gate picks a coarse or
fine tokenization per image region), or that add a trained module to a reducer (CLCA: a head reading what a vtr
reducer removed). They are not token reducers themselves: each is patched with :func:`patch`, trains (the
backbone frozen or not), and is undone by ``vtr.unpatch``. :func:`methods` lists them with their stage and that
they train, beside ``vtr.methods()`` (the reducers). TCA, listed too, is training-free test-time adaptation for
CLIP: it patches nothing and runs as :class:`TCA` over a stream of test images (:mod:`vtr.adaptive.tca`).

    model = vtr.adaptive.patch(model, "dyt", dispatch="block", rate=0.5)
    vtr.adaptive.trainable(model)                      # dispatchers and adapters only
    with vtr.adaptive.complete(model), torch.no_grad():
        teacher = model(images)                        # every token computed: the self-distillation teacher
    with vtr.adaptive.decisions(model) as kept:
        logits = model(images)
    loss = ce(logits, labels) + kl(logits, teacher) + 2 * vtr.adaptive.rate_loss(kept)
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from ..adapters.base import restore_class, swap_class, unwrap
from . import calls, clca, dyt, msvit, smarttrim
from .calls import Dispatch, GateChoice, Trim
from .tca import TCA

MODULE_NAME = "_vtr_adaptive"   # where the method's modules sit in the patched model


@dataclass(frozen=True)
class Method:
    """What a user needs to know of an adaptive method before patching it."""

    description: str
    stage: str       # where it acts: "tower" (inside a vision encoder's blocks)
    trains: bool     # it has parameters that must be trained before it saves anything
    paper: str
    options: tuple[str, ...] = ()
    build: Optional[Callable[..., nn.Module]] = None      # (model, **options) -> its modules
    block_mixin: Optional[type] = None                    # swapped into every timm Block
    model_mixin: Optional[type] = None                    # swapped into the model, if it needs one
    attach: Optional[Callable[[nn.Module, nn.Module], None]] = None   # (model, its modules): hooks instead of mixins
    detach: Optional[Callable[[nn.Module], None]] = None              # undoes build() and attach()


METHODS = {
    "dyt": Method("dynamic tuning: a learned dispatcher per block lets tokens skip the MLP (or the whole block) and "
                  "come back unchanged; light adapters; trained with the backbone frozen (DyT)", "tower", True,
                  "Zhao et al., Dynamic Tuning Towards Parameter and Inference Efficiency for ViT Adaptation, "
                  "arXiv 2403.11808", ("dispatch", "rate", "bottleneck", "tau", "noise"), dyt.build,
                  dyt.DispatchingBlock),
    "smarttrim": Method("learned per-image trimmers in every block prune tokens (for good) and attention heads (cut out "
                        "of the projections); trained with self-distillation from the untrimmed model (SmartTrim)",
                        "tower", True, "Wang et al., SmartTrim: Adaptive Tokens and Attention Pruning for Efficient "
                        "Vision-Language Models, arXiv 2305.15033", ("flops", "tau", "noise", "start"), smarttrim.build,
                        smarttrim.TrimmingBlock, smarttrim.TrimmingViT),
    "msvit": Method("dynamic mixed-scale tokenization: a learned gate per coarse region (2x2 fine patches) picks one "
                    "coarse token (size 4) or its fine tokens, so the token count follows the image; trained with "
                    "the batch-shaping loss toward a target share of fine regions (MSViT)", "tower", True,
                    "Havtorn et al., MSViT: Dynamic Mixed-Scale Tokenization for Vision Transformers, ICCV-W 2023, "
                    "arXiv 2307.02321", ("coarse", "rate", "hidden", "threshold", "proportional", "tau", "noise",
                                                "batch_rate"),
                    msvit.build, None, msvit.MixedScaleViT),
    "clca": Method("cross-layer cache aggregation: what a vtr reducer (reducer=) removes at each block is cached, and "
                   "a cross-layer aggregation head reads the cache and adds its logits to the model's; trained with the "
                   "backbone frozen (CLCA)", "tower", True,
                   "Rios et al., Cross-Layer Cache Aggregation for Token Reduction in Ultra-Fine-Grained Image "
                   "Recognition, arXiv 2501.00243",
                   ("reducer", "hidden", "r", "keep", "flops", "layers", "reducer_options"), clca.build,
                   attach=clca.attach, detach=clca.detach),
    "tca": Method("token condensation as test-time adaptation for CLIP: a reservoir of confident test images' CLS "
                  "tokens guides which tokens are pruned and merged and corrects the zero-shot logits; training-free, "
                  "over a stream at batch 1; not patched: run vtr.adaptive.TCA(clip_model, class_features)",
                  "clip-tower", False, "Wang et al., Is Less More? Exploring Token Condensation as Training-free "
                  "Test-time Adaptation, arXiv 2410.14729",
                  ("rate", "layers", "reservoir", "scale", "lambd", "beta", "centers", "anchors")),
}
REFERENCE = "_vtr_adaptive_ref"   # each patched module's plain reference to the method's modules


def methods() -> dict[str, Method]:
    """Adaptive-computation methods by name, for :func:`patch`."""
    return dict(METHODS)


def is_patched(model: nn.Module) -> bool:
    return isinstance(getattr(unwrap(model), MODULE_NAME, None), nn.Module)


def patch(model: nn.Module, method: str = "dyt", **options) -> nn.Module:
    """Patch a timm ``VisionTransformer`` in place with an adaptive method: ``"dyt"`` (options ``dispatch``, ``rate``,
    ``bottleneck``, ``tau``, ``noise``; :mod:`vtr.adaptive.dyt`), ``"smarttrim"`` (``flops``, ``tau``, ``noise``,
    ``start``; :mod:`vtr.adaptive.smarttrim`), ``"msvit"`` (``coarse``, ``rate``, ``hidden``, ``threshold``,
    ``proportional``, ``tau``, ``noise``, ``batch_rate``; :mod:`vtr.adaptive.msvit`) or ``"clca"`` (``reducer``, the
    vtr reducer it sits on, with ``r``/``keep``/``flops``/``layers``/``reducer_options`` for ``vtr.patch``, and
    ``hidden``; :mod:`vtr.adaptive.clca`). Its modules are created on the model's device and dtype and registered as
    ``model._vtr_adaptive``. Returns ``model``."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    from ..adapters import is_patched as reduces

    wrapper, model = model, unwrap(model)
    if method not in METHODS:
        raise ValueError(f"unknown adaptive method {method!r}; choose one of: {', '.join(METHODS)}")
    if METHODS[method].build is None:
        raise ValueError(f"{method} does not patch a model: run it as vtr.adaptive.{method.upper()}(model, ...) "
                         "over the test stream")
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{method}: adaptive methods patch a timm VisionTransformer, got {type(model).__name__}")
    if is_patched(model) or reduces(model):
        raise ValueError(f"{method}: model is already patched by vtr; call vtr.unpatch(model) first")
    for i, block in enumerate(model.blocks):
        if type(block) is not Block or type(block.attn) is not Attention:
            raise ValueError(f"{method}: model.blocks[{i}] is {type(block).__name__} with {type(block.attn).__name__}; "
                             "adaptive methods support timm's Block with timm's Attention only")
    spec = METHODS[method]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(f"{method} takes no option {', '.join(unknown)}; its options: {', '.join(spec.options)}")
    modules = spec.build(model, **options)
    weights = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weights is not None:
        modules.to(device=weights.device, dtype=weights.dtype)
    modules.train(model.training)
    setattr(model, MODULE_NAME, modules)
    if spec.attach is not None:   # hooks on a model vtr.patch reduces (CLCA), no mixins
        spec.attach(model, modules)
        return wrapper
    for layer, block in enumerate(model.blocks):
        block._vtr_layer = layer
        block.__dict__[REFERENCE] = modules   # a reference, not a submodule: one copy of the weights
        if spec.block_mixin is not None:
            swap_class(block, spec.block_mixin)
    if spec.model_mixin is not None:
        model.__dict__[REFERENCE] = modules
        swap_class(model, spec.model_mixin)
    return wrapper


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: original block classes, no adaptive modules (``vtr.unpatch`` calls it)."""
    wrapper, model = model, unwrap(model)
    if not is_patched(model):
        raise ValueError("model is not patched by vtr.adaptive.patch")
    spec = METHODS[getattr(model, MODULE_NAME).name]
    if spec.detach is not None:
        del model._modules[MODULE_NAME]
        spec.detach(model)
        return wrapper
    for block in model.blocks:
        restore_class(block)
        del block._vtr_layer
        del block.__dict__[REFERENCE]
    restore_class(model)
    model.__dict__.pop(REFERENCE, None)
    del model._modules[MODULE_NAME]
    return wrapper


def _modules(model: nn.Module) -> nn.Module:
    if not is_patched(model):
        raise ValueError("model is not patched by vtr.adaptive.patch; call vtr.adaptive.patch(model, 'dyt') first")
    return getattr(unwrap(model), MODULE_NAME)


def trainable(model: nn.Module) -> nn.Module:
    """Freeze the backbone; the adaptive method's parameters (DyT: dispatchers and adapters; SmartTrim: trimmers)
    train."""
    own = {id(p) for p in _modules(model).parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in own)
    return model


@contextmanager
def complete(model: nn.Module) -> Iterator[nn.Module]:
    """Calls of ``model`` inside the block compute every token (DyT's "complete model", adapters included;
    SmartTrim's untrimmed model): the teacher of their self-distillation. This thread only."""
    with calls.completed(_modules(model)):
        yield model


@contextmanager
def decisions(model: nn.Module) -> Iterator[list[Dispatch]]:
    """Collect every block's dispatch decisions of the calls inside the block (this thread only), with their
    gradient in training, for :func:`rate_loss` or to count what ran."""
    with calls.collecting(_modules(model)) as found:
        yield found


def rate_loss(found: list[Dispatch]) -> Tensor:
    """DyT's rate loss: ``(mean activation - rate) ** 2`` over every block, image and unprotected token."""
    if not found:
        raise ValueError("rate_loss needs the decisions of a pass: call the model inside vtr.adaptive.decisions")
    keep = torch.stack([d.keep[:, d.num_protected:].float() for d in found])
    return (keep.mean() - found[0].rate) ** 2


def activation_rate(found: list[Dispatch]) -> float:
    """The fraction of (block, image, unprotected token) the model computed in the collected passes."""
    total = sum(d.keep[:, d.num_protected:].numel() for d in found)
    return sum(float(d.keep[:, d.num_protected:].detach().float().sum()) for d in found) / max(total, 1)


def flops_loss(found: list[Trim]) -> Tensor:
    """SmartTrim's cost loss: ``(mean relative cost of the blocks - flops) ** 2``, the cost being each block's
    (tokens x heads) share of its untrimmed cost, differentiable through the decisions; mean over images."""
    trims = [d for d in found if isinstance(d, Trim)]
    if not trims:
        raise ValueError("flops_loss needs the trimming decisions of a pass: call a smarttrim-patched model inside "
                         "vtr.adaptive.decisions")
    return (torch.stack([d.spent for d in trims]).mean() - trims[0].target) ** 2


def _gates(found: list, what: str) -> list[GateChoice]:
    gates = [d for d in found if isinstance(d, GateChoice)]
    if not gates:
        raise ValueError(f"{what} needs the gate choices of a pass: call an msvit-patched model inside "
                         "vtr.adaptive.decisions")
    return gates


def batch_shaping_loss(found: list) -> Tensor:
    """MSViT's gate loss: :func:`vtr.adaptive.msvit.batch_shaping` of the gate probabilities of the collected
    passes toward a Beta(rate, 1 - rate) prior."""
    gates = _gates(found, "batch_shaping_loss")
    return msvit.batch_shaping(torch.cat([g.probabilities.flatten() for g in gates]), gates[0].rate)


def fine_share(found: list) -> float:
    """The share of coarse regions the gate sent to fine tokens in the collected passes."""
    gates = _gates(found, "fine_share")
    return float(torch.cat([g.fine.detach().float().flatten() for g in gates]).mean())
