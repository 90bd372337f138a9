"""Qwen-VL reduction inside the vision tower (``tower_layer=K``): whole 2x2 units dropped after block K.

Exact when nothing is dropped; a hand-made score keeps the units it ranks first; the blocks after K attend inside
their recomputed windows (full-attention blocks over the image's kept units) at the kept patches' own rotary
positions, checked against a float64 transcription; Qwen3-VL's DeepStack levels follow the same units; rows alone
equal rows in a batch; the tower's counted MACs are what a FLOP counter measures; bad settings are clear errors.
"""
import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import vtr
from vtr.adapters.qwen_vl import before_lm, received, tower

import qwen3_vl_models as q3
from qwen_vl_models import batch, generate, logits, mixed_batch, tiny_qwen, tiny_qwen2, video_batch, with_frames

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def unit_scores(model, grid: tuple, raster: torch.Tensor):
    """A stand-in for ``received_per_patch``: each patch (in the tower's block order) scores ``raster[u]``, the
    hand-made score of the unit u it belongs to (one image of ``grid``)."""
    window = received.window_index(model.model.visual, torch.tensor([grid]))
    per_block_unit = raster if window is None else raster[window]

    def fake(attention, hidden, cu_seqlens, position_embeddings, qkv=None):
        return per_block_unit.repeat_interleave(4).float()
    return fake


def one_image(grid: tuple, seed: int = 0):
    return batch([[1, 5, ("image", 0), 7, 8]], image_grids=[grid], seed=seed)


# -- nothing dropped: the unpatched model ---------------------------------------------------------------

@pytest.mark.parametrize("build, layer", [(tiny_qwen, 0), (tiny_qwen, 1), (tiny_qwen2, 0), (q3.tiny_qwen3, 1)])
def test_a_budget_that_keeps_every_unit_equals_the_unpatched_model(build, layer):
    model = build()
    inputs = (q3.mixed_batch() if build is q3.tiny_qwen3 else mixed_batch()).inputs()
    expected = generate(model, inputs)
    vtr.patch(model, "fastv", budget=1000, tower_layer=layer)
    out = generate(model, inputs)
    assert torch.equal(out.sequences, expected.sequences) and torch.equal(logits(out), logits(expected))
    report = vtr.report(model)
    assert report.tower_macs == report.tower_macs_unreduced and report.tower_flops_saved == 0.0
    vtr.unpatch(model)


def test_a_copy_reduces_the_same_and_unpatch_restores_the_tower():
    """The hooks are plain objects: a deep copy (or a pickle) of a patched model reduces as the model does; unpatch
    leaves the tower without them, computing what it computed before."""
    import pickle
    model = tiny_qwen()
    inputs = mixed_batch().inputs()
    expected = generate(model, inputs)
    vtr.patch(model, "fastv", budget=4, tower_layer=0)
    reduced = logits(generate(model, inputs))
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(logits(generate(twin, inputs)), reduced)
    vtr.unpatch(model)
    hooks = [h for m in model.model.visual.modules() for h in (*m._forward_hooks.values(),
                                                               *m._forward_pre_hooks.values())]
    assert hooks == [] and torch.equal(logits(generate(model, inputs)), logits(expected))


# -- what is kept ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["fastv", "evit"])
def test_a_hand_made_score_keeps_the_units_it_ranks_first(monkeypatch, method):
    """One image of 8 x 8 patches (4 x 4 units): the units scored highest are the ones kept, at their own M-RoPE
    positions in the language model."""
    model = tiny_qwen()
    data = one_image((1, 8, 8))
    raster = torch.randperm(16, generator=torch.Generator().manual_seed(3)).float()
    monkeypatch.setattr(received, "received_per_patch", unit_scores(model, (1, 8, 8), raster))
    vtr.patch(model, method, budget=5, tower_layer=0, fuse="drop")
    inputs = data.inputs()
    generate(model, inputs)
    report = vtr.report(model)
    kept = (report.assignment[0] >= 0).nonzero().flatten()
    assert kept.tolist() == sorted(raster.argsort(descending=True)[:5].tolist())
    assert report.image_tokens_after.tolist() == [5] and report.tower_flops_saved > 0
    # Each kept unit reaches the language model at the (t, h, w) position it has in the caller's prompt.
    positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              image_grid_thw=inputs["image_grid_thw"],
                                              attention_mask=inputs["attention_mask"])
    columns = (inputs["input_ids"][0] == 90).nonzero().flatten()[kept]
    assert torch.equal(report.visual_positions[0], positions[:, 0, columns])
    vtr.unpatch(model)


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_each_row_of_a_batch_equals_the_row_alone(family):
    """Images of different sizes in one call (Qwen3-VL: and a timestamped video), each its own budget; a row alone
    computes what it computes in the left-padded batch."""
    if family == "qwen3-vl":
        model, data, make, after = q3.tiny_qwen3(), q3.mixed_batch(), q3.generate, [5, 5, 5, 5]
    else:
        model, data, make, after = tiny_qwen(depth=4, full=(1, 3)), mixed_batch(), generate, [5, 5, 5]
    for method in ("fastv", "divprune"):
        vtr.patch(model, method, budget=5, tower_layer=1)
        together = make(model, data.inputs())
        assert vtr.report(model).image_tokens_after.tolist() == after
        for row in range(2):
            alone = make(model, data.inputs([row]))
            torch.testing.assert_close(logits(together)[row], logits(alone)[0], atol=1e-5, rtol=0)
        vtr.unpatch(model)


def test_videos_keep_their_budget_frame_by_frame():
    model = tiny_qwen()
    data = video_batch()
    vtr.patch(model, "fastv", budget=6, tower_layer=0)
    together = generate(model, data.inputs())
    report = vtr.report(model)
    assert report.kinds == ["image", "video", "video"]
    assert report.image_tokens_after.tolist() == [6, 6, 6]
    assert [sum(f) for f in report.frame_tokens] == [6, 6, 6] and len(report.frame_tokens[1]) == 4
    for row in range(2):
        torch.testing.assert_close(logits(together)[row], logits(generate(model, data.inputs([row])))[0],
                                   atol=1e-5, rtol=0)
    vtr.unpatch(model)


def test_temporal_merges_a_repeated_frames_units_into_the_frame_it_repeats():
    """Frames [0, 0, 2, 2]: after block K a repeat's units are its frame's (same pixels, each frame attends on its
    own), so temporal=0.5 merges each into the unit it repeats, which stays in the earlier frame's chunk; the
    budget is then split over the frames as before the language model. Rows stay independent."""
    model = tiny_qwen()
    inputs = with_frames(video_batch().inputs(), [0, 0, 2, 2])
    vtr.patch(model, "fastv", budget=6, tower_layer=0, temporal=0.5)
    together = generate(model, inputs)
    report = vtr.report(model)
    assert report.frame_tokens[1] == [3, 0, 3, 0] and report.size[1, :6].tolist() == [2.0] * 6
    alone = generate(model, with_frames(video_batch().inputs([0]), [0, 0, 2, 2]))
    torch.testing.assert_close(logits(together)[0], logits(alone)[0], atol=1e-5, rtol=0)
    vtr.unpatch(model)


# -- the blocks after K: windows and rotary embeddings of the kept units -----------------------------------

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def reference_block(block, inv_freq: torch.Tensor, x: torch.Tensor, positions: torch.Tensor,
                    chunk: torch.Tensor) -> torch.Tensor:
    """A Qwen2.5-VL vision block in float64, written out: each patch attends to the patches of its own ``chunk``
    (an explicit mask), with 2-D rotary angles from its (h, w) ``positions``."""
    block = copy.deepcopy(block).double()
    x = x.double()
    n, heads = x.shape[0], block.attn.num_heads
    q, k, v = block.attn.qkv(block.norm1(x)).reshape(n, 3, heads, -1).permute(1, 2, 0, 3)   # [H, n, d] each
    angles = positions.double()[..., None] * inv_freq.double()                          # [n, 2, d/4]
    angles = torch.cat([angles[:, 0], angles[:, 1]], dim=-1)
    angles = torch.cat([angles, angles], dim=-1)                                        # [n, d]
    q, k = (t * angles.cos() + rotate_half(t) * angles.sin() for t in (q, k))
    logits_ = (q @ k.transpose(1, 2)) * q.shape[-1] ** -0.5
    logits_ = logits_.masked_fill(chunk[:, None] != chunk[None, :], float("-inf"))
    out = (logits_.softmax(-1) @ v).transpose(0, 1).reshape(n, -1)
    x = x + block.attn.proj(out)
    return x + block.mlp(block.norm2(x))


def test_blocks_after_k_attend_in_their_recomputed_windows(monkeypatch):
    """Depth 4, full attention at blocks 1 and 3, windows of 2 x 2 units: an image of 4 x 6 units (2 x 3 windows)
    keeps 7 units after block 1, unevenly over its windows (one keeps none). Block 2 (windowed) and block 3 (full)
    on the kept patches equal a float64 transcription with each window's own kept units, in window order."""
    model = tiny_qwen(depth=4, full=(1, 3))
    grid, rows, cols = (1, 8, 12), 4, 6
    raster = torch.zeros(rows * cols)
    chosen = [0, 1, 6, 7, 2, 3, 16]      # window (0,0) keeps 4, window (0,1) 2, window (1,0) 1, the others none
    raster[chosen] = torch.arange(10.0, 10.0 + len(chosen))
    monkeypatch.setattr(received, "received_per_patch", unit_scores(model, grid, raster))
    vtr.patch(model, "fastv", budget=7, tower_layer=1)
    seen = {}
    for index in (2, 3):
        model.model.visual.blocks[index].register_forward_hook(
            lambda module, args, kwargs, output, index=index: seen.__setitem__(index, (args[0], output)),
            with_kwargs=True)
    generate(model, one_image(grid).inputs())
    assert sorted((vtr.report(model).assignment[0] >= 0).nonzero().flatten().tolist()) == sorted(chosen)
    # The kept units in window order (windows row by row, units row by row inside), four patches each.
    window_of = lambda u: (u // cols // 2, u % cols // 2)                                   # noqa: E731
    units = sorted(chosen, key=lambda u: (*window_of(u), u))
    positions = torch.tensor([[2 * (u // cols) + dh, 2 * (u % cols) + dw] for u in units for dh in (0, 1)
                              for dw in (0, 1)])
    windows = torch.tensor([window_of(u)[0] * 3 + window_of(u)[1] for u in units]).repeat_interleave(4)
    inv_freq = model.model.visual.rotary_pos_emb.inv_freq
    blocks = model.model.visual.blocks
    for index, chunk in ((2, windows), (3, torch.zeros_like(windows))):
        x, out = seen[index]
        assert x.shape[0] == 4 * len(chosen)
        torch.testing.assert_close(out.double(), reference_block(blocks[index], inv_freq, x, positions, chunk),
                                   atol=2e-5, rtol=0)
    vtr.unpatch(model)


def test_the_received_score_is_block_ks_attention_per_unit_scaled_by_its_window(monkeypatch):
    """An image of 3 x 4 units at K=0 (windowed: windows of 16, 16, 8 and 8 patches): the score a unit gets is the
    mean over its four patches of the attention each receives in block 0 (head and query mean inside its window),
    times its window's length; here from a float64 transcription with an explicit window mask, in raster order."""
    model = tiny_qwen()
    grid, rows, cols = (1, 6, 8), 3, 4
    seen, inputs = {}, {}
    reduce_items = before_lm.reduce_items

    def spy(reduction, items, queries, cost, received_scores):   # what the decision is given
        seen["scores"] = received_scores
        return reduce_items(reduction, items, queries, cost, received_scores)
    monkeypatch.setattr(before_lm, "reduce_items", spy)
    vtr.patch(model, "fastv", budget=5, tower_layer=0)
    model.model.visual.blocks[0].attn.register_forward_hook(
        lambda module, args, kwargs, output: inputs.setdefault("x", args[0]), with_kwargs=True)
    generate(model, one_image(grid).inputs())
    vtr.unpatch(model)
    window = received.window_index(model.model.visual, torch.tensor([grid]))
    x = inputs["x"].double().view(-1, 4, 32)[torch.argsort(window)].reshape(-1, 32)       # patches, raster units
    units = torch.arange(rows * cols).repeat_interleave(4)
    offsets = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]]).repeat(rows * cols, 1)
    positions = torch.stack([2 * (units // cols), 2 * (units % cols)], dim=1) + offsets
    chunk = (units // cols // 2) * 2 + units % cols // 2
    attention = copy.deepcopy(model.model.visual.blocks[0].attn).double()
    q, k, _ = attention.qkv(x).reshape(len(x), 3, 4, -1).permute(1, 2, 0, 3)
    angles = positions.double()[..., None] * model.model.visual.rotary_pos_emb.inv_freq.double()
    angles = torch.cat([angles[:, 0], angles[:, 1]], dim=-1).repeat(1, 2)
    q, k = (t * angles.cos() + rotate_half(t) * angles.sin() for t in (q, k))
    same = chunk[:, None] == chunk[None, :]
    weights = ((q @ k.transpose(1, 2)) * q.shape[-1] ** -0.5).masked_fill(~same, float("-inf")).softmax(-1)
    size = same.sum(1).double()                                                     # each patch's window length
    per_patch = (weights.sum(dim=(0, 1)) / (4 * size)) * size                       # mean over heads and queries
    expected = per_patch.view(-1, 4).mean(1)
    torch.testing.assert_close(seen["scores"][0].double(), expected, atol=1e-5, rtol=1e-4)


# -- Qwen3-VL: DeepStack ----------------------------------------------------------------------------------

def deepstack_seen(model, inputs: dict) -> list:
    """The DeepStack levels the language model receives (one tensor per level, the visual tokens in order)."""
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("deepstack_visual_embeds")), with_kwargs=True)
    with torch.inference_mode():
        model(**inputs)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("layer", [0, 1])
def test_qwen3_deepstack_levels_follow_the_kept_units(layer):
    """DeepStack at blocks 0 and 1 (depth 3). Every level has the kept units only; a level taken before block K
    (ran on every unit) is gathered with the same selection, a merged unit's the mean of its units'; at K the
    kept units' own level is the unpatched one; after K it ran on the kept units only (so it differs)."""
    model = q3.tiny_qwen3()
    inputs = q3.batch([[1, 5, ("image", 0), 7, 8]], image_grids=[(1, 8, 8)]).inputs()
    with torch.inference_mode():
        unpatched = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                   return_dict=True)
    full = [level[0] for level in unpatched.deepstack_features]                   # [16, D] per level
    vtr.patch(model, "visionzip", budget=6, tower_layer=layer)
    levels = deepstack_seen(model, inputs)
    report = vtr.report(model)
    assignment = report.assignment[0]
    kept = int(report.image_tokens_after[0])
    carried = (assignment[None, :] == torch.arange(kept)[:, None]).float()       # [kept, 16] units each carries
    assert (carried.sum(1) > 1).any()                          # a contextual unit carries several
    first = carried.argmax(1)                                  # each output's representative
    for block, level in zip(q3.DEEPSTACK, levels):
        assert level.shape[0] == kept
        if block < layer:
            expected = (carried / carried.sum(1, keepdim=True)) @ full[block]
            torch.testing.assert_close(level, expected, atol=1e-5, rtol=0)
        else:
            alone = carried.sum(1) == 1                        # a unit kept as it was
            if block == layer:
                torch.testing.assert_close(level[alone], full[block][first[alone]], atol=1e-5, rtol=0)
            else:
                # float32 noise is ~1e-7 here; the block after K attending to the kept units only moves it more
                assert float((level[alone] - full[block][first[alone]]).abs().max()) > 1e-5
    vtr.unpatch(model)


# -- what it costs -------------------------------------------------------------------------------------------

def measured_macs(fn) -> float:
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.inference_mode():
        fn()
    return counter.get_total_flops() / 2


@pytest.mark.parametrize("build, layer", [(tiny_qwen, 0), (tiny_qwen2, 0), (q3.tiny_qwen3, 1)])
def test_the_tower_macs_are_what_a_flop_counter_measures(build, layer):
    """A reference-sized image (16 x 16 units) keeping 64 units with random (whose decision has no MACs): the report's
    tower MACs as run and unreduced are the counter's; ``vtr.expected_flops`` adds the same tower counts (the blocks
    after K are full attention here, so its assumption of units spread evenly over the windows does not matter)."""
    model = build()
    side = 32
    grid = torch.tensor([[1, side, side]])
    values = q3.PATCH_VALUES if build is q3.tiny_qwen3 else 3 * 2 * 14 * 14
    pixels = torch.randn(side * side, values, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1, 5, 92] + [90] * 256 + [93, 7]])
    unreduced = measured_macs(lambda: model.model.get_image_features(pixels, grid))
    vtr.patch(model, "random", budget=64)
    language, language_unreduced = vtr.expected_flops(model)      # after the tower: the language model's alone
    vtr.unpatch(model)
    vtr.patch(model, "random", budget=64, tower_layer=layer)
    as_run = measured_macs(lambda: before_lm.prepare(model, ids, None, None, None, True, pixel_values=pixels,
                                                     image_grid_thw=grid))
    report = vtr.report(model)
    assert report.tower_macs == pytest.approx(as_run, rel=1e-9)
    assert report.tower_macs_unreduced == pytest.approx(unreduced, rel=1e-9)
    assert as_run < unreduced
    assert tower.expected_macs(model, model._vtr, 16) == pytest.approx((as_run, unreduced), rel=1e-9)
    assert vtr.expected_flops(model) == pytest.approx((language + as_run, language_unreduced + unreduced), rel=1e-9)
    vtr.unpatch(model)


# -- settings ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, settings, message", [
    ("fastv", {"budget": 4, "tower_layer": -1}, r"tower_layer must be an int in \[0, 1\]"),
    ("fastv", {"budget": 4, "tower_layer": 2}, r"tower_layer must be an int in \[0, 1\]"),
    ("fastv", {"budget": 4, "tower_layer": 1.0}, r"tower_layer must be an int in \[0, 1\]"),
    ("fastv", {"budget": 4, "tower_layer": True}, r"tower_layer must be an int in \[0, 1\]"),
    ("fastv", {"tower_layer": 0}, r"tower_layer= needs budget= as one int"),
    ("fastv", {"budget": [8, 4], "tower_layer": 0}, r"tower_layer= needs budget= as one int"),
    ("fastv", {"budget": 4, "tower_layer": 0, "layers": [1]}, "give one of them"),
    ("query", {"budget": 4, "tower_layer": 0}, "needs a text query"),
    ("hired", {"budget": 4, "tower_layer": 0}, "needs a partition"),
    ("cdpruner", {"budget": 4, "tower_layer": 0}, "does not act in a vision tower"),
    ("dart", {"budget": 4, "tower_layer": 0}, "does not act in a vision tower"),
    ("pool", {"factor": 2, "tower_layer": 0}, "cannot reduce inside the Qwen-VL tower"),
])
def test_bad_settings_are_clear_errors(method, settings, message):
    model = tiny_qwen()
    with pytest.raises(ValueError, match=message):
        vtr.patch(model, method, **settings)
    assert not vtr.is_patched(model)


def test_families_that_do_not_reduce_inside_their_tower_say_so():
    from llava_models import tiny_llava
    with pytest.raises(ValueError, match="tower_layer= .* not supported by the llava adapter; Qwen2-VL"):
        vtr.patch(tiny_llava(), "fastv", budget=4, tower_layer=0)
