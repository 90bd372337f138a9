"""Does MSViT's training gradient point the right way? For each (image, region) of a batch on the trained 6-block
fidelity ViT, the sign of d(cross-entropy)/d(gate logit) through the straight-through choice is compared with the
sign of the loss change when that region's choice is flipped at inference. Two estimators: the key weights only
(``vtr.adaptive.msvit``'s training path) and the key weights plus the embeddings scaled by the choice.

    python benchmarks/msvit_gradient_check.py      # one thread, about a minute
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import vtr
from vtr.adaptive import msvit
from vtr.tools import fidelity


def scaled_embeddings(ms, prefix, fine, coarse, chosen):
    """The alternative: every token's embedding also multiplied by its straight-through choice."""
    x, bias = KEYS_ONLY(ms, prefix, fine, coarse, chosen)
    fine_chosen = chosen[:, ms.region]
    x = torch.cat([prefix, fine * fine_chosen[..., None], coarse * (1 - chosen)[..., None]], dim=1)
    return x, bias


KEYS_ONLY = msvit.MixedScaleViT._masked


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    task, training = fidelity.SECOND_TASK, fidelity.SECOND_TRAINING
    images, labels = fidelity.make_images(task, 16, seed=10_000)
    for name, path in (("key weights only", KEYS_ONLY), ("key weights + scaled embeddings", scaled_embeddings)):
        model = fidelity.trained_model(task, training)
        vtr.adaptive.patch(model, "msvit", coarse=2, noise=0.0)
        for block in model.blocks:
            block.attn.fused_attn = False
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        torch.manual_seed(0)
        with torch.no_grad():
            model._vtr_adaptive.gate.score[-1].weight.normal_(0, 3.0)
        msvit.MixedScaleViT._masked = staticmethod(path)
        logits = {}

        def keep(module, args, out):
            if out.requires_grad:
                out.retain_grad()
                logits["value"] = out

        hook = model._vtr_adaptive.gate.register_forward_hook(keep)
        model.train()
        F.cross_entropy(model(images), labels, reduction="sum").backward()
        hook.remove()
        agree, total = agreement(model, images, labels, logits["value"].grad)
        print(f"{name}: gradient sign agrees with the flip for {agree} of {total} regions")
    msvit.MixedScaleViT._masked = staticmethod(KEYS_ONLY)


def agreement(model, images, labels, grads) -> tuple[int, int]:
    """(regions whose gradient sign predicts the loss change of flipping them, regions counted)."""
    gate = model._vtr_adaptive
    model.eval()
    agree = total = 0
    for i in range(len(images)):
        one, label = images[i:i + 1], labels[i:i + 1]
        with torch.no_grad():
            base = F.cross_entropy(model(one), label).item()
            fine = gate.gate(gate.regions(model.patch_embed(one)))[0] > 0
        for region in range(gate.num_regions):
            def flipped(values, region=region):
                choice = values > 0
                choice[:, region] = ~choice[:, region]
                return choice
            gate.decide = flipped
            with torch.no_grad():
                change = F.cross_entropy(model(one), label).item() - base
            del gate.decide
            predicted = (-1 if bool(fine[region]) else 1) * float(grads[i, region])
            if abs(change) > 1e-3 and abs(predicted) > 1e-9:
                total += 1
                agree += (predicted > 0) == (change > 0)
    return agree, total


if __name__ == "__main__":
    main()
