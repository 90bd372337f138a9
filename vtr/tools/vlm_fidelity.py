"""VLM fidelity: what each method keeps of a trained VLM's answers, at visual-token budgets, before and in the LM.

:func:`evaluate` patches the model with every method that applies, at each budget (a fraction of the image's
visual tokens: 50%, 25% and 11%, the last being the field's 64 of 576), once before the language model
(``budget=``) and once inside it (``budget=`` with ``layers=[in_llm_layer]``), and measures answer accuracy (per
question type too), agreement with the unreduced model's answers, and the prefill FLOPs of one batch measured by
torch's counter (vision tower, reducer and language model: the whole ``forward``), as a fraction of the unreduced.

Besides the methods two rows frame the result: ``oracle`` keeps the tokens under the objects that answer the
question (``relevant`` of :class:`vtr.tools.vqa_task.Examples`), so the task's sensitivity to *which* tokens survive
shows, and ``random`` (a registered baseline) keeps a seeded random subset. Query-conditioned methods get the
question the way a user's call gives it: the prompt's own text (``query`` reads its embedded words; ``fastv`` in the
LM the last prompt token's attention). ``query (no question)`` is ``query`` with ``relevance_weight=0``: the same
selection without the question, to show what conditioning buys.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .. import api
from ..adapters import UnsupportedModelError
from ..core.state import TokenState
from ..reducers.base import REDUCERS, Reducer, Signals, dest_from_choice
from . import vqa_task as task
from .vlm_yardstick import answer_logits, model_inputs

BUDGETS = (0.5, 0.25, 0.11)
STAGES = ("before LM", "in LM")
VARIANTS = {"query (no question)": ("query", {"relevance_weight": 0.0})}


@dataclass
class VlmResult:
    """One method at one budget and stage. ``status`` is "ok" or why there is no measurement."""

    method: str
    stage: str
    budget: float                  # fraction of the visual tokens asked for
    status: str = "ok"
    tokens: Optional[float] = None   # visual tokens kept per image (mean)
    accuracy: Optional[float] = None
    agreement: Optional[float] = None   # answer equal to the unreduced model's
    flops: Optional[float] = None       # measured prefill FLOPs, fraction of the unreduced
    per_type: dict = field(default_factory=dict)   # question type -> accuracy


class Oracle(Reducer):
    """Keeps the tokens that answer the question (the largest share of their pixels under those objects first,
    then a seeded random fill: :func:`oracle_scores`), read from the query the evaluation passes through
    ``vtr.conditioned``: per prompt row the flattened relevance map of :mod:`vtr.tools.vqa_task`."""

    name = "oracle"
    description = "keep the tokens under the objects that answer the question (the yardstick's upper reference)"
    needs = frozenset({"query"})

    def step(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        scores = signals.query.reshape(state.x.shape[0], -1)[:, :state.num_tokens - state.num_protected]
        kept = scores.topk(num_kept - state.num_protected, dim=1, sorted=False).indices.sort(dim=1).values
        return state.reduce(dest_from_choice(state, kept), num_kept)


@contextlib.contextmanager
def _oracle_registered() -> Iterator[None]:
    REDUCERS[Oracle.name] = Oracle
    try:
        yield
    finally:
        del REDUCERS[Oracle.name]


def oracle_scores(examples: "task.Examples", seed: int = 0) -> Tensor:
    """``[N, 64]`` distinct scores, exact in float32 (``k / 64``), ranking each example's tokens: those of the
    answering objects first (more covered first), then the rest in a seeded random order: a random subset with the
    answer forced in, so oracle minus random is what keeping the asked object is worth.

    (The first oracle filled with the other objects' tokens, then the rest in raster order. On the LLaVA yardstick
    before the LM that scored 64.4% at 25% against 77.1% with the random fill: the other objects' tokens without
    their surroundings mislead this LM's lookups, colour 74.5 against 93.5%, and a raster fill keeps only the top
    of the image.)"""
    relevant = examples.relevant.flatten(1).double()
    fill = torch.rand(relevant.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    # answer tokens above 1, by coverage (steps of 1/64 of a token's pixels); the fill, under 1/64, orders the rest
    # and breaks ties: every key differs, and no choice hinges on rounding
    key = (relevant > 0) + relevant + fill / 128
    rank = key.argsort(dim=1, descending=True).argsort(dim=1)
    return (task.GRID ** 2 - rank).float() / task.GRID ** 2


def default_methods() -> list[str]:
    """Every registered training-free method that reduces (``none`` is the reference row)."""
    return [name for name in api.methods() if not REDUCERS[name].learned and not REDUCERS[name].identity]


def evaluate(model: nn.Module, examples: "task.Examples", *, methods: Optional[Sequence[str]] = None,
             budgets: Sequence[float] = BUDGETS, stages: Sequence[str] = STAGES, in_llm_layer: int = 1,
             variants: Optional[dict] = None, batch_size: int = 250, log=print) -> list[VlmResult]:
    """Accuracy, agreement and measured prefill FLOPs of each method, budget and stage on ``examples``."""
    if api.is_patched(model):
        raise ValueError("evaluate a model that is not patched; it patches and unpatches each method")
    for budget in budgets:
        if not 0 < budget < 1:
            raise ValueError(f"budgets: each must be a fraction in (0, 1), got {budget}")
    for stage in stages:
        if stage not in STAGES:
            raise ValueError(f"stages: each must be one of {STAGES}, got {stage!r}")
    visual = task.GRID ** 2
    reference = answer_logits(model, examples, batch_size).argmax(-1)
    probe = examples.subset(slice(0, min(len(examples), 32)))
    base = _prefill_flops(model, probe)
    rows = [_scored(VlmResult("none", "-", 1.0, tokens=visual, flops=1.0), reference, reference, examples)]
    log(_line(rows[0]))
    # (row label, method, its options, the query it is given per example, the stages it runs at)
    oracle = (Oracle.name, Oracle.name, {}, oracle_scores(examples), STAGES[:1])
    chosen = [oracle] + [(name, name, {}, None, _stages_of(name)) for name in (methods or default_methods())]
    chosen += [(label, method, dict(options), None, _stages_of(method)) for label, (method, options) in
               (VARIANTS if variants is None else variants).items() if methods is None or method in methods]
    with _oracle_registered():
        for label, method, options, query, at in chosen:
            for stage in (stage for stage in stages if stage in at):
                for budget in budgets:
                    result = VlmResult(label, stage, float(budget))
                    layers = {} if stage == STAGES[0] else {"layers": [in_llm_layer]}
                    kept = max(1, round(budget * visual))
                    rows.append(_measure(model, examples, probe, method, dict(options, budget=kept, **layers),
                                         query, result, reference, base, batch_size))
                    log(_line(rows[-1]))
    return rows


def _stages_of(method: str) -> tuple:
    """The evaluation's stages where ``method`` acts (its declared ``stages``): an in-LM-only method has no row
    before the LM, a tower method none in it."""
    declared = REDUCERS[method].stages
    return tuple(stage for stage, name in zip(STAGES, ("before_lm", "in_lm")) if name in declared)


def _measure(model, examples, probe, method, options, query, result, reference, base, batch_size) -> VlmResult:
    try:
        api.patch(model, method, **options)
    except (ValueError, TypeError, UnsupportedModelError) as error:
        result.status = _reason(error)
        return result
    try:
        answers, kept = [], []
        for start in range(0, len(examples), batch_size):
            part = slice(start, start + batch_size)
            with _conditioned(model, None if query is None else query[part]):
                answers.append(answer_logits(model, examples.subset(part), batch_size).argmax(-1))
                kept.append(api.report(model).image_tokens_after.float())
        answers = torch.cat(answers)
        result.tokens = float(torch.cat(kept).mean())
        with _conditioned(model, None if query is None else query[:len(probe)]):
            result.flops = _prefill_flops(model, probe) / base
    except (ValueError, TypeError, RuntimeError) as error:
        result.status = _reason(error)
        return result
    finally:
        api.unpatch(model)
    return _scored(result, answers, reference, examples)


def _conditioned(model: nn.Module, query: Optional[Tensor]):
    """``vtr.conditioned`` with the oracle's scores, or nothing for the methods that read the prompt themselves."""
    return contextlib.nullcontext() if query is None else api.conditioned(model, query.float())


def _scored(result: VlmResult, answers: Tensor, reference: Tensor, examples: "task.Examples") -> VlmResult:
    correct = answers == examples.answers
    result.accuracy = float(correct.float().mean())
    result.agreement = float((answers == reference).float().mean())
    types = torch.tensor([task.TYPES.index(t) for t in examples.types])
    result.per_type = {kind: float(correct[types == i].float().mean()) for i, kind in enumerate(task.TYPES)
                       if bool((types == i).any())}
    return result


def _prefill_flops(model: nn.Module, examples: "task.Examples") -> float:
    """FLOPs of one ``forward`` (the prefill: tower, reducer, language model) on ``examples``, counted by torch's
    counter under the math attention kernel (the default CPU kernel hides SDPA from the counter)."""
    inputs = model_inputs(model, examples)
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(**{k: v.to(device) for k, v in inputs.items()}, logits_to_keep=1)
    return float(counter.get_total_flops())


def _reason(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"n/a: {text[:140]}"


def _line(r: VlmResult) -> str:
    if r.status != "ok":
        return f"{r.method:>20} {r.stage:>9} @ {r.budget:.0%}: {r.status}"
    return (f"{r.method:>20} {r.stage:>9} @ {r.budget:.0%}: accuracy {r.accuracy:.3f}, agreement {r.agreement:.3f}, "
            f"tokens {r.tokens:.1f}, FLOPs {r.flops:.3f}")


def chance_accuracy(examples: "task.Examples") -> float:
    """Accuracy of guessing within each question's answers, over ``examples``' mix of types."""
    return sum(task.CHANCE[t] for t in examples.types) / len(examples)


def accuracy_series(results: Sequence[VlmResult]) -> dict:
    """``{"method (stage)": [(measured prefill FLOPs, accuracy), ...]}`` from the unreduced point."""
    unreduced = next(r for r in results if api.is_identity(r.method))
    series: dict = {}
    for r in results:
        if not api.is_identity(r.method) and r.status == "ok":
            series.setdefault(f"{r.method} ({r.stage})", [(1.0, unreduced.accuracy)]).append((r.flops, r.accuracy))
    return series


def format_table(results: Sequence[VlmResult]) -> str:
    """A markdown table: one row per method, stage and budget, with per-type accuracy."""
    head = "| method | stage | budget | tokens | prefill FLOPs | accuracy | agreement | " + \
        " | ".join(task.TYPES) + " |"
    lines = [head, "|" + "---|" * (7 + len(task.TYPES))]
    for r in results:
        if r.status != "ok":
            lines.append(f"| {r.method} | {r.stage} | {r.budget:.0%} | {r.status} |" + " |" * (4 + len(task.TYPES)))
            continue
        types = " | ".join(f"{r.per_type.get(t, float('nan')):.1%}" for t in task.TYPES)
        lines.append(f"| {r.method} | {r.stage} | {r.budget:.0%} | {r.tokens:.1f} | {r.flops:.1%} | "
                     f"{r.accuracy:.1%} | {r.agreement:.1%} | {types} |")
    return "\n".join(lines)
