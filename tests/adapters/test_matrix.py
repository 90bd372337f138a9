"""Every registered method on every model family: runs, reports the truth, and meets flops=.

The per-family files test each adapter in depth; this one catches a method and an adapter that
were each right alone but disagree together (where a step sits, which signals exist).
"""
import pytest
import timm
import torch
from open_clip.transformer import VisionTransformer
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

import vtr
from vtr.tools.profile import count_macs

HF = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4, image_size=48,
          patch_size=8)
FAMILIES = {
    "timm": lambda: timm.create_model("vit_tiny_patch16_224", depth=6, img_size=96, embed_dim=32, num_heads=4),
    "open_clip": lambda: VisionTransformer(image_size=48, patch_size=8, width=32, layers=6, heads=4, mlp_ratio=2.0,
                                           output_dim=16),
    "hf_clip": lambda: CLIPVisionModel(CLIPVisionConfig(**HF)),
    "hf_siglip": lambda: SiglipVisionModel(SiglipVisionConfig(**HF)),  # no CLS token
}
SIZE = {"timm": 96}
ENCODER_METHODS = [m for m, info in vtr.methods(details=True).items() if m != "none" and "tower" in info.stages]
# Methods that reduce once, at the tower's last block, by default (the layer a VLM reads): flops=0.6 is out of reach.
LAST_BLOCK = {"visionzip", "divprune", "vispruner", "fastervlm"}


def build(family):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    x = torch.randn(2, 3, SIZE.get(family, 48), SIZE.get(family, 48), generator=torch.Generator().manual_seed(1))
    return model, x


# Methods defined on the tower's [CLS] attention (or the attention a token receives) refuse a tower without a CLS
# token that offers neither (SigLIP here).
TOWER_ATTENTION = {"visionzip", "vispruner", "fastervlm"}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ENCODER_METHODS)
def test_method_on_family(family, method):
    model, x = build(family)
    if family == "hf_siglip" and method in TOWER_ATTENTION:
        vtr.patch(model, method, keep=0.5)
        with pytest.raises(ValueError, match=rf"{method} ranks visual tokens by the vision tower's \[CLS\] attention"):
            with torch.no_grad():
                model(x)
        return
    base = count_macs(model, x[:1]).total
    try:
        vtr.patch(model, method, flops=0.6)
    except ValueError as error:  # a fixed-count method may not land near this target on a 6-layer model
        assert method in {"pool"} | LAST_BLOCK and "is out of reach" in str(error)
        vtr.patch(model, method, layers=[2], **({} if method == "pool" else {"keep": 0.5}))
    with torch.no_grad():
        model(x)
    report = vtr.report(model)
    assert report.tokens == vtr.expected_tokens(model) and report.tokens[-1] < report.tokens[0]
    counted = count_macs(model, x[:1]).total
    assert counted == pytest.approx(vtr.expected_flops(model)[0], rel=1e-6)
    if method not in {"pool"} | LAST_BLOCK:
        assert counted / base == pytest.approx(0.6, abs=0.02)
    vtr.unpatch(model)
