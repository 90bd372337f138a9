"""In-LLM pruning (``layers=``) on LLaVA-NeXT: images with different token counts in one batch.

``budget=B`` keeps min(B, count) visual tokens of each image after the last stage; every row of a
left-padded batch equals the row alone; the result equals a segment-by-segment reference of the
unpatched layers; budgets that keep everything equal the unpatched model.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vtr
from vtr.adapters.llava.in_llm import image_budgets, stage_budgets

from llava_models import (GENERATE, IMAGE_TOKEN, assert_each_row_equals_it_alone, generate, logits,
                           segment_reference)
from llava_next_models import batch, image_counts, model_for, run

LARGEST = 88                 # a 112 x 112 image
MIXED = [([1, 5], [(50, 120), (16, 400)], [7, 8]),     # two images: 52 and 16 tokens (the thin one: thumbnail only)
         ([1, 5, 6, 9, 10], [(90, 40)], [7, 12]),         # one tall image: 56 tokens
         ([1, 20, 21, 22], [], [23])]                      # text only
COUNTS = [52, 16, 56]


def kept_per_image(budget, count: int, num_stages: int) -> list[int]:
    """What each stage should keep of an image of ``count`` tokens, written out from the rules."""
    if isinstance(budget, list):
        return [min(b, count) for b in budget]
    return [count] * num_stages if count <= budget else stage_budgets(budget, count, 0, num_stages)


def test_mixed_batch_has_different_counts_per_image():
    model = model_for()
    _, _, pixel_values, image_sizes = batch(model, MIXED)
    assert image_counts(model, pixel_values, image_sizes) == COUNTS


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method, layers, budget", [("fastv", [1], 20), ("tome", [0, 2], 20),
                                                    ("fastv", [1, 3], [40, 20])])
def test_batch_with_left_padding_equals_each_row_alone(attn, method, layers, budget):
    model = model_for(attn)
    ids, mask, pixel_values, image_sizes = batch(model, MIXED)
    vtr.patch(model, method, budget=budget, layers=layers)
    batched = run(model, ids, mask, pixel_values, image_sizes)
    report = vtr.report(model)
    assert report.image_tokens_before.tolist() == COUNTS
    assert report.image_tokens_after.tolist() == [20, 16, 20]
    assert report.visual_tokens_before.tolist() == [68, 56, 0] and report.visual_tokens_after.tolist() == [36, 20, 0]
    assert report.image_rows.tolist() == [0, 0, 1]
    assert_each_row_equals_it_alone(model, ids, mask, pixel_values, batched, [2, 1, 0], image_sizes=image_sizes)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method, layers, budget", [("fastv", [2], 20), ("random", [0, 2], 24),
                                                    ("fastv", [1, 2, 3], [50, 30, 10])])
def test_prefill_and_decode_equal_the_segment_reference(attn, method, layers, budget):
    """Dropping methods: each kept token goes on with its own hidden state, as in the reference."""
    model = model_for(attn)
    ids, mask, pixel_values, image_sizes = batch(model, MIXED[:1])
    vtr.patch(model, method, budget=budget, layers=layers)
    out = run(model, ids, mask, pixel_values, image_sizes)
    report = vtr.report(model)
    vtr.unpatch(model)
    stages = {layer: columns[0] for layer, columns in zip(report.stage_layers, report.stage_positions)}
    expected = [kept_per_image(budget, n, len(layers)) for n in COUNTS[:2]]
    assert report.stage_tokens == [52] + [max(counts) for counts in zip(*expected)]
    previous = set(range(ids.shape[1]))
    for index, kept in enumerate(stages.values()):                   # each stage keeps a subset
        images = ids[0, kept] == IMAGE_TOKEN
        assert int(images.sum()) == sum(counts[index] for counts in expected) and set(kept.tolist()) <= previous
        previous = set(kept.tolist())
    generated = out.sequences[0, ids.shape[1]:]
    for step in range(GENERATE["max_new_tokens"]):
        reference = segment_reference(model, ids, pixel_values, stages, generated[:step], image_sizes=image_sizes)
        torch.testing.assert_close(out.logits[step], reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layers, budget", [([0, 2], LARGEST), ([1, 3], [LARGEST, 56]), ([1], 56)])
def test_budgets_that_keep_everything_match_the_unpatched_model(layers, budget):
    model = model_for()
    ids, mask, pixel_values, image_sizes = batch(model, MIXED)
    expected = run(model, ids, mask, pixel_values, image_sizes)
    vtr.patch(model, "fastv", budget=budget, layers=layers)
    out = run(model, ids, mask, pixel_values, image_sizes)
    torch.testing.assert_close(logits(out), logits(expected), atol=1e-5, rtol=0)
    assert torch.equal(out.sequences, expected.sequences)
    assert vtr.report(model).image_tokens_after.tolist() == COUNTS
    vtr.unpatch(model)
    assert not any(layer._forward_pre_hooks for layer in model.model.language_model.layers)


SIZES = [(50, 120), (16, 400), (90, 40), (112, 112), (56, 56), (112, 60)]


@settings(max_examples=12, deadline=None)
@given(st.lists(st.sampled_from(SIZES), min_size=1, max_size=3), st.integers(1, LARGEST), st.sampled_from(
    [("fastv", [1]), ("tome", [0, 3]), ("random", [1, 2, 3])]))
def test_each_image_keeps_exactly_min_budget_count(sizes, budget, setup):
    method, layers = setup
    model = model_for()
    rows = [([1, 5], sizes[:1], [7]), ([1, 9, 3], sizes[1:], [8, 2])] if len(sizes) > 1 else [([1], sizes, [4])]
    ids, mask, pixel_values, image_sizes = batch(model, rows)
    counts = image_counts(model, pixel_values, image_sizes)
    vtr.patch(model, method, budget=budget, layers=layers)
    run(model, ids, mask, pixel_values, image_sizes, max_new_tokens=1)
    report = vtr.report(model)
    assert report.image_tokens_before.tolist() == counts
    assert report.image_tokens_after.tolist() == [min(budget, n) for n in counts]
    per_stage = [kept_per_image(budget, n, len(layers)) for n in counts]
    assert report.stage_tokens == [max(counts)] + [max(kept) for kept in zip(*per_stage)]
    image_rows = report.image_rows.tolist()
    for index, columns in enumerate(report.stage_positions):   # what each stage's segment sees, per row
        seen = (ids.gather(1, columns.clamp_min(0)) == IMAGE_TOKEN) & (columns >= 0)
        wanted = [sum(kept[index] for kept, row in zip(per_stage, image_rows) if row == r) for r in range(len(rows))]
        assert seen.sum(1).tolist() == wanted
    assert report.visual_tokens_after.tolist() == wanted
    # Provenance: each image's kept tokens carry distinct original tokens; sizes are counts.
    for image, n in enumerate(counts):
        assignment, size = report.assignment[image, :n], report.size[image]
        carried = torch.zeros_like(size).scatter_add_(0, assignment.clamp_min(0), (assignment >= 0).float())
        assert torch.equal(carried, size) and int((size > 0).sum()) == min(budget, n)
        assert bool((report.assignment[image, n:] == -1).all())
    vtr.unpatch(model)


def test_image_budgets_follow_the_image_count():
    assert image_budgets(20, 16, 0, 2) == [16, 16]                 # within the budget: keeps all
    assert image_budgets(20, 80, 0, 2) == stage_budgets(20, 80, 0, 2) == [40, 20]
    assert image_budgets([40, 20], 30, 0, 2) == [30, 20] and image_budgets([40, 20], 10, 0, 2) == [10, 10]


@pytest.mark.parametrize("layers, budget, match", [
    ([2, 1], 20, r"layers must be .*strictly increasing .*K in \[0, 3\]"),
    ([0, 4], 20, r"layers must be .*K in \[0, 3\]"),
    ([1, 2], 0, rf"budget must be an int in \[1, {LARGEST}\] .*at most {LARGEST} per image"),
    ([1], LARGEST + 1, rf"budget must be an int in \[1, {LARGEST}\]"),
    ([1, 2], [20, 40], rf"budget as a list .*non-increasing, each an int in \[1, {LARGEST}\]"),
    ([1, 2], [20], r"budget as a list must give one count per layer in layers= \(2\)"),
])
def test_bad_layers_and_budgets_name_the_parameter_and_range(layers, budget, match):
    model = model_for()
    with pytest.raises(ValueError, match=match):
        vtr.patch(model, "fastv", budget=budget, layers=layers)
    assert not vtr.is_patched(model)


def test_a_prompt_without_image_sizes_is_a_clear_error():
    model = model_for()
    ids, mask, pixel_values, _ = batch(model, MIXED)
    vtr.patch(model, "fastv", budget=20, layers=[1])
    with pytest.raises(ValueError, match="needs image_sizes"):
        generate(model, ids, mask, pixel_values=pixel_values)


def test_a_forward_with_pixel_values_finds_the_counts_from_image_sizes():
    """Outside generate() the counts come from the model's packing of image_sizes: same kept columns."""
    model = model_for()
    ids, mask, pixel_values, image_sizes = batch(model, MIXED)
    vtr.patch(model, "fastv", budget=20, layers=[1, 2])
    run(model, ids, mask, pixel_values, image_sizes, max_new_tokens=1)
    kept = vtr.report(model).kept_positions
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=image_sizes)
    report = vtr.report(model)
    assert torch.equal(report.kept_positions, kept) and report.image_tokens_after.tolist() == [20, 16, 20]


def test_static_cache_equals_the_dynamic_cache():
    model = model_for()
    ids, mask, pixel_values, image_sizes = batch(model, MIXED)
    vtr.patch(model, "fastv", budget=[30, 12], layers=[0, 2])
    dynamic = run(model, ids, mask, pixel_values, image_sizes)
    static = run(model, ids, mask, pixel_values, image_sizes, cache_implementation="static")
    torch.testing.assert_close(logits(static), logits(dynamic), atol=1e-5, rtol=0)
    assert torch.equal(static.sequences, dynamic.sequences)


def test_expected_flops_equal_the_report_of_a_prompt_of_the_largest_image():
    """vtr.expected_flops counts the largest image's tokens and the text token that scores them, as a call on
    them reports."""
    model = model_for()
    ids, mask, pixel_values, image_sizes = batch(model, [([], [(112, 112)], [7])])
    vtr.patch(model, "fastv", budget=20, layers=[1, 3])
    run(model, ids, mask, pixel_values, image_sizes, max_new_tokens=1)
    report = vtr.report(model)
    assert report.stage_tokens == [LARGEST] + stage_budgets(20, LARGEST, 0, 2)
    reduced, unreduced = vtr.expected_flops(model)
    assert reduced == pytest.approx(float(report.prefill_macs[0]) + report.reducer_macs, rel=1e-12)
    assert unreduced == pytest.approx(float(report.prefill_macs_unreduced[0]), rel=1e-12)
    assert reduced < unreduced


@pytest.mark.parametrize("method, layers, budget", [("fastv", [1, 3], [40, 20]), ("tome", [0, 2], 20)])
def test_generate_without_cache_equals_the_cached_run(method, layers, budget):
    """Images of different counts: use_cache=False keeps what the prefill decided from the prompt."""
    model = model_for()
    ids, mask, pixel_values, image_sizes = batch(model, MIXED)
    vtr.patch(model, method, budget=budget, layers=layers)
    cached = run(model, ids, mask, pixel_values, image_sizes)
    kept = vtr.report(model).kept_positions
    uncached = run(model, ids, mask, pixel_values, image_sizes, use_cache=False)
    assert torch.equal(uncached.sequences, cached.sequences)
    torch.testing.assert_close(logits(uncached), logits(cached), atol=1e-5, rtol=0)
    assert torch.equal(vtr.report(model).kept_positions, kept)
