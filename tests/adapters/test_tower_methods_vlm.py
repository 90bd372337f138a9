"""VisionZip, DivPrune, VisPruner and FasterVLM before the language model on every VLM family vtr patches
(LLaVA, LLaVA-NeXT, Qwen2.5-VL, LLaVA-OneVision, LLaVA-NeXT-Video): batched, each image at exactly its budget,
each row of a left-padded batch what it is alone; on LLaVA the [CLS] row they rank by is the feature layer's,
computed from q/k under SDPA, the row an eager tower returns."""
from __future__ import annotations

import pytest
import torch

import vtr

from llava_models import logits, mixed_batch, tiny_llava
from test_one_file_method import FAMILIES, run

METHODS = ["visionzip", "divprune", "vispruner", "fastervlm"]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", METHODS)
def test_runs_before_the_lm_on_every_family_batched_and_row_by_row(family, method):
    build, rows, num_rows = FAMILIES[family]
    model = vtr.patch(build(), method, budget=4)
    batched = run(model, rows(model))
    report = vtr.report(model)
    assert report.image_tokens_after.tolist() == [min(4, n) for n in report.image_tokens_before.tolist()]
    assert (report.image_tokens_before > 4).any()
    for row in range(num_rows):
        alone = run(model, rows(model, row))
        torch.testing.assert_close(logits(batched)[row], logits(alone)[0], atol=1e-5, rtol=0)
    vtr.unpatch(model)


def eager_cls_row(pixels: torch.Tensor) -> torch.Tensor:
    """The head-mean [CLS] row of LLaVA's feature layer (-2) over the patches, from an eager tower's own
    attention weights (same weights as :func:`tiny_llava`'s)."""
    eager = tiny_llava(attn="eager")
    with torch.no_grad():
        out = eager.model.vision_tower(pixels, output_attentions=True)
    return out.attentions[-2][:, :, 0, 1:].mean(dim=1)


@pytest.mark.parametrize("method, dominant", [("fastervlm", 4), ("vispruner", 2), ("visionzip", 3)])
def test_on_llava_the_important_tokens_are_the_feature_layers_cls_top_k(method, dominant):
    """budget 4: FasterVLM keeps the top 4, VisPruner's important half the top 2, VisionZip's dominant 3 (+ 1
    contextual token carrying the rest)."""
    ids, mask, pixels = mixed_batch()
    model = vtr.patch(tiny_llava(), method, budget=4)     # SDPA: the row comes from the layer's q and k
    run(model, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels))
    report = vtr.report(model)
    cls_row = eager_cls_row(pixels)
    for image in range(3):
        kept = report.assignment[image]
        carries = kept[kept >= 0].bincount(minlength=4)                        # originals per output token
        single = {i for i, d in enumerate(kept.tolist()) if d >= 0 and carries[d] == 1}   # kept as they were
        top = set(cls_row[image].topk(dominant).indices.tolist())
        assert top <= single, (image, top, single)
        if method != "visionzip":
            assert len(single) == 4 and int((kept >= 0).sum()) == 4            # the others dropped
        else:
            assert int((kept >= 0).sum()) == 16                                # the contextual token carries the rest
    vtr.unpatch(model)


def test_on_towers_they_reduce_once_at_the_last_block():
    """On a ViT tower the default step is the last block (the layer a VLM reads); flops= that needs more is out
    of reach with the layers named."""
    import timm
    model = timm.create_model("vit_tiny_patch16_224", depth=4, img_size=64, pretrained=False).eval()
    for method in METHODS:
        vtr.patch(model, method, keep=0.25)
        with torch.no_grad():
            model(torch.randn(2, 3, 64, 64))
        assert vtr.report(model).tokens == [17] * 4 + [5]
        vtr.unpatch(model)
        with pytest.raises(ValueError, match=r"flops=0.5 is out of reach .* only layers \[3\] reduce"):
            vtr.patch(model, method, flops=0.5)
