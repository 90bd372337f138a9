"""LLaVA-NeXT (AnyRes): an exact budget per image, split over the thumbnail and the crops; generate() unchanged."""
import json

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import vtr
from vtr.adapters.llava import anyres
from vtr.adapters.llava.anyres import crop_importance
from vtr.budget.visual import split_budget
from vtr.adapters.llava.common import largest_image_tokens, layout
from vtr.reducers import REDUCERS

from conftest import call_state
from llava_models import IMAGE_TOKEN, FeatureCapture, generate, held_tensors, logits, pooled, tiny_llava
from llava_next_models import PINPOINTS, batch, image_counts, model_for, run, tiny_llava_next

LARGEST = 16 + 8 * 9        # a 112 x 112 image: thumbnail 4x4, 2x2 crops -> an 8x8 map, a newline per row
MIXED = [([1, 5], [(50, 120), (112, 112)], [7, 8]),     # two images: 52 and 88 tokens
         ([1, 5, 6, 9, 10], [(90, 40)], [7, 12]),         # one tall image: 56 tokens
         ([1, 20, 21, 22], [], [23])]                      # text only


def test_layout_follows_transformers_packing():
    model = model_for()
    for size in [(50, 120), (112, 112), (90, 40), (300, 20), (56, 56), (400, 16)]:
        geometry = layout(model, size)
        assert geometry.num_tokens == image_counts(model, torch.zeros(1, 5, 3, 56, 56), torch.tensor([size]))[0]
        assert (geometry.source < 0).sum() == geometry.rows and geometry.source[-1] == -1
        assert geometry.positions(0).tolist() == list(range(16))
        crops = geometry.crop_tokens()
        assert sum(crops) == geometry.rows * geometry.cols and max(crops) <= 16
        for c, n in enumerate(crops):
            if n:
                rows, cols = geometry.grid(1 + c)
                assert rows * cols == n
    assert largest_image_tokens(model) == LARGEST
    thin = layout(model, (16, 400))           # unpadding leaves no row: the thumbnail alone, no newline
    assert (thin.num_tokens, thin.rows, thin.crop_tokens()) == (16, 0, [0, 0])


def test_nothing_to_reduce_matches_unpatched_tokens_and_logits():
    model = model_for()
    ids, mask, pixel_values, image_sizes = batch(model, MIXED)
    expected = run(model, ids, mask, pixel_values, image_sizes)
    for method, amount in [("none", {}), ("tome", {"budget": LARGEST}), ("random", {"budget": 88})]:
        vtr.patch(model, method, **amount)
        out = run(model, ids, mask, pixel_values, image_sizes)
        assert torch.equal(out.sequences, expected.sequences), method
        assert torch.equal(logits(out), logits(expected)), method
        report = vtr.report(model)
        assert report.visual_tokens_after.tolist() == report.visual_tokens_before.tolist() == [140, 56, 0]
        assert all(split.passed_through for split in report.anyres)
        assert report.prefill_flops_saved == pytest.approx(0.0)
        vtr.unpatch(model)


def test_an_image_within_the_budget_passes_through_untouched():
    model = model_for()
    ids, mask, pixel_values, image_sizes = batch(model, MIXED)
    vtr.patch(model, "tome", budget=60)          # 52 and 56 fit, 88 is reduced
    capture = FeatureCapture(model)
    run(model, ids, mask, pixel_values, image_sizes)
    capture.remove()
    report = vtr.report(model)
    assert report.image_tokens_before.tolist() == [52, 88, 56]
    assert report.image_tokens_after.tolist() == [52, 60, 56]
    assert [s.passed_through for s in report.anyres] == [True, False, True]
    vtr.unpatch(model)
    with torch.inference_mode():
        unreduced = model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes).pooler_output
    assert torch.equal(capture.features[0], unreduced[0]) and torch.equal(capture.features[2], unreduced[2])


def test_a_budget_between_content_and_count_drops_only_the_first_newlines():
    model = model_for()
    ids, mask, pixel_values, image_sizes = batch(model, [([1], [(112, 112)], [2])])
    vtr.patch(model, "tome", budget=LARGEST - 3)      # 80 thumbnail and crop tokens + 5 of the 8 newlines
    capture = FeatureCapture(model)
    run(model, ids, mask, pixel_values, image_sizes)
    capture.remove()
    split = vtr.report(model).anyres[0]
    assert (split.newlines_kept, split.crop_budgets, split.base_kept) == (5, [16, 16, 16, 16], 16)
    vtr.unpatch(model)
    with torch.inference_mode():
        full = model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes).pooler_output[0]
    source = layout(model, (112, 112)).source
    first_newlines = (source < 0).nonzero()[:3, 0]
    keep = torch.ones(LARGEST, dtype=torch.bool)
    keep[first_newlines] = False
    assert torch.equal(capture.features[0], full[keep])


METHODS = ["tome", "pitome", "evit", "fastv", "random", "query", "hired"]
SIDES = st.integers(16, 400)


@settings(max_examples=25, deadline=None)
@given(method=st.sampled_from(METHODS), sizes=st.lists(st.tuples(SIDES, SIDES), min_size=1, max_size=3),
       budget=st.integers(anyres.MIN_BUDGET, LARGEST))
@example(method="pitome", sizes=[(16, 16), (16, 129)], budget=3)   # a thumbnail-only image: no newline at all
def test_budget_is_exact_per_image(method, sizes, budget):
    model = model_for()
    rows = [([1, 5], sizes[:2], [7]), ([3], sizes[2:], [8, 9])]
    ids, mask, pixel_values, image_sizes = batch(model, rows)
    counts = image_counts(model, pixel_values, image_sizes)
    vtr.patch(model, method, budget=budget)
    capture = FeatureCapture(model)
    out = run(model, ids, mask, pixel_values, image_sizes, max_new_tokens=1)
    capture.remove()
    report = vtr.report(model)
    newline = model.model.image_newline
    expected = [min(budget, n) for n in counts]

    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)
    assert [len(f) for f in capture.features] == expected == report.image_tokens_after.tolist()
    assert report.visual_tokens_after.tolist() == [sum(expected[:len(sizes[:2])]), sum(expected[2:])]
    compacted = [(ids[r, p[p >= 0]] == IMAGE_TOKEN).sum() for r, p in enumerate(report.kept_positions)]
    assert compacted == report.visual_tokens_after.tolist()
    for i, (split, features) in enumerate(zip(report.anyres, capture.features)):
        assert split.tokens_before == counts[i] and split.tokens_after == expected[i]
        assert all(0 <= b <= n for b, n in zip(split.crop_budgets, split.crop_tokens))
        assert 1 <= split.base_kept <= split.base_tokens
        if split.newline_tokens:
            assert torch.equal(features[-1], newline.to(features))          # ends with a newline, as always
        if not split.passed_through and split.newlines_kept <= 1:
            assert sum(split.crop_budgets) + split.base_kept == budget - split.newlines_kept
        # Provenance: each kept token's size is the number of original tokens it carries.
        assignment, size = report.assignment[i, : counts[i]], report.size[i, : expected[i]]
        carried = torch.bincount(assignment[assignment >= 0], minlength=expected[i]).float()
        assert torch.equal(carried, size)
        assert (report.assignment[i, counts[i]:] == -1).all() and (report.size[i, expected[i]:] == 0).all()
        # No newline is ever merged: every kept newline carries itself alone.
        source = layout(model, sizes[i]).source
        newline_slots = assignment[(source < 0) & (assignment >= 0)]
        assert (size[newline_slots] == 1).all()
        if split.newline_tokens:            # the final newline stays last (a very thin image has none)
            assert assignment[-1] == expected[i] - 1


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_split_budget_is_exact_capped_and_follows_the_weights(data):
    num_crops = data.draw(st.integers(1, 6))
    crop_tokens = data.draw(st.lists(st.integers(0, 30), min_size=num_crops, max_size=num_crops))
    base_tokens = data.draw(st.integers(1, 30))
    crop_tokens[0] = max(crop_tokens[0], 2)       # at least 3 tokens, so that some budget reduces
    available = data.draw(st.integers(2, base_tokens + sum(crop_tokens) - 1))
    weights = torch.tensor(data.draw(st.lists(st.floats(0.0, 1.0), min_size=num_crops, max_size=num_crops)))
    base, crops = split_budget(available, base_tokens, crop_tokens, weights)

    assert base + sum(crops) == available
    assert 1 <= base <= base_tokens and sum(crops) >= 1
    assert all(0 <= b <= n for b, n in zip(crops, crop_tokens))
    for i in range(num_crops):
        for j in range(num_crops):
            if weights[i] > weights[j] and crop_tokens[i] >= crop_tokens[j]:
                assert crops[i] >= crops[j], (i, j, crops)


def test_split_budget_gives_the_base_its_token_share_and_rejects_bad_totals():
    assert split_budget(20, 16, [16, 16, 16, 16], torch.ones(4)) == (4, [4, 4, 4, 4])
    assert split_budget(2, 16, [16, 16], torch.tensor([1.0, 0.0])) == (1, [1, 0])
    for available in (1, 80):
        with pytest.raises(ValueError, match=r"available must be in \[2, 79\]"):
            split_budget(available, 16, [16, 16, 16, 16], torch.ones(4))


def test_crop_importance_is_the_thumbnail_attention_over_each_crops_region():
    model = model_for()
    square = layout(model, (112, 112))                      # 2x2 crops, nothing unpadded
    attention = torch.zeros(16)
    attention[0] = 1.0                                      # the thumbnail's top-left token
    assert crop_importance(square, attention).tolist() == [1.0, 0.0, 0.0, 0.0]
    attention = torch.rand(16)
    quadrants = attention.view(2, 2, 2, 2).sum(dim=(1, 3)).flatten()   # [top-left, top-right, ...]
    torch.testing.assert_close(crop_importance(square, attention), quadrants.double())
    for size in [(50, 120), (90, 40), (200, 90), (16, 28)]:
        geometry = layout(model, size)
        importance = crop_importance(geometry, attention)
        torch.testing.assert_close(importance.sum(), attention.sum().double())   # crops cover the image
        assert all(w == 0 for w, n in zip(importance.tolist(), geometry.crop_tokens()) if n == 0)


def test_crops_the_thumbnail_attends_to_get_the_larger_budgets(recording):
    """The split follows the base image's CLS attention, read from the eager tower's attention maps."""
    model = model_for("eager")
    ids, mask, pixel_values, image_sizes = batch(model, [([1], [(112, 112), (50, 120)], [2])], seed=3)
    vtr.patch(model, "fastv", budget=24)
    run(model, ids, mask, pixel_values, image_sizes, max_new_tokens=1)
    report = vtr.report(model)
    vtr.unpatch(model)
    with torch.inference_mode():
        crops = torch.cat([pixel_values[0, :5], pixel_values[1, :3]])
        maps = model.model.vision_tower(crops, output_attentions=True).attentions[0]   # the layer LLaVA reads
    thumbnails = maps[[0, 5], :, 0, 1:].mean(dim=1)
    for i, size in enumerate([(112, 112), (50, 120)]):
        split = report.anyres[i]
        expected = crop_importance(layout(model, size), thumbnails[i])
        weights = torch.tensor(split.crop_weights, dtype=torch.float64)
        torch.testing.assert_close(weights, expected, atol=1e-6, rtol=1e-5)
        for a, b in [(a, b) for a in range(len(expected)) for b in range(len(expected))]:
            if expected[a] > expected[b] and split.crop_tokens[a] >= split.crop_tokens[b]:
                assert split.crop_budgets[a] >= split.crop_budgets[b]


def test_each_part_gets_its_own_signals(recording):
    cls = recording("_rec_next", {"cls_attention", "query"})
    model = model_for("eager")
    ids, mask, pixel_values, image_sizes = batch(model, [([1, 5], [(50, 120)], [7, 8])])
    vtr.patch(model, "_rec_next", budget=10)
    run(model, ids, mask, pixel_values, image_sizes, max_new_tokens=1)
    split = vtr.report(model).anyres[0]
    vtr.unpatch(model)
    with torch.inference_mode():
        maps = model.model.vision_tower(pixel_values[0, :3], output_attentions=True).attentions[0]
    cls_rows = maps[:, :, 0, 1:].mean(dim=1)                 # [base, crop 0, crop 1] x 16
    geometry = layout(model, (50, 120))
    text = model.get_input_embeddings()(torch.tensor([1, 5, 7, 8]))
    budgets, tokens = [split.base_kept] + split.crop_budgets, [16] + split.crop_tokens
    parts = [part for part, (b, n) in enumerate(zip(budgets, tokens)) if 0 < b < n]
    assert len(cls.seen) == len(parts) == 3
    for signals, part in zip(cls.seen, parts):
        within = geometry.source[geometry.positions(part)] % 16
        torch.testing.assert_close(signals.cls_attention[0], cls_rows[part, within], atol=1e-6, rtol=1e-5)
        assert signals.grid == geometry.grid(part)
        torch.testing.assert_close(signals.query[0], text)


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_batch_with_left_padding_equals_each_row_alone(positions, attn):
    """Rows keep different numbers of tokens (images of different sizes, a text-only row); each row's
    prefill and decode logits equal the row run alone by the unpatched model on its compacted prompt (with the positions the batch gave it)
    with the same features."""
    model = model_for(attn)
    ids, mask, pixel_values, image_sizes = batch(model, MIXED)
    vtr.patch(model, "pitome", budget=30, positions=positions)
    capture = FeatureCapture(model)
    batched = run(model, ids, mask, pixel_values, image_sizes)
    capture.remove()
    report = vtr.report(model)
    assert report.visual_tokens_after.tolist() == [60, 30, 0]
    vtr.unpatch(model)

    for row in range(ids.shape[0]):
        columns = report.kept_positions[row]
        row_ids = ids[row, columns[columns >= 0]][None]
        images = [f for f, r in zip(capture.features, report.image_rows.tolist()) if r == row]
        alone_inputs = {"mm_encoder_outputs": {"image": pooled(images)}} if images else {}
        alone = generate(model, row_ids, torch.ones_like(row_ids), **alone_inputs, **capture.alone(row, columns))
        torch.testing.assert_close(logits(batched)[row], logits(alone)[0], atol=1e-5, rtol=0)
        assert torch.equal(batched.sequences[row, ids.shape[1]:], alone.sequences[0, row_ids.shape[1]:])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_patched_row_alone_equals_its_row_in_the_batch(attn):
    model = model_for(attn)
    ids, mask, pixel_values, image_sizes = batch(model, MIXED)
    vtr.patch(model, "query", budget=25)
    batched = run(model, ids, mask, pixel_values, image_sizes)
    first = 0
    for row, count in enumerate([2, 1, 0]):
        real = mask[row].bool()
        kwargs = {"pixel_values": pixel_values[first:first + count],
                  "image_sizes": image_sizes[first:first + count]} if count else {}
        alone = generate(model, ids[row, real][None], mask[row, real][None], **kwargs)
        torch.testing.assert_close(logits(batched)[row], logits(alone)[0], atol=1e-5, rtol=0)
        first += count


def test_save_pretrained_round_trip_unpatch_and_expected_flops(tmp_path):
    model = model_for()
    ids, mask, pixel_values, image_sizes = batch(model, MIXED)
    cls, state = type(model), {k: v.clone() for k, v in model.state_dict().items()}
    expected = run(model, ids, mask, pixel_values, image_sizes)
    unreduced_flops = vtr.expected_flops(model)

    vtr.patch(model, "tome", budget=20)
    reduced = run(model, ids, mask, pixel_values, image_sizes)
    assert torch.equal(reduced.sequences[:, : ids.shape[1]], ids)
    assert 0 < vtr.report(model).prefill_flops_saved < 1
    flops, unreduced = vtr.expected_flops(model)
    assert flops < unreduced == unreduced_flops[0]
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [cls.__name__]
    loaded = cls.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    vtr.patch(loaded, "tome", budget=20)
    torch.testing.assert_close(logits(run(loaded, ids, mask, pixel_values, image_sizes)), logits(reduced))

    vtr.unpatch(model)
    assert type(model) is cls and not hasattr(model, "_vtr")
    out = run(model, ids, mask, pixel_values, image_sizes)
    assert torch.equal(out.sequences, expected.sequences) and torch.equal(logits(out), logits(expected))


@pytest.mark.parametrize("budget", [0, 2, LARGEST + 1, 2.5, True, "64"])
def test_bad_budget_names_the_allowed_range(budget):
    model = model_for()
    with pytest.raises(ValueError, match=rf"budget must be an int in \[3, {LARGEST}\]"):
        vtr.patch(model, "tome", budget=budget)
    assert not vtr.is_patched(model)


def test_bad_calls_and_unsupported_options_are_clear_errors():
    model = model_for()
    ids, mask, pixel_values, image_sizes = batch(model, MIXED)
    vtr.patch(model, "fastv", budget=20, layers=[1])      # in-LLM pruning: tests/test_llava_next_prune.py
    vtr.unpatch(model)
    for layers in (None, [1]):
        with pytest.raises(ValueError, match="'pool' sets its own token count"):
            vtr.patch(model, "pool", budget=20, factor=2, layers=layers)
    assert not vtr.is_patched(model)
    vtr.patch(model, "tome", budget=20)
    with pytest.raises(ValueError, match="needs image_sizes"):
        generate(model, ids, mask, pixel_values=pixel_values)
    with pytest.raises(ValueError, match="one \\(height, width\\) per image"):
        run(model, ids, mask, pixel_values, image_sizes[:2])
    with pytest.raises(ValueError, match="image tokens"):
        run(model, ids[:, 10:], mask[:, 10:], pixel_values, image_sizes)
    vtr.unpatch(model)
    one_five = tiny_llava()
    vtr.patch(one_five, "tome", budget=4)
    with pytest.raises(vtr.UnsupportedModelError, match="image_sizes"):
        generate(one_five, *batch(model, MIXED)[:2], pixel_values=torch.zeros(3, 3, 56, 56),
                 image_sizes=torch.tensor([[56, 56]] * 3))


def test_unsupported_variants_are_clear_errors():
    """A bare LlavaNextModel and the 'full' strategy are refused (LLaVA-OneVision and NeXT-Video are supported:
    tests/adapters/test_llava_video.py)."""
    model = model_for()
    with pytest.raises(vtr.UnsupportedModelError, match="is not supported"):
        vtr.patch(model.model, "tome", budget=20)
    with pytest.raises(vtr.UnsupportedModelError, match="'default' only"):
        vtr.patch(tiny_llava_next(vision_feature_select_strategy="full"), "tome", budget=20)


def test_every_budget_method_runs_on_llava_next():
    """Each registered method that takes a budget lands on it exactly, image by image."""
    model = model_for()
    ids, mask, pixel_values, image_sizes = batch(model, MIXED)
    learned = {m for m, cls in REDUCERS.items() if cls.learned}   # refused on LLaVA (issue 12)
    for method in sorted(set(REDUCERS) - {"none", "pool"} - {m for m in REDUCERS if m.startswith("_")} - learned):
        vtr.patch(model, method, budget=7)
        run(model, ids, mask, pixel_values, image_sizes, max_new_tokens=1)
        assert vtr.report(model).visual_tokens_after.tolist() == [14, 7, 0], method
        vtr.unpatch(model)


def test_forward_runs_on_the_compacted_prompt_with_labels():
    model = model_for()
    ids, mask, pixel_values, image_sizes = batch(model, MIXED)
    vtr.patch(model, "evit", budget=12)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=image_sizes,
                    labels=ids.masked_fill(mask == 0, -100))
    report = vtr.report(model)
    assert out.logits.shape[:2] == report.kept_positions.shape and torch.isfinite(out.loss)
    assert report.visual_tokens_after.tolist() == [24, 12, 0]


def test_plan_follows_the_weights_and_hands_on_what_a_crop_cannot_take():
    square = layout(model_for(), (112, 112))           # 16 thumbnail tokens, 4 crops of 16, 8 newlines
    split = anyres.plan(square, 24, torch.tensor([0.7, 0.1, 0.1, 0.1]))
    assert (split.base_kept, split.crop_budgets, split.newlines_kept) == (5, [12, 2, 2, 2], 1)
    split = anyres.plan(square, 40, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert (split.base_kept, split.crop_budgets) == (8, [16, 5, 5, 5])      # crop 0 is full: the rest go on
    assert anyres.plan(square, None, None).passed_through


def test_without_a_cls_attention_the_crops_share_by_token_count():
    model = tiny_llava_next(vision_feature_layer=[-2, -1])      # two feature layers: no single attention row
    ids, mask, pixel_values, image_sizes = batch(model, [([1], [(50, 120), (112, 112)], [2])])
    with pytest.raises(vtr.UnsupportedModelError, match="int vision_feature_layer"):
        vtr.patch(model, "evit", budget=20)
    vtr.patch(model, "tome", budget=20)
    run(model, ids, mask, pixel_values, image_sizes, max_new_tokens=1)
    splits = vtr.report(model).anyres
    assert [s.crop_weights for s in splits] == [None, None]
    assert [(s.base_kept, s.crop_budgets) for s in splits] == [(6, [7, 6]), (4, [4, 4, 4, 3])]   # ties: first crop


@pytest.mark.parametrize("amount", [{"budget": 20}, {"budget": 20, "layers": [1, 2]}])
def test_after_a_call_the_model_holds_no_tensor_of_it(amount):
    """The thumbnail's attention (kept by hooks for the call), the split and the pruning all end with the
    call: every tensor the model holds afterwards it held before, and no run, token state or report
    hangs from it."""
    model = model_for()
    ids, mask, pixel_values, image_sizes = batch(model, MIXED)
    vtr.patch(model, "tome", **amount)
    before = held_tensors(model)
    run(model, ids, mask, pixel_values, image_sizes, max_new_tokens=2)
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=image_sizes)
    assert held_tensors(model).keys() <= before.keys()
    assert call_state(model) == []
    assert vtr.report(model).image_tokens_after.tolist() == [20, 20, 20]


@pytest.mark.parametrize("allocate_layer", [0, 1])
def test_hired_splits_the_budget_by_its_allocate_layer(allocate_layer):
    """HiRED allocates early and selects late: the crops share by the thumbnail's CLS attention at
    ``allocate_layer`` (here 1, a layer after the one LLaVA reads, so the two differ), then each part
    keeps its tokens by the feature layer's attention."""
    model = model_for("eager")
    ids, mask, pixel_values, image_sizes = batch(model, [([1], [(112, 112)], [2])], seed=3)
    vtr.patch(model, "hired", budget=24, allocate_layer=allocate_layer)
    run(model, ids, mask, pixel_values, image_sizes, max_new_tokens=1)
    split = vtr.report(model).anyres[0]
    vtr.unpatch(model)
    with torch.inference_mode():
        maps = model.model.vision_tower(pixel_values[0, :5], output_attentions=True).attentions
    expected = crop_importance(layout(model, (112, 112)), maps[allocate_layer][0, :, 0, 1:].mean(dim=0))
    other = crop_importance(layout(model, (112, 112)), maps[1 - allocate_layer][0, :, 0, 1:].mean(dim=0))
    assert not torch.allclose(expected, other, atol=1e-3)      # the two layers would split differently
    torch.testing.assert_close(torch.tensor(split.crop_weights, dtype=torch.float64), expected, atol=1e-6, rtol=1e-5)


def test_an_allocate_layer_outside_the_tower_is_refused_at_patch_time():
    model = model_for()
    with pytest.raises(ValueError, match=r"hired: allocate_layer must be a layer of the vision tower, in \[0, 1\], got 2"):
        vtr.patch(model, "hired", budget=24, allocate_layer=2)
    assert not vtr.is_patched(model)
    with pytest.raises(ValueError, match="allocate_layer must be a vision-tower layer index >= 0"):
        vtr.patch(model, "hired", budget=24, allocate_layer=-1)
