"""Probes behind benchmarks/RESULTS-vlm-fidelity.md's arguments, on the trained yardsticks (cached; trained on first
use) and the same 1200 questions as ``vtr fidelity --model llava-task``.

    python benchmarks/vlm_probes.py oracles [--model llava|qwen]   # which fill an oracle needs before the LM
    python benchmarks/vlm_probes.py in-lm   [--model llava|qwen]   # the oracle inside the LM (layer 1)
    python benchmarks/vlm_probes.py sized   [--methods pitome,tome] # proportional attention in the LM (LLaVA)
    python benchmarks/vlm_probes.py recall  [--model qwen] [--methods fastv,divprune]   # the answer kept? spread?
    python benchmarks/vlm_probes.py fill    [--model qwen]   # fastv's top share of the budget, the rest at random
    python benchmarks/vlm_probes.py spread  [--model qwen]   # each method with FEATHER's grid forced in
    python benchmarks/vlm_probes.py convention [--model qwen]   # rank by the pruning layer or the one before

``oracles``: the answering objects' tokens first, then a fill: random, the other objects' then random, or the
background only (objects last). ``in-lm``: the oracle (answer tokens, then a random fill) after decoder layer 1,
through ``vtr.conditioned`` as a user's query. ``sized``: tokens merged before the LM get ``log(size)`` added to
their key columns in the LM's attention (ToMe's proportional attention carried into the LM), against the plain run.
``recall``: dropping methods in the LM (layer 1) at 25% and 11%: the share of the answering objects' tokens they
keep (of as many as the budget allows), of their kept tokens on objects, of the image's 2 x 2 cells they cover and
of their kept tokens in the bottom half, beside the accuracy. ``fill``: in the LM (layer 1), a share of
the budget by fastv's rule (the last prompt token's attention), the rest a seeded random spread: the object and the
rest, which the oracle shows these LMs need.
"""
from __future__ import annotations

import argparse

import torch
from torch import Tensor

import vtr
from vtr.tools import vlm_fidelity, vlm_yardstick, vqa_task as task

BUDGETS = (0.5, 0.25, 0.11)


def ranked(key: Tensor) -> Tensor:
    """Distinct scores ``k / 64`` from a float64 ranking key (highest first), as the oracle takes them."""
    rank = key.argsort(dim=1, descending=True).argsort(dim=1)
    return (task.GRID ** 2 - rank).float() / task.GRID ** 2


def line(label: str, budget: float, accuracy: float, per_type: dict) -> str:
    types = " ".join(f"{kind} {100 * value:5.1f}" for kind, value in per_type.items())
    return f"{label:52s} {100 * budget:3.0f}%  acc {100 * accuracy:5.1f}  {types}"


def per_type(correct: Tensor, examples: "task.Examples") -> dict:
    kinds = torch.tensor([task.TYPES.index(kind) for kind in examples.types])
    return {kind: float(correct[kinds == i].float().mean()) for i, kind in enumerate(task.TYPES)}


def oracle_rows(model, examples, variants: dict, layers: list) -> None:
    reference = vlm_fidelity.answer_logits(model, examples).argmax(-1)
    probe = examples.subset(slice(0, 32))
    base = vlm_fidelity._prefill_flops(model, probe)
    with vlm_fidelity._oracle_registered():
        for label, scores in variants.items():
            for budget in BUDGETS:
                options = {"budget": max(1, round(budget * task.GRID ** 2)), **({"layers": layers} if layers else {})}
                row = vlm_fidelity._measure(model, examples, probe, "oracle", options, scores,
                                            vlm_fidelity.VlmResult(label, "", budget), reference, base, 250)
                print(line(label, budget, row.accuracy, row.per_type), flush=True)


def oracles(model, examples) -> None:
    relevant, objects = examples.relevant.flatten(1).double(), examples.objects.flatten(1).double()
    fill = torch.rand(relevant.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    answer = (relevant > 0) * 1e6 + relevant * 1e4
    oracle_rows(model, examples, {
        "answer tokens, then random (the oracle)": vlm_fidelity.oracle_scores(examples),
        "answer tokens, other objects', then random": ranked(answer + (objects > 0) * 1e3 + objects * 10 + fill),
        "answer tokens, other objects', then raster order": ranked(
            answer + (objects > 0) * 1e3 + objects * 10 - torch.arange(task.GRID ** 2, dtype=torch.float64) * 1e-4),
        "background only (random), objects last": ranked((objects == 0) * 1e3 + fill),
    }, layers=[])


def in_lm(model, examples) -> None:
    oracle_rows(model, examples, {"oracle in the LM (layer 1)": vlm_fidelity.oracle_scores(examples)}, layers=[1])


def sized(model, examples, methods: list) -> None:
    """Each method before the LM, plain and with log(size) on its merged tokens' key columns in the LM."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    bias = {"columns": None}   # [B, L'] log size of each column of the compacted prompt (0 for text)

    def attention(module, query, key, value, attention_mask, **kwargs):
        if bias["columns"] is None or query.shape[2] == 1 or not getattr(module, "is_causal", False):
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        length = key.shape[2]
        if attention_mask is None:
            allowed = torch.ones(query.shape[2], length, dtype=torch.bool).tril(length - query.shape[2])[None, None]
        else:
            allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask > -1e30
        mask = torch.zeros(allowed.shape, dtype=query.dtype).masked_fill(~allowed, float("-inf"))
        kwargs.pop("is_causal", None)
        return sdpa_attention_forward(module, query, key, value, mask + bias["columns"][:, None, None, :length],
                                      is_causal=False, **kwargs)

    AttentionInterface.register("vtr_sized_probe", attention)
    AttentionMaskInterface.register("vtr_sized_probe", sdpa_mask)
    image_token = model.config.image_token_id
    for method in methods:
        for budget in BUDGETS:
            vtr.patch(model, method, budget=max(1, round(budget * task.GRID ** 2)))
            correct = {"plain": [], "sized": []}
            try:
                for start in range(0, len(examples), 250):
                    part = examples.subset(slice(start, start + 250))
                    bias["columns"] = None
                    model.set_attn_implementation("sdpa")
                    correct["plain"].append(vlm_fidelity.answer_logits(model, part).argmax(-1) == part.answers)
                    report = vtr.report(model)
                    ids = vlm_yardstick.model_inputs(model, part)["input_ids"]
                    kept = report.kept_positions
                    columns = torch.zeros(kept.shape)
                    for image, row in enumerate(report.image_rows.tolist()):
                        visual = (kept[row] >= 0) & (ids[row].gather(0, kept[row].clamp_min(0)) == image_token)
                        sizes = report.size[image][report.size[image] > 0].float()
                        columns[row, visual] = sizes.log()
                    bias["columns"] = columns
                    model.set_attn_implementation("vtr_sized_probe")
                    correct["sized"].append(vlm_fidelity.answer_logits(model, part).argmax(-1) == part.answers)
            finally:
                bias["columns"] = None
                model.set_attn_implementation("sdpa")
                vtr.unpatch(model)
            for label, parts in correct.items():
                right = torch.cat(parts)
                print(line(f"{method} before the LM, {label}", budget, float(right.float().mean()),
                           per_type(right, examples)), flush=True)


def parsed(spec: str) -> tuple[str, dict]:
    """A method given as ``name`` or ``name:option=value`` (e.g. ``sparsevlm:recycle=0``): its name and options."""
    method, _, option = spec.partition(":")
    name, _, value = option.partition("=")
    return method, ({name: int(value) if value.isdigit() else float(value)} if option else {})


def recall(model, examples, methods: list, budgets: tuple = (0.11,)) -> None:
    """Where each dropping method's kept tokens lie in the LM (layer 1): the share of the answering objects' tokens
    kept (of as many as the budget allows), of the kept tokens on any object, of the image's 2 x 2 cells holding
    one (its spread) and of the kept tokens in the image's bottom half (the rotary embedding's pull towards the
    prompt, FEATHER's finding), beside the accuracy per type. A token merged with others (SparseVLM's recycled
    clusters) is not kept as itself and counts for none of these."""
    answer = examples.relevant.flatten(1) > 0
    on_object = examples.objects.flatten(1) > 0
    side = task.GRID
    cell = (torch.arange(side)[:, None] // 2 * (side // 2) + torch.arange(side)[None, :] // 2).flatten()
    bottom = (torch.arange(side * side) // side) >= side // 2
    for budget in budgets:
        kept_count = max(1, round(budget * side ** 2))
        for spec in methods:
            method, options = parsed(spec)
            vtr.patch(model, method, budget=kept_count, layers=[1], **options)
            kept, right = [], []
            try:
                for start in range(0, len(examples), 250):
                    part = examples.subset(slice(start, start + 250))
                    right.append(vlm_fidelity.answer_logits(model, part).argmax(-1) == part.answers)
                    assignment = vtr.report(model).assignment
                    # a token kept as itself: its destination holds no other (merged tokens are means, not it)
                    dest = assignment.clamp_min(0)
                    held = torch.zeros(dest.shape[0], dest.shape[1] + 1)
                    held.scatter_add_(1, dest, (assignment >= 0).float())
                    kept.append((assignment >= 0) & (held.gather(1, dest) == 1))
            finally:
                vtr.unpatch(model)
            kept, right = torch.cat(kept), torch.cat(right)
            method = spec
            share = (kept & answer).sum(1) / answer.sum(1).clamp(max=kept_count).clamp_min(1)
            has = answer.any(1)
            count = kept.sum(1).clamp_min(1)
            objects = float(((kept & on_object).sum(1) / count).mean())
            cells = torch.zeros(len(kept), (side // 2) ** 2).index_add_(1, cell, kept.float()) > 0
            lower = float(((kept & bottom).sum(1) / count).mean())
            label = (f"{method}: answer {100 * float(share[has].mean()):3.0f}% objects {100 * objects:3.0f}% "
                     f"cells {100 * float(cells.float().mean()):3.0f}% bottom {100 * lower:3.0f}%")
            print(line(label, budget, float(right.float().mean()), per_type(share.clamp(max=1) * has, examples)),
                  flush=True)


def fill(model, examples) -> None:
    from vtr.reducers.base import REDUCERS, dest_from_choice
    from vtr.reducers.fastv import FastV
    from vtr.reducers.select import attention_scores, real_tokens

    class AttendedFill(FastV):
        name = "attended_fill"

        def __init__(self, share: float = 0.5):
            super().__init__(fuse="drop")
            self.share = share

        def step(self, state, num_kept, signals):
            wanted = num_kept - state.num_protected
            score = attention_scores(self, state, signals).float().masked_fill(~real_tokens(state), -1.0)
            top = max(1, round(self.share * wanted)) if self.share > 0 else 0
            first = score.topk(top, dim=1).indices
            generator = torch.Generator().manual_seed(signals.layer)
            rest = torch.rand(score.shape, generator=generator).masked_fill(~real_tokens(state), -1.0)
            rest = rest.scatter(1, first, -2.0)   # not twice
            kept = torch.cat([first, rest.topk(wanted - top, dim=1).indices], 1).sort(dim=1).values
            return state.reduce(dest_from_choice(state, kept), num_kept)

    reference = vlm_fidelity.answer_logits(model, examples).argmax(-1)
    probe = examples.subset(slice(0, 32))
    base = vlm_fidelity._prefill_flops(model, probe)
    REDUCERS[AttendedFill.name] = AttendedFill
    try:
        for share in (1.0, 0.75, 0.5, 0.25):
            for budget in (0.25, 0.11):
                options = {"budget": max(1, round(budget * task.GRID ** 2)), "layers": [1], "share": share}
                row = vlm_fidelity._measure(model, examples, probe, AttendedFill.name, options, None,
                                            vlm_fidelity.VlmResult("fill", "", budget), reference, base, 250)
                print(line(f"fastv's top {share:.0%} of the budget, then random", budget, row.accuracy or 0.0,
                           row.per_type) if row.status == "ok" else row.status, flush=True)
    finally:
        del REDUCERS[AttendedFill.name]


def spread(model, examples, methods: list) -> None:
    """In the LM (layer 1) at 25% and 11%: each dropping method as it is, and with FEATHER's uniform grid forced in
    (``vtr.reducers.feather``: ``grid[::s, ::s]``, at most half the budget) and the method choosing the rest: does
    adding a spread to its picks lift it, as it lifts fastv to feather?"""
    from vtr.reducers.base import REDUCERS, Reducer, dest_from_choice
    from vtr.reducers.feather import grid_stride, uniform_grid

    class WithGrid(Reducer):
        name = "with_grid"
        stages = ("in_lm",)

        def __init__(self, inner: str = "fastv"):
            super().__init__()
            method, options = parsed(inner)
            if REDUCERS[method].published_fuse:   # dropped as published (vtr's default fuse would merge them all in)
                options.setdefault("fuse", REDUCERS[method].published_fuse)
            self.inner = vtr.make_reducer(method, **options)
            self.needs = self.inner.needs

        def step(self, state, num_kept, signals):
            wanted = num_kept - state.num_protected
            rows, cols = signals.grid
            grid = uniform_grid(rows, cols, grid_stride(rows, cols, 3, wanted))
            forced = torch.zeros(state.x.shape[0], rows * cols, dtype=torch.bool)
            forced[:, grid] = True
            for count in range(wanted - len(grid), wanted + 1):   # the method's picks until the union fills
                picked = self.inner.step(state, state.num_protected + count, signals).assignment
                picked = picked[:, state.num_protected:]
                union = forced | (picked >= 0)
                if int(union.sum(1).min()) >= wanted:
                    break
            order = (union.float() * 2 + forced.float()).argsort(dim=1, descending=True, stable=True)[:, :wanted]
            return state.reduce(dest_from_choice(state, order.sort(dim=1).values), num_kept)

    reference = vlm_fidelity.answer_logits(model, examples).argmax(-1)
    probe = examples.subset(slice(0, 32))
    base = vlm_fidelity._prefill_flops(model, probe)
    REDUCERS[WithGrid.name] = WithGrid
    try:
        for spec in methods:
            method, options = parsed(spec)
            for budget in (0.25, 0.11):
                count = max(1, round(budget * task.GRID ** 2))
                for label, chosen, settings in ((spec, method, options),
                                                (f"{spec} + grid", WithGrid.name, {"inner": spec})):
                    row = vlm_fidelity._measure(model, examples, probe, chosen,
                                                {"budget": count, "layers": [1], **settings}, None,
                                                vlm_fidelity.VlmResult(label, "", budget), reference, base, 250)
                    print(line(label, budget, row.accuracy or 0.0, row.per_type) if row.status == "ok"
                          else f"{label}: {row.status}", flush=True)
    finally:
        del REDUCERS[WithGrid.name]


def convention(model, examples, methods: list) -> None:
    """In the LM at layer 1, 25% and 11%: ranking with the pruning layer's own q/k on the states entering it (vtr's
    convention for every in-LM method) against the layer before it on its own input (FastV's and FEATHER's official
    code: the attention layer K-1 computed, then pruning its output)."""
    from vtr.adapters.vlm import pruning
    from vtr.adapters.vlm.language import decoder

    layers = decoder(model).layers
    entering = {}

    def keep_input(module, args, kwargs):
        entering["hidden"] = args[0] if args else kwargs["hidden_states"]

    def layer_before(layer, hidden, cos, sin, real, window=None):   # layer 0 on its input: the same columns
        return own(layers[0], entering["hidden"], cos, sin, real, window)

    own = pruning.last_token_attention
    hook = layers[0].register_forward_pre_hook(keep_input, with_kwargs=True)
    reference = vlm_fidelity.answer_logits(model, examples).argmax(-1)
    probe = examples.subset(slice(0, 32))
    base = vlm_fidelity._prefill_flops(model, probe)
    try:
        for label, ranking in (("its own layer (vtr)", own), ("the layer before (official)", layer_before)):
            pruning.last_token_attention = ranking
            for method in methods:
                for budget in (0.25, 0.11):
                    options = {"budget": max(1, round(budget * task.GRID ** 2)), "layers": [1]}
                    row = vlm_fidelity._measure(model, examples, probe, method, options, None,
                                                vlm_fidelity.VlmResult(method, "", budget), reference, base, 250)
                    print(line(f"{method} ranked by {label}", budget, row.accuracy or 0.0, row.per_type), flush=True)
    finally:
        pruning.last_token_attention = own
        hook.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=["oracles", "in-lm", "sized", "recall", "fill", "spread", "convention"])
    parser.add_argument("--model", choices=["llava", "qwen"], default="llava")
    parser.add_argument("--methods", default=None, help="sized: merging methods (pitome,tome); recall: dropping ones")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe == "sized" and args.model != "llava":
        parser.error("sized: LLaVA only (its compacted prompt's columns are the report's kept_positions)")
    model = vlm_yardstick.trained_model(vlm_yardstick.recipe(args.model))
    examples = task.make_examples(1200, seed=10_000)
    if args.probe == "oracles":
        oracles(model, examples)
    elif args.probe == "in-lm":
        in_lm(model, examples)
    elif args.probe == "sized":
        sized(model, examples, (args.methods or "pitome,tome").split(","))
    elif args.probe == "recall":
        recall(model, examples, (args.methods or "random,fastv,feather,divprune,query,sparsevlm,sparsevlm:recycle=0,"
                                 "dart,dart:pivot_text=0,atf").split(","),
               (0.25, 0.11))
    elif args.probe == "convention":
        convention(model, examples, (args.methods or "fastv,feather").split(","))
    elif args.probe == "spread":
        spread(model, examples, (args.methods or "random,fastv,dart,sparsevlm:recycle=0,atf,divprune").split(","))
    else:
        fill(model, examples)


if __name__ == "__main__":
    main()
