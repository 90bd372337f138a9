"""vtr.tools.visualize and `vtr visualize`: the PNG has the input size and paints the report's groups."""
import argparse

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import vtr
from vtr.cli import visualize as cli_visualize
from vtr.tools.visualize import group_map, load_image, render, visualize


def tiny_vit(**kw):
    cfg = dict(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5) | kw
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **cfg).eval()


@pytest.mark.parametrize("method, amount", [("tome", dict(keep=0.6)), ("random", dict(keep=0.7)),
                                            ("pitome", dict(flops=0.6))])
def test_png_size_and_groups_match_report(tmp_path, method, amount):
    torch.manual_seed(0)
    model = vtr.patch(tiny_vit(), method, **amount)
    path = tmp_path / "groups.png"
    drawing = visualize(model, "chelsea", path)
    saved = np.asarray(Image.open(path))
    assert saved.shape == (64, 64, 3) and np.array_equal(saved, drawing)
    groups = group_map(model)
    last = vtr.report(model)
    assert groups.shape == last.grid == (8, 8)
    assert np.array_equal(groups.ravel(), last.assignment[0, last.num_protected:].numpy())
    # Inside each patch (away from the drawn boundaries) the colour is the group's colour:
    # equal within a group, grey (R = G = B) where the patch was dropped.
    centres = drawing[4::8, 4::8].reshape(-1, 3).astype(int)
    for label in np.unique(groups):
        members = centres[groups.ravel() == label]
        if label < 0:  # dropped: grey, the image faintly visible
            assert (members[:, 0] == members[:, 1]).all() and (members[:, 1] == members[:, 2]).all()
        else:
            assert (members == members[0]).all()
    if method == "random":
        assert (groups < 0).any()


def test_render_paints_group_means():
    pixels = np.zeros((4, 4, 3), dtype=np.uint8)
    pixels[:, :2] = 200  # left half bright, right half dark
    groups = np.array([[0, 1], [0, -1]])
    out = render(pixels, groups)
    assert (out[0, 0] == 200).all()                 # group 0 = patches (0,0),(1,0): both bright
    assert (out[1, 1] == 255).all()                 # boundary between group 0 and group 1
    assert (out[3, 3] == 40).all()                  # dropped dark patch: dim grey


def test_load_image_sources(tmp_path):
    assert load_image("coffee", (32, 48)).shape == (32, 48, 3)
    Image.fromarray(np.full((10, 10, 3), 7, dtype=np.uint8)).save(tmp_path / "x.png")
    assert (load_image(str(tmp_path / "x.png"), (16, 16)) == 7).all()
    with pytest.raises(ValueError, match="image must be a file"):
        load_image("no-such-image", (16, 16))


def test_unpatched_model_is_refused():
    with pytest.raises(ValueError, match="not patched"):
        visualize(tiny_vit(), "coffee")


def test_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cli_visualize.add_parser(parser.add_subparsers())
    out = tmp_path / "cli.png"
    args = parser.parse_args(["visualize", "--model", "vit_tiny_patch16_224", "--img-size", "64",
                              "--method", "tome", "--keep", "0.7", "--image", "astronaut", "--out", str(out)])
    assert args.func(args) == 0
    assert Image.open(out).size == (64, 64)
    assert "tokens per layer" in capsys.readouterr().out
