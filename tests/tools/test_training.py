"""Fine-tuning with reduced tokens: a training loop learns, and DistributedDataParallel (2 CPU ranks,
gloo) gives every rank the gradient of the whole batch, as it does for an unpatched model."""
from __future__ import annotations

import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import pytest
from torch.nn.parallel import DistributedDataParallel

import vtr

WORLD = 2


def small_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", depth=3, img_size=64, num_classes=3, drop_rate=0.0)
    return model.train()


def batch(size: int = 8):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(size, 3, 64, 64, generator=generator), torch.arange(size) % 3


def _ddp_rank(rank: int, rendezvous: str, method: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        model = DistributedDataParallel(vtr.patch(small_vit(), method, flops=0.6))
        images, labels = batch()
        part = slice(rank * len(images) // WORLD, (rank + 1) * len(images) // WORLD)
        torch.nn.functional.cross_entropy(model(images[part]), labels[part]).backward()
        grads = {name: p.grad.clone() for name, p in model.module.named_parameters()}
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        weights = {name: p.detach().clone() for name, p in model.module.named_parameters()}
        torch.save({"grads": grads, "weights": weights, "tokens": vtr.report(model.module).tokens}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["tome", "evit"])
def test_ddp_gives_every_rank_the_full_batch_gradient(tmp_path, method):
    mp.spawn(_ddp_rank, args=(str(tmp_path / "rendezvous"), method, str(tmp_path / "rank")), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank.{r}") for r in range(WORLD)]

    model = vtr.patch(small_vit(), method, flops=0.6)
    images, labels = batch()
    torch.nn.functional.cross_entropy(model(images), labels).backward()   # mean over the whole batch
    assert ranks[0]["tokens"] == vtr.report(model).tokens and ranks[0]["tokens"][-1] < ranks[0]["tokens"][0]
    for name, param in model.named_parameters():
        for rank in ranks:
            torch.testing.assert_close(rank["grads"][name], param.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ranks[0]["weights"][name], ranks[1]["weights"][name], rtol=0, atol=0)


def test_a_training_loop_on_reduced_tokens_learns_and_updates_every_parameter():
    model = vtr.patch(small_vit(), "pitome", flops=0.5)
    images, labels = batch()
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)   # no weight decay: untouched = no gradient
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert vtr.report(model).tokens[-1] < vtr.report(model).tokens[0]
    assert losses[-1] < 0.5 * losses[0]
    unchanged = [name for name, p in model.named_parameters() if torch.equal(p, start[name])]
    assert unchanged == []
