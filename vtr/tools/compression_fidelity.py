"""The compression modules (``vtr.compress``) on the trained yardstick LLaVA (issue 21's task): TokenPacker trained
at scale 2 and 3, adaptive granularity with the training-free and the RGLF-trained router, against the unreduced
model, pooling and pruning at the same token counts; each router's row is followed by what fixed levels give at its
shares of images (the same mean tokens).

    python -m vtr.tools.compression_fidelity --minutes 10

Training data are the task's own questions from a seed apart from the yardstick's training (2) and the evaluation
set (``make_examples(1200, seed=10_000)``), both of the question types the yardstick's recipe taught
(``vlm_yardstick.recipe("llava").types``; the quick recipe: counting only).
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from .. import api, compression
from . import vqa_task as task
from . import vlm_yardstick as yardstick

TRAIN_SEED, EVAL_SEED = 20_000, 10_000


def answer_batches(model: nn.Module, examples: "task.Examples", batch_size: int = 32, seed: int = 0) -> Iterator[dict]:
    """Endless shuffled batches of the model's inputs with ``labels``: each prompt followed by its one-word answer,
    the loss on the answer only."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            part = examples.subset(order[start:start + batch_size].tolist())
            inputs = yardstick.model_inputs(model, part)
            ids = torch.cat([inputs["input_ids"], part.answers[:, None]], 1)
            labels = torch.full_like(ids, -100)
            labels[:, -1] = part.answers
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(part.answers)[:, None]], 1)
            yield inputs | {"input_ids": ids, "attention_mask": mask, "labels": labels}


def measure(model: nn.Module, examples: "task.Examples", batch_size: int = 250) -> dict:
    """Accuracy, per-type accuracy, mean visual tokens per image and (compressed models) each level's share."""
    answers, tokens, levels = [], [], []
    for start in range(0, len(examples), batch_size):
        part = examples.subset(slice(start, start + batch_size))
        answers.append(yardstick.answer_logits(model, part, batch_size).argmax(-1))
        if compression.is_compressed(model):
            report = api.report(model)
            tokens.append(report.tokens_after.float())
            levels.append(report.levels)
        elif api.is_patched(model):
            tokens.append(api.report(model).image_tokens_after.float())
        else:
            tokens.append(torch.full((len(part),), float(task.GRID ** 2)))
    correct = torch.cat(answers) == examples.answers
    types = torch.tensor([task.TYPES.index(t) for t in examples.types])
    asked = [(i, kind) for i, kind in enumerate(task.TYPES) if bool((types == i).any())]
    result = {"accuracy": float(correct.float().mean()), "tokens": float(torch.cat(tokens).mean()),
              "per_type": {kind: round(float(correct[types == i].float().mean()), 3) for i, kind in asked}}
    if levels:
        chosen = torch.cat(levels)
        result["levels"] = {int(f): round(float((chosen == f).float().mean()), 3) for f in chosen.unique()}
        result["levels_by_type"] = {kind: {int(f): int(((chosen == f) & (types == i)).sum()) for f in chosen.unique()}
                                    for i, kind in asked}
    return result


def at_fixed_shares(result: dict, fixed: dict) -> dict:
    """What fixed levels give at a router's shares of images (its ``levels_by_type`` counts): each level's accuracy and
    tokens (``fixed``: level -> its :func:`measure`) weighted by the share of images the router sent there. The
    same mean tokens as the router, with the choice blind to the image and question: the router's accuracy above
    this is what its choosing is worth."""
    counts: dict = {}
    for per_level in result["levels_by_type"].values():      # exact counts (result["levels"] is rounded)
        for f, n in per_level.items():
            counts[f] = counts.get(f, 0) + n
    shares = {f: n / sum(counts.values()) for f, n in counts.items()}
    missing = sorted(set(shares) - set(fixed))
    if missing:
        raise ValueError(f"at_fixed_shares: no fixed-level row for level(s) {missing}")
    return {"accuracy": sum(share * fixed[f]["accuracy"] for f, share in shares.items()),
            "tokens": sum(share * fixed[f]["tokens"] for f, share in shares.items())}


def timed_steps(minutes: float, step_seconds: float) -> int:
    """Steps that fit in ``minutes`` at ``step_seconds`` each, with a fifth spare (the machine is shared)."""
    return max(1, int(0.8 * minutes * 60 / step_seconds))


def until(batches: Iterator[dict], minutes: float) -> Iterator[dict]:
    """``batches`` until ``minutes`` have passed: a hard stop where the machine got slower than the probe said."""
    stop = time.perf_counter() + minutes * 60
    for item in batches:
        if time.perf_counter() > stop:
            return
        yield item


def _probe_step(model: nn.Module, batches: Iterator[dict], train: Callable, steps: int = 20) -> float:
    """Seconds per training step (a copy of the model, a few steps)."""
    import copy
    trial = copy.deepcopy(model)
    start = time.perf_counter()
    train(trial, batches, steps)
    return (time.perf_counter() - start) / steps


def main(argv: Optional[list] = None, log=print) -> list[tuple[str, dict]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training time per TokenPacker scale")
    parser.add_argument("--router-minutes", type=float, default=5.0)
    parser.add_argument("--train", type=int, default=20_000, help="training questions")
    parser.add_argument("--parts", default="baselines,tokenpacker,granularity",
                        help="which rows: comma-separated baselines, tokenpacker, granularity")
    parser.add_argument("--methods", default="divprune,visionzip,vispruner,fastervlm",
                        help="pruning baselines ('' for none)")
    parser.add_argument("--quick", action="store_true", help="the quick yardstick (narrower, trained on less)")
    parser.add_argument("--checkpoint", help="a yardstick state_dict to load instead of the recipe's cached one")
    parser.add_argument("--train-yardstick", action="store_true", help="train the yardstick if it is not cached")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    recipe = yardstick.recipe("llava", quick=args.quick)
    if args.checkpoint:      # a yardstick trained by an earlier recipe of the same shapes
        model = yardstick.build_model(recipe)
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
        model.eval()
    elif not yardstick.checkpoint_path(recipe).is_file() and not args.train_yardstick:
        raise SystemExit(f"no trained yardstick at {yardstick.checkpoint_path(recipe)}: train it first (vtr fidelity "
                         "--model llava-task, 20+ minutes) or pass --train-yardstick")
    else:
        model = yardstick.trained_model(recipe)
    evaluation = task.make_examples(1200, seed=EVAL_SEED, types=recipe.types)     # the types the yardstick learnt
    training = task.make_examples(args.train, seed=TRAIN_SEED, types=recipe.types)
    rows = []

    def add(label: str, result: dict) -> None:
        rows.append((label, result))
        log(f"{label:38s} acc {result['accuracy']:.3f}  tokens {result['tokens']:5.1f}  {result['per_type']}"
            + (f"  levels {result['levels']}" if "levels" in result else ""))
        if len(result.get("levels", ())) > 1:
            log(f"{'':38s} images per level, by question type: {result['levels_by_type']}")

    parts = set(args.parts.split(","))
    add("unreduced", measure(model, evaluation))
    for budget in (16, 9, 4) if "baselines" in parts else ():
        for name in ["pool", *filter(None, args.methods.split(","))]:
            api.patch(model, name, budget=budget)
            try:
                add(f"{name} (budget {budget})", measure(model, evaluation))
            finally:
                api.unpatch(model)
    for scale in (2, 3) if "tokenpacker" in parts else ():
        compression.compress(model, "tokenpacker", scale=scale)
        batches = answer_batches(model, training, seed=scale)
        step = _probe_step(model, batches, lambda m, b, n: compression.train_projector(m, b, n))
        steps = timed_steps(args.minutes, step)
        log(f"tokenpacker scale {scale}: {steps} steps of {step * 1000:.0f} ms")
        done = len(compression.train_projector(model, until(batches, args.minutes), steps, log=log, lr=1e-3))
        add(f"tokenpacker scale {scale} ({done} steps)", measure(model, evaluation))
        api.unpatch(model)
    if "granularity" not in parts:
        return rows
    compression.compress(model, "granularity", levels=[1, 2, 4])
    fixed = {}
    for factor in (1, 2, 4):
        with compression.forced_level(model, factor):
            fixed[factor] = measure(model, evaluation)
        add(f"granularity, fixed level {factor}", fixed[factor])
    api.unpatch(model)

    def add_routed(label: str, result: dict) -> None:
        add(label, result)
        mix = at_fixed_shares(result, fixed)
        log(f"{'':38s} fixed levels at its shares: acc {mix['accuracy']:.3f}  tokens {mix['tokens']:5.1f}")

    for temperature in (1.0, 0.5):
        compression.compress(model, "granularity", levels=[1, 2, 4], temperature=temperature)
        add_routed(f"granularity, relevance router (temperature {temperature})", measure(model, evaluation))
        api.unpatch(model)
    for token_cost in (0.0, 0.05):
        compression.compress(model, "granularity", levels=[1, 2, 4], router="learned")
        batches = answer_batches(model, training, seed=7)
        step = _probe_step(model, batches, lambda m, b, n: compression.train_router(m, b, n, token_cost=token_cost), 5)
        steps = timed_steps(args.router_minutes / 2, step)
        done = len(compression.train_router(model, until(batches, args.router_minutes / 2), steps,
                                            token_cost=token_cost, log=log))
        add_routed(f"granularity, learned router (cost {token_cost}, {done} steps)", measure(model, evaluation))
        api.unpatch(model)
    return rows


if __name__ == "__main__":
    main()
