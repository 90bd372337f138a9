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


# -- FSDP2: learned reducers shard and train like the model's own weights (issue 12) ----------------

def fsdp_vit(method: str) -> torch.nn.Module:
    """A tiny ViT (16 patches + CLS, width 32) with a learned reducer at block 1."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=16, depth=3, embed_dim=32, num_heads=2,
                              num_classes=3, drop_rate=0.0)
    return vtr.patch(model, method, keep=0.5, layers=[1]).train()


def _fsdp_steps(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int = 2) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()


def _fsdp_rank(rank: int, rendezvous: str, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        images, labels = batch()
        part = slice(rank * len(images) // WORLD, (rank + 1) * len(images) // WORLD)
        found = {}
        for method in ("sit", "dynamicvit"):
            model = fsdp_vit(method)
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)          # the root group holds what no block holds: the reducer's modules
            shards = {name: (type(p).__name__, tuple(p.to_local().shape), tuple(p.shape))
                      for name, p in model._vtr_reducer.named_parameters()}
            before = {name: p.full_tensor() for name, p in model._vtr_reducer.named_parameters()}
            _fsdp_steps(model, images[part], labels[part])
            after = {name: p.full_tensor() for name, p in model._vtr_reducer.named_parameters()}
            found[method] = {"shards": shards, "moved": [n for n in before if not torch.equal(before[n], after[n])],
                             "weights": {k: v.full_tensor() for k, v in model.state_dict().items()}}
        torch.save(found, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_fsdp2_shards_and_trains_learned_reducers_like_one_process(tmp_path):
    """fully_shard on 2 CPU ranks (gloo): the learned modules' parameters are sharded DTensors, train, and
    sit's final weights equal one process's on the whole batch (dynamicvit samples its training decisions,
    so its ranks cannot match one process draw for draw; its modules must shard and move)."""
    images, labels = batch()
    mp.spawn(_fsdp_rank, args=(str(tmp_path / "rendezvous"), str(tmp_path / "rank")), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank.{r}") for r in range(WORLD)]
    for method in ("sit", "dynamicvit"):
        shards = ranks[0][method]["shards"]
        assert shards and all(kind == "DTensor" for kind, _, _ in shards.values()), method
        assert any(local[0] < full[0] for _, local, full in shards.values()), method   # split across ranks
        moved = ranks[0][method]["moved"]
        assert moved and ("sit" != method or len(moved) == len(shards)), method
    model = fsdp_vit("sit")
    _fsdp_steps(model, images, labels)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ranks[0]["sit"]["weights"][name], value, rtol=1e-5, atol=1e-6)
