"""vtr.save_reduction / vtr.load_reduction: a patched Hugging Face model through save_pretrained and
from_pretrained, re-patched from what was saved, computes exactly what it computed before."""
import json
import re

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
    ("evit", dict(keep=0.7, layers=[1, 2], fuse="one", fuse_weight="size")),
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


# -- a saved reduction that is not what save_reduction writes (issue 26) ----------------------------

def _saved_tome(tmp_path) -> dict:
    """A tiny CLIP's reduction saved in ``tmp_path``; returns the JSON document, to be broken."""
    vtr.save_reduction(vtr.patch(tiny_clip(), "tome", r=2), tmp_path)
    return json.loads((tmp_path / "vtr_reduction.json").read_text())


def _without(document: dict, field: str) -> dict:
    return {k: v for k, v in document.items() if k != field}


# (what to write instead of the JSON, given the saved document) -> what the error says after the file name
BROKEN_FILES = {
    "not JSON": (lambda d: "{method: tome", r" is not JSON \(Expecting property name"),
    "empty": (lambda d: "", r" is empty; write it again with vtr.save_reduction"),
    "an array": (lambda d: "[]", r" must hold a JSON object \(fields vtr_reduction, method, arguments, metric, "
                                 r"prop_attn\), got an array"),
    "no format": (lambda d: json.dumps(_without(d, "vtr_reduction")), r": field 'vtr_reduction' must be 1 .*got null"),
    "no arguments": (lambda d: json.dumps(_without(d, "arguments")),
                     r": field 'arguments' is missing; it must be an object of vtr.patch arguments"),
    "no metric": (lambda d: json.dumps(_without(d, "metric")), r": field 'metric' is missing; it must be a string"),
    "arguments an array": (lambda d: json.dumps(d | {"arguments": [1]}),
                           r": field 'arguments' must be an object of vtr.patch arguments, got an array"),
    "prop_attn a string": (lambda d: json.dumps(d | {"prop_attn": "yes"}),
                           r": field 'prop_attn' must be true or false, got a string"),
    "a tuple of no list": (lambda d: json.dumps(d | {"arguments": {"r": {"tuple": 5}}}),
                           r": argument 'r' must be a number, string, list, .*got \{\"tuple\": 5\}"),
    "a value patch refuses": (lambda d: json.dumps(d | {"method": "tomee"}), r": unknown method 'tomee'"),
}


@pytest.mark.parametrize("broken", sorted(BROKEN_FILES))
def test_a_broken_saved_reduction_is_a_value_error_naming_the_file_and_the_field(tmp_path, broken):
    write, says = BROKEN_FILES[broken]
    file = tmp_path / "vtr_reduction.json"
    file.write_text(write(_saved_tome(tmp_path)))
    model = tiny_clip()
    with pytest.raises(ValueError, match=re.escape(str(file)) + says):
        vtr.load_reduction(model, tmp_path)
    assert not vtr.is_patched(model)


@pytest.mark.parametrize("sidecar, says", [
    (b"not a torch file\n", r"vtr_reduction.pt is no tensor file torch.load\(weights_only=True\) can read "
                            r"\(UnpicklingError\)"),
    (b"a", r"vtr_reduction.pt is no tensor file torch.load\(weights_only=True\) can read \(IndexError\)"),
    (None, r"vtr_reduction.pt must hold a dict of tensors by option name .*got Tensor"),
])
def test_a_broken_tensor_sidecar_is_a_value_error_naming_it(tmp_path, sidecar, says):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    vtr.save_reduction(vtr.patch(model, "atf", keep=0.5, prior=torch.full((16,), 1 / 16)), tmp_path)
    vtr.unpatch(model)
    if sidecar is None:
        torch.save(torch.ones(16), tmp_path / "vtr_reduction.pt")   # a torch file, but not the sidecar's dict
    else:
        (tmp_path / "vtr_reduction.pt").write_bytes(sidecar)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + ".*" + says):
        vtr.load_reduction(model, tmp_path)
    assert not vtr.is_patched(model)
