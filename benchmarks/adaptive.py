"""Adaptive computation (vtr.adaptive: DyT) against training-free token reduction on the fidelity ViTs.
Results: benchmarks/RESULTS-finetune.md ("Adaptive computation").

    python benchmarks/adaptive.py free --model second --targets 0.5,0.25      # training-free rows
    python benchmarks/adaptive.py dyt --model second --dispatch block --rate 0.3 --epochs 2
    python benchmarks/adaptive.py smarttrim --model second --flops 0.5 --recipe full --epochs 2
    python benchmarks/adaptive.py msvit --model second --coarse 2 --rate 0.3 --recipe full --epochs 2
    python benchmarks/adaptive.py speed                                         # eval speed-up, ViT-S/16 random

Rows are appended to ``--out`` (default ``benchmarks/finetune-results.jsonl``) with ``"kind": "adaptive"``.
CPU, one thread, no downloads (the fidelity ViTs are trained once and cached, see vtr.tools.fidelity).
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

import vtr
from vtr.tools import fidelity
from vtr.tools.profile import count_macs

MODELS = {"second": (fidelity.SECOND_TASK, fidelity.SECOND_TRAINING), "default": (fidelity.Task(), fidelity.Training())}
FREE = ("tome", "pitome", "evit", "atf")
OWN = {"dyt": "dispatchers+adapters", "smarttrim": "trimmers", "msvit": "gate"}   # what trains in "frozen"


def setup(name: str, eval_images: int):
    task, training = MODELS[name]
    model = fidelity.trained_model(task, training, log=log)
    images, labels = fidelity.make_images(task, eval_images, seed=10_000)
    return model, task, training, fidelity.batches(images, labels, 250), images


def accuracy(model, data) -> float:
    with torch.no_grad():
        return sum(int((model(x).argmax(1) == y).sum()) for x, y in data) / sum(len(y) for _, y in data)


def mean_macs(model, images, count: int) -> float:
    """MACs per image by the torch counter on real eval passes at batch 1 (dispatch is per image)."""
    return sum(count_macs(model, images[i:i + 1]).total for i in range(count)) / count


def run_free(args) -> None:
    model, _, _, data, images = setup(args.model, args.eval_images)
    base = count_macs(model, images[:1]).total
    rows = [{"kind": "adaptive", "model": args.model, "depth": len(model.blocks), "method": "none", "recipe": "-",
             "target": 1.0, "flops": 1.0, "top1": accuracy(model, data), "seconds": 0.0}]
    for target in args.targets:
        for method in FREE:
            row = {"kind": "adaptive", "model": args.model, "depth": len(model.blocks), "method": method,
                   "recipe": "free", "target": target, "seconds": 0.0}
            try:
                vtr.patch(model, method, flops=target)
            except ValueError as error:   # out of reach at the default layers: every block reduces
                row["status"] = str(error).split(";")[0]
                try:
                    vtr.patch(model, method, flops=target, layers=list(range(len(model.blocks))))
                except ValueError:
                    pass
                else:
                    row = {k: v for k, v in row.items() if k != "status"} | {"layers": "all"}
            if vtr.is_patched(model):
                row |= {"top1": accuracy(model, data), "flops": count_macs(model, images[:1]).total / base}
                vtr.unpatch(model)
            rows.append(row)
            log(json.dumps(row))
    append(args.out, rows)


def run_train(args) -> None:
    """Train an adaptive method on the fidelity model, then measure it. DyT's recipe (its released image code):
    backbone and head frozen; loss = CE(student) + CE(complete model) + KL(student || complete, detached) +
    ``--cost-weight`` (2) x rate loss. SmartTrim's: the same self-distillation from the untrimmed model (the same
    weights), plus ``--cost-weight`` x flops loss, its target annealed from 1 to ``--flops`` over the first half (its curriculum);
    ``--recipe full`` trains the backbone too (at a tenth of the learning rate). AdamW, cosine, batch 64, flips."""
    torch.set_num_threads(args.threads)
    model, task, training, data, images = setup(args.model, args.eval_images)
    base = count_macs(model, images[:1]).total
    train_x, train_y = fidelity.make_images(task, training.train_images, seed=training.seed + 1)
    if args.command == "dyt":
        options = {"dispatch": args.dispatch, "rate": args.rate, "noise": args.noise}
    elif args.command == "msvit":
        options = {"coarse": args.coarse, "rate": args.rate, "noise": args.noise, "proportional": args.proportional,
                   "batch_rate": args.batch_rate, "tau": args.tau}
    else:
        options = {"flops": args.flops, "noise": args.noise, "start": args.start}
    vtr.adaptive.patch(model, args.command, **options)
    vtr.adaptive.trainable(model)
    own = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": own, "lr": args.lr}]
    if args.recipe == "full":
        ids = {id(p) for p in own}
        backbone = [p for p in model.parameters() if id(p) not in ids]
        for p in backbone:
            p.requires_grad_(True)
        groups.append({"params": backbone, "lr": args.lr / 10})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    base_lrs = [g["lr"] for g in groups]
    steps = int(math.ceil(args.epochs * len(train_x) / args.batch))
    for block in model.blocks:   # eager attention: its CPU backward is much faster at this size
        block.attn.fused_attn = False
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * min(1.0, (step + 1) / max(1, steps // 20)) * 0.5 * (1 + math.cos(math.pi * step / steps))
        if args.command == "smarttrim":   # curriculum: the cost target falls from 1 to --flops over the first half
            model._vtr_adaptive.flops = 1 - (1 - args.flops) * min(1.0, 2 * step / steps)
        index = torch.randint(0, len(train_x), (args.batch,), generator=generator)
        x, y = train_x[index], train_y[index]
        flip = torch.rand(len(x), generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(2), x)
        with vtr.adaptive.decisions(model) as kept:
            logits = model(x)
        with vtr.adaptive.complete(model):
            teacher = model(x)
        kl = F.kl_div(logits.log_softmax(-1), teacher.detach().log_softmax(-1), reduction="batchmean", log_target=True)
        cost = args.cost_weight * {"dyt": vtr.adaptive.rate_loss, "smarttrim": vtr.adaptive.flops_loss,
                                   "msvit": vtr.adaptive.batch_shaping_loss}[args.command](kept)
        loss = F.cross_entropy(logits, y) + F.cross_entropy(teacher, y) + kl + cost
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 25 == 0 or step + 1 == steps:
            spent = (vtr.adaptive.activation_rate(kept) if args.command == "dyt"
                     else vtr.adaptive.fine_share(kept) if args.command == "msvit"
                     else float(torch.stack([d.spent.detach() for d in kept]).mean()))
            log(f"  step {step + 1}/{steps}: loss {loss.item():.3f}, rate/cost {spent:.3f} "
                f"({time.perf_counter() - start:.0f}s)")
    seconds = time.perf_counter() - start
    for block in model.blocks:
        block.attn.fused_attn = True
    model.eval()
    cuts = [None] + (calibrated_cuts(model, train_x[:1000], args.fine_shares) if args.command == "msvit" else [])
    for cut in cuts:
        if cut is not None:   # MSViT's threshold moved so that a share of the training images' regions is fine
            model._vtr_adaptive.cut = cut[1]
        with vtr.adaptive.decisions(model) as kept:
            top1 = accuracy(model, data)
        row = {"kind": "adaptive", "model": args.model, "depth": len(model.blocks), "method": args.command,
               "recipe": f"{OWN[args.command]}"
                         f"{' + backbone' if args.recipe == 'full' else ''}, {args.epochs:g} epochs",
               "options": options | {"lr": args.lr} | {"cost_weight": args.cost_weight},
               "top1": top1,
               "flops": mean_macs(model, images, args.flops_images) / base, "seconds": seconds, "steps": steps}
        if args.command == "dyt":
            row["activation"] = vtr.adaptive.activation_rate(kept)
        if args.command == "msvit":
            row["fine_share"] = vtr.adaptive.fine_share(kept)
            row["tokens"] = float(torch.cat([g.tokens for g in kept]).float().mean())
            row["threshold"] = (model._vtr_adaptive.threshold if cut is None
                                else f"logit {cut[1]:.3g}, calibrated to {cut[0]:g} fine")
        log(json.dumps(row))
        append(args.out, [row])


def calibrated_cuts(model, images, shares) -> list:
    """``(share, logit cut)``: the gate logit above which ``share`` of these images' regions lie (MSViT)."""
    gate = model._vtr_adaptive
    with torch.no_grad():
        logits = torch.cat([gate.gate(gate.regions(model.patch_embed(images[i:i + 250]))).flatten()
                            for i in range(0, len(images), 250)]).double()
    return [(share, float(torch.quantile(logits, 1 - share))) for share in shares]


def run_speed(args) -> None:
    """Eval forward of a random-weight ViT-S/16 (224 px, 197 tokens), batch 1 and 8: unpatched vs DyT with its
    dispatchers set so that a given fraction of the patch tokens is activated (a bias on a random score)."""
    import timm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    rows = []
    for dispatch, share in (("mlp", 0.5), ("block", 0.5), ("block", 0.25)):
        model = vtr.adaptive.patch(timm.create_model("vit_small_patch16_224", pretrained=False).eval(), "dyt",
                                   dispatch=dispatch)
        model.load_state_dict(base.state_dict(), strict=False)
        for linear in model._vtr_adaptive.dispatchers.values():   # logits ~ N(0, 1) + bias: `share` activated
            with torch.no_grad():
                linear.weight.normal_(0, 1 / math.sqrt(linear.in_features) / 0.5)
                linear.bias.fill_(0.0)
        for batch in (1, 8):
            x = torch.randn(batch, 3, 224, 224)
            with torch.no_grad():
                blocks_in = []
                hook = model.blocks[0].register_forward_pre_hook(lambda m, a: blocks_in.append(a[0]))
                model(x)
                hook.remove()
            calibrate(model, x, share)
            times = {"unpatched": [], "dyt": []}
            with torch.no_grad(), vtr.adaptive.decisions(model) as kept:
                for rep in range(args.warmup + args.reps):
                    for key, m in (("unpatched", base), ("dyt", model)):
                        start = time.perf_counter()
                        m(x)
                        if rep >= args.warmup:
                            times[key].append(time.perf_counter() - start)
            median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
            flops = count_macs(model, x[:1]).total / count_macs(base, x[:1]).total
            row = {"kind": "adaptive_speed", "model": "vit_small_patch16_224 (random)", "dispatch": dispatch,
                   "batch": batch, "activation": vtr.adaptive.activation_rate(kept), "flops_batch1": flops,
                   "unpatched_s": median["unpatched"], "dyt_s": median["dyt"],
                   "speedup": median["unpatched"] / median["dyt"], "reps": args.reps, "threads": args.threads}
            log(json.dumps(row))
            rows.append(row)
    append(args.out, rows)


def calibrate(model, x, share: float) -> None:
    """Set each dispatcher's bias so that ``share`` of this batch's patch tokens is activated at its block."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for b in model.blocks]
    for layer, linear in model._vtr_adaptive.dispatchers.items():
        seen.clear()
        with torch.no_grad():
            model(x)
            block = model.blocks[int(layer)]
            tokens = seen[int(layer)]
            if model._vtr_adaptive.dispatch == "mlp":
                tokens = tokens + block.ls1(block.attn(block.norm1(tokens)))
            logit = linear(tokens[:, 1:]).flatten()
            linear.bias -= torch.quantile(logit, 1 - share)
    for hook in hooks:
        hook.remove()


def append(path: str, rows: list) -> None:
    with open(path, "a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def log(message: str) -> None:
    print(message, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    free = sub.add_parser("free", help="training-free reducers at the targets")
    free.add_argument("--targets", type=lambda s: [float(v) for v in s.split(",")], default=[0.5, 0.25])
    dyt = sub.add_parser("dyt", help="train DyT's dispatchers and adapters, then measure")
    dyt.add_argument("--dispatch", choices=("mlp", "block"), default="block")
    dyt.add_argument("--rate", type=float, default=0.5)
    trim = sub.add_parser("smarttrim", help="train SmartTrim's trimmers (or the whole model), then measure")
    trim.add_argument("--flops", type=float, default=0.5)
    trim.add_argument("--cost-weight", type=float, default=5.0)
    trim.add_argument("--start", type=float, default=3.0)
    dyt.add_argument("--cost-weight", type=float, default=2.0, help="the rate loss's weight (2, as DyT's code)")
    dyt.add_argument("--recipe", choices=("frozen", "full"), default="frozen")
    trim.add_argument("--recipe", choices=("frozen", "full"), default="full")
    ms = sub.add_parser("msvit", help="train MSViT's gate (or gate and backbone), then measure")
    ms.add_argument("--coarse", type=int, default=2)
    ms.add_argument("--rate", type=float, default=0.5)
    ms.add_argument("--proportional", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    ms.add_argument("--cost-weight", type=float, default=1.0, help="the batch-shaping loss's weight")
    ms.add_argument("--batch-rate", action="store_true", help="train with the batch's top --rate share fine")
    ms.add_argument("--tau", type=float, default=1.0, help="the straight-through sigmoid's temperature")
    ms.add_argument("--recipe", choices=("frozen", "full"), default="full")
    ms.add_argument("--fine-shares", type=lambda s: [float(v) for v in s.split(",")], default=[],
                    help="also measure with the threshold moved so that these shares of regions are fine")
    for command in (dyt, trim, ms):
        command.add_argument("--epochs", type=float, default=2.0)
        command.add_argument("--batch", type=int, default=64)
        command.add_argument("--lr", type=float, default=1e-3)
        command.add_argument("--noise", type=float, default=1.0)
        command.add_argument("--flops-images", type=int, default=100)
    speed = sub.add_parser("speed", help="eval speed-up of gathered dispatch, ViT-S/16 random weights")
    speed.add_argument("--reps", type=int, default=5)
    speed.add_argument("--warmup", type=int, default=1)
    for command in (free, dyt, trim, ms):
        command.add_argument("--model", choices=tuple(MODELS), default="second")
        command.add_argument("--eval-images", type=int, default=2000)
    for command in (free, dyt, trim, ms, speed):
        command.add_argument("--threads", type=int, default=1)
        command.add_argument("--out", default="benchmarks/finetune-results.jsonl")
    args = parser.parse_args()
    {"free": run_free, "dyt": run_train, "smarttrim": run_train, "msvit": run_train, "speed": run_speed}[args.command](args)


if __name__ == "__main__":
    main()
