"""The LLaVA adapter: generate() unchanged, exact when nothing is reduced, per-row exact when rows differ;
a patched model pickles, deep-copies, serves several threads and keeps nothing of its calls (the harnesses:
``check_threads`` and the ``reachable`` walker in tests/conftest.py)."""
import copy
import functools
import json
import pickle

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import vtr
from vtr.adapters.llava.common import compact_prompt, prefill_macs

from conftest import THREADS, call_state, check_threads
from llava_models import (GENERATE, check_loss_on_kept_positions, IMAGE_TOKEN, IMAGE_TOKENS, PAD, FeatureCapture, assert_each_row_equals_it_alone,
                           generate, held_tensors, left_padded, logits, mixed_batch, pooled, prompt_row, text_labels,
                           tiny_llava)

LEARNED = {m for m in vtr.methods() if vtr.reducers.REDUCERS[m].learned}   # refused on LLaVA (issue 12)


def test_zero_reduction_matches_unpatched_tokens_and_logits():
    model = tiny_llava()
    ids, mask, pixels = mixed_batch()
    expected = generate(model, ids, mask, pixel_values=pixels)
    for method, amount in [("none", {}), ("tome", {"budget": IMAGE_TOKENS}), ("random", {"budget": IMAGE_TOKENS})]:
        vtr.patch(model, method, **amount)
        out = generate(model, ids, mask, pixel_values=pixels)
        assert torch.equal(out.sequences, expected.sequences), method
        assert torch.equal(logits(out), logits(expected)), method
        report = vtr.report(model)
        assert report.visual_tokens_after.tolist() == report.visual_tokens_before.tolist() == [32, 16, 0]
        assert report.prefill_flops_saved == pytest.approx(0.0)
        vtr.unpatch(model)


def test_budget_reduces_and_generate_returns_the_callers_prompt():
    model = tiny_llava()
    ids, mask, pixels = mixed_batch()
    vtr.patch(model, "tome", budget=5)
    out = generate(model, ids, mask, pixel_values=pixels)
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)
    assert out.sequences.shape[1] == ids.shape[1] + GENERATE["max_new_tokens"]
    report = vtr.report(model)
    assert report.tokens == [16, 8, 5]                      # two bipartite steps: 16 -> 8 -> 5
    assert report.visual_tokens_before.tolist() == [32, 16, 0]
    assert report.visual_tokens_after.tolist() == [10, 5, 0]
    assert report.image_rows.tolist() == [0, 0, 1]
    assert report.where.startswith("before the language model")
    # Merged tokens are counted as what they are: sizes add up to the 16 patches of each image.
    assert report.size.shape == (3, 5) and torch.equal(report.size.sum(1), torch.full((3,), 16.0))
    assert ((report.assignment >= 0) & (report.assignment < 5)).all()
    assert (report.prefill_macs < report.prefill_macs_unreduced)[:2].all()
    assert report.prefill_macs[2] == report.prefill_macs_unreduced[2]      # the text-only row
    assert 0 < report.prefill_flops_saved < 1
    assert vtr.expected_tokens(model) == [16, 8, 5]
    reduced, unreduced = vtr.expected_flops(model)
    assert reduced < unreduced == vtr.expected_flops(tiny_llava())[0]


def test_cls_attention_decisions_are_charged_at_the_vision_tower_width():
    """Before the language model the CLS row comes from the vision tower (width 32), not the LM (64)."""
    model = tiny_llava()
    vtr.patch(model, "evit", budget=4)
    reduced, _ = vtr.expected_flops(model)
    vision_width = model.config.vision_config.hidden_size
    assert vision_width != model.config.text_config.hidden_size
    assert reduced == float(prefill_macs(model, torch.tensor([4]))) + IMAGE_TOKENS * vision_width


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["tome", "random"])
def test_batch_with_left_padding_equals_each_row_alone(positions, attn, method):
    """Rows keep 10, 5 and 0 visual tokens; each row's prefill and decode logits equal the row run
    alone by the *unpatched* model on its compacted prompt (with the positions the batch gave it) with the same kept features."""
    model = tiny_llava(attn)
    ids, mask, pixels = mixed_batch()
    vtr.patch(model, method, budget=5, positions=positions)
    capture = FeatureCapture(model)
    batched = generate(model, ids, mask, pixel_values=pixels)
    capture.remove()
    report = vtr.report(model)
    vtr.unpatch(model)

    for row in range(ids.shape[0]):
        columns = report.kept_positions[row]
        row_ids = ids[row, columns[columns >= 0]][None]
        images = [f for f, r in zip(capture.features, report.image_rows.tolist()) if r == row]
        alone_inputs = {}
        if images:
            alone_inputs["mm_encoder_outputs"] = {"image": pooled(images)}
        alone = generate(model, row_ids, torch.ones_like(row_ids), **alone_inputs, **capture.alone(row, columns))
        torch.testing.assert_close(logits(batched)[row], logits(alone)[0], atol=1e-5, rtol=0)
        assert torch.equal(batched.sequences[row, ids.shape[1]:], alone.sequences[0, row_ids.shape[1]:])


@pytest.mark.parametrize("method", ["random", "tome"])
def test_kept_tokens_keep_their_positions_in_the_callers_prompt(method):
    """positions="original" (the default): each text token keeps its position in the caller's left-padded prompt,
    each kept visual token the position of the placeholder it came from (merged: the rounded mean of its sources'),
    and generate() continues from the caller's last position. A hand transcription from the report's provenance."""
    model = tiny_llava()
    ids, mask, pixels = mixed_batch()
    vtr.patch(model, method, budget=5)
    capture = FeatureCapture(model)
    steps = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: steps.append(kwargs["position_ids"].clone()), with_kwargs=True)
    generate(model, ids, mask, pixel_values=pixels)
    hook.remove()
    capture.remove()
    report = vtr.report(model)
    original = (mask.cumsum(1) - 1).clamp_min(0)
    image = 0
    for row in range(ids.shape[0]):
        columns = report.kept_positions[row]
        got = capture.position_ids[row][columns >= 0]
        text = ids[row, columns[columns >= 0]] != IMAGE_TOKEN
        assert torch.equal(got[text], original[row, columns[columns >= 0]][text])
        expected = []
        placeholders = (ids[row] == IMAGE_TOKEN).nonzero().flatten().split(IMAGE_TOKENS)
        for span in (span for span in placeholders if span.numel()):
            carried = report.assignment[image]
            for kept in range(int(carried.max()) + 1):
                sources = original[row, span[carried == kept]].double()
                expected.append(int(torch.round(sources.mean())))
            image += 1
        assert got[~text].tolist() == expected
        assert int(steps[1][row, -1]) == int(original[row, -1]) + 1     # the first decode step
    real = report.kept_positions >= 0
    compacted = (real.long().cumsum(1) - 1).clamp_min(0)      # what positions="compact" numbers
    assert (capture.position_ids != compacted)[real].any()


def test_positions_is_checked_and_refused_where_it_does_not_apply():
    model = tiny_llava()
    with pytest.raises(ValueError, match="positions must be one of 'original', 'compact'"):
        vtr.patch(model, "random", budget=5, positions="kept")
    with pytest.raises(ValueError, match="positions= numbers the tokens an image keeps before the language model"):
        vtr.patch(model, "fastv", budget=5, layers=[1], positions="original")
    vtr.patch(model, "random", budget=5, positions="compact")
    assert model._vtr.visual.positions == "compact"


def test_positions_on_a_family_that_does_not_take_it_is_a_clear_error():
    from qwen_vl_models import tiny_qwen

    with pytest.raises(ValueError, match="positions= .* is not taken by the qwen"):
        vtr.patch(tiny_qwen(), "random", budget=4, positions="original")


def test_patched_row_alone_equals_its_row_in_the_batch():
    model = tiny_llava()
    ids, mask, pixels = mixed_batch()
    vtr.patch(model, "pitome", budget=6)
    batched = generate(model, ids, mask, pixel_values=pixels)
    assert_each_row_equals_it_alone(model, ids, mask, pixels, batched, images_per_row=[2, 1, 0], sequences=False)


def test_forward_runs_on_the_compacted_prompt_with_labels():
    model = tiny_llava()
    ids, mask, pixels = mixed_batch()
    labels = ids.masked_fill(mask == 0, -100)
    vtr.patch(model, "tome", budget=4)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    report = vtr.report(model)
    assert out.logits.shape[:2] == report.kept_positions.shape
    assert torch.isfinite(out.loss)
    vtr.unpatch(model)
    with torch.inference_mode():
        unpatched = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    assert unpatched.logits.shape[1] == ids.shape[1]


@pytest.mark.parametrize("method", ["tome", "fastv"])
def test_labels_follow_the_compacted_prompt_and_the_loss_trains(method):
    """Before the language model: labels are compacted with the prompt, the loss is the model's own over
    the compacted sequence, and its gradient reaches the language model and the projector."""
    model = tiny_llava()
    ids, mask, pixels = mixed_batch()
    labels = text_labels(ids, mask)
    vtr.patch(model, method, budget=4)
    check_loss_on_kept_positions(model, ids, mask, pixels, labels, lambda m: (
        m.model.language_model.layers[0].mlp.down_proj.weight, m.model.multi_modal_projector.linear_2.weight))


def test_save_pretrained_round_trip_and_unpatch(tmp_path):
    model = tiny_llava()
    ids, mask, pixels = mixed_batch()
    cls, state = type(model), {k: v.clone() for k, v in model.state_dict().items()}
    expected = generate(model, ids, mask, pixel_values=pixels)

    vtr.patch(model, "tome", budget=5)
    reduced = generate(model, ids, mask, pixel_values=pixels)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [cls.__name__]
    assert vtr.is_patched(model) and type(model) is not cls          # saving left the patch on
    loaded = cls.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(generate(loaded, ids, mask, pixel_values=pixels).sequences, expected.sequences)
    vtr.patch(loaded, "tome", budget=5)
    torch.testing.assert_close(logits(generate(loaded, ids, mask, pixel_values=pixels)), logits(reduced))

    vtr.unpatch(model)
    assert type(model) is cls and not hasattr(model, "_vtr")
    out = generate(model, ids, mask, pixel_values=pixels)
    assert torch.equal(out.sequences, expected.sequences) and torch.equal(logits(out), logits(expected))


def test_full_strategy_protects_the_cls_feature():
    model = tiny_llava(strategy="full")
    ids, mask = left_padded([prompt_row([1, 5], 1, [7], per_image=IMAGE_TOKENS + 1)])
    pixels = torch.randn(1, 3, 56, 56)
    vtr.patch(model, "random", budget=3)
    capture = FeatureCapture(model)
    generate(model, ids, mask, pixel_values=pixels)
    capture.remove()
    report = vtr.report(model)
    assert report.num_protected == 1 and report.assignment[0, 0] == 0
    assert report.visual_tokens_after.tolist() == [3]
    vtr.unpatch(model)
    with torch.inference_mode():
        cls_feature = model.model.get_image_features(pixel_values=pixels).pooler_output[0][0]
    torch.testing.assert_close(capture.features[0][0], cls_feature)


def test_query_is_each_rows_text_embeddings(recording):
    cls = recording("_rec_query", {"query"})
    model = tiny_llava()
    ids, mask, pixels = mixed_batch()
    vtr.patch(model, "_rec_query", budget=4)
    generate(model, ids, mask, pixel_values=pixels)
    embed = model.get_input_embeddings()
    for image, row in enumerate([0, 0, 1]):
        text = ids[row][(mask[row] == 1) & (ids[row] != IMAGE_TOKEN)]
        query = cls.seen[image].query
        assert query.shape == (1, len(text), 64)
        torch.testing.assert_close(query[0], embed(text))


def test_conditioned_query_replaces_the_prompt(recording):
    cls = recording("_rec_given_query", {"query"})
    model = tiny_llava()
    ids, mask, pixels = mixed_batch()
    vtr.patch(model, "_rec_given_query", budget=4)
    given = torch.randn(3, 2, 64)
    with vtr.conditioned(model, given):
        generate(model, ids, mask, pixel_values=pixels)
    for image, row in enumerate([0, 0, 1]):
        assert torch.equal(cls.seen[image].query[0], given[row])


def test_cls_attention_equals_the_eager_attention_row(recording):
    cls = recording("_rec_attention", {"cls_attention"})
    model = tiny_llava("eager")
    ids, mask, pixels = mixed_batch()
    vtr.patch(model, "_rec_attention", budget=4)
    generate(model, ids, mask, pixel_values=pixels)
    with torch.inference_mode():
        attentions = model.model.vision_tower(pixels, output_attentions=True).attentions
    # vision_feature_layer=-2 of 2 layers reads hidden_states[1], the output of layer 0.
    expected = attentions[0][:, :, 0, 1:].mean(dim=1)
    torch.testing.assert_close(cls.seen[0].cls_attention, expected, atol=1e-6, rtol=1e-5)
    assert cls.seen[0].grid == (4, 4)


@pytest.mark.parametrize("budget", [0, -1, IMAGE_TOKENS + 1, 2.5, True, "64"])
def test_bad_budget_names_the_allowed_range(budget):
    model = tiny_llava()
    with pytest.raises(ValueError, match=rf"budget must be an int in \[1, {IMAGE_TOKENS}\]"):
        vtr.patch(model, "tome", budget=budget)
    assert not vtr.is_patched(model)


def test_other_amounts_and_missing_budget_are_errors():
    model = tiny_llava()
    with pytest.raises(ValueError, match="takes budget="):
        vtr.patch(model, "tome", r=4)
    with pytest.raises(ValueError, match="needs budget="):
        vtr.patch(model, "tome")
    with pytest.raises(ValueError, match="does not reduce"):
        vtr.patch(model, "none", budget=4)
    with pytest.raises(ValueError, match="metric='x'"):
        vtr.patch(model, "tome", budget=4, metric="keys")
    assert not vtr.is_patched(model)


def test_a_method_default_metric_llava_cannot_give_falls_back_to_its_own():
    """pitome variant='paper' defaults to attention keys, which LLaVA's projected features do not have: the
    LLaVA metric ('x') applies; only an explicit metric='keys' is refused."""
    model = tiny_llava()
    ids, mask, pixels = mixed_batch()
    vtr.patch(model, "pitome", budget=4, variant="paper")
    assert vtr.adapters.settings(model).metric == "x" and vtr.adapters.settings(model).prop_attn is False
    generate(model, ids, mask, pixel_values=pixels)
    assert vtr.report(model).visual_tokens_after.tolist() == [8, 4, 0]
    vtr.unpatch(model)
    with pytest.raises(ValueError, match="metric='x'"):
        vtr.patch(model, "pitome", budget=4, variant="paper", metric="keys")


def test_unsupported_families_are_clear_errors():
    model = tiny_llava()
    with pytest.raises(vtr.UnsupportedModelError, match="LlavaForConditionalGeneration"):
        vtr.patch(model.model, "tome", budget=4)
    with pytest.raises(vtr.UnsupportedModelError, match="supported: .*transformers LLaVA, LLaVA-NeXT"):
        vtr.patch(nn.Linear(2, 2), "tome", budget=4)
    # LLaVA-NeXT-Video and LLaVA-OneVision: tests/adapters/test_llava_video.py


def test_patching_the_vision_tower_alone_is_refused_with_the_way_to_do_it():
    """Regression (issue 26, case 10): ``vtr.patch(llava.model.vision_tower, "tome", keep=.6)`` then
    ``llava.generate(...)`` failed inside transformers ("Image features and image tokens do not match")."""
    model = tiny_llava()
    with pytest.raises(ValueError, match=r"CLIPVisionModel is part of a LlavaForConditionalGeneration: .*"
                                         r"vtr.patch\(model, 'tome', budget=N\)"):
        vtr.patch(model.model.vision_tower, "tome", keep=0.6)
    assert not vtr.is_patched(model.model.vision_tower)
    tower = copy.deepcopy(model.model.vision_tower)   # the same tower on its own patches as any CLIP tower
    assert vtr.is_patched(vtr.patch(tower, "tome", keep=0.6))


def test_bad_calls_are_clear_errors():
    model = tiny_llava()
    ids, mask, pixels = mixed_batch()
    vtr.patch(model, "tome", budget=4)
    with pytest.raises(ValueError, match="image tokens"):
        generate(model, ids, mask, pixel_values=pixels[:2])
    with pytest.raises(ValueError, match="position_ids"):
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=mask.cumsum(1))
    with pytest.raises(ValueError, match="mm_encoder_outputs"):
        generate(model, ids, mask, mm_encoder_outputs={"image": pooled(torch.zeros(3, 16, 64))})


def test_text_only_batch_passes_through():
    model = tiny_llava()
    ids, mask = left_padded([[1, 5, 6], [1, 7, 8, 9, 10]])
    expected = generate(model, ids, mask)
    vtr.patch(model, "tome", budget=4)
    generate(model, *mixed_batch()[:2], pixel_values=mixed_batch()[2])      # a report to replace
    out = generate(model, ids, mask)
    assert torch.equal(out.sequences, expected.sequences) and torch.equal(logits(out), logits(expected))
    report = vtr.report(model)
    assert report.visual_tokens_before.tolist() == report.visual_tokens_after.tolist() == [0, 0]
    assert report.prefill_flops_saved == 0.0


def test_beam_search_and_several_sequences_per_prompt():
    model = tiny_llava()
    ids, mask, pixels = mixed_batch()
    vtr.patch(model, "tome", budget=5)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3,
                             num_beams=2, num_return_sequences=2, do_sample=False)
    assert out.shape == (6, ids.shape[1] + 3)
    assert torch.equal(out[:, : ids.shape[1]], ids.repeat_interleave(2, dim=0))


def test_prefill_macs_match_the_flop_counter_on_the_linear_layers():
    from vtr.tools.profile import count_macs
    model = tiny_llava()
    language, tokens = model.model.language_model, 11
    counted = count_macs(language, inputs_embeds=torch.randn(1, tokens, 64)).total
    counted += count_macs(model.lm_head, torch.randn(1, 1, 64)).total
    analytic = float(prefill_macs(model, torch.tensor([tokens])))
    # The counter sees the full (non-causal) T x T attention matrices; vtr counts the causal half.
    layer = language.layers[0].self_attn
    full_attention = 2 * layer.q_proj.out_features * tokens * tokens * len(language.layers)
    causal_attention = layer.q_proj.out_features * tokens * (tokens + 1) * len(language.layers)
    assert analytic - causal_attention == pytest.approx(counted - full_attention)


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_compact_prompt_keeps_order_and_counts(data):
    num_rows = data.draw(st.integers(1, 4))
    rows, counts = [], []
    for _ in range(num_rows):
        row = []
        for _ in range(data.draw(st.integers(0, 2))):
            n = data.draw(st.integers(1, 5))
            counts.append(n)
            row += [data.draw(st.integers(1, 9))] + [IMAGE_TOKEN] * n
        row += [data.draw(st.integers(1, 9)) for _ in range(data.draw(st.integers(1, 3)))]
        rows.append(row)
    ids, mask = left_padded(rows)
    counts = torch.tensor(counts, dtype=torch.long)
    kept = torch.tensor([data.draw(st.integers(1, int(n))) for n in counts], dtype=torch.long)
    out_ids, out_mask, positions = compact_prompt(ids, mask, IMAGE_TOKEN, counts, kept, PAD)

    assert (out_ids == IMAGE_TOKEN).sum() == kept.sum()
    starts = 0
    for r, row in enumerate(rows):
        real = positions[r][positions[r] >= 0]
        assert (real.diff() > 0).all()                              # order is kept
        assert torch.equal(out_ids[r][positions[r] >= 0], ids[r, real])
        assert torch.equal(out_mask[r], (positions[r] >= 0).long())
        assert not out_mask[r, out_mask[r].argmax():].eq(0).any()   # padding only on the left
        text = [t for t in row if t != IMAGE_TOKEN]
        assert [t for t in out_ids[r][out_mask[r] == 1].tolist() if t != IMAGE_TOKEN] == text
        images = sum(1 for i, t in enumerate(row) if t == IMAGE_TOKEN and (i == 0 or row[i - 1] != IMAGE_TOKEN))
        assert (out_ids[r] == IMAGE_TOKEN).sum() == kept[starts:starts + images].sum()
        starts += images


@pytest.mark.parametrize("method", sorted(set(vtr.methods()) - {"none", "pool"} - LEARNED))
def test_every_method_reduces_llava_images_to_the_budget(method):
    """Each registered method, fed the signals the LLaVA adapter has, lands on the budget per image (before the
    language model, or at its own default layers inside it for a method that acts only there)."""
    model = tiny_llava()
    ids, mask, pixels = mixed_batch()
    vtr.patch(model, method, budget=5)
    out = generate(model, ids, mask, pixel_values=pixels)
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)
    assert vtr.report(model).visual_tokens_after.tolist() == [10, 5, 0]


def test_pool_on_llava_follows_its_factor():
    model = tiny_llava()
    ids, mask, pixels = mixed_batch()
    vtr.patch(model, "pool", budget=4, factor=2)  # 4x4 patch grid pooled 2x2: 4 tokens per image
    generate(model, ids, mask, pixel_values=pixels)
    assert vtr.report(model).visual_tokens_after.tolist() == [8, 4, 0]


@pytest.mark.parametrize("strategy, budget, factor", [("default", 4, 2), ("default", 1, 4), ("full", 5, 2),
                                                      ("full", 2, 4)])
def test_pool_on_llava_keeps_the_budget_through_the_factor_that_meets_it(strategy, budget, factor):
    """Issue 11: budget= picks pool's factor (4x4 grid: ceil(4/f)^2, plus the CLS feature with 'full')."""
    ids, mask, pixels = mixed_batch()
    if strategy == "full":   # the CLS feature is an image token too
        per_image = IMAGE_TOKENS + 1
        ids, mask = left_padded([prompt_row([1, 5], 2, [7, 8], per_image=per_image),
                                 prompt_row([1, 5, 6, 9, 10, 11], 1, [7, 12, 13], per_image=per_image),
                                 [1, 20, 21, 22, 23]])
    model = vtr.patch(tiny_llava(strategy=strategy), "pool", budget=budget)
    out = generate(model, ids, mask, pixel_values=pixels)
    report = vtr.report(model)
    assert report.visual_tokens_after.tolist() == [2 * budget, budget, 0]
    direct = vtr.patch(tiny_llava(strategy=strategy), "pool", budget=budget, factor=factor)
    expected = generate(direct, ids, mask, pixel_values=pixels)
    assert torch.equal(out.sequences, expected.sequences)
    assert torch.equal(logits(out), logits(expected))
    assert vtr.report(direct).visual_tokens_after.tolist() == [2 * budget, budget, 0]


@pytest.mark.parametrize("strategy, amount, allowed", [
    ("default", {"budget": 3}, "16, 4, 1"), ("default", {"budget": 9}, "16, 4, 1"),
    ("default", {"budget": 1, "factor": 2}, "16, 4, 1"), ("default", {"budget": 4, "factor": 4}, "16, 4, 1"),
    ("full", {"budget": 4}, "17, 5, 2"), ("full", {"budget": 2, "factor": 3}, "17, 5, 2"),
])
def test_pool_on_llava_refuses_a_budget_no_factor_meets(strategy, amount, allowed):
    model = tiny_llava(strategy=strategy)
    with pytest.raises(ValueError, match=f"budget={amount['budget']}.*budget must be one of {allowed}"):
        vtr.patch(model, "pool", **amount)
    assert not vtr.is_patched(model)


# --- a patched model as an object: pickle, deepcopy, threads, nothing of a call left on it -----------

BEFORE_AND_IN_LLM = [("evit", {"budget": 5}), ("fastv", {"budget": 4, "layers": [1, 2]})]


@pytest.mark.parametrize("method, amount", BEFORE_AND_IN_LLM)
def test_pickle_and_deepcopy_of_a_patched_model_stay_patched(method, amount):
    ids, mask, pixels = mixed_batch()
    unpatched = generate(tiny_llava(), ids, mask, pixel_values=pixels)
    model = vtr.patch(tiny_llava(), method, **amount)
    # Pickled before its first call: transformers then installs output-capturing hooks that are closures,
    # after which no LLaVA pickles, patched or not. deepcopy copies those hooks by reference.
    pickled = pickle.loads(pickle.dumps(model))
    expected = generate(model, ids, mask, pixel_values=pixels)
    report = vtr.report(model)
    copied = copy.deepcopy(model)
    for clone in (pickled, copied):
        assert vtr.is_patched(clone) and type(clone) is type(model) and clone._vtr is not model._vtr
        with pytest.raises(ValueError, match="no forward pass"):     # its own reports, none yet
            vtr.report(clone)
        out = generate(clone, ids, mask, pixel_values=pixels)
        assert torch.equal(out.sequences, expected.sequences) and torch.equal(logits(out), logits(expected))
        assert torch.equal(vtr.report(clone).kept_positions, report.kept_positions)
        vtr.unpatch(clone)
        assert not any(layer._forward_pre_hooks for layer in clone.model.language_model.layers)
        out = generate(clone, ids, mask, pixel_values=pixels)
        assert torch.equal(out.sequences, unpatched.sequences) and torch.equal(logits(out), logits(unpatched))
    assert vtr.is_patched(model)                                     # the original is left as it was
    out = generate(model, ids, mask, pixel_values=pixels)
    assert torch.equal(logits(out), logits(expected))


def _thread_inputs(thread: int):
    """Each thread its own prompts and images: different rows, texts and image counts."""
    rows = [[prompt_row([1, 5], 2, [7, 8]), prompt_row([1, 5, 6, 9, 10, 11], 1, [7, 12, 13]), [1, 20, 21, 22, 23]],
            [prompt_row([1, 5, 6], 1, [7, 8, 9])],
            [prompt_row([1], 1, [4, 4, 4, 4, 4]), prompt_row([1, 2, 3, 30, 31], 2, [9])],
            [[1, 40, 41], prompt_row([1, 50], 1, [51, 52])]][thread]
    ids, mask = left_padded(rows)
    images = int((ids == IMAGE_TOKEN).sum()) // IMAGE_TOKENS
    return ids, mask, torch.randn(images, 3, 56, 56, generator=torch.Generator().manual_seed(10 + thread))


@pytest.mark.parametrize("method, amount", BEFORE_AND_IN_LLM)
def test_threads_sharing_one_patched_model_get_their_own_outputs_and_reports(method, amount):
    """Threads sharing one patched model, each generating from its own prompts and images, get the
    tokens, logits and report of their own call, bitwise what the call gives alone; reports are per
    thread (conftest.check_threads)."""
    model = vtr.patch(tiny_llava(), method, **amount)

    def call(ids, mask, pixels):
        out = generate(model, ids, mask, pixel_values=pixels)
        return out.sequences, logits(out)

    calls = [functools.partial(call, *_thread_inputs(thread)) for thread in range(THREADS)]
    check_threads(model, [[c] * 3 for c in calls])


@pytest.mark.parametrize("method, amount", [*BEFORE_AND_IN_LLM, ("_rec_query_held", {"budget": 4})])
def test_after_a_call_the_model_holds_no_tensor_of_it(method, amount, recording):
    """Nothing a call computes stays on the model: every tensor it holds afterwards (through attributes,
    hooks, closures, weak references) it held before the first call; no run, token state, report or
    graph tensor hangs from it (conftest.reachable / call_state)."""
    recording("_rec_query_held", {"query", "cls_attention"})
    model = vtr.patch(tiny_llava(), method, **amount)
    before = held_tensors(model)
    ids, mask, pixels = mixed_batch()
    generate(model, ids, mask, pixel_values=pixels)
    with vtr.conditioned(model, torch.randn(3, 64)):
        generate(model, ids, mask, pixel_values=pixels)
    model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits.sum().backward()   # autograd on
    model.zero_grad(set_to_none=True)
    with torch.inference_mode():                        # a decode loop by hand on the forward's own cache
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True)
        seen = mask if "layers" in amount else (vtr.report(model).kept_positions >= 0).long()  # compacted prompt
        model(input_ids=out.logits[:, -1:].argmax(-1), cache=out.cache, use_cache=True,
              attention_mask=torch.cat([seen, torch.ones_like(seen[:, :1])], 1))
    after = held_tensors(model)
    assert after.keys() <= before.keys(), [tuple(t.shape) for key, t in after.items() if key not in before]
    assert call_state(model) == []
    assert type(vtr.report(model)).__name__ == "LlavaReport"


def test_dropping_methods_drop_as_published_in_front_of_the_language_model():
    """Merging the unkept tokens (the reducers' fuse='nearest') was measured on vision encoders only; on
    LLaVA a dropping method keeps its paper's rule unless fuse= is given."""
    model = tiny_llava()
    for method, amount, published in [("fastv", dict(budget=4, layers=[1]), "drop"), ("hired", dict(budget=4), "drop"),
                                      ("evit", dict(budget=4), "one"), ("query", dict(budget=4), "drop")]:
        vtr.patch(model, method, **amount)
        assert model._vtr.reducer.fuse == published, method
        vtr.unpatch(model)
    vtr.patch(model, "fastv", budget=4, fuse="nearest")
    assert model._vtr.reducer.fuse == "nearest"
    assert vtr.make_reducer("fastv").fuse == "nearest"   # the reducer's own default is untouched
