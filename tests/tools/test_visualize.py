"""vtr.tools.visualize and `vtr visualize`: one figure with the input beside the report's groups (painted
patch by patch) and the tokens per block, titled and with a legend."""
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
def test_drawing_paints_the_reports_groups(method, amount):
    torch.manual_seed(0)
    model = vtr.patch(tiny_vit(), method, **amount)
    figure = visualize(model, "chelsea")
    pixels = load_image("chelsea", (64, 64))
    drawing = render(pixels, group_map(model))
    assert np.array_equal(figure.axes[1].images[0].get_array(), drawing)   # the figure shows this drawing
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


def test_one_figure_input_beside_result_with_title_legend_and_tokens(tmp_path):
    model = vtr.patch(tiny_vit(), "tome", flops=0.6)
    path = tmp_path / "figure.png"
    figure = visualize(model, "astronaut", path, name="tiny-vit")
    tokens = vtr.report(model).tokens
    image_axes = [axes for axes in figure.axes if axes.images]
    assert len(image_axes) == 2
    assert np.array_equal(image_axes[0].images[0].get_array(), load_image("astronaut", (64, 64)))   # the input
    assert not np.array_equal(image_axes[1].images[0].get_array(), image_axes[0].images[0].get_array())
    title = figure.get_suptitle()
    assert "tiny-vit" in title and "tome, flops=0.6" in title and f"{tokens[-1]} of 65 tokens kept" in title
    assert image_axes[1].get_legend() is not None
    counts = next(axes for axes in figure.axes if not axes.images)   # tokens entering each block
    assert list(counts.lines[0].get_ydata()) == tokens and tokens[-1] < tokens[0]
    saved = Image.open(path)
    assert saved.format == "PNG" and saved.size[0] > 2 * saved.size[1] > 600   # three panels side by side


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
    assert Image.open(out).size[0] > 600
    assert "tokens per block" in capsys.readouterr().out
