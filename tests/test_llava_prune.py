"""In-LLM pruning of LLaVA at layer K (``layers=[K]``): exact against a plain reference, per-row exact in batches."""
import pytest
import torch

import vtr

from _llava_models import (GENERATE, IMAGE_TOKEN, IMAGE_TOKENS, assert_each_row_equals_it_alone, generate, left_padded,
                           logits, mixed_batch, prompt_row, tiny_llava)


def causal(n: int) -> torch.Tensor:
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.zeros(1, 1, n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)


def reference_logits(model, ids, pixels, kept, layer, generated):
    """The unpatched layers, no cache: layers < K on the whole sequence, layers >= K on the kept
    prompt columns plus the generated tokens, each at its original position."""
    inner, language = model.model, model.model.language_model
    with torch.inference_mode():
        sequence = torch.cat([ids, generated[None]], dim=1)
        hidden = language.embed_tokens(sequence)
        hidden[sequence == IMAGE_TOKEN] = torch.cat(list(inner.get_image_features(pixel_values=pixels).pooler_output))
        columns = torch.cat([kept, torch.arange(ids.shape[1], sequence.shape[1])])
        positions = torch.arange(sequence.shape[1])[None]
        for index, decoder in enumerate(language.layers):
            if index == layer:
                hidden, positions = hidden[:, columns], positions[:, columns]
            hidden = decoder(hidden, attention_mask=causal(hidden.shape[1]), position_ids=positions,
                             position_embeddings=language.rotary_emb(hidden, positions))
        return model.lm_head(language.norm(hidden[:, -1]))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layer", [0, 2])
def test_prefill_and_decode_equal_the_kept_sequence_reference(attn, layer):
    model = tiny_llava(attn)
    ids, mask = left_padded([prompt_row([1, 5, 6], 1, [7, 8, 9])])
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    vtr.patch(model, "fastv", budget=5, layers=[layer])
    out = generate(model, ids, mask, pixel_values=pixels)
    kept = vtr.report(model).kept_positions[0]
    vtr.unpatch(model)
    assert len(kept) == ids.shape[1] - IMAGE_TOKENS + 5
    generated = out.sequences[0, ids.shape[1]:]
    for step in range(GENERATE["max_new_tokens"]):
        expected = reference_logits(model, ids, pixels, kept, layer, generated[:step])
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


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["fastv", "tome"])
def test_batch_with_left_padding_equals_each_row_alone(attn, method):
    model = tiny_llava(attn)
    ids, mask, pixels = mixed_batch()
    vtr.patch(model, method, budget=5, layers=[1])
    batched = generate(model, ids, mask, pixel_values=pixels)
    report = vtr.report(model)
    assert report.visual_tokens_after.tolist() == [10, 5, 0]
    assert_each_row_equals_it_alone(model, ids, mask, pixels, batched, images_per_row=[2, 1, 0])


def test_keeping_every_token_matches_the_unpatched_model_and_unpatch_removes_the_hooks():
    model = tiny_llava()
    ids, mask, pixels = mixed_batch()
    expected = generate(model, ids, mask, pixel_values=pixels)
    vtr.patch(model, "fastv", budget=IMAGE_TOKENS, layers=[2])
    out = generate(model, ids, mask, pixel_values=pixels)
    torch.testing.assert_close(logits(out), logits(expected), atol=1e-5, rtol=0)
    vtr.unpatch(model)
    assert not any(layer._forward_pre_hooks for layer in model.model.language_model.layers)
    out = generate(model, ids, mask, pixel_values=pixels)
    assert torch.equal(logits(out), logits(expected))


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


def test_bad_layers_and_right_padding_are_clear_errors():
    model = tiny_llava()
    for layers in ([4], [2, 1], [1, 1], [1, 4], [], [-1], [True]):
        with pytest.raises(ValueError, match=r"layers must be .*strictly increasing .* with each K in \[0, 3\]"):
            vtr.patch(model, "fastv", budget=4, layers=layers)
    vtr.patch(model, "fastv", budget=4, layers=[1])
    ids, mask = left_padded([prompt_row([1], 1, [7]), prompt_row([1, 2, 3], 1, [7])])
    with pytest.raises(ValueError, match="pad on the left"):
        model(input_ids=ids.flip(1), attention_mask=mask.flip(1), pixel_values=torch.randn(2, 3, 56, 56))


def test_fastv_reducer_keeps_the_most_attended_tokens_in_order():
    state = vtr.TokenState.start(torch.randn(2, 6, 3), num_protected=1)
    attention = torch.tensor([[0.5, 0.1, 0.3, 0.05, 0.4, 0.2], [0.5, 0.4, 0.1, 0.3, 0.2, 0.0]])
    reducer = vtr.make_reducer("fastv")
    out = reducer(state, 3, vtr.Signals(cls_attention=attention))
    assert out.assignment.tolist() == [[0, -1, 1, -1, 2, -1], [0, 1, -1, 2, -1, -1]]
    assert torch.equal(out.x[0], state.x[0, [0, 2, 4]]) and torch.equal(out.size, torch.ones(2, 3))
    with pytest.raises(ValueError, match="fastv needs signals.cls_attention"):
        reducer(state, 3, vtr.Signals())
