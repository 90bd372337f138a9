"""Model zoo: every entry builds, takes its preset and reproduces its recorded figures."""
import argparse
import json

import pytest
import torch

import vtr
from vtr.cli import zoo as cli_zoo
from vtr.tools import zoo
from vtr.tools.profile import profile_model

ENTRIES = sorted(zoo.entries())


def test_zoo_is_installed_inside_vtr():
    import vtr.model_zoo
    assert vtr.model_zoo.__name__ == "vtr.model_zoo" and len(ENTRIES) >= 6
    # the repository's model_zoo/ folder, installed under vtr (not as a top-level package)
    assert vtr.model_zoo.__file__.replace("\\", "/").endswith("model_zoo/__init__.py")


@pytest.mark.parametrize("name", ENTRIES)
def test_entry_preset_reproduces_recorded_figures(name):
    entry = zoo.get(name)
    with torch.device("meta"):  # the full forward of the patched model, without weights
        model = zoo.build(entry)
    base = profile_model(model).macs
    vtr.patch(model, preset=name)
    assert model._vtr.method == entry.reduction["method"]
    reduced = profile_model(model)
    measured = entry.measured
    assert base / 1e9 == pytest.approx(measured["gmacs_unreduced"], rel=0.005)
    assert reduced.macs / 1e9 == pytest.approx(measured["gmacs"], rel=0.005)
    assert vtr.report(model).tokens == measured["tokens"]
    if "flops" in entry.reduction:
        assert reduced.macs / base == pytest.approx(entry.reduction["flops"], abs=0.01)


@pytest.mark.parametrize("name", [n for n in ENTRIES if zoo.get(n).measured["gmacs_unreduced"] < 1.5])
def test_entry_runs_with_random_weights(name):
    entry = zoo.get(name)
    torch.manual_seed(0)
    model = zoo.build(entry)
    x = torch.randn(1, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        reference = model(x)
        vtr.patch(model, preset=name)
        out = model(x)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    assert vtr.report(model).tokens == entry.measured["tokens"]


def test_arguments_override_the_preset():
    with torch.device("meta"):
        model = zoo.build(zoo.get("timm/vit_base_patch16_224"))
    vtr.patch(model, preset="timm/vit_base_patch16_224", flops=0.35)
    assert profile_model(model).macs / 17.5638e9 == pytest.approx(0.35, abs=0.01)
    vtr.unpatch(model)
    vtr.patch(model, "random", preset="timm/vit_base_patch16_224", seed=3)
    assert model._vtr.method == "random" and model._vtr.reducer.seed == 3


def test_preset_refuses_other_shapes_and_unknown_names():
    with torch.device("meta"):
        model = zoo.build(zoo.get("timm/vit_tiny_patch16_224"), img_size=160)
    with pytest.raises(ValueError, match="num_tokens=101 \\(preset expects 197\\)"):
        vtr.patch(model, preset="timm/vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="unknown preset 'nope'.*timm/vit_base_patch16_224"):
        vtr.patch(model, preset="nope")
    assert not vtr.is_patched(model)


def test_find_matches_shape():
    with torch.device("meta"):
        model = zoo.build(zoo.get("timm/vit_small_patch16_224"))
    names = [e.name for e in zoo.find(model)]
    assert "timm/vit_small_patch16_224" in names and "timm/deit_small_patch16_224" in names
    assert "timm/vit_base_patch16_224" not in names


@pytest.mark.parametrize("text, match", [
    ('name = "a"\n[model]\nbuilder = "timm"\n', "missing reduction"),
    ('name = "a"\n[model]\nbuilder = "timm"\n[reduction]\nmethod = "tome"\nr = 2\nflops = 0.5\n', "more than one"),
    ('name = "a"\n[model]\nbuilder = "timm"\n[reduction]\nmethod = "tome"\nspeed = 2\n', "unknown speed"),
])
def test_bad_entry_files(text, match):
    with pytest.raises(ValueError, match=match):
        vtr.model_zoo._parse(text, "bad.toml")


def test_cli_zoo(capsys):
    parser = argparse.ArgumentParser()
    cli_zoo.add_parser(parser.add_subparsers())
    args = parser.parse_args(["zoo"])
    assert args.func(args) == 0
    assert "timm/vit_base_patch16_224" in capsys.readouterr().out
    args = parser.parse_args(["zoo", "timm/vit_base_patch16_224"])
    args.func(args)
    assert "gmacs: 8.784" in capsys.readouterr().out


def test_cli_zoo_json(capsys):
    """`vtr zoo --json`: every entry with all its fields; with a name, that entry alone."""
    from vtr.cli import main

    assert main(["zoo", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [entry["name"] for entry in listed] == list(zoo.entries())
    assert main(["zoo", "timm/vit_base_patch16_224", "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)
    assert entry == next(e for e in listed if e["name"] == "timm/vit_base_patch16_224")
    assert entry["reduction"] == zoo.get("timm/vit_base_patch16_224").reduction
    assert entry["measured"]["gmacs"] == zoo.get("timm/vit_base_patch16_224").measured["gmacs"]
