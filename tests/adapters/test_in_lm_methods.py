"""The in-LM methods of issue 22 on every VLM family vtr patches (LLaVA, LLaVA-NeXT, Qwen2.5-VL, LLaVA-OneVision,
LLaVA-NeXT-Video), at their own default layers: every image keeps exactly its budget, and each row of a
left-padded batch computes what it computes alone."""
import pytest
import torch

import vtr

from llava_models import logits
from test_one_file_method import FAMILIES, GENERATE, run

IN_LM = ["pyramiddrop"]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", IN_LM)
def test_every_family_keeps_the_budget_and_rows_are_independent(method, family):
    build, rows, num_rows = FAMILIES[family]
    model = vtr.patch(build(), method, budget=3)
    assert model._vtr.visual.layers is not None          # pruned inside the language model, at its default layers
    batched = run(model, rows(model))
    report = vtr.report(model)
    assert report.image_tokens_after.tolist() == [min(3, n) for n in report.image_tokens_before.tolist()]
    assert (report.image_tokens_before > 3).any()
    for row in range(num_rows):
        alone = run(model, rows(model, row))
        torch.testing.assert_close(logits(batched)[row], logits(alone)[0], atol=1e-5, rtol=0)
        prompt = rows(model, row)["input_ids"].shape[1]
        assert torch.equal(batched.sequences[row, -GENERATE["max_new_tokens"]:], alone.sequences[0, prompt:])


@pytest.mark.parametrize("method", IN_LM)
def test_an_in_lm_method_is_refused_on_a_vit_and_before_the_lm(method):
    from conftest import tiny_vit
    with pytest.raises(ValueError, match=f"method '{method}' acts inside the language model"):
        vtr.patch(tiny_vit(), method, keep=0.5)
    assert vtr.methods(details=True)[method].stages == ("in_lm",)
