"""vtr.tools.profile: counters against known values, per-layer rows, the drop at the reducing layers."""
import open_clip
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import timm
import torch
from open_clip.transformer import VisionTransformer as OpenClipViT

import vtr
from vtr.tools.profile import count_macs, find_blocks, profile_model


def meta_model(name: str):
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False).eval()


def tiny_vit(**kw):
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5) | kw
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **cfg).eval()


def close(value: float, expected: float, rel: float = 0.005) -> bool:
    return abs(value - expected) <= rel * expected


def test_vit_b16_torch_counter_matches_known_value():
    prof = profile_model(meta_model("vit_base_patch16_224"))
    # 17.58 GMACs is the published figure, which includes layer norms; the torch counter
    # leaves norms out (17.564), within 0.1% of it.
    assert close(prof.macs, 17.58e9)
    assert abs(prof.macs - 17.5638e9) < 1e6
    assert prof.flops == 2 * prof.macs


def test_vit_b16_fvcore_counter_matches_known_value():
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    prof = profile_model(model, counter="fvcore")
    assert close(prof.macs, 17.58e9, rel=0.001)  # fvcore counts norms: 17.583


def test_tome_r16_on_vit_b16():
    model = vtr.patch(meta_model("vit_base_patch16_224"), "tome", r=16)
    prof = profile_model(model)
    assert close(prof.macs, 8.78e9)
    assert [row.tokens_in for row in prof.blocks] == [197 - 16 * i for i in range(12)]


def test_open_clip_b32_image_tower_on_meta():
    visual = open_clip.create_model("ViT-B-32", pretrained=None, device="meta").visual.eval()
    assert close(profile_model(visual).macs, 4.41e9)


def test_mha_fast_path_is_counted():
    """On real CPU tensors in eval + no-grad nn.MultiheadAttention takes its fused fast path;
    the count must equal the unfused count on the meta device."""
    visual = OpenClipViT(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=4.0,
                         output_dim=16).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.profiler.profile() as trace:
        visual(x)
    assert any("_native_multi_head_attention" in e.name for e in trace.events())  # the fast path ran
    real = profile_model(visual, x)
    meta = profile_model(visual)
    fv = profile_model(visual, x, counter="fvcore")
    assert real.macs == pytest.approx(meta.macs, rel=1e-9)
    assert fv.macs >= real.macs and close(fv.macs, real.macs, rel=0.02)  # fvcore adds norms


def test_open_clip_b32_fast_path_on_cpu():
    visual = open_clip.create_model("ViT-B-32", pretrained=None).visual.eval()
    assert close(profile_model(visual, torch.randn(1, 3, 224, 224)).macs, 4.41e9)


@pytest.mark.parametrize("counter", ["torch", "fvcore"])
@pytest.mark.parametrize("method", [None, "tome", "random"])
def test_rows_sum_to_total(counter, method):
    model = tiny_vit()
    if method:
        vtr.patch(model, method, keep=0.7)
    prof = profile_model(model, torch.randn(2, 3, 32, 32), counter=counter)
    assert sum(row.macs for row in prof.rows) == pytest.approx(prof.macs, rel=1e-9)
    assert len(prof.blocks) == 4
    if counter == "torch":  # every MAC is placed: no remainder row
        assert all(row.name != "(other)" for row in prof.rows)
        assert prof.macs == pytest.approx(count_macs(model, torch.randn(2, 3, 32, 32)).per_image)


def test_patched_profile_drops_at_reducing_layers():
    base = profile_model(tiny_vit(depth=6))
    model = vtr.patch(tiny_vit(depth=6), "tome", r=4, layers=[2, 4])
    prof = profile_model(model)
    tokens = [(row.tokens_in, row.tokens_out) for row in prof.blocks]
    assert tokens == [(17, 17), (17, 17), (17, 13), (13, 13), (13, 9), (9, 9)]
    for i, (before, after) in enumerate(zip(base.blocks, prof.blocks)):
        if i < 2:
            assert after.macs == before.macs and after.reduce_macs == 0
        else:  # from the first reducing block on, every block is cheaper
            assert after.macs < before.macs
    assert prof.blocks[2].reduce_macs > 0 and prof.blocks[4].reduce_macs > 0
    assert prof.blocks[3].reduce_macs == 0
    # Analytic model and counter agree on the reduced total (norms are excluded by both).
    assert prof.macs == pytest.approx(vtr.expected_flops(model)[0], rel=1e-6)


def test_profile_in_eval_under_active_train_counts_the_unreduced_model():
    """Eval mode under ``active="train"`` runs the unpatched model: its profile is the unpatched model's, with
    the tokens the blocks saw (issue 26: tokens per block came from ``vtr.report``, which described no call
    or an earlier one)."""
    x = torch.randn(2, 3, 32, 32)
    base = profile_model(tiny_vit(), x)
    model = vtr.patch(tiny_vit(), "tome", r=4, active="train")
    for inputs in (x, None):   # on the model, and on a weightless copy
        prof = profile_model(model, inputs)
        assert [(row.tokens_in, row.tokens_out) for row in prof.blocks] == [(17, 17)] * 4
        assert prof.macs == pytest.approx(base.macs, rel=1e-9)


DATA_DEPENDENT = {"hired"}  # its budget split reads score values on the host


@pytest.mark.parametrize("method", sorted(m for m, info in vtr.methods(details=True).items()
                                           if m != "none" and "tower" in info.stages))
def test_meta_profile_equals_real_profile(method):
    """For every registered encoder method, a count on the meta device (no data) equals the count on
    real images, or the meta count refuses clearly; it never guesses."""
    torch.manual_seed(0)
    model = vtr.patch(tiny_vit(), method, **({"layers": [1]} if method == "pool" else {"keep": 0.6}))
    real = profile_model(model, torch.randn(3, 3, 32, 32))
    if method in DATA_DEPENDENT:
        with pytest.raises(ValueError, match="profile it on real inputs"):
            profile_model(model)
        return
    meta = profile_model(model)
    assert meta.macs == pytest.approx(real.macs, rel=1e-9)
    assert [r.macs for r in meta.rows] == pytest.approx([r.macs for r in real.rows], rel=1e-9)
    assert next(model.parameters()).device.type == "cpu"  # the model itself is untouched


def test_average_over_batches():
    model = tiny_vit()
    one = profile_model(model, torch.randn(1, 3, 32, 32))
    many = profile_model(model, [torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)])
    assert many.images == 5 and many.macs == pytest.approx(one.macs)


def test_table_and_dict():
    prof = profile_model(vtr.patch(tiny_vit(), "tome", r=2))
    text = prof.table()
    assert "MMACs" in text and "MFLOPs" in text and "blocks.3" in text  # a tiny model: millions
    data = prof.to_dict()
    assert data["flops"] == 2 * data["macs"] and len(data["rows"]) == len(prof.rows)


def test_bad_arguments():
    with pytest.raises(ValueError, match="counter must be one of"):
        profile_model(tiny_vit(), counter="thop")
    with pytest.raises(ValueError, match="fvcore"):
        profile_model(tiny_vit(), counter="fvcore", device="meta")
    with pytest.raises(ValueError, match="fvcore"):
        profile_model(meta_model("vit_tiny_patch16_224"), counter="fvcore")
    with pytest.raises(ValueError, match="blocks="):
        find_blocks(torch.nn.Linear(2, 2))


def test_cli_profile(capsys):
    import argparse
    import json

    from vtr.cli import profile as cli_profile

    parser = argparse.ArgumentParser()
    cli_profile.add_parser(parser.add_subparsers())
    args = parser.parse_args(["profile", "--model", "vit_base_patch16_224", "--method", "tome", "--r", "16"])
    assert args.func(args) == 0
    assert "blocks.11" in capsys.readouterr().out
    args = parser.parse_args(["profile", "--model", "vit_tiny_patch16_224", "--img-size", "64", "--json"])
    args.func(args)
    data = json.loads(capsys.readouterr().out)
    assert data["unit"].startswith("MACs") and len([r for r in data["rows"] if r["tokens_in"]]) == 12


class _NormThreshold(vtr.Reducer):
    """A data-dependent reducer (test only): keeps the tokens whose norm exceeds a threshold, so
    the token count depends on the images."""

    name = "_test_norm_threshold"
    max_step = 0.95

    def forward(self, state, num_kept, signals):
        norm = state.x[:, state.num_protected:].norm(dim=-1)
        count = int((norm > 6.0).sum(1).max().clamp_min(1))  # reads data: no meta device
        kept = norm.topk(count, dim=1).indices.sort(dim=1).values
        return state.reduce(vtr.reducers.dest_from_choice(state, kept), state.num_protected + count)


@pytest.fixture
def threshold_method():
    from vtr.reducers import REDUCERS
    REDUCERS[_NormThreshold.name] = _NormThreshold
    try:
        yield _NormThreshold.name
    finally:
        del REDUCERS[_NormThreshold.name]


def test_data_dependent_reducer_is_averaged_over_inputs(threshold_method):
    torch.manual_seed(0)
    model = vtr.patch(tiny_vit(), threshold_method, keep=0.5, layers=[1])
    with pytest.raises(ValueError, match="real inputs"):
        profile_model(model)  # meta device: the count cannot be known
    small, large = torch.randn(2, 3, 32, 32) * 0.2, torch.randn(3, 3, 32, 32) * 5
    a, b = profile_model(model, small), profile_model(model, large)
    assert a.blocks[1].tokens_out != b.blocks[1].tokens_out  # the images decide
    both = profile_model(model, [small, large])
    assert both.images == 5
    assert both.macs == pytest.approx((2 * a.macs + 3 * b.macs) / 5)
    assert both.blocks[1].tokens_out == pytest.approx((a.blocks[1].tokens_out + b.blocks[1].tokens_out) / 2)


@settings(max_examples=25, deadline=None)
@given(keep=st.floats(0.5, 1.0), depth=st.integers(2, 4), method=st.sampled_from(["tome", "random", "pitome"]),
       batch=st.integers(1, 3))
def test_rows_sum_and_follow_tokens_property(keep, depth, method, batch):
    model = vtr.patch(tiny_vit(depth=depth), method, keep=keep)
    prof = profile_model(model, torch.randn(batch, 3, 32, 32))
    assert sum(row.macs for row in prof.rows) == pytest.approx(prof.macs, rel=1e-9)
    tokens = vtr.report(model).tokens
    assert [(r.tokens_in, r.tokens_out) for r in prof.blocks] == list(zip(tokens[:-1], tokens[1:]))
    # Each block costs what the analytic model says for its token counts (norms are not counted).
    cost = vtr.adapters.find_adapter(model).cost(model)
    for row, n_in, n_out in zip(prof.blocks, tokens[:-1], tokens[1:]):
        assert row.macs - row.reduce_macs == pytest.approx(cost.block(n_in, n_out), rel=1e-9)
