"""Training recipes for the compression modules, on any LLaVA-format model and any iterable of batches.

A batch is the model's keyword arguments with ``labels`` (``input_ids``, ``attention_mask``, ``pixel_values``,
``labels``: -100 where no loss is taken), as a processor and a collator give them; the prompt keeps the
processor's placeholders (the compressed model compacts it, labels included).

Each level's share of tokens in the router's ``token_cost`` is ``1 / f**2`` (of a grid ``f`` divides).

- :func:`train_projector`: TokenPacker's stage: the new projector alone learns the language-model loss (tower and
  LM frozen); ``lora_rank > 0`` then adds LoRA adapters (peft) to the LM's attention and trains them with it.
- :func:`train_router`: RGLF (AVG-LLaVA): per batch the LM's answer loss at every level (no gradient), ranked,
  and the learned router trained to rank the levels alike (:func:`vtr.compression.granularity.ranking_loss`).
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import llava, module, qwen_vl
from .granularity import ranking_loss


def _cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _loop(model: nn.Module, parameters: list, batches: Iterable[dict], steps: int, lr: float,
          loss_of: Callable[[dict], Tensor], log: Optional[Callable[[str], None]], every: int = 50) -> list[float]:
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = _cosine(optimizer, steps, max(1, steps // 20))
    losses = []
    for step, batch in enumerate(itertools.islice(batches, steps)):
        loss = loss_of(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if log is not None and (step + 1) % every == 0:
            log(f"step {step + 1}/{steps}: loss {sum(losses[-every:]) / len(losses[-every:]):.4f}")
    return losses


def train_projector(model: nn.Module, batches: Iterable[dict], steps: int, lr: float = 1e-3, lora_rank: int = 0,
                    lora_steps: Optional[int] = None, log: Optional[Callable[[str], None]] = None) -> list[float]:
    """Train a TokenPacker-compressed model's projector for ``steps`` batches (everything else frozen); with
    ``lora_rank``, then ``lora_steps`` more (default ``steps``) with LoRA on the LM's q/v projections too.
    Returns the losses. The model is left in eval mode with its original ``requires_grad`` flags."""
    compression = module.compression_of(model)
    if not compression.packs:
        raise ValueError(f"train_projector trains a TokenPacker projector; this model is compressed with "
                         f"{compression.describe()}")
    if not isinstance(steps, int) or steps < 1 or not isinstance(lora_rank, int) or lora_rank < 0:
        raise ValueError(f"train_projector: steps must be an int >= 1 and lora_rank an int >= 0, got {steps!r}, "
                         f"{lora_rank!r}")
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector
    projector.requires_grad_(True)
    model.train()
    batches = iter(batches)
    try:
        losses = _loop(model, list(projector.parameters()), batches, steps, lr, lambda b: model(**b).loss, log)
        if lora_rank:
            from peft import LoraConfig, inject_adapter_in_model

            inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank,
                                               target_modules=["q_proj", "v_proj"]), model.model.language_model)
            trained = [p for n, p in model.named_parameters() if "lora_" in n] + list(projector.parameters())
            for p in trained:
                p.requires_grad_(True)
            losses += _loop(model, trained, batches, lora_steps or steps, lr / 2, lambda b: model(**b).loss, log)
    finally:
        for p in model.parameters():
            p.requires_grad_(flags.get(p, False))
        model.eval()
    return losses


def answer_losses(model: nn.Module, batch: dict) -> Tensor:
    """``[B, K]`` each row's mean label loss at each granularity level (every image of the row at that level)."""
    compression = module.compression_of(model)
    columns = []
    with torch.no_grad():
        for factor in compression.levels:
            with module.forced_level(model, factor):
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                kept = module.last_report(model).kept_positions.to(batch["labels"].device)
            labels = batch["labels"].gather(1, kept.clamp_min(0)).masked_fill(kept < 0, -100)
            loss = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], reduction="none")
            counted = (labels[:, 1:] != -100).sum(1).clamp_min(1)
            columns.append(loss.sum(1) / counted)
    return torch.stack(columns, 1)


def train_router(model: nn.Module, batches: Iterable[dict], steps: int, lr: float = 1e-3, token_cost: float = 0.0,
                 log: Optional[Callable[[str], None]] = None) -> list[float]:
    """RGLF: train a granularity model's learned router for ``steps`` batches (nothing else changes). Each level's
    answer loss gets ``token_cost * tokens / N`` added before ranking, so near-ties go to fewer tokens."""
    compression = module.compression_of(model)
    router = compression._modules.get("router")
    if router is None:
        raise ValueError("train_router trains the learned router of vtr.compress(model, 'granularity', "
                         f"router='learned'); this model has {compression.describe()}")
    if not isinstance(steps, int) or steps < 1 or token_cost < 0:
        raise ValueError(f"train_router: steps must be an int >= 1 and token_cost >= 0, got {steps!r}, {token_cost!r}")

    cost = torch.tensor([token_cost / f ** 2 for f in compression.levels])
    family = qwen_vl if compression.family == "qwen_vl" else llava

    def loss_of(batch: dict) -> Tensor:
        targets = answer_losses(model, batch) + cost.to(batch["input_ids"].device)
        with torch.no_grad():
            images, rows = family.router_inputs(model, batch)
        logits = torch.stack([router(tokens, question) for tokens, question, _ in images])
        return ranking_loss(logits, targets[rows])

    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    router.requires_grad_(True)
    router.train()
    try:
        return _loop(model, list(router.parameters()), batches, steps, lr, loss_of, log)
    finally:
        for p in model.parameters():
            p.requires_grad_(flags.get(p, False))
        router.eval()

