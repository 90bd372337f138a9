"""CLCA (vtr.adaptive "clca") against training-free token reduction on the fidelity ViTs, at 50% and 25% FLOPs and at
a 10% keep rate. Results: benchmarks/RESULTS-finetune.md ("CLCA").

    python benchmarks/clca.py --model second --reducers tome,evit --free tome,pitome,evit,atf
    python benchmarks/clca.py --model default --targets keep:0.1 --reducers tome

For each target: every ``--free`` reducer as it is (training-free), then each ``--reducers`` reducer with CLCA's
head trained with the backbone frozen, and the same head trained without the cache (it reads the classifier's input
only: what re-fitting a head on the reduced features gives by itself). With the backbone frozen (and no dropout)
the head's inputs do not change during training, so they are computed once per training image (and its flip) by
the patched model and the head trains on them; the accuracy is then measured by the patched model's own forward.
``--recipe full`` instead trains the backbone too (at a tenth of the learning rate) through the model's forward.
Loss: cross-entropy (label smoothing 0.1) + KL to the unreduced model's logits; AdamW, cosine, batch 256.
A ``keep:K`` target reduces at every block with the same keep ratio, so that K of the patch tokens are left after the
last block. Rows are appended to ``--out`` (``"kind": "adaptive"``, ``"method": "clca"``). CPU, one thread.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch
import torch.nn.functional as F

import vtr
from vtr.adaptive.clca import CrossLayerHead
from vtr.tools import fidelity
from vtr.tools.profile import count_macs

MODELS = {"second": (fidelity.SECOND_TASK, fidelity.SECOND_TRAINING), "default": (fidelity.Task(), fidelity.Training())}


def amounts(reducer: str, target: str, depth: int) -> dict:
    """``vtr.patch`` amounts for a target: ``flops:F`` (merging methods at every block, attention-scored ones from
    block 1 at 30% and above, as benchmarks/finetune.py), ``keep:K`` (every block, K of the patch tokens left) or
    ``paper:K`` (the paper's keep rate: K of the tokens kept at each of three blocks, a quarter, half and three
    quarters of the way: 3, 6, 9 of 12 as its EViT runs)."""
    kind, value = target.split(":")
    value = float(value)
    if kind == "paper":
        return {"keep": value, "layers": sorted({round(depth * i / 4) for i in (1, 2, 3)})}
    if kind == "keep":
        return {"keep": value ** (1 / depth), "layers": list(range(depth))}
    if reducer in ("tome", "pitome"):
        return {"flops": value}
    return {"flops": value, "layers": list(range(0 if value < 0.3 else 1, depth))}


def accuracy(model, data) -> float:
    with torch.no_grad():
        return sum(int((model(x).argmax(1) == y).sum()) for x, y in data) / sum(len(y) for _, y in data)


def head_inputs(model, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLA head's (inputs, present) for every image, from the patched model's own forward."""
    seen = []
    hook = model._vtr_adaptive.register_forward_pre_hook(lambda m, args: seen.append(args))
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch):
                model(images[i:i + batch])
    finally:
        hook.remove()
    return torch.cat([s[0] for s in seen]), torch.cat([s[1] for s in seen])


def teacher_logits(model, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)])


def train_head(head: CrossLayerHead, classifier, inputs, present, labels, teacher, epochs: float, lr: float,
               batch: int = 256, log=print) -> float:
    """Train ``head`` on cached inputs: logits = classifier(inputs[:, 0]) + head(inputs, present)."""
    head.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    steps = int(math.ceil(epochs * len(labels) / batch))
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    with torch.no_grad():
        base = classifier(inputs[:, 0])
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(1, steps // 20)) * 0.5 * (1 + math.cos(math.pi * step / steps))
        index = torch.randint(0, len(labels), (batch,), generator=generator)
        logits = base[index] + head(inputs[index], present[index])
        kl = F.kl_div(logits.log_softmax(-1), teacher[index].log_softmax(-1), reduction="batchmean", log_target=True)
        loss = F.cross_entropy(logits, labels[index], label_smoothing=0.1) + kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"    step {step + 1}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)")
    head.eval()
    return time.perf_counter() - start


def train_full(model, train_x, train_y, epochs: float, lr: float, batch: int = 64, log=print) -> float:
    """Every weight trains (head at ``lr``, backbone at ``lr / 10``) through the patched model's forward; the
    teacher is a frozen copy of the original model."""
    own = list(model._vtr_adaptive.parameters())
    ids = {id(p) for p in own}
    backbone = [p for p in model.parameters() if id(p) not in ids]
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([{"params": own, "lr": lr}, {"params": backbone, "lr": lr / 10}], weight_decay=1e-4)
    base_lrs = [lr, lr / 10]
    steps = int(math.ceil(epochs * len(train_x) / batch))
    generator = torch.Generator().manual_seed(0)
    teacher = copy.deepcopy(model)   # the frozen original
    vtr.unpatch(teacher)
    teacher.eval()
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        for group, base in zip(optimizer.param_groups, base_lrs):
            warm = min(1.0, (step + 1) / max(1, steps // 20))
            group["lr"] = base * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        index = torch.randint(0, len(train_x), (batch,), generator=generator)
        x, y = train_x[index], train_y[index]
        flip = torch.rand(len(x), generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(2), x)
        with torch.no_grad():
            target = teacher(x)
        logits = model(x)
        kl = F.kl_div(logits.log_softmax(-1), target.log_softmax(-1), reduction="batchmean", log_target=True)
        loss = F.cross_entropy(logits, y, label_smoothing=0.1) + kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"    step {step + 1}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)")
    model.eval()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=tuple(MODELS), default="second")
    parser.add_argument("--targets", default="flops:0.5,flops:0.25,keep:0.1")
    parser.add_argument("--free", default="tome,pitome,evit", help="training-free rows")
    parser.add_argument("--reducers", default="tome,evit", help="reducers CLCA sits on")
    parser.add_argument("--recipe", choices=("frozen", "full"), default="frozen")
    parser.add_argument("--epochs", type=float, default=20.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--hidden", type=int, default=2)
    parser.add_argument("--eval-images", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/finetune-results.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task, training = MODELS[args.model]
    model = fidelity.trained_model(task, training, log=print).eval()
    depth = len(model.blocks)
    images, labels = fidelity.make_images(task, args.eval_images, seed=10_000)
    data = fidelity.batches(images, labels, 500)
    train_x, train_y = fidelity.make_images(task, training.train_images, seed=training.seed + 1)
    train_x, train_y = torch.cat([train_x, train_x.flip(2)]), torch.cat([train_y, train_y])   # and the flips
    base = count_macs(model, images[:1]).total
    teacher = teacher_logits(model, train_x)
    load = open("/proc/loadavg").read().split()[0]
    common = {"kind": "adaptive", "model": args.model, "depth": depth, "load": load}
    rows = [common | {"method": "none", "recipe": "-", "target": "-", "flops": 1.0, "top1": accuracy(model, data)}]
    print(json.dumps(rows[-1]))

    def done(row):
        rows.append(common | row)
        print(json.dumps(rows[-1]), flush=True)
        with open(args.out, "a") as handle:
            handle.write(json.dumps(rows[-1]) + "\n")

    for target in args.targets.split(","):
        for reducer in [r for r in args.free.split(",") if r]:
            try:
                vtr.patch(model, reducer, **amounts(reducer, target, depth))
            except ValueError as error:
                done({"method": reducer, "recipe": "free", "target": target, "status": str(error).split(";")[0]})
                continue
            done({"method": reducer, "recipe": "free", "target": target, "tokens": None,
                  "flops": count_macs(model, images[:1]).total / base, "top1": accuracy(model, data),
                  "final_tokens": vtr.report(model).tokens[-1]})
            vtr.unpatch(model)
        for reducer in [r for r in args.reducers.split(",") if r]:
            state = {k: v.clone() for k, v in model.state_dict().items()}
            try:
                vtr.adaptive.patch(model, "clca", reducer=reducer, hidden=args.hidden,
                                   **amounts(reducer, target, depth))
            except ValueError as error:
                done({"method": f"clca+{reducer}", "recipe": args.recipe, "target": target,
                      "status": str(error).split(";")[0]})
                continue
            head = model._vtr_adaptive
            # The classifier without CLCA's hook (calling model.head would add the head's logits once more).
            classifier = lambda f: F.linear(f, model.head.weight, model.head.bias)   # noqa: E731
            initial = {k: v.clone() for k, v in head.state_dict().items()}
            untrained = accuracy(model, data)
            flops = count_macs(model, images[:1]).total / base
            if args.recipe == "full":
                seconds = train_full(model, train_x[:len(train_x) // 2], train_y[:len(train_y) // 2], args.epochs,
                                     args.lr)
                done({"method": f"clca+{reducer}", "recipe": "full", "target": target, "flops": flops,
                      "untrained": untrained, "top1": accuracy(model, data), "seconds": seconds,
                      "epochs": args.epochs, "lr": args.lr})
                vtr.unpatch(model)
                model.load_state_dict(state)
                continue
            start = time.perf_counter()
            inputs, present = head_inputs(model, train_x)
            eval_inputs, eval_present = head_inputs(model, images)
            cached = time.perf_counter() - start
            seconds = train_head(head, classifier, inputs, present, train_y, teacher, args.epochs, args.lr)
            top1 = accuracy(model, data)
            with torch.no_grad():   # the same from the cached inputs: the forward reads what training read
                again = (classifier(eval_inputs[:, 0]) + head(eval_inputs, eval_present)).argmax(1)
            assert abs(float((again == labels).float().mean()) - top1) < 2e-3, "cached inputs differ from the forward"
            done({"method": f"clca+{reducer}", "recipe": "head, backbone frozen", "target": target, "flops": flops,
                  "untrained": untrained, "top1": top1, "seconds": seconds + cached, "epochs": args.epochs,
                  "lr": args.lr, "final_tokens": vtr.report(model).tokens[-1]})
            head.load_state_dict(initial)   # ablation: the same head, the classifier's input only
            only = torch.zeros_like(present)
            only[:, 0] = 1
            seconds = train_head(head, classifier, inputs, only, train_y, teacher, args.epochs, args.lr)
            eval_only = torch.zeros_like(eval_present)
            eval_only[:, 0] = 1
            with torch.no_grad():
                top1 = float(((classifier(eval_inputs[:, 0]) + head(eval_inputs, eval_only)).argmax(1) == labels)
                             .float().mean())
            done({"method": f"clca+{reducer} without the cache", "recipe": "head, backbone frozen", "target": target,
                  "flops": flops, "top1": top1, "seconds": seconds + cached, "epochs": args.epochs, "lr": args.lr})
            vtr.unpatch(model)


if __name__ == "__main__":
    main()
