"""In-LLM pruning of LLaVA: at one decoder layer (``layers=[K]``) or progressively (``layers=[K1, K2, ...]``),
and the cache modes it meets.

Exact against a plain segment-by-segment reference, per-row exact in batches, static caches,
clear early errors for what it cannot do (assisted generation, chunked prefill).
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, GenerationConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vtr
from vtr.adapters.llava.common import cost, prefill_macs
from vtr.adapters.llava.in_llm import stage_budgets

from llava_models import (GENERATE, check_loss_on_kept_positions, IMAGE_TOKEN, IMAGE_TOKENS, PAD, assert_each_row_equals_it_alone, generate,
                           left_padded, logits, mixed_batch, prompt_row, segment_reference, text_labels, tiny_llava)

NUM_LAYERS = 4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layers, budget, counts", [([0], 5, [5]), ([2], 5, [5]), ([0, 2], 4, [8, 4]),
                                                    ([1, 2, 3], [12, 6, 3], [12, 6, 3])])
def test_prefill_and_decode_equal_the_segment_reference(attn, layers, budget, counts):
    """One layer or several: layers before K1 see every token, each segment its stage's kept columns."""
    model = tiny_llava(attn)
    ids, mask = left_padded([prompt_row([1, 5, 6], 1, [7, 8, 9])])
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    vtr.patch(model, "fastv", budget=budget, layers=layers)
    out = generate(model, ids, mask, pixel_values=pixels)
    report = vtr.report(model)
    vtr.unpatch(model)
    stages = {layer: columns[0] for layer, columns in zip(report.stage_layers, report.stage_positions)}
    assert report.stage_layers == layers and report.stage_tokens == [IMAGE_TOKENS] + counts == report.tokens
    text = ids.shape[1] - IMAGE_TOKENS
    previous = set(range(ids.shape[1]))
    for (layer, kept), count in zip(stages.items(), counts):
        assert len(kept) == text + count and set(kept.tolist()) <= previous   # each stage keeps a subset
        previous = set(kept.tolist())
    assert torch.equal(report.kept_positions[0], stages[layers[-1]])
    generated = out.sequences[0, ids.shape[1]:]
    for step in range(GENERATE["max_new_tokens"]):
        expected = segment_reference(model, ids, pixels, stages, generated[:step])
        torch.testing.assert_close(out.logits[step], expected, atol=1e-5, rtol=0)


def test_fastv_keeps_the_tokens_the_last_token_attends_to_most():
    """The ranking recomputed from q/k + rotary equals the eager attention row of the unpatched model."""
    model, layer = tiny_llava("eager"), 2
    ids, mask = left_padded([prompt_row([1, 5, 6], 1, [7, 8, 9])])
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        attentions = model(input_ids=ids, pixel_values=pixels, output_attentions=True).attentions
    row = attentions[layer][0, :, -1].mean(dim=0)
    image_columns = (ids[0] == IMAGE_TOKEN).nonzero()[:, 0]
    expected = image_columns[row[image_columns].topk(5).indices].sort().values
    vtr.patch(model, "fastv", budget=5, layers=[layer])
    generate(model, ids, mask, pixel_values=pixels)
    kept = vtr.report(model).kept_positions[0]
    assert torch.equal(kept[ids[0, kept] == IMAGE_TOKEN], expected)


@pytest.mark.parametrize("attn, method, layers, budget", [
    ("sdpa", "fastv", [1], 5), ("eager", "fastv", [1], 5), ("sdpa", "tome", [1], 5), ("eager", "tome", [1], 5),
    ("sdpa", "fastv", [1, 2], 4), ("eager", "tome", [0, 3], [8, 3])])
def test_batch_with_left_padding_equals_each_row_alone(attn, method, layers, budget):
    model = tiny_llava(attn)
    ids, mask, pixels = mixed_batch()
    vtr.patch(model, method, budget=budget, layers=layers)
    batched = generate(model, ids, mask, pixel_values=pixels)
    report = vtr.report(model)
    final = budget if isinstance(budget, int) else budget[-1]
    assert report.visual_tokens_after.tolist() == [2 * final, final, 0]
    assert float(report.size.sum()) <= 3 * IMAGE_TOKENS and report.size.shape == (3, final)
    assert_each_row_equals_it_alone(model, ids, mask, pixels, batched, images_per_row=[2, 1, 0])


def test_tome_stages_carry_sizes_and_provenance():
    """Merges at a later stage weigh tokens by the sizes earlier stages gave them; provenance composes."""
    model = tiny_llava()
    ids, mask, pixels = mixed_batch()
    vtr.patch(model, "tome", budget=[8, 3], layers=[0, 3])
    generate(model, ids, mask, pixel_values=pixels)
    report = vtr.report(model)
    assert report.tokens == [16, 8, 4, 3] and report.stage_tokens == [16, 8, 3]
    assert torch.equal(report.size.sum(1), torch.full((3,), 16.0))              # a pure merge keeps every token
    carried = torch.zeros_like(report.size).scatter_add_(1, report.assignment, torch.ones(3, IMAGE_TOKENS))
    assert torch.equal(carried, report.size)


@pytest.mark.parametrize("layers, budget", [([2], IMAGE_TOKENS), ([0, 2], IMAGE_TOKENS),
                                           ([1, 3], [IMAGE_TOKENS, IMAGE_TOKENS])])
def test_budgets_that_keep_everything_match_the_unpatched_model_and_unpatch_removes_the_hooks(layers, budget):
    model = tiny_llava()
    ids, mask, pixels = mixed_batch()
    expected = generate(model, ids, mask, pixel_values=pixels)
    vtr.patch(model, "fastv", budget=budget, layers=layers)
    out = generate(model, ids, mask, pixel_values=pixels)
    torch.testing.assert_close(logits(out), logits(expected), atol=1e-5, rtol=0)
    assert torch.equal(out.sequences, expected.sequences)
    vtr.unpatch(model)
    assert not any(layer._forward_pre_hooks for layer in model.model.language_model.layers)
    out = generate(model, ids, mask, pixel_values=pixels)
    assert torch.equal(logits(out), logits(expected))


def test_text_only_prompts_pass_through_progressive_pruning():
    model = tiny_llava()
    ids, mask = left_padded([[1, 20, 21, 22, 23], [1, 5, 6]])
    expected = generate(model, ids, mask)
    vtr.patch(model, "fastv", budget=4, layers=[1, 2])
    out = generate(model, ids, mask)
    assert torch.equal(logits(out), logits(expected))
    report = vtr.report(model)
    assert report.where == "in the language model at layers 1, 2" and report.visual_tokens_after.tolist() == [0, 0]


def test_stage_budgets_decay_geometrically_example():
    assert stage_budgets(2, 16, 0, 3) == [8, 4, 2]
    assert stage_budgets(64, 576, 0, 1) == [64] and stage_budgets(64, 576, 0, 2) == [192, 64]
    assert stage_budgets([9, 9, 4], 16, 0, 3) == [9, 9, 4]


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 600), st.data(), st.integers(1, 6), st.integers(0, 1))
def test_stage_budgets_are_non_increasing_and_end_at_the_budget(num_tokens, data, num_stages, protected):
    budget = data.draw(st.integers(protected + 1, num_tokens))
    counts = stage_budgets(budget, num_tokens, protected, num_stages)
    assert len(counts) == num_stages and counts[-1] == budget
    assert all(num_tokens >= a >= b >= budget for a, b in zip(counts[:-1], counts[1:]))
    for i, count in enumerate(counts[:-1], start=1):
        assert abs(count - num_tokens * (budget / num_tokens) ** (i / num_stages)) <= 0.5


def test_report_says_where_and_earlier_layers_save_more():
    ids, mask, pixels = mixed_batch()
    saved = []
    for layer in (3, 1, 0):
        model = tiny_llava()
        vtr.patch(model, "fastv", budget=4, layers=[layer])
        generate(model, ids, mask, pixel_values=pixels)
        report = vtr.report(model)
        assert report.where == f"in the language model at layer {layer}"
        assert report.visual_tokens_before.tolist() == [32, 16, 0] and report.visual_tokens_after.tolist() == [8, 4, 0]
        saved.append(report.prefill_flops_saved)
    assert 0 < saved[0] < saved[1] < saved[2]


SINGLE_LAYER = r"layers must be .*strictly increasing .* with each K in \[0, 3\]"


@pytest.mark.parametrize("layers, budget, match", [
    ([4], 4, SINGLE_LAYER), ([1, 4], 4, SINGLE_LAYER), ([], 4, SINGLE_LAYER), ([-1], 4, SINGLE_LAYER),
    ([True], 4, SINGLE_LAYER),
    ([2, 1], 4, r"layers must be .*strictly increasing .*K in \[0, 3\]"),
    ([1, 1], 4, r"layers must be .*strictly increasing"),
    ([0, 4], 4, r"layers must be .*K in \[0, 3\]"),
    ([1, 2], [8, 4, 2], r"budget as a list must give one count per layer in layers= \(2\)"),
    ([1, 2], [4, 8], r"budget as a list .*non-increasing, each an int in \[1, 16\]"),
    ([1, 2], [17, 8], r"budget as a list .*in \[1, 16\]"),
    ([1, 2], [8, 0], r"budget as a list .*in \[1, 16\]"),
    ([1, 2], ["8", 4], r"budget as a list .*in \[1, 16\]"),
    ([1, 2], 0, r"budget must be an int in \[1, 16\] .* or a list of 2"),
    ([1, 2], 2.5, r"budget must be an int in \[1, 16\]"),
    (None, [8, 4], r"budget must be an int in \[1, 16\]"),
])
def test_bad_layers_and_budgets_name_the_parameter_and_range(layers, budget, match):
    model = tiny_llava()
    with pytest.raises(ValueError, match=match):
        vtr.patch(model, "fastv", budget=budget, layers=layers)
    assert not vtr.is_patched(model)


def test_right_padding_is_a_clear_error():
    model = tiny_llava()
    vtr.patch(model, "fastv", budget=4, layers=[1])
    ids, mask = left_padded([prompt_row([1], 1, [7]), prompt_row([1, 2, 3], 1, [7])])
    with pytest.raises(ValueError, match="pad on the left"):
        model(input_ids=ids.flip(1), attention_mask=mask.flip(1), pixel_values=torch.randn(2, 3, 56, 56))


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_a_prompt_that_ends_in_visual_tokens_is_a_clear_error(family):
    """Regression (issue 26, case 6): with ``[1] + [99] * 16`` the last prompt position (a visual token) was
    pruned, so the first new token was predicted from another position. The last prompt token scores the
    visual tokens and predicts: a prompt that ends in one is refused, for every family (shared code)."""
    if family == "llava":
        model = vtr.patch(tiny_llava(), "fastv", budget=4, layers=[1])
        ids, mask = left_padded([prompt_row([1], 1, []), prompt_row([1], 1, [7])])
        inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 56, 56))
    else:
        from qwen_vl_models import batch, tiny_qwen
        model = vtr.patch(tiny_qwen(), "fastv", budget=4, layers=[1])
        prompts = batch([[1, ("image", 0)], [1, 5, ("image", 1), 7]], image_grids=[(1, 8, 8), (1, 8, 8)])
        # row 0 without its <vision_end>: the prompt ends with the image's last token
        prompts.input_ids[0] = torch.cat([prompts.input_ids[0, :1], prompts.input_ids[0, :-1]])
        prompts.attention_mask[0] = torch.cat([prompts.attention_mask[0, :1] * 0, prompts.attention_mask[0, :-1]])
        inputs = prompts.inputs()
    with pytest.raises(ValueError, match=r"end with a text token, but row\(s\) \[0\] end with a visual token"):
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False)


def test_tome_stage_budget_it_can_reach_is_checked_at_patch_time():
    """The 'full' strategy protects the CLS feature: budgets start at 2, and a list budget obeys it too."""
    model = tiny_llava(strategy="full")
    with pytest.raises(ValueError, match=r"in \[2, 17\]"):
        vtr.patch(model, "tome", budget=[8, 1], layers=[1, 2])
    vtr.patch(model, "tome", budget=[8, 2], layers=[1, 2])
    assert vtr.expected_tokens(model)[-1] == 2


def test_report_macs_per_segment_and_scoring_per_stage():
    ids, mask, pixels = mixed_batch()
    reports = {}
    for layers in ([1], [3], [1, 3]):
        model = tiny_llava()
        vtr.patch(model, "fastv", budget=4, layers=layers)
        generate(model, ids, mask, pixel_values=pixels)
        reports[tuple(layers)] = vtr.report(model)
    progressive = reports[(1, 3)]
    assert progressive.where == "in the language model at layers 1, 3" and progressive.stage_tokens == [16, 8, 4]
    assert progressive.visual_tokens_after.tolist() == [8, 4, 0]

    # Segment by segment: layer 0 on every real token, layers 1-2 after stage 1, layer 3 after stage 2.
    c, real = cost(model), mask.sum(1).double()
    per_layer = lambda t: (c.attn_linear + c.mlp_linear) * t + c.attn_dim * t * (t + 1)   # noqa: E731
    after_1, after_2 = real - torch.tensor([16.0, 8, 0]), real - torch.tensor([24.0, 12, 0])
    head = model.lm_head.in_features * model.lm_head.out_features
    expected = per_layer(real) + 2 * per_layer(after_1) + per_layer(after_2) + head
    torch.testing.assert_close(progressive.prefill_macs, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(progressive.prefill_macs_unreduced, NUM_LAYERS * per_layer(real) + head, rtol=1e-12,
                               atol=0)
    # The single-layer call gives what it gave before stages existed.
    single = reports[(1,)]
    torch.testing.assert_close(single.prefill_macs, per_layer(real) + 3 * per_layer(after_2) + head, rtol=1e-12,
                               atol=0)

    # Reducer MACs: each stage scores every token it sees (one query row against all keys), and
    # fastv's own decision on each of the 3 images' tokens entering it.
    attn = model.model.language_model.layers[0].self_attn
    def scoring(n: torch.Tensor) -> float:
        return float((attn.k_proj.in_features * (attn.k_proj.out_features * n + attn.q_proj.out_features)).sum())

    decision = lambda n: 3 * vtr.make_reducer("fastv", fuse="drop").extra_macs(n, c)   # noqa: E731
    assert progressive.reducer_macs == pytest.approx(scoring(real) + scoring(after_1) + decision(16) + decision(8),
                                                     rel=1e-12)
    assert single.reducer_macs == pytest.approx(scoring(real) + decision(16), rel=1e-12)

    # At the same final budget, progressive pruning sits between pruning everything at its first
    # layer (cheapest) and at its last layer.
    for row in range(2):
        assert single.prefill_macs[row] < progressive.prefill_macs[row] < reports[(3,)].prefill_macs[row]
    assert single.prefill_flops_saved > progressive.prefill_flops_saved > reports[(3,)].prefill_flops_saved > 0


@pytest.mark.parametrize("method, layers, budget", [("fastv", [1], 4), ("fastv", [1, 3], 4), ("tome", [0, 2], [8, 3])])
def test_expected_flops_equal_the_report_of_a_prompt_of_one_image(method, layers, budget):
    """vtr.expected_flops counts one image's tokens and the text token that scores them (the shortest prompt
    in-LLM pruning takes): segments, scoring and decisions, as a call does."""
    model = tiny_llava()
    vtr.patch(model, method, budget=budget, layers=layers)
    ids = torch.tensor([prompt_row([], 1, [7])])
    generate(model, ids, torch.ones_like(ids), pixel_values=mixed_batch()[2][:1])
    report = vtr.report(model)
    reduced, unreduced = vtr.expected_flops(model)
    assert reduced == pytest.approx(float(report.prefill_macs[0]) + report.reducer_macs, rel=1e-12)
    assert unreduced == pytest.approx(float(report.prefill_macs_unreduced[0]), rel=1e-12)
    assert reduced < unreduced


def test_prefill_macs_stage_lists_reduce_to_the_single_call():
    model = tiny_llava()
    n, k = torch.tensor([40, 30]), torch.tensor([20, 10])
    assert torch.equal(prefill_macs(model, n, [k], [2]), prefill_macs(model, n, k, 2))
    assert torch.equal(prefill_macs(model, n, [n, n], [1, 3]), prefill_macs(model, n))
    assert torch.equal(prefill_macs(model, n, [k, k], [1, 3]), prefill_macs(model, n, k, 1))


# --- cache modes -------------------------------------------------------------------------------

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layers, budget", [([1], 5), ([0, 2], [8, 3])])
def test_static_cache_equals_the_dynamic_cache(attn, layers, budget):
    """Layers >= K1 hold fewer entries in their static cache: masks span the cache's whole width."""
    model = tiny_llava(attn)
    ids, mask, pixels = mixed_batch()
    vtr.patch(model, "fastv", budget=budget, layers=layers)
    dynamic = generate(model, ids, mask, pixel_values=pixels)
    kept = vtr.report(model).kept_positions
    static = generate(model, ids, mask, pixel_values=pixels, cache_implementation="static")
    assert torch.equal(vtr.report(model).kept_positions, kept)
    torch.testing.assert_close(logits(static), logits(dynamic), atol=1e-5, rtol=0)
    assert torch.equal(static.sequences, dynamic.sequences)


def test_before_the_language_model_static_cache_equals_the_unpatched_model_on_the_compacted_prompt():
    model = tiny_llava()
    ids, mask, pixels = mixed_batch()
    vtr.patch(model, "tome", budget=5, positions="compact")
    features = []

    def capture(module, args, kwargs):     # the reduced features the language model receives
        image = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if image is not None and not features:
            features.extend(f.clone() for f in image.pooler_output)

    handle = model.model.register_forward_pre_hook(capture, with_kwargs=True)
    out = generate(model, ids, mask, pixel_values=pixels, cache_implementation="static")
    handle.remove()
    columns = vtr.report(model).kept_positions
    vtr.unpatch(model)
    assert len(features) == 3 and all(f.shape == (5, 64) for f in features)
    compact_ids = torch.where(columns >= 0, ids.gather(1, columns.clamp_min(0)), PAD)
    expected = generate(model, compact_ids, (columns >= 0).long(),
                        mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=features)})
    torch.testing.assert_close(logits(out), logits(expected), atol=1e-5, rtol=0)
    assert torch.equal(out.sequences[:, ids.shape[1]:], expected.sequences[:, compact_ids.shape[1]:])


MULTI_TOKEN = [
    ({"prompt_lookup_num_tokens": 2}, "prompt_lookup_num_tokens="),
    ({"assistant_model": "tiny"}, "assistant_model="),
    ({"prefill_chunk_size": 8}, "prefill_chunk_size="),
    ({"generation_config": GenerationConfig(prompt_lookup_num_tokens=2)}, "prompt_lookup_num_tokens="),
]


@pytest.mark.parametrize("layers", [[1], [1, 2]])
@pytest.mark.parametrize("options, name", MULTI_TOKEN)
def test_assisted_generation_and_chunked_prefill_are_refused_before_any_forward(layers, options, name):
    model = tiny_llava()
    ids, mask, pixels = mixed_batch()
    options = {k: tiny_llava(seed=1) if v == "tiny" else v for k, v in options.items()}
    vtr.patch(model, "fastv", budget=4, layers=layers)
    with pytest.raises(ValueError, match=rf"\({name}\) is not supported with in-LLM pruning \(layers=\).*one forward"):
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=2, **options)
    with pytest.raises(ValueError, match="no forward pass"):                        # nothing ran
        vtr.report(model)


@pytest.mark.parametrize("layers, budget", [([1], 5), ([0, 2], [8, 3])])
def test_a_decode_loop_by_hand_continues_the_pruning_of_its_prefill(layers, budget):
    """Forwards on their own: the prefill's pruning goes with the KV cache it filled, so each later step
    on that cache sees what generate()'s decode steps see."""
    model = tiny_llava()
    ids = torch.tensor([prompt_row([1, 5, 6], 1, [7, 8, 9])])
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    vtr.patch(model, "fastv", budget=budget, layers=layers)
    expected = generate(model, ids, torch.ones_like(ids), pixel_values=pixels)
    kept = vtr.report(model).kept_positions
    with torch.inference_mode():
        out = model(input_ids=ids, pixel_values=pixels, use_cache=True)      # the forward makes its own cache
        assert torch.equal(vtr.report(model).kept_positions, kept)
        steps = [out.logits[:, -1]]
        for step, token in enumerate(expected.sequences[0, ids.shape[1]:-1]):
            length = ids.shape[1] + step       # positions as generate() numbers them (the pruned caches are shorter)
            steps.append(model(input_ids=token.view(1, 1), cache=out.cache, use_cache=True,
                               position_ids=torch.tensor([[length]]),
                               attention_mask=torch.ones(1, length + 1, dtype=torch.long)).logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, dim=1), logits(expected), atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method, layers, budget", [("fastv", [2], 5), ("evit", [1], 5), ("hired", [1, 2], 4),
                                                    ("tome", [0, 2], [8, 3])])
def test_generate_without_cache_decides_once_from_the_prompt(attn, method, layers, budget):
    """use_cache=False sends the prompt and every generated token in each forward: they keep what the
    prefill decided from the prompt (they used to re-rank by the newest token) and generate what the
    cached run generates. Batch of 2 with left padding; tome: merged features carried over."""
    model = tiny_llava(attn)
    ids, mask = left_padded([prompt_row([1, 5], 1, [7, 8]), prompt_row([1, 5, 6, 9, 10, 11], 1, [7, 12, 13])])
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    vtr.patch(model, method, budget=budget, layers=layers)
    cached = generate(model, ids, mask, pixel_values=pixels)
    report = vtr.report(model)
    uncached = generate(model, ids, mask, pixel_values=pixels, use_cache=False)
    assert torch.equal(uncached.sequences, cached.sequences)
    torch.testing.assert_close(logits(uncached), logits(cached), atol=1e-5, rtol=0)
    assert torch.equal(vtr.report(model).kept_positions, report.kept_positions)    # the prefill's report


def test_a_forward_on_its_own_decides_from_its_own_input():
    """Outside generate() every forward is its own call: its last token ranks the visual tokens."""
    model = tiny_llava()
    ids = torch.tensor([prompt_row([1, 5, 6], 1, [7, 8, 9])])
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    vtr.patch(model, "fastv", budget=5, layers=[2])
    out = generate(model, ids, torch.ones_like(ids), pixel_values=pixels, use_cache=False)
    prefill = vtr.report(model).kept_positions
    with torch.inference_mode():
        model(input_ids=out.sequences, pixel_values=pixels, use_cache=False)
    alone = vtr.report(model).kept_positions
    assert alone.shape[1] == prefill.shape[1] + GENERATE["max_new_tokens"]
    with torch.inference_mode():
        model(input_ids=ids, pixel_values=pixels, use_cache=False)
    assert torch.equal(vtr.report(model).kept_positions, prefill)


@pytest.mark.parametrize("layers", [[1], [0, 2]])
def test_prompt_in_pieces_or_several_tokens_on_a_pruned_cache_are_clear_errors(layers):
    model = tiny_llava()
    vtr.patch(model, "fastv", budget=4, layers=layers)
    row = torch.tensor([prompt_row([1, 5, 6], 1, [7, 12, 13])])
    pixels = torch.randn(1, 3, 56, 56)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config.text_config)
        model(input_ids=row[:, :-2], pixel_values=pixels, cache=cache, use_cache=True)     # first chunk
        length = cache.get_seq_length()
        with pytest.raises(ValueError, match=r"forward of 2 tokens on a cache that already holds .*chunked prefill"):
            model(input_ids=row[:, -2:], cache=cache, use_cache=True)
        assert cache.get_seq_length() == length                                          # refused before it ran
        cache = DynamicCache(config=model.config.text_config)
        model(input_ids=row[:, :3], cache=cache, use_cache=True)              # text first, then the image
        with pytest.raises(ValueError, match="chunked prefill"):
            model(input_ids=row[:, 3:], pixel_values=pixels, cache=cache, use_cache=True)


def test_before_the_language_model_supports_prompt_lookup_and_chunked_prefill():
    model = tiny_llava()
    ids, mask, pixels = mixed_batch()
    vtr.patch(model, "fastv", budget=4)
    expected = generate(model, ids[:1], mask[:1], pixel_values=pixels[:2])      # assisted generation: one row
    for options in ({"prompt_lookup_num_tokens": 2}, {"prefill_chunk_size": 8}):
        out = generate(model, ids[:1], mask[:1], pixel_values=pixels[:2], **options)
        assert torch.equal(out.sequences, expected.sequences)


def test_before_the_language_model_supports_an_assistant_model_with_autograd_on():
    """generate() runs without autograd; so does the patched model's reduction before it (the
    assistant's candidate generator deep-copies the reduced features, which a graph would forbid)."""
    model, assistant = tiny_llava(), tiny_llava(seed=1)
    ids, mask, pixels = mixed_batch()
    vtr.patch(model, "tome", budget=5)
    options = dict(input_ids=ids[:1], attention_mask=mask[:1], pixel_values=pixels[:2], max_new_tokens=4,
                   do_sample=False)
    expected = model.generate(**options)
    assert torch.is_grad_enabled()
    assert torch.equal(model.generate(**options, assistant_model=assistant), expected)


def test_fastv_reducer_keeps_the_most_attended_tokens_in_order():
    state = vtr.TokenState.start(torch.randn(2, 6, 3), num_protected=1)
    attention = torch.tensor([[0.5, 0.1, 0.3, 0.05, 0.4, 0.2], [0.5, 0.4, 0.1, 0.3, 0.2, 0.0]])
    reducer = vtr.make_reducer("fastv", fuse="drop")
    out = reducer(state, 3, vtr.Signals(cls_attention=attention))
    assert out.assignment.tolist() == [[0, -1, 1, -1, 2, -1], [0, 1, -1, 2, -1, -1]]
    assert torch.equal(out.x[0], state.x[0, [0, 2, 4]]) and torch.equal(out.size, torch.ones(2, 3))
    with pytest.raises(ValueError, match="fastv needs signals.cls_attention"):
        reducer(state, 3, vtr.Signals())


# --- training: labels follow the kept positions --------------------------------------------------------

@pytest.mark.parametrize("method, layers, budget", [("fastv", [1, 2], 4), ("evit", [1], 5), ("tome", [0, 2], [8, 3])])
def test_labels_follow_the_kept_positions_and_the_loss_trains(method, layers, budget):
    model = tiny_llava()
    ids, mask, pixels = mixed_batch()
    labels = text_labels(ids, mask)
    vtr.patch(model, method, budget=budget, layers=layers)
    language = model.model.language_model
    out = check_loss_on_kept_positions(model, ids, mask, pixels, labels, lambda m: (
        language.layers[0].mlp.down_proj.weight, language.layers[-1].self_attn.q_proj.weight,
        m.model.multi_modal_projector.linear_2.weight))
    as_tuple = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(as_tuple[1], out.logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("layers, budget", [([1], IMAGE_TOKENS), ([0, 2], [IMAGE_TOKENS, IMAGE_TOKENS])])
def test_labels_with_nothing_pruned_give_the_unpatched_loss_and_gradients(layers, budget):
    model = tiny_llava()
    ids, mask, pixels = mixed_batch()
    labels = text_labels(ids, mask)
    expected = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
    expected.backward()
    grad = model.model.language_model.layers[2].mlp.up_proj.weight.grad.clone()
    model.zero_grad()
    vtr.patch(model, "fastv", budget=budget, layers=layers)
    loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
    loss.backward()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.model.language_model.layers[2].mlp.up_proj.weight.grad, grad, atol=1e-6,
                               rtol=0)


def test_shift_labels_with_in_llm_pruning_is_a_clear_error():
    model = tiny_llava()
    ids, mask, pixels = mixed_batch()
    vtr.patch(model, "fastv", budget=4, layers=[1])
    with pytest.raises(ValueError, match="shift_labels cannot be combined with in-LLM pruning"):
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=ids, shift_labels=ids)


def _kept_image_columns(model, ids, mask, pixels) -> torch.Tensor:
    generate(model, ids, mask, pixel_values=pixels)
    kept = vtr.report(model).kept_positions[0]
    return kept[ids[0, kept] == IMAGE_TOKEN]


def test_query_in_the_lm_reads_the_question_as_the_layer_holds_it():
    """In the LM, ``query`` compares each image token's hidden state entering layer K with the text after the image
    at that layer (best match over the text tokens): with ``relevance_weight=1`` it keeps the top cosines. A
    different question changes the choice; a ``vtr.conditioned`` query replaces the question."""
    model, layer, budget = tiny_llava("eager"), 2, 5
    ids, mask = left_padded([prompt_row([1, 5, 6], 1, [7, 8, 9])])
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    image = (ids[0] == IMAGE_TOKEN).nonzero()[:, 0]

    def expected(question_ids, query=None):
        with torch.inference_mode():
            hidden = model(input_ids=question_ids, pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
        tokens = torch.nn.functional.normalize(hidden[0, image].double(), dim=-1)
        text = hidden[0, image[-1] + 1:] if query is None else query[0][None]
        cosine = (tokens @ torch.nn.functional.normalize(text.double(), dim=-1).T).amax(dim=1)
        ranked = cosine.sort(descending=True).values
        assert ranked[budget - 1] - ranked[budget] > 1e-4   # the choice does not hinge on rounding
        return image[cosine.topk(budget).indices].sort().values

    vtr.patch(model, "query", budget=budget, layers=[layer], relevance_weight=1.0)
    try:
        assert torch.equal(_kept_image_columns(model, ids, mask, pixels), expected(ids))
        other = ids.clone()
        other[0, -3:] = torch.tensor([40, 41, 42])
        assert torch.equal(_kept_image_columns(model, other, mask, pixels), expected(other))
        assert not torch.equal(expected(other), expected(ids))
        given = torch.randn(1, 64, generator=torch.Generator().manual_seed(5))
        with vtr.conditioned(model, given):
            assert torch.equal(_kept_image_columns(model, ids, mask, pixels), expected(ids, given))
        with pytest.raises(ValueError, match="one row per prompt"), vtr.conditioned(model, given.expand(2, -1)):
            generate(model, ids, mask, pixel_values=pixels)
    finally:
        vtr.unpatch(model)
