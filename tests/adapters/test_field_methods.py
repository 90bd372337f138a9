"""The methods of issue 22 on every VLM family vtr patches (``test_one_file_method.FAMILIES``: LLaVA, LLaVA-NeXT,
Qwen2.5-VL, Qwen3-VL, Gemma 3, SmolVLM, InternVL, LLaVA-OneVision, LLaVA-NeXT-Video), where each acts (in-LM
methods at their own default layers): every image keeps exactly its budget, and each row of a left-padded batch
computes what it computes alone."""
import pytest
import torch

import vtr

from conftest import tiny_vit
from llava_models import logits, tiny_llava
from test_one_file_method import FAMILIES, GENERATE, run

IN_LM = ["pyramiddrop", "dart", "sparsevlm", "feather"]
BEFORE_LM = ["cdpruner"]
# Qwen3-VL prunes from layer 2 on (DeepStack adds tower features after layers 0 and 1): the tiny 4-layer model's
# default layers of the multi-stage methods start at 1, so these tests move them (a real model's start deeper).
QWEN3_LAYERS = {"pyramiddrop": [2, 3], "sparsevlm": [2, 3], "feather": [2, 3]}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", IN_LM + BEFORE_LM)
def test_every_family_keeps_the_budget_and_rows_are_independent(method, family):
    build, rows, num_rows = FAMILIES[family]
    layers = QWEN3_LAYERS.get(method) if family == "qwen3-vl" else None
    model = vtr.patch(build(), method, budget=3, layers=layers)
    # in-LM methods prune inside the language model at their default layers; the others before it
    assert (model._vtr.visual.layers is not None) == (method in IN_LM)
    batched = run(model, rows(model))
    report = vtr.report(model)
    assert report.image_tokens_after.tolist() == [min(3, n) for n in report.image_tokens_before.tolist()]
    assert (report.image_tokens_before > 3).any()
    for row in range(num_rows):
        alone = run(model, rows(model, row))
        torch.testing.assert_close(logits(batched)[row], logits(alone)[0], atol=1e-5, rtol=0)
        prompt = rows(model, row)["input_ids"].shape[1]
        assert torch.equal(batched.sequences[row, -GENERATE["max_new_tokens"]:], alone.sequences[0, prompt:])


@pytest.mark.parametrize("method", IN_LM + BEFORE_LM)
def test_a_method_is_refused_where_it_does_not_act(method):
    where = "inside the language model" if method in IN_LM else "before the language model"
    with pytest.raises(ValueError, match=f"method '{method}' applies {where}, not in the vision tower"):
        vtr.patch(tiny_vit(), method, keep=0.5)
    if method in BEFORE_LM:
        with pytest.raises(ValueError, match=f"method '{method}' applies {where}, not inside the language model"):
            vtr.patch(tiny_llava(), method, budget=4, layers=[1])
    assert vtr.methods(details=True)[method].stages == (("in_lm",) if method in IN_LM else ("before_lm",))


def test_cdpruner_on_llava_takes_the_prompt_text_as_its_instruction():
    """On LLaVA the instruction is the language model's input embeddings of the prompt's text tokens and the
    features are the projector's outputs: the kept set is the official greedy MAP of exactly those."""
    from reducers.test_cdpruner import official
    from llava_models import IMAGE_TOKEN, generate, left_padded, prompt_row
    model = tiny_llava(seed=1)
    ids, mask = left_padded([prompt_row([1, 5], 1, [7, 8, 9])])
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        features = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
        text = model.get_input_embeddings()(ids[0][ids[0] != IMAGE_TOKEN])
    vtr.patch(model, "cdpruner", budget=5)
    generate(model, ids, mask, pixel_values=pixels)
    assignment = vtr.report(model).assignment[0]
    assert (assignment >= 0).nonzero().flatten().tolist() == official(features, text, 5)
