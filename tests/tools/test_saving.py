"""vtr.save_reduction / vtr.load_reduction: a patched Hugging Face model through save_pretrained and
from_pretrained, re-patched from what was saved, computes exactly what it computed before."""
import json

import pytest
import timm
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.utils import logging as hf_logging

import vtr
from vtr.tools.calibrate import calibrate

hf_logging.set_verbosity_error()


def tiny_clip() -> CLIPVisionModel:
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                              image_size=32, patch_size=4)
    return CLIPVisionModel(config).eval()


def pixels(batch=2):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method, kwargs", [
    ("tome", dict(r=(8, -1), metric="keys")),   # a tuple amount, and the attention switched to hand over q and k
    ("pitome", dict(flops=0.6, margin=0.8, prop_attn=False)),
    ("evit", dict(keep=0.7, layers=[1, 2], fuse="size")),
])
def test_round_trip_through_save_pretrained_gives_the_same_outputs(tmp_path, method, kwargs):
    model = vtr.patch(tiny_clip(), method, **kwargs)
    with torch.no_grad():
        before = model(pixel_values=pixels()).last_hidden_state
    tokens = vtr.report(model).tokens
    model.save_pretrained(tmp_path)
    vtr.save_reduction(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "vtr" not in json.dumps(config)   # nothing written into the config behind the user's back

    loaded = CLIPVisionModel.from_pretrained(tmp_path)
    assert not vtr.is_patched(loaded)
    vtr.load_reduction(loaded, tmp_path)
    with torch.no_grad():
        after = loaded(pixel_values=pixels()).last_hidden_state
    assert torch.equal(after, before)
    assert vtr.report(loaded).tokens == tokens and tokens[-1] < tokens[0]
    saved, reloaded = vtr.adapters.settings(model), vtr.adapters.settings(loaded)
    assert (reloaded.method, reloaded.arguments, reloaded.metric, reloaded.prop_attn) == \
           (saved.method, saved.arguments, saved.metric, saved.prop_attn)


def test_tensor_options_travel_in_a_sidecar(tmp_path):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    images = torch.randn(2, 3, 32, 32)
    prior = calibrate(model, images)
    vtr.patch(model, "atf", keep=0.5, layers=[0], prior=prior, prior_weight=0.7)
    with torch.no_grad():
        before = model(images)
    vtr.save_reduction(model, tmp_path)
    assert json.loads((tmp_path / "vtr_reduction.json").read_text())["arguments"]["prior"] == {"tensor": "prior"}
    assert (tmp_path / "vtr_reduction.pt").is_file()
    vtr.unpatch(model)
    vtr.load_reduction(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(model(images), before)
    assert torch.equal(vtr.adapters.settings(model).arguments["prior"], prior)

    vtr.unpatch(model)   # a later save without tensors removes the stale sidecar
    vtr.save_reduction(vtr.patch(model, "tome", r=2), tmp_path)
    assert not (tmp_path / "vtr_reduction.pt").exists()


def test_refusals(tmp_path):
    model = tiny_clip()
    with pytest.raises(ValueError, match="not patched"):
        vtr.save_reduction(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="no vtr_reduction.json in"):
        vtr.load_reduction(model, tmp_path)
    vtr.save_reduction(vtr.patch(model, "tome", r=2), tmp_path)
    with pytest.raises(ValueError, match="already patched with 'tome'"):
        vtr.load_reduction(model, tmp_path)   # two reductions are never stacked
    vtr.unpatch(model)
    vtr.patch(model, "query", keep=0.5, layers=[1], projection=torch.nn.Identity())
    with pytest.raises(ValueError, match="cannot save option projection=Identity"):
        vtr.save_reduction(model, tmp_path / "other")
