"""Fidelity harness: the task, the cached training, and the table, end to end on a tiny setting."""
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import vtr
from vtr.cli import main
from vtr.tools import fidelity

# The harness on a model too small to learn anything (seconds); what the methods are worth is measured
# on the quick model below.
TASK = fidelity.Task(image_size=16, patch_size=4, clutter=4, num_classes=4)
TRAINING = fidelity.Training(embed_dim=16, depth=2, num_heads=2, train_images=64, epochs=1, batch_size=32)
# pool is a baseline, not guarded: averaging the patch grid before the CLS token has gathered the glyph blurs
# it, and at 50% FLOPs it scored below random for 2 of 6 training seeds of the quick model
# (benchmarks/RESULTS-fidelity.md measures every factor and layer on the full model).
INFORMED = ("tome", "pitome", "evit", "hired", "fastv", "atf", "query")
# Methods that stay within a point of the unreduced model for every training seed tried (0-5). The
# attention-ranked ones (evit, hired, fastv) reduce hard at block 1 of this 4-block model at 50% FLOPs, and
# lose 0-20 points depending on the seed: on another CPU the training, and so the seed, differs.
CLOSE_TO_UNREDUCED = ("tome", "pitome", "atf", "query")


@pytest.fixture(scope="session")
def quick_cache(tmp_path_factory):
    """The cache dir holding the quick model, trained once per test session (about a minute)."""
    root = tmp_path_factory.mktemp("fidelity-cache")
    fidelity.trained_model(fidelity.QUICK_TASK, fidelity.QUICK_TRAINING, root=root, log=lambda *_: None)
    return root


@pytest.fixture(scope="session")
def quick_results(quick_cache):
    model = fidelity.trained_model(fidelity.QUICK_TASK, fidelity.QUICK_TRAINING, root=quick_cache)
    images, labels = fidelity.make_images(fidelity.QUICK_TASK, 1000, seed=10_000)
    results = fidelity.evaluate(model, fidelity.batches(images, labels, 250), targets=(0.5,), log=lambda *_: None)
    return {r.method: r for r in results}


def test_the_quick_model_learns(quick_results):
    """A model at chance would make every comparison below meaningless (it scored 0.297 everywhere)."""
    assert quick_results["none"].top1 > 0.7   # 4 classes: chance is 0.25


def test_every_informed_method_beats_random_at_half_the_flops(quick_results):
    """The guard against collapse (issue 11): with default options, no method that looks at the tokens may
    do worse than dropping a random subset of them at the same FLOPs.

    Agreement with the unreduced model is the paired comparison (the same images, the same model), so its
    margin holds across training seeds: over seeds 0-5 the worst informed method agreed 0.033-0.34 more
    often than random (block-0 scoring, the collapse of issue 11, agreed less often than random)."""
    unreduced, random = quick_results["none"], quick_results["random"]
    assert random.top1 < unreduced.top1 - 0.02    # the task punishes losing the glyph's patches
    for method in INFORMED:
        result = quick_results[method]
        assert result.status == "ok", (method, result.status)
        assert result.flops == pytest.approx(0.5, abs=0.05)
        assert result.agreement > random.agreement + 0.02, (method, result.agreement, random.agreement)
        assert result.top1 > random.top1, (method, result.top1, random.top1)
    for method in CLOSE_TO_UNREDUCED:
        assert quick_results[method].top1 > unreduced.top1 - 0.03, (method, quick_results[method].top1)


def test_images_are_deterministic_and_labelled():
    x, y = fidelity.make_images(TASK, 12, seed=3)
    x2, y2 = fidelity.make_images(TASK, 12, seed=3)
    assert x.shape == (12, 3, 16, 16) and torch.equal(x, x2) and torch.equal(y, y2)
    assert y.min() >= 0 and y.max() < TASK.num_classes
    assert not torch.equal(x, fidelity.make_images(TASK, 12, seed=4)[0])


def test_glyphs_are_distinct():
    glyphs = fidelity._glyphs().reshape(8, -1)
    assert len({g.tobytes() for g in glyphs}) == 8 and glyphs.sum(1).min() > 10


def test_bad_task():
    with pytest.raises(ValueError, match="image_size"):
        fidelity.Task(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="num_classes"):
        fidelity.Task(num_classes=9)


def test_training_is_cached(tmp_path):
    logs = []
    model = fidelity.trained_model(TASK, TRAINING, root=tmp_path, log=logs.append)
    path = fidelity.checkpoint_path(TASK, TRAINING, tmp_path)
    assert path.is_file() and any("training" in line for line in logs)
    logs.clear()
    again = fidelity.trained_model(TASK, TRAINING, root=tmp_path, log=logs.append)
    assert not logs  # loaded, not trained
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    other = fidelity.checkpoint_path(TASK, fidelity.Training(epochs=2), tmp_path)
    assert other != path  # the recipe is part of the cache key


def test_evaluate_end_to_end(tmp_path):
    torch.manual_seed(0)
    model = fidelity.build_model(TASK, TRAINING).eval()
    images, labels = fidelity.make_images(TASK, 32, seed=1)
    results = fidelity.evaluate(model, fidelity.batches(images, labels, 16), targets=(0.7, 0.35),
                                log=lambda *_: None)
    assert not vtr.is_patched(model)
    rows = {(r.method, r.target): r for r in results}
    assert rows[("none", 1.0)].agreement == 1.0
    learned = {"dynamicvit", "sit"}   # measured untrained only when named
    tower = {m for m, info in vtr.methods(details=True).items() if "tower" in info.stages}
    assert {m for m, _ in rows} == tower - learned  # every training-free method of a ViT has rows
    for r in results:
        if r.status == "ok":
            assert 0 <= r.top1 <= 1 and 0 <= r.agreement <= 1 and -1 <= r.cosine <= 1.0 + 1e-6
            assert r.flops == pytest.approx(r.target, abs=0.06)
        else:
            assert r.status.startswith(("cannot reach", "n/a"))
    assert rows[("tome", 0.35)].status.startswith("cannot reach")  # 2 bipartite steps stop at ~60%
    table = fidelity.format_table(results)
    assert table.count("\n") == len(results) + 1 and "| tome | 70% |" in table
    series = fidelity.accuracy_series(results)
    assert series["tome"][0] == (1.0, rows[("none", 1.0)].top1) and len(series["tome"]) == 2  # 35%: out of reach


def test_cli_quick_and_own_checkpoint(tmp_path, capsys, quick_cache):
    out = tmp_path / "r.json"
    assert main(["fidelity", "--quick", "--cache", str(quick_cache), "--methods", "tome", "--targets", "0.7",
                 "--out", str(out), "--plot", str(tmp_path / "accuracy.png"), "--json", "--device", "cpu"]) == 0
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads(out.read_text())
    assert [r["method"] for r in data["results"]] == ["none", "tome"]
    assert json.loads(capsys.readouterr().out) == data   # --json: the same document on stdout, nothing else
    # A user's own checkpoint and ImageFolder go through the same harness.
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=32, depth=2, num_heads=2, num_classes=2)
    torch.save(model.state_dict(), tmp_path / "own.pt")
    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(3):
            pixels = np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / label / f"{i}.png")
    md = tmp_path / "t.md"
    assert main(["fidelity", "--checkpoint", str(tmp_path / "own.pt"), "--model", "vit_tiny_patch16_224",
                 "--num-classes", "2", "--img-size", "32", "--model-arg", "patch_size=8",
                 "--model-arg", "embed_dim=32", "--model-arg", "depth=2", "--model-arg", "num_heads=2",
                 "--data", str(tmp_path / "data"),
                 "--methods", "tome,random", "--targets", "0.7", "--markdown", str(md)]) == 0
    assert "| random | 70% |" in md.read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:   # a --model-arg timm refuses: the user's mistake
        main(["fidelity", "--checkpoint", str(tmp_path / "own.pt"), "--model", "vit_tiny_patch16_224",
              "--model-arg", "no_such_arg=1", "--data", str(tmp_path / "data")])
    assert exit_info.value.code == 2 and "argument --model-arg: " in capsys.readouterr().err
