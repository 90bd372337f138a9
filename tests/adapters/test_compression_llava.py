"""vtr.compress on a tiny LLaVA: TokenPacker in place of the projector, adaptive granularity per image and question."""
from __future__ import annotations

import pytest
import torch

import vtr
from vtr.compression.granularity import relevance
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from llava_models import (GENERATE, IMAGE_TOKEN, assert_each_row_equals_it_alone, generate, left_padded,
                          mixed_batch, prompt_row, text_labels, tiny_llava)


def six_by_six_llava() -> LlavaForConditionalGeneration:
    """36 patch tokens (84 / 14), a 3-layer tower: scale 3 packs them into 4."""
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=84, patch_size=14)
    text = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, image_seq_length=36,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    return LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


def run(model, ids, mask, pixels):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits


# -- TokenPacker ----------------------------------------------------------------------------------------------

def test_tokenpacker_packs_each_image_and_unpatch_restores_the_model():
    model = tiny_llava()
    ids, mask, pixels = mixed_batch()
    before, keys = run(model, ids, mask, pixels), list(model.state_dict())
    vtr.compress(model, "tokenpacker", scale=2)
    logits = run(model, ids, mask, pixels)
    report = vtr.report(model)
    assert report.tokens_before.tolist() == [16, 16, 16] and report.tokens_after.tolist() == [4, 4, 4]
    assert report.image_rows.tolist() == [0, 0, 1]
    lengths = mask.sum(1) - 12 * torch.tensor([2, 1, 0])     # the prompt compacted: 12 placeholders per image fewer
    assert logits.shape[1] == int(lengths.max())
    assert any(k.startswith("model.multi_modal_projector.attention") for k in model.state_dict())
    vtr.unpatch(model)
    assert type(model) is LlavaForConditionalGeneration and list(model.state_dict()) == keys
    assert torch.equal(run(model, ids, mask, pixels), before)


def test_tokenpacker_scale_3_and_multi_level_layers():
    model = six_by_six_llava()
    vtr.compress(model, "tokenpacker", scale=3, layers=[1, -2, 3])
    packer = model.model.multi_modal_projector
    assert packer.k_proj[0].in_features == 3 * 32 and packer.num_tokens == 4
    assert model._vtr_compression.layers == [1, 2, 3, 2]      # the levels, then the query's layer (-2)
    ids, mask = left_padded([prompt_row([1, 5], 1, [7, 8], per_image=36)])
    run(model, ids, mask, torch.randn(1, 3, 84, 84))
    assert vtr.report(model).tokens_after.tolist() == [4]


def test_tokenpacker_reads_the_levels_it_names():
    """Changing the tower's last layer moves the output only when layer 3 (its output) is one of the levels."""
    pixels = torch.randn(1, 3, 84, 84)
    ids, mask = left_padded([prompt_row([1], 1, [7], per_image=36)])
    for layers, moves in (([1, 2], False), ([1, 3], True)):
        model = six_by_six_llava()
        vtr.compress(model, "tokenpacker", scale=3, layers=layers)
        before = run(model, ids, mask, pixels)
        with torch.no_grad():
            model.model.vision_tower.encoder.layers[2].mlp.fc2.bias.add_(1.0)
        assert (not torch.equal(run(model, ids, mask, pixels), before)) == moves


def test_tokenpacker_state_dict_round_trips_strictly():
    model, fresh = tiny_llava(), tiny_llava(seed=1)
    vtr.compress(model, "tokenpacker", scale=2)
    vtr.compress(fresh, "tokenpacker", scale=2)
    fresh.load_state_dict(model.state_dict(), strict=True)
    ids, mask, pixels = mixed_batch()
    assert torch.equal(run(fresh, ids, mask, pixels), run(model, ids, mask, pixels))
    with pytest.raises(RuntimeError, match="multi_modal_projector"):
        tiny_llava().load_state_dict(model.state_dict(), strict=True)
    with pytest.raises(ValueError, match="save model.state_dict"):
        model.save_pretrained("never-written")


@pytest.mark.parametrize("method, options", [("tokenpacker", {"scale": 2}), ("granularity", {"levels": [1, 2, 4]})])
def test_generate_rows_are_independent_and_return_the_callers_prompt(method, options):
    model = tiny_llava()
    vtr.compress(model, method, **options)
    ids, mask, pixels = mixed_batch()
    batched = generate(model, ids, mask, pixel_values=pixels)
    assert torch.equal(batched.sequences[:, :ids.shape[1]], ids)
    assert batched.sequences.shape[1] == ids.shape[1] + GENERATE["max_new_tokens"]
    assert_each_row_equals_it_alone(model, ids, mask, pixels, batched, images_per_row=[2, 1, 0])


def test_labels_follow_the_compacted_prompt_and_the_projector_trains():
    model = tiny_llava()
    vtr.compress(model, "tokenpacker", scale=2)
    ids, mask, pixels = mixed_batch()
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=text_labels(ids, mask))
    frozen = {n: p.clone() for n, p in model.named_parameters() if "multi_modal_projector" not in n}
    with torch.no_grad():
        first = float(model(**batch).loss)
    losses = vtr.compression.train_projector(model, [batch] * 30, steps=30, lr=3e-3)
    assert losses[-1] < first - 0.05
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert not model.training and all(p.requires_grad for p in model.parameters())


def test_the_lora_stage_adds_adapters_to_the_language_model():
    pytest.importorskip("peft")
    model = tiny_llava()
    vtr.compress(model, "tokenpacker", scale=2)
    ids, mask, pixels = mixed_batch()
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=text_labels(ids, mask))
    losses = vtr.compression.train_projector(model, [batch] * 4, steps=2, lora_rank=2)
    assert len(losses) == 4
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())


# -- adaptive granularity -------------------------------------------------------------------------------------

def test_the_relevance_router_choice_changes_with_the_question():
    """Word 50's embedding points at the visual token that stands out most from the image's mean (its question
    singles that token out: the finest level); word 51's is zero (relevance uniform: the coarsest). The row's text
    is BOS (zeroed) and the word. Both rows in one batch."""
    model = tiny_llava()
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output[0]
        centred = features - features.mean(0)
        j = int(centred.norm(dim=1).argmax())
        embed = model.get_input_embeddings().weight
        embed[[1, 51]] = 0.0
        embed[50] = 2 * 100 * centred[j] / centred[j].norm() ** 2
    assert float(relevance(features, embed[[1, 50]], temperature=0.25)[j]) > 0.9     # the constructed case holds
    vtr.compress(model, "granularity", levels=[1, 2, 4], tolerance=0.25, temperature=0.25)
    ids, mask = left_padded([prompt_row([1], 1, [50]), prompt_row([1], 1, [51])])
    run(model, ids, mask, pixels.repeat(2, 1, 1, 1))
    report = vtr.report(model)
    assert report.levels.tolist() == [1, 4] and report.tokens_after.tolist() == [16, 1]


def test_forced_level_and_the_learned_router_in_the_state_dict():
    model = tiny_llava()
    vtr.compress(model, "granularity", levels=[1, 2], router="learned")
    ids, mask, pixels = mixed_batch()
    with vtr.compression.forced_level(model, 2):
        run(model, ids, mask, pixels)
    assert vtr.report(model).levels.tolist() == [2, 2, 2]
    fresh = tiny_llava()
    vtr.compress(fresh, "granularity", levels=[1, 2], router="learned")
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert any(k.startswith("_vtr_compression.router.") for k in model.state_dict())
    with pytest.raises(ValueError, match="one of the granularity levels"):
        with vtr.compression.forced_level(model, 4):
            run(model, ids, mask, pixels)   # refused on entering (a check left to the call is caught too)


def test_rglf_trains_only_the_router():
    model = tiny_llava()
    vtr.compress(model, "granularity", levels=[1, 2, 4], router="learned")
    ids, mask, pixels = mixed_batch()
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=text_labels(ids, mask))
    losses_at = vtr.compression.answer_losses(model, batch)
    assert losses_at.shape == (3, 3) and torch.isfinite(losses_at).all()
    router = {n: p.clone() for n, p in model._vtr_compression.router.named_parameters()}
    others = {n: p.clone() for n, p in model.named_parameters() if "_vtr_compression" not in n}
    losses = vtr.compression.train_router(model, [batch] * 5, steps=5, token_cost=0.1)
    assert len(losses) == 5 and all(l == l for l in losses)
    assert any(not torch.equal(p, router[n]) for n, p in model._vtr_compression.router.named_parameters())
    assert all(torch.equal(p, others[n]) for n, p in model.named_parameters() if n in others)


# -- bad options ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, options, message", [
    ("pack", {}, "unknown compression 'pack'"),
    ("tokenpacker", {"scale": 5}, "at most the patch grid"),
    ("tokenpacker", {"scale": 1}, "integer >= 2"),
    ("tokenpacker", {"layers": [5]}, r"layers must be hidden-state indexes of the 2-layer vision tower, in \[-3, 2\]"),
    ("tokenpacker", {"factor": 2}, "takes no option factor"),
    ("tokenpacker", {"width": 30, "heads": 4}, "heads must divide the attention's width 30, got 4"),
    ("tokenpacker", {"heads": 0}, "heads must be a positive integer"),
    ("tokenpacker", {"width": 2.5}, "width must be a positive integer"),
    ("granularity", {"levels": [1, 5]}, "levels must"),
    ("granularity", {"router": "oracle"}, "router must be"),
    ("granularity", {"tolerance": -0.1}, "tolerance"),
])
def test_bad_options_are_clear_errors(method, options, message):
    model = tiny_llava()
    with pytest.raises(ValueError, match=message):
        vtr.compress(model, method, **options)
    assert not vtr.compression.is_compressed(model) and type(model) is LlavaForConditionalGeneration


def test_compress_refuses_twice_patched_models_and_other_families():
    model = tiny_llava()
    vtr.compress(model, "tokenpacker")
    with pytest.raises(ValueError, match="already compressed"):
        vtr.compress(model, "granularity")
    with pytest.raises(ValueError, match="vtr.unpatch"):
        vtr.patch(model, "pool", budget=4)
    vtr.unpatch(model)
    vtr.patch(model, "pool", budget=4)
    with pytest.raises(ValueError, match="patched with"):
        vtr.compress(model, "tokenpacker")
    with pytest.raises(vtr.UnsupportedModelError, match="LlavaForConditionalGeneration"):
        vtr.compress(torch.nn.Linear(2, 2), "tokenpacker")


def test_a_prompt_with_the_wrong_placeholder_count_is_a_clear_error():
    model = tiny_llava()
    vtr.compress(model, "tokenpacker")
    ids, mask = left_padded([prompt_row([1], 1, [7], per_image=4)])
    with pytest.raises(ValueError, match="need 16 each"):
        run(model, ids, mask, torch.randn(1, 3, 56, 56))


def test_each_recipe_refuses_the_other_compression():
    model = tiny_llava()
    ids, mask, pixels = mixed_batch()
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=text_labels(ids, mask))
    vtr.compress(model, "granularity")
    with pytest.raises(ValueError, match="train_projector trains a TokenPacker projector"):
        vtr.compression.train_projector(model, [batch], steps=1)
    with pytest.raises(ValueError, match="train_router trains the learned router"):
        vtr.compression.train_router(model, [batch], steps=1)       # the relevance router has nothing to train
    vtr.unpatch(model)
    vtr.compress(model, "tokenpacker")
    with pytest.raises(ValueError, match="train_router trains the learned router"):
        vtr.compression.train_router(model, [batch], steps=1)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        vtr.compression.train_projector(model, [batch], steps=0)


def test_a_compressed_model_deep_copies_and_pickles():
    """pickle before the first call (transformers then adds output-capturing closures no model pickles with)."""
    import copy
    import pickle

    model = tiny_llava()
    vtr.compress(model, "granularity", router="learned")
    pickled = pickle.loads(pickle.dumps(model))
    ids, mask, pixels = mixed_batch()
    expected = run(model, ids, mask, pixels)
    for clone in (copy.deepcopy(model), pickled):
        assert torch.equal(run(clone, ids, mask, pixels), expected)
        assert vtr.report(clone).levels.tolist() == vtr.report(model).levels.tolist()
        vtr.unpatch(clone)
        assert type(clone) is LlavaForConditionalGeneration
    assert vtr.compression.is_compressed(model)


def test_compressions_are_listed_beside_the_methods():
    assert set(vtr.compressions()) == {"tokenpacker", "granularity"}
    assert not set(vtr.compressions()) & set(vtr.methods())


def test_the_report_describes_the_last_call_text_only_calls_and_generate_included():
    model = tiny_llava()
    vtr.compress(model, "tokenpacker")
    ids, mask, pixels = mixed_batch()
    generate(model, ids, mask, pixel_values=pixels)          # its decode steps keep the prefill's report
    assert vtr.report(model).tokens_after.tolist() == [4, 4, 4]
    text, text_mask = left_padded([[1, 20, 21]])
    with torch.no_grad():
        model(input_ids=text, attention_mask=text_mask)
    report = vtr.report(model)
    assert report.tokens_after.numel() == 0 and report.kept_positions.tolist() == [[0, 1, 2]]
