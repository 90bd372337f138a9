"""In-LLM pruning on Gemma 3 (``layers=``): the layers past the pruning keep Gemma 3's own masks for the kept tokens.

Exact when nothing is pruned (greedy, beams, left padding); after pruning, the logits are those of an independent
reference (the unpatched decoder layers run on the kept tokens with the masks transformers builds from their token
types, and each layer type's rotary table at their original positions), which a causal mask or a lost sliding
window would miss; the stage layer ranks by the attention the layer itself computes (windowed on local layers);
rows alone equal rows in a batch; static and no cache; the report and the FLOPs count.
"""
import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model, get_block_sequence_ids_for_mask

import vtr
from vtr.adapters.vlm.sequence import last_token_attention, layer_keys, rows_attention

from gemma3_models import IMAGE, generate, inputs, logits, tiny_gemma3, tiny_gemma3_layers

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
SLIDING, FULL = "sliding_attention", "full_attention"
# Global at 1 and 4, local elsewhere: a stage at a global layer, then local and global layers after it.
MIXED = [SLIDING, FULL, SLIDING, SLIDING, FULL, SLIDING]
IN_LM_ONLY = sorted(m for m, info in vtr.methods(details=True).items() if "in_lm" in info.stages
                    and not vtr.reducers.REDUCERS[m].learned and not vtr.reducers.REDUCERS[m].requires_one_of
                    and m not in {"none", "pool"})


@pytest.fixture(scope="module")
def model():
    return tiny_gemma3_layers(MIXED)


@pytest.fixture(autouse=True)
def unpatched(model):
    yield
    if vtr.is_patched(model):
        vtr.unpatch(model)


@pytest.mark.parametrize("layers", [[1], [0, 4], [2, 3]])
def test_a_budget_that_keeps_every_token_equals_the_unpatched_model(model, layers):
    data = inputs()
    beams = dict(max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    expected = generate(model, data)
    with torch.inference_mode():
        expected_beams = model.generate(**data, **beams)
    vtr.patch(model, "fastv", budget=1000, layers=layers)
    out = generate(model, data)
    assert torch.equal(out.sequences, expected.sequences) and torch.equal(logits(out), logits(expected))
    report = vtr.report(model)
    assert report.visual_tokens_before.tolist() == report.visual_tokens_after.tolist() == [32, 16, 0]
    with torch.inference_mode():
        assert torch.equal(model.generate(**data, **beams), expected_beams)


def _reference(model, ids: torch.Tensor, pixels: torch.Tensor, stages: dict, bidirectional: bool = True,
               window: bool = True) -> torch.Tensor:
    """Last-position logits of one unpadded row, layer by layer through the unpatched decoder layers: from each
    stage layer on, only that stage's kept prompt columns (``stages``: layer -> columns), each layer with the mask
    transformers builds for the sequence it sees (from the kept tokens' types: ``bidirectional=False`` leaves them
    out; ``window=False`` gives local layers the global mask) and its type's rotary table at the original
    positions."""
    inner, language = model.model, model.model.language_model
    config = language.config
    with torch.inference_mode():
        hidden = language.embed_tokens(ids)
        hidden[ids == IMAGE] = inner.get_image_features(pixel_values=pixels).pooler_output.flatten(0, 1)
        present = torch.arange(ids.shape[1])
        for index, layer in enumerate(language.layers):
            if index in stages:
                slots = torch.searchsorted(present, stages[index])
                hidden, present = hidden[:, slots], stages[index]
            if index == 0 or index in stages:
                types = (ids[:, present] == IMAGE).long() * int(bidirectional)
                masks = create_masks_for_vision_model(
                    config, hidden, None, None, None,
                    block_sequence_ids=get_block_sequence_ids_for_mask(types))
                if not window:
                    masks[SLIDING] = masks[FULL]
            kind = config.layer_types[index]
            hidden = layer(hidden, attention_mask=masks[kind], position_ids=present[None],
                           position_embeddings=language.rotary_emb(hidden, present[None], kind))
        return model.lm_head(language.norm(hidden[:, -1]))[0]


@pytest.mark.parametrize("method, layers", [("fastv", [1]), ("fastv", [2, 4]), ("pyramiddrop", [1, 3])])
def test_the_layers_after_pruning_keep_gemmas_masks_for_the_kept_tokens(model, method, layers):
    """Each image's kept tokens see each other both ways, text causally, local layers within their window: the
    reference that has all three matches, and each one left out would be noticed."""
    data = inputs(only=[0])                          # two images, unpadded
    vtr.patch(model, method, budget=5, layers=layers)
    with torch.inference_mode():
        mine = model(**data).logits[0, -1]
    report = vtr.report(model)
    assert report.image_tokens_after.tolist() == [5, 5]
    stages = {layer: columns[0] for layer, columns in zip(layers, report.stage_positions)}
    vtr.unpatch(model)
    ids, pixels = data["input_ids"], data["pixel_values"]
    torch.testing.assert_close(mine, _reference(model, ids, pixels, stages), atol=1e-5, rtol=0)
    assert (mine - _reference(model, ids, pixels, stages, bidirectional=False)).abs().max() > 1e-3
    assert (mine - _reference(model, ids, pixels, stages, window=False)).abs().max() > 1e-3


def _layer_inputs(model, index: int, data: dict) -> tuple:
    """(hidden states, rotary tables, eager attention weights ``[1, H, L, L]``, the cache) of decoder layer
    ``index`` in one forward of ``data``."""
    seen = {}
    hook = model.model.language_model.layers[index].register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(hidden=args[0] if args else kwargs["hidden_states"],
                                                 rotary=kwargs["position_embeddings"]), with_kwargs=True)
    with torch.inference_mode():
        out = model(**data, output_attentions=True, use_cache=True)
    hook.remove()
    return seen["hidden"], seen["rotary"], out.attentions[index], out.cache


def test_a_local_stage_layer_ranks_by_its_windowed_attention():
    """At a sliding-window stage layer, the last prompt token's attention vtr ranks by is the one the layer computes
    (transformers' eager attention weights): 0 beyond the window. So are the attention rows of the text tokens
    (SparseVLM's raters), with Gemma 3's per-head q/k norms."""
    eager = tiny_gemma3_layers(MIXED, attn="eager")
    hidden, (cos, sin), weights, _ = _layer_inputs(eager, 2, inputs(only=[0]))
    layer = eager.model.language_model.layers[2]
    real = torch.ones(hidden.shape[:2], dtype=torch.bool)
    with torch.inference_mode():
        mine = last_token_attention(layer, hidden, cos, sin, real, window=layer.self_attn.sliding_window)
        text = torch.tensor([[1, 2, 20, 38, 39, 40]])          # text columns of the row (not its image tokens)
        rows = rows_attention(layer, hidden, cos, sin, real, text, window=layer.self_attn.sliding_window)
    assert layer.self_attn.sliding_window == 8 and int((weights[0, :, -1].mean(0) > 0).sum()) == 8
    torch.testing.assert_close(mine, weights[:, :, -1].mean(dim=1), atol=1e-6, rtol=0)
    torch.testing.assert_close(rows, weights[:, :, text[0]].mean(dim=1), atol=1e-6, rtol=0)


def test_the_keys_dart_reads_are_the_layers_own():
    """``layer_keys``: the keys the layer's attention caches (after Gemma 3's per-head k norm and its rotary)."""
    model = tiny_gemma3_layers(MIXED, attn="eager")
    hidden, (cos, sin), _, cache = _layer_inputs(model, 1, inputs(only=[0]))
    with torch.inference_mode():
        keys = layer_keys(model.model.language_model.layers[1], hidden, cos, sin)
    cached = cache.layers[1].keys                               # [1, Hk, L, d] of a global layer
    torch.testing.assert_close(keys, cached.transpose(1, 2).reshape(keys.shape), atol=1e-6, rtol=0)


@pytest.mark.parametrize("attn, method, layers", [("sdpa", "fastv", [1]), ("eager", "fastv", [2, 4]),
                                                  ("sdpa", "tome", [1, 3]), ("sdpa", "dart", [1])])
def test_each_row_of_a_left_padded_batch_equals_the_row_alone(attn, method, layers):
    model = vtr.patch(tiny_gemma3_layers(MIXED, attn), method, budget=5, layers=layers)
    batched = generate(model, inputs())
    assert vtr.report(model).visual_tokens_after.tolist() == [10, 5, 0]
    for row in range(3):
        alone = generate(model, inputs(only=[row]))
        torch.testing.assert_close(logits(batched)[row], logits(alone)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("layers", [[1], [2, 4]])
def test_static_and_no_cache_equal_the_dynamic_cache(model, layers):
    """Local layers' caches keep their last window of the pruned sequence (static: a rolling buffer)."""
    vtr.patch(model, "fastv", budget=5, layers=layers)
    data = inputs()
    dynamic = generate(model, data, max_new_tokens=12)   # past the window of 8 on the pruned rows
    static = generate(model, data, max_new_tokens=12, cache_implementation="static")
    uncached = generate(model, data, max_new_tokens=12, use_cache=False)
    torch.testing.assert_close(logits(static), logits(dynamic), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(uncached), logits(dynamic), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", IN_LM_ONLY)
def test_every_in_lm_method_keeps_each_images_budget(model, method):
    vtr.patch(model, method, budget=5, layers=[1, 4] if method == "pyramiddrop" else [1])
    generate(model, inputs(), max_new_tokens=1)
    assert vtr.report(model).image_tokens_after.tolist() == [5, 5, 5]


def test_report_and_the_flops_count(model):
    """Tokens per image; ``vtr.expected_flops`` equals the report of a prompt of one image and the text token that
    scores it."""
    vtr.patch(model, "fastv", budget=4, layers=[1])
    assert vtr.expected_tokens(model)[0] == 16
    generate(model, inputs(), max_new_tokens=1)
    report = vtr.report(model)
    assert report.image_tokens_before.tolist() == [16] * 3 and report.image_tokens_after.tolist() == [4] * 3
    assert report.image_rows.tolist() == [0, 0, 1] and report.where == "in the language model at layer 1"
    assert report.prefill_macs[2] == report.prefill_macs_unreduced[2] and 0 < report.prefill_flops_saved < 1
    ids = torch.tensor([[IMAGE] * 16 + [7]])
    one = dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=(ids == IMAGE).long(),
               pixel_values=inputs(only=[1])["pixel_values"])
    generate(model, one, max_new_tokens=1)
    single = vtr.report(model)
    reduced, unreduced = vtr.expected_flops(model)
    assert reduced == pytest.approx(float(single.prefill_macs[0]) + single.reducer_macs, rel=1e-12)
    assert unreduced == pytest.approx(float(single.prefill_macs_unreduced[0]), rel=1e-12) and reduced < unreduced


def test_without_token_types_the_kept_tokens_are_causal_as_in_the_unpatched_model():
    """transformers gives a call without ``token_type_ids`` causal masks everywhere; so do the layers past the
    pruning (at a budget that keeps everything, the unpatched model's logits exactly)."""
    model = tiny_gemma3()
    data = {k: v for k, v in inputs().items() if k != "token_type_ids"}
    expected = generate(model, data)
    vtr.patch(model, "fastv", budget=1000, layers=[1])
    assert torch.equal(logits(generate(model, data)), logits(expected))
    with pytest.raises(ValueError, match="token_type_ids must mark"):
        generate(model, data | {"token_type_ids": torch.zeros_like(data["input_ids"])})


def test_the_vlm_benchmark_prunes_inside_the_language_model():
    """``vtr bench --model gemma3:...`` with ``layers=``: the prefill's speed-up beside its analytic MACs ratio."""
    from vtr.tools import bench_vlm
    model = bench_vlm.build("gemma3:tiny", 1, 2)
    (row,) = bench_vlm.run(model, bench_vlm.workload(model), [("fastv", {"method": "fastv", "budget": 4,
                                                                          "layers": [1]})], rounds=1, decode_tokens=1)
    assert (row.where, row.visual, row.kept) == ("LM layer 1", 16, 4) and 0 < row.macs_ratio < 1
