"""LLaVA with LoRA (peft) and visual-token reduction (issue 12): ``vtr.patch`` works on a ``PeftModel`` and on a
model whose layers LoRA wraps, and ``labels=`` gives a loss whose gradient trains the LoRA weights."""
from __future__ import annotations

import pytest
import torch

import vtr

from llava_models import mixed_batch, tiny_llava

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def lora(model):
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("order", ["patch_then_lora", "lora_then_patch"])
def test_lora_fine_tuning_on_reduced_visual_tokens(order):
    ids, mask, pixels = mixed_batch()
    labels = ids.masked_fill(mask == 0, -100)
    if order == "patch_then_lora":
        model = lora(vtr.patch(tiny_llava(), "tome", budget=4))
    else:
        model = vtr.patch(lora(tiny_llava()), "tome", budget=4)
    assert type(model).__name__ == "PeftModel" and vtr.is_patched(model) and vtr.family(model) == "llava"
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    language = [n for n, p in model.named_parameters() if p.requires_grad and "language_model" in n]
    assert language and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in language}
    loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
    assert torch.isfinite(loss)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert vtr.report(model).visual_tokens_after.tolist() == [8, 4, 0]       # 4 per image reach the LM
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in language)
    vtr.unpatch(model)
    assert not vtr.is_patched(model)
