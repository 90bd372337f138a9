"""Fine-tuning with reduced tokens: learned reducers on the fidelity task, and the training-step speed-up of
training-time reduction. Results: benchmarks/RESULTS-finetune.md.

    python benchmarks/finetune.py accuracy            # training-free rows, then each learned method x recipe x target
    python benchmarks/finetune.py accuracy --methods dynamicvit --recipes reducer --targets 0.35 --epochs 1
    python benchmarks/finetune.py speed               # ViT-B/16 and a CLIP ViT-B/16 image tower, batch 16

Every run appends one JSON row per result to ``--out`` (default ``finetune-results.jsonl``), so runs can be
split and resumed; ``python benchmarks/finetune.py table`` prints the markdown tables from the rows.
Everything runs on the CPU, one thread by default, on random or locally trained weights (no downloads).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import vtr
from vtr.tools import fidelity
from vtr.tools.profile import count_macs

TRAINING_FREE = ("tome", "pitome", "evit")
LEARNED = ("dynamicvit", "sit")
RECIPES = ("reducer", "full")


def reducing_layers(method: str, target: float, depth: int, sit_layers: str = "after_first"):
    """Where methods reduce. Merging methods: their default, every block. Attention-scored ones (evit, and dynamicvit,
    which starts from the CLS attention): blocks 1.. at 35% (block 0's CLS attention has not looked at the image),
    every block at 25% (no schedule that spares block 0 reaches 25% on a 6-block, 65-token model). sit: the same by
    default; ``sit_layers="all"`` slims at every block (it reads no attention), which trained worse at 35%."""
    if method in ("tome", "pitome"):
        return None
    if method == "sit" and sit_layers == "all":
        return list(range(depth))
    return list(range(0 if target < 0.3 else 1, depth))


def accuracy(model: nn.Module, data: list) -> float:
    with torch.no_grad():
        return sum(int((model(x).argmax(1) == y).sum()) for x, y in data) / sum(len(y) for _, y in data)


def flops_fraction(model: nn.Module, base: float, x: torch.Tensor) -> float:
    return count_macs(model, x[:1]).total / base


def fine_tune(model: nn.Module, method: str, target: float, recipe: str, train: tuple, epochs: float, batch: int,
              log, options: dict, sit_layers: str = "after_first") -> tuple[nn.Module, float]:
    """The recipe: cross-entropy + KL to the unreduced model (+ DynamicViT's keep-ratio loss, weight 2), AdamW with a
    cosine schedule. ``reducer``: the backbone frozen, the teacher is the same model under ``vtr.disabled``;
    ``full``: every weight trains (backbone at a tenth of the reducer's learning rate), the teacher is a frozen copy
    of the original."""
    teacher = model
    student = vtr.patch(copy.deepcopy(model), method, flops=target,
                        layers=reducing_layers(method, target, len(model.blocks), sit_layers), **options)
    vtr.trainable(student, "reducer" if recipe == "reducer" else "all")
    reducer_params = list(student._vtr_reducer.parameters())
    own = {id(p) for p in reducer_params}
    groups = [{"params": reducer_params, "lr": 1e-3}]
    if recipe == "full":
        groups.append({"params": [p for p in student.parameters() if id(p) not in own], "lr": 1e-4})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    images, labels = train
    steps = int(math.ceil(epochs * len(images) / batch))
    base_lrs = [g["lr"] for g in groups]
    for block in student.blocks:   # eager attention: its CPU backward is much faster at this size
        block.attn.fused_attn = False
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    student.train()
    for step in range(steps):
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * min(1.0, (step + 1) / max(1, steps // 20)) * 0.5 * (1 + math.cos(math.pi * step / steps))
        index = torch.randint(0, len(images), (batch,), generator=generator)
        x, y = images[index], labels[index]
        flip = torch.rand(len(x), generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(2), x)
        with torch.no_grad():
            if recipe == "reducer":
                with vtr.disabled(student):
                    reference = student(x)
            else:
                reference = teacher(x)
        with vtr.decisions(student) as kept:
            logits = student(x)
        loss = F.cross_entropy(logits, y, label_smoothing=0.1) + vtr.losses.logit_distillation(logits, reference)
        if kept:
            loss = loss + 2.0 * vtr.losses.keep_ratio(kept)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"  {method}/{recipe} @ {target:.0%}: step {step + 1}/{steps}, loss {loss.item():.3f} "
                f"({time.perf_counter() - start:.0f}s)")
    seconds = time.perf_counter() - start
    for block in student.blocks:
        block.attn.fused_attn = True
    vtr.trainable(student, "all")
    return student.eval(), seconds


def run_accuracy(args) -> None:
    torch.set_num_threads(args.threads)
    task, training = fidelity.Task(), fidelity.Training()
    model = fidelity.trained_model(task, training, log=log)
    images, labels = fidelity.make_images(task, args.eval_images, seed=10_000)
    data = fidelity.batches(images, labels, 250)
    train = fidelity.make_images(task, training.train_images, seed=training.seed + 1)   # the model's training set
    base = count_macs(model, images[:1]).total
    if "free" in args.recipes:
        append(args.out, [{"kind": "accuracy", "depth": len(model.blocks), "method": "none", "recipe": "-", "target": 1.0, "flops": 1.0,
                           "top1": accuracy(model, data), "seconds": 0.0}])
        for target in args.targets:
            for method in TRAINING_FREE + LEARNED:   # learned methods untrained: where training starts
                layers = reducing_layers(method, target, len(model.blocks), args.sit_layers)
                variants = [layers] + ([None] if method == "evit" and layers is not None else [])
                for chosen in variants:
                    row = {"kind": "accuracy", "depth": len(model.blocks), "method": method, "recipe": "untrained" if method in LEARNED else "free",
                           "target": target, "layers": chosen if chosen is not None else "default", "seconds": 0.0}
                    try:
                        vtr.patch(model, method, flops=target, layers=chosen)
                    except ValueError as error:
                        row["status"] = str(error).split(";")[0]
                        append(args.out, [row])
                        log(f"{method} @ {target:.0%} ({row['layers']}): {row['status']}")
                        continue
                    row |= {"top1": accuracy(model, data), "flops": flops_fraction(model, base, images),
                            "tokens": vtr.expected_tokens(model)}
                    vtr.unpatch(model)
                    append(args.out, [row])
                    log(f"{method} @ {target:.0%} ({row['layers']}): top-1 {row['top1']:.4f}, FLOPs {row['flops']:.3f}")
    for target in args.targets:
        for method in args.methods:
            for recipe in [r for r in args.recipes if r in RECIPES]:
                options = args.options.get(method, {})
                student, seconds = fine_tune(model, method, target, recipe, train, args.epochs, args.batch, log,
                                             options, args.sit_layers)
                row = {"kind": "accuracy", "depth": len(model.blocks), "method": method, "recipe": recipe, "target": target, "options": options,
                       "layers": reducing_layers(method, target, len(model.blocks), args.sit_layers),
                       "epochs": args.epochs,
                       "top1": accuracy(student, data), "flops": flops_fraction(student, base, images),
                       "tokens": vtr.expected_tokens(student), "seconds": seconds}
                log(f"{method}/{recipe} @ {target:.0%}: top-1 {row['top1']:.4f}, FLOPs {row['flops']:.3f}, "
                    f"trained {seconds:.0f}s")
                append(args.out, [row])


# -- training-step speed-up ---------------------------------------------------------------------------

def speed_models():
    import open_clip
    import timm

    yield "timm vit_base_patch16_224", lambda: timm.create_model("vit_base_patch16_224", pretrained=False)
    yield "open_clip ViT-B-16 image tower", lambda: open_clip.create_model("ViT-B-16", pretrained=None).visual


def train_step(model: nn.Module, optimizer, x: torch.Tensor, target: torch.Tensor) -> float:
    start = time.perf_counter()
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    loss = F.mse_loss(out, target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def run_speed(args) -> None:
    """One training step (forward, backward, AdamW) unreduced and with training-time reduction, interleaved rep by
    rep in one process: evit keeps half the tokens at block 1 (attentive masking: the tokens the CLS attention favours,
    the rest dropped), only in training mode."""
    torch.set_num_threads(args.threads)
    rows = []
    for name, build in speed_models():
        torch.manual_seed(0)
        base = build().train()
        reduced = vtr.patch(copy.deepcopy(base), "evit", keep=0.5, layers=[1], fuse="drop", active="train").train()
        flops = vtr.expected_flops(reduced)
        x = torch.randn(args.batch, 3, 224, 224)
        with torch.no_grad():
            out = base.eval()(x[:1])
        target = torch.randn(args.batch, (out[0] if isinstance(out, tuple) else out).shape[-1])
        base.train()
        times = {"unreduced": [], "reduced": []}
        optimizers = {"unreduced": torch.optim.AdamW(base.parameters(), lr=1e-5),
                      "reduced": torch.optim.AdamW(reduced.parameters(), lr=1e-5)}
        models = {"unreduced": base, "reduced": reduced}
        for rep in range(args.warmup + args.reps):
            for key in ("unreduced", "reduced"):
                seconds = train_step(models[key], optimizers[key], x, target)
                if rep >= args.warmup:
                    times[key].append(seconds)
            log(f"{name}: rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items() if v))
        median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        rows.append({"kind": "speed", "model": name, "batch": args.batch, "threads": args.threads,
                     "tokens": vtr.report(reduced).tokens, "flops": flops[0] / flops[1],
                     "unreduced_s": median["unreduced"], "reduced_s": median["reduced"],
                     "speedup": median["unreduced"] / median["reduced"], "reps": args.reps})
        log(json.dumps(rows[-1]))
    append(args.out, rows)


# -- rows and tables ------------------------------------------------------------------------------------

def append(path: str, rows: list) -> None:
    with open(path, "a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def run_table(args) -> None:
    rows = [json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()]
    print("| depth | method | recipe | target | layers | measured FLOPs | top-1 | training time |")
    print("|---|---|---|---|---|---|---|---|")
    for row in (r for r in rows if r["kind"] == "accuracy"):
        depth = row.get("depth", 6)   # rows without one were measured on the 6-block model
        if "status" in row:
            print(f"| {depth} | {row['method']} | {row['recipe']} | {row['target']:.0%} | {row.get('layers', '-')} | "
                  f"{row['status']} | | |")
            continue
        seconds = f"{row['seconds']:.0f} s" if row["seconds"] else "-"
        method = row["method"] + "".join(f", {k}={v}" for k, v in row.get("options", {}).items())
        recipe = row["recipe"] + (f", {row['epochs']:g} epochs" if "epochs" in row else "")
        print(f"| {depth} | {method} | {recipe} | {row['target']:.0%} | {row.get('layers', '-')} | "
              f"{row['flops']:.1%} | {row['top1']:.2%} | {seconds} |")
    print()
    print("| model | batch | tokens per block (reduced) | FLOPs ratio | step unreduced | step reduced | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for row in (r for r in rows if r["kind"] == "speed"):
        print(f"| {row['model']} | {row['batch']} | {row['tokens']} | {row['flops']:.1%} | {row['unreduced_s']:.2f} s | "
              f"{row['reduced_s']:.2f} s | {row['speedup']:.2f}x |")


def log(message: str) -> None:
    print(message, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    acc = sub.add_parser("accuracy", help="learned reducers vs training-free methods on the fidelity task")
    acc.add_argument("--targets", type=lambda s: [float(v) for v in s.split(",")], default=[0.35, 0.25])
    acc.add_argument("--methods", type=lambda s: s.split(","), default=list(LEARNED))
    acc.add_argument("--recipes", type=lambda s: s.split(","), default=["free", *RECIPES],
                     help="free (the training-free and untrained rows), reducer, full")
    acc.add_argument("--epochs", type=float, default=2.0)
    acc.add_argument("--batch", type=int, default=64)
    acc.add_argument("--eval-images", type=int, default=2000)
    acc.add_argument("--sit-layers", choices=("all", "after_first"), default="after_first",
                     help="where sit slims: every block, or from block 1 on as dynamicvit")
    acc.add_argument("--options", type=json.loads, default={},
                     help='method options as JSON, e.g. \'{"dynamicvit": {"noise": 1.0}}\'')
    speed = sub.add_parser("speed", help="training-step speed-up of active='train' at 50%% tokens")
    speed.add_argument("--batch", type=int, default=16)
    speed.add_argument("--reps", type=int, default=3)
    speed.add_argument("--warmup", type=int, default=1)
    table = sub.add_parser("table", help="markdown tables from the rows in --out")
    for command in (acc, speed):
        command.add_argument("--threads", type=int, default=1)
    for command in (acc, speed, table):
        command.add_argument("--out", default="finetune-results.jsonl", help="JSON rows, one per line (appended)")
    args = parser.parse_args()
    {"accuracy": run_accuracy, "speed": run_speed, "table": run_table}[args.command](args)


if __name__ == "__main__":
    main()
