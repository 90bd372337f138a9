"""The one-line API: ``vtr.patch(model, method, amount)`` and ``vtr.unpatch(model)``."""
from __future__ import annotations

import gc
import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

from torch import Tensor, nn

from . import adaptive, compression, model_zoo
from .adapters import UnsupportedModelError, find_adapter, is_patched, settings, thread_settings, unwrap
from .budget.schedule import RSpec
from .core import run as runs
from .core.numbers import plain, plain_scalar
from .core.plan import ACTIVE, METRICS, Reduction
from .core.run import Report
from .core.signals import Need
from .reducers import REDUCERS, Reducer
from .reducers.base import STAGE_WORDS


REDUCER_NAME = "_vtr_reducer"   # where a learned reducer sits in the patched model (see attach_reducer)


@dataclass(frozen=True)
class MethodInfo:
    """What ``vtr.methods(details=True)`` says of one method.

    stages: where it can act, a subset of ("tower", "before_lm", "in_lm"): inside a vision tower (timm,
    open_clip, Hugging Face ViTs), on a VLM's visual tokens before its language model, or inside the language
    model (``layers=``). attention: it ranks tokens by attention (the CLS row in a tower, the last prompt
    token's or the prompt text's rows in a language model, computed from q/k). query: it reads the prompt's
    text or a query (``vtr.conditioned``).
    training: it has parameters to train (a learned reducer). paper: short citation with its arXiv id.
    """

    name: str
    description: str
    stages: tuple[str, ...]
    attention: bool
    query: bool
    training: bool
    paper: str


ATTENTION_NEEDS = frozenset({Need.CLS_ATTENTION, Need.TEXT_ATTENTION, Need.UNROTATED_ATTENTION})


def methods(details: bool = False) -> Union[dict[str, str], dict[str, MethodInfo]]:
    """Method names with one-line descriptions, for ``vtr.patch(model, name, ...)``; ``details=True``: a
    :class:`MethodInfo` per name instead (stages, what it needs, its paper). Modules that add parts of their own to
    a VLM (TokenPacker's projector, adaptive granularity) are not reducers: ``vtr.compressions()`` lists them, for
    ``vtr.compress(model, name, ...)``."""
    if not details:
        return {name: cls.description for name, cls in sorted(REDUCERS.items())}
    return {name: MethodInfo(name=name, description=cls.description, stages=tuple(cls.stages),
                             attention=bool(ATTENTION_NEEDS & cls.needs),
                             query=bool({Need.QUERY, Need.INSTRUCTION} & cls.needs),
                             training=bool(cls.learned), paper=cls.paper)
            for name, cls in sorted(REDUCERS.items())}


STAGE_COLUMNS = {"tower": "tower", "before_lm": "before LM", "in_lm": "in LM"}


def method_table() -> str:
    """The methods as a Markdown table (the README's is this one, checked by a test): name, description,
    where each can act, what it needs (attention, a query, training) and its paper."""
    lines = ["| method | what it does | " + " | ".join(STAGE_COLUMNS.values()) + " | needs | paper |",
             "|---" * (len(STAGE_COLUMNS) + 4) + "|"]
    for name, info in methods(details=True).items():
        needs = [word for word, flag in (("attention", info.attention), ("query", info.query),
                                         ("training", info.training)) if flag]
        marks = ["yes" if stage in info.stages else "—" for stage in STAGE_COLUMNS]
        lines.append(f"| `{name}` | {info.description} | " + " | ".join(marks) + f" | {', '.join(needs) or '—'} | {info.paper or '—'} |")
    return "\n".join(lines) + "\n"


def check_stage(reducer: Reducer, method: str, where: str, adapter) -> None:
    """A method at a stage it does not list is refused at patch time, with the stages it has."""
    if where in reducer.stages:
        return
    applies = " and ".join(STAGE_WORDS[stage] for stage in reducer.stages)
    if where == "in_lm":
        hint = "leave out layers="
    elif where == "before_lm":
        hint = "give layers=[K] (decoder layers to prune at)"
    else:
        hint = "patch a vision-language model"
    raise ValueError(f"method {method!r} applies {applies}, not {STAGE_WORDS[where]}: {hint} (the {adapter.name} "
                     "adapter would run it there; see vtr.methods(details=True))")


def check_signals(reducer: Reducer, method: str, where: str, adapter, model: nn.Module) -> None:
    """A method that cannot run without one of some signals (``Reducer.requires_one_of``) is refused at patch time
    where the family offers none of them, naming each and why it lacks."""
    missing = adapter.missing_signals(model, where)
    if not reducer.requires_one_of or not reducer.requires_one_of <= set(missing):
        return
    lacks = "; ".join(f"{need.value}: {missing[need]}" for need in sorted(reducer.requires_one_of, key=str))
    raise UnsupportedModelError(f"method {method!r} needs one of {', '.join(sorted(map(str, reducer.requires_one_of)))} "
                                f"and the {adapter.name} adapter offers none {STAGE_WORDS[where]} ({lacks}); use a "
                                "method that ranks tokens by their features (see vtr.methods(details=True))")


def is_identity(method: str) -> bool:
    """Whether ``method`` keeps every token (the unreduced reference, ``"none"``): asked of the reducer's
    ``identity`` capability, never of its name."""
    return method in REDUCERS and REDUCERS[method].identity


def make_reducer(method: str, **options) -> Reducer:
    """Build a registered reducer; unknown names and options are errors that list what exists.

    numpy and 0-d tensor scalars among the options are the Python numbers they hold.
    """
    if method not in REDUCERS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(sorted(REDUCERS))}")
    cls = REDUCERS[method]
    accepted = reducer_options(cls)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"method {method!r} takes no option {', '.join(unknown)}; its options: "
                         f"{', '.join(accepted) or 'none'}")
    return cls(**{name: plain_scalar(value) for name, value in options.items()})


def reducer_options(cls: type[Reducer]) -> list[str]:
    """The options a reducer class takes: its ``__init__``'s named parameters.

    A reducer without an ``__init__`` of its own inherits ``nn.Module``'s ``(*args, **kwargs)``, which
    are no options, so catch-all parameters never count.
    """
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [name for name, parameter in inspect.signature(cls.__init__).parameters.items()
            if name != "self" and parameter.kind in named]


def patch(
    model: nn.Module,
    method: Optional[str] = None,
    *,
    r: Optional[RSpec] = None,
    keep: Optional[Union[float, Sequence[float]]] = None,
    flops: Optional[float] = None,
    layers: Optional[Sequence[int]] = None,
    metric: Optional[str] = None,
    prop_attn: Optional[bool] = None,
    active: str = "always",
    preset: Optional[str] = None,
    **options,
) -> nn.Module:
    """Make ``model`` reduce its tokens with ``method``; returns the same model, patched in place.

    Give one amount: ``r`` tokens removed per layer (int, per-layer list, or ``(r, inflect)``),
    ``keep`` fraction of unprotected tokens kept per layer, or ``flops`` the target fraction of the
    unreduced model's FLOPs (vtr solves a per-layer schedule for it). ``layers`` restricts where
    reduction happens. ``metric`` is what merging compares: ``"x"`` hidden states (default; kept
    outputs closer to the unreduced ones in our measurements) or ``"keys"`` (attention keys, as in
    ToMe). ``prop_attn`` adds log(size) to attention logits (default True). Left out (None), both take
    the method's own defaults where it has some (``pitome`` with ``variant="paper"``: keys, no
    proportional attention), else vtr's. ``active="train"`` reduces in training mode only: cheaper
    training steps, the unreduced model in eval mode (Attentive Mask CLIP, FLIP). Other keywords go to
    the method. Weights, ``state_dict`` keys and hooks are untouched; ``vtr.unpatch`` undoes it. A
    learned method (``dynamicvit``, ``sit``) adds its own modules to the model, under ``_vtr_reducer``
    (see :func:`attach_reducer`). A peft ``PeftModel`` is patched through to its base model.
    ``preset`` names a model-zoo entry (``vtr.zoo.entries()``) whose method and settings apply;
    arguments given here override it (an amount replaces the preset's amount).
    """
    if preset is not None:
        given = {"method": method, "r": r, "keep": keep, "flops": flops, "layers": layers,
                 "metric": metric, "prop_attn": prop_attn,
                 "active": None if active == "always" else active, "options": options}
        return patch(model, **model_zoo.preset_arguments(preset, model, given))
    method = "tome" if method is None else method
    # numpy / 0-d tensor scalars as Python numbers, for every adapter's checks and for describe().
    r, keep, flops, layers = plain(r, "r"), plain(keep, "keep"), plain(flops, "flops"), plain(layers, "layers")
    prop_attn = plain(prop_attn, "prop_attn")
    wrapper, model = model, unwrap(model)
    if compression.is_compressed(model):
        raise ValueError("model carries a vtr.compress module; call vtr.unpatch(model) before patching it")
    if is_patched(model):
        raise ValueError(
            f"model is already patched with {settings(model).describe()}; call vtr.unpatch(model) before "
            "patching it again"
        )
    if adaptive.is_patched(model):
        raise ValueError("model is already patched with an adaptive method (vtr.adaptive.patch); call "
                         "vtr.unpatch(model) before patching it again")
    if metric is not None and metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if prop_attn is not None and not isinstance(prop_attn, bool):
        raise ValueError(f"prop_attn must be True or False, got {prop_attn!r}")
    if active not in ACTIVE:
        raise ValueError(f"active must be one of {ACTIVE} (reduce on every call, or in training mode only), "
                         f"got {active!r}")
    adapter = find_adapter(model)
    adapter.check(model)
    check_not_inside_a_vlm(model, adapter, method)
    own = {k: plain(options.pop(k), k) for k in adapter.amounts if k in options}   # e.g. LLaVA's budget=
    if "tower_layer" in options:   # an amount of the families that reduce inside their vision tower, not an option
        raise ValueError(f"tower_layer= (reducing inside a vision-language model's vision tower) is not supported by "
                         f"the {adapter.name} adapter; Qwen2-VL, Qwen2.5-VL and Qwen3-VL take it")
    if "positions" in options:     # LLaVA's choice of numbering for a compacted prompt, not a method's option
        raise ValueError(f"positions= (how a compacted prompt's kept tokens are numbered) is not taken by the "
                         f"{adapter.name} adapter: LLaVA-1.5 / LLaVA-NeXT images take it; Qwen-VL keeps every kept "
                         "token's M-RoPE position, the other families number the compacted prompt consecutively")
    reducer = make_reducer(method, **options)
    if reducer.learned and not adapter.learned_reducers:
        raise ValueError(f"method {method!r} is a learned reducer, and the {adapter.name} adapter does not take "
                         "learned reducers yet; use a training-free method (see vtr.methods())")
    layers = adapter.default_stage_layers(model, reducer, layers)
    check_stage(reducer, method, adapter.stage(layers), adapter)
    check_signals(reducer, method, adapter.stage(layers), adapter, model)
    metric, prop_attn = patch_settings(reducer, adapter.metrics, metric, prop_attn)
    cost = adapter.cost(model, metric)
    schedule = adapter.make_schedule(model, reducer, r=r, keep=keep, flops=flops, layers=layers, metric=metric,
                                     **own)
    if reducer.learned:
        reducer.build(cost.width, schedule.token_counts(reducer, cost.num_tokens, cost.num_protected),
                      cost.num_protected)
    given = {"r": r, "keep": keep, "flops": flops, "layers": layers} | own
    arguments = {k: v for k, v in given.items() if v is not None} | options
    if active != "always":
        arguments["active"] = active
    adapter.patch(model, Reduction(method=method, reducer=reducer, schedule=schedule, metric=metric,
                                   prop_attn=prop_attn, arguments=arguments, has_cls=cost.has_cls, active=active,
                                   visual=adapter.plan(layers=layers, **own)))
    attach_reducer(model, reducer)
    return wrapper


def parents(module: nn.Module) -> list[nn.Module]:
    """The modules that hold ``module`` as a child.

    torch keeps no parent links. A child is a value of its parent's ``_modules`` dict, which sits in the
    parent's ``__dict__``: the garbage collector's referrers lead from the child to the parent in three
    scans (at patch time, never per call)."""
    children = [d for d in gc.get_referrers(module) if isinstance(d, dict) and d
                and all(isinstance(v, nn.Module) or v is None for v in d.values())]   # what _modules holds
    if not children:
        return []
    attributes = [d for d in gc.get_referrers(*children)
                  if isinstance(d, dict) and any(d.get("_modules") is c for c in children)]
    if not attributes:
        return []
    return [m for m in gc.get_referrers(*attributes)
            if isinstance(m, nn.Module) and any(m.__dict__ is a for a in attributes)]


def check_not_inside_a_vlm(model: nn.Module, adapter, method: str) -> None:
    """Refuse to reduce a part of a vision-language model on its own (its vision tower, say): the language
    model would then get fewer image features than its prompt has image tokens. ``budget=`` on the whole
    model is the way (its adapter reduces the visual tokens and shortens the prompt to match)."""
    if not adapter.vision_tower_of_vlms:
        return
    vlm = outermost_vlm(model)
    if vlm is not None:
        raise ValueError(
            f"this {type(model).__name__} is part of a {type(vlm).__name__}: reduced on its own, it would give the "
            "language model fewer image features than the prompt has image tokens. Patch the whole model "
            f"instead: vtr.patch(model, {method!r}, budget=N) keeps N visual tokens per image")


def outermost_vlm(module: nn.Module) -> Optional[nn.Module]:
    """The outermost module holding ``module`` that a vision-language adapter (one with ``budget=``) claims."""
    def is_vlm(candidate: nn.Module) -> bool:
        try:
            return "budget" in find_adapter(candidate).amounts
        except Exception:   # not a model vtr knows
            return False

    found, seen, frontier = None, {id(module)}, [module]
    while frontier:
        for parent in parents(frontier.pop()):
            if id(parent) not in seen:
                seen.add(id(parent))
                frontier.append(parent)
                if is_vlm(parent):
                    found = parent
    return found


def attach_reducer(model: nn.Module, reducer: Reducer) -> None:
    """Make a learned reducer part of the patched model: the submodule ``_vtr_reducer``.

    The frozen settings (``model._vtr``) still name the reducer, and are what the forward pass reads;
    registering the same module object on the model is what makes its parameters the model's own:
    ``model.parameters()`` and optimizers see them, ``state_dict`` saves them under ``_vtr_reducer.``
    (so a checkpoint loads ``strict=True`` into a fresh model patched the same way), ``.to()``/``.half()``,
    ``train()``/``eval()``, DDP and FSDP reach them, and deepcopy/pickle keep one object in both places.
    It is created on the model's device and dtype. Training-free reducers have no parameters and are
    not registered: patching them leaves ``state_dict`` keys and module traversal as they were.
    """
    if not reducer.learned:
        return
    weights = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weights is not None:
        reducer.to(device=weights.device, dtype=weights.dtype)
    reducer.train(model.training)
    setattr(model, REDUCER_NAME, reducer)


def patch_settings(reducer: Reducer, metrics: Sequence[str], metric: Optional[str] = None,
                   prop_attn: Optional[bool] = None) -> tuple[str, bool]:
    """``metric`` and ``prop_attn`` as given; left out (None), the reducer's own defaults
    (:meth:`~vtr.reducers.Reducer.patch_defaults`), else vtr's: ``"x"`` and True. A default metric the
    model family cannot give (``metrics``: those it can) gives way to the family's first."""
    defaults = {"metric": "x", "prop_attn": True} | reducer.patch_defaults()
    if metric is None:
        metric = defaults["metric"] if defaults["metric"] in metrics else metrics[0]
    return metric, defaults["prop_attn"] if prop_attn is None else prop_attn


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` (or :func:`vtr.adaptive.patch`, or ``vtr.compress``): original classes and projector, no
    hooks, no learned reducer, adaptive or compression module, outputs identical to before patching."""
    wrapper, model = model, unwrap(model)
    if adaptive.is_patched(model):
        adaptive.unpatch(model)
        return wrapper
    if compression.is_compressed(model):
        compression.uncompress(model)
        return wrapper
    settings(model)
    find_adapter(model).unpatch(model)
    model._modules.pop(REDUCER_NAME, None)
    return wrapper


def report(model: nn.Module) -> Report:
    """Tokens per layer and provenance from this thread's last forward pass of the patched model.

    A last call that ran unreduced (``vtr.disabled``, eval mode under ``active="train"``) is an error: the
    report always describes the last call, never an earlier one as if it were it. A model with a ``vtr.compress``
    module gives its :class:`~vtr.compression.CompressionReport` (per image: the level it got, tokens before/after).
    """
    if compression.is_compressed(model):
        return compression.report(model)
    found = runs.last_call(thread_settings(model))
    if found is None:
        raise ValueError("no forward pass of this model yet in this thread: run the patched model once, then "
                         "read vtr.report(model)")
    if found.report is None:
        raise ValueError("the last forward pass of this model in this thread ran unreduced (inside vtr.disabled, or "
                         "in eval mode under active='train'), so it has no reduction to report: read "
                         "vtr.report(model) after a reduced call")
    return found.report


def expected_tokens(model: nn.Module) -> list[int]:
    """Tokens entering each block (and after the last) at the model's default input size."""
    model = unwrap(model)
    return find_adapter(model).expected_tokens(model, settings(model))


def expected_flops(model: nn.Module) -> tuple[float, float]:
    """Analytic (reduced, unreduced) MACs per image at the model's default input size."""
    model = unwrap(model)
    return find_adapter(model).expected_flops(model, model._vtr if is_patched(model) else None)


@contextmanager
def conditioned(model: nn.Module, query: Tensor) -> Iterator[nn.Module]:
    """Give query-conditioned reducers their query for the forward passes inside the block.

    ``query`` is ``[B, D]`` (one embedding per image) or ``[B, Q, D]`` (several, e.g. class
    prompts or text tokens), one row per image of the batch. The query holds for this thread only:

        with vtr.conditioned(model, text_embeddings):
            features = model(images)
    """
    reduction = thread_settings(model)
    if not isinstance(query, Tensor) or query.dim() not in (2, 3):
        shape = tuple(query.shape) if isinstance(query, Tensor) else type(query).__name__
        raise ValueError(f"query must be a tensor [B, D] or [B, Q, D], got {shape}")
    with runs.conditioned_on(reduction, query):
        yield model


adaptive.clca.use_reducer_api(patch, unpatch)   # CLCA patches its reducer through the api (a layer above it)
