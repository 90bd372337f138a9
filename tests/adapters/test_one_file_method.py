"""A method costs one file: a reducer written outside the library (:class:`EveryOther`, under 25 lines) runs
unchanged before the language model and inside it on every VLM family vtr patches (LLaVA, LLaVA-NeXT,
Qwen2.5-VL, Qwen3-VL, Gemma 3, SmolVLM, InternVL, LLaVA-OneVision, LLaVA-NeXT-Video): batched,
every image kept to exactly its budget, and each row of a left-padded batch computing what it computes alone. And
a call reads only the typed settings of the patch (``Reduction.visual``, solved in ``vtr.budget.visual``), never
``Reduction.arguments`` (what the user typed, for ``describe()``)."""
from __future__ import annotations

import pytest
import torch

import vtr
from vtr.core.state import TokenState
from vtr.reducers.base import REDUCERS, Reducer, Signals, dest_from_choice

from llava_models import logits, mixed_batch as llava_batch, tiny_llava
from llava_next_models import batch as next_batch, tiny_llava_next
from llava_video_models import ROWS, inputs as video_inputs, tiny_next_video, tiny_onevision
from qwen_vl_models import mixed_batch as qwen_batch, tiny_qwen
from qwen3_vl_models import mixed_batch as qwen3_batch, tiny_qwen3
from gemma3_models import inputs as gemma3_inputs, tiny_gemma3
from smolvlm_models import inputs as smolvlm_inputs, tiny_smolvlm
from internvl_models import inputs as internvl_inputs, tiny_internvl


class EveryOther(Reducer):   # ---- the whole method: this class and its registration (the fixture) ----
    """Keeps the unprotected tokens at even positions first, then odd ones, up to the budget; drops the rest.
    Decides from positions alone, so every row of a batch makes the same choice it makes alone."""

    name = "every_other"
    description = "keep every other token (a method written outside the library)"

    def step(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        unprotected = state.num_tokens - state.num_protected
        order = torch.cat([torch.arange(0, unprotected, 2), torch.arange(1, unprotected, 2)])
        kept = order[:num_kept - state.num_protected].sort().values.to(state.x.device)
        return state.reduce(dest_from_choice(state, kept.expand(state.x.shape[0], -1)), num_kept)


class Untouchable(dict):
    """``Reduction.arguments`` during a call: any read is a test failure."""

    def _read(self, *args, **kwargs):
        raise AssertionError("a call read Reduction.arguments: run-time settings must come from typed fields")

    __getitem__ = __contains__ = __iter__ = __len__ = get = keys = items = values = _read


@pytest.fixture(autouse=True)
def every_other():
    """Registered for these tests only (``vtr.methods()`` elsewhere stays the library's own)."""
    REDUCERS[EveryOther.name] = EveryOther
    yield
    del REDUCERS[EveryOther.name]


# Each family: (its tiny model, the keywords of a left-padded mixed batch, of one row of it alone).
def llava_rows(model, only=None):
    ids, mask, pixels = llava_batch()
    per_row = [2, 1, 0]
    if only is None:
        return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    real, first = mask[only].bool(), sum(per_row[:only])
    row = dict(input_ids=ids[only, real][None], attention_mask=mask[only, real][None])
    return row | ({"pixel_values": pixels[first:first + per_row[only]]} if per_row[only] else {})


NEXT_ROWS = [([1, 5], [(56, 112), (112, 112)], [7]), ([1, 5, 6], [(112, 56)], [8, 9]), ([1, 20, 21], [], [])]


def llava_next_rows(model, only=None):
    ids, mask, pixels, sizes = next_batch(model, NEXT_ROWS)
    if only is None:
        return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)
    real, count = mask[only].bool(), len(NEXT_ROWS[only][1])
    first = sum(len(images) for _, images, _ in NEXT_ROWS[:only])
    row = dict(input_ids=ids[only, real][None], attention_mask=mask[only, real][None])
    images = slice(first, first + count)
    return row | ({"pixel_values": pixels[images], "image_sizes": sizes[images]} if count else {})


def qwen_rows(model, only=None):
    return qwen_batch().inputs(None if only is None else [only])


def qwen3_rows(model, only=None):
    return qwen3_batch().inputs(None if only is None else [only])


def gemma3_rows(model, only=None):
    return gemma3_inputs(only=None if only is None else [only])


def smolvlm_rows(model, only=None):
    return smolvlm_inputs(only=None if only is None else [only])


def internvl_rows(model, only=None):
    return internvl_inputs(only=None if only is None else [only])


def video_rows(model, only=None):
    return video_inputs(model, ROWS, only=None if only is None else [only])


FAMILIES = {
    "llava": (tiny_llava, llava_rows, 3),
    "llava-next": (tiny_llava_next, llava_next_rows, 3),
    "qwen2.5-vl": (tiny_qwen, qwen_rows, 3),
    "qwen3-vl": (tiny_qwen3, qwen3_rows, 3),
    "gemma3": (tiny_gemma3, gemma3_rows, 3),
    "smolvlm": (tiny_smolvlm, smolvlm_rows, 3),
    "internvl": (tiny_internvl, internvl_rows, 3),
    "llava-onevision": (tiny_onevision, video_rows, len(ROWS)),
    "llava-next-video": (tiny_next_video, video_rows, len(ROWS)),
}
IN_THE_LM = {"qwen3-vl": [2]}    # after the layers DeepStack adds tower features to (0 and 1)
GENERATE = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)


def run(model, inputs: dict):
    with torch.inference_mode():
        return model.generate(**inputs, **GENERATE)


@pytest.mark.parametrize("family, layers", [
    pytest.param(family, layers, id=f"{'in' if layers else 'before'}-the-lm-{family}")
    for layers in (None, [1]) for family in FAMILIES])
def test_a_method_written_outside_the_library_runs_on_every_vlm_family(family, layers):
    build, rows, num_rows = FAMILIES[family]
    model = vtr.patch(build(), "every_other", budget=4, layers=layers and IN_THE_LM.get(family, layers))
    arguments = model._vtr.arguments
    object.__setattr__(model._vtr, "arguments", Untouchable())   # frozen settings: swapped for the calls only
    batched = run(model, rows(model))
    report = vtr.report(model)
    assert report.image_tokens_after.tolist() == [min(4, n) for n in report.image_tokens_before.tolist()]
    assert (report.image_tokens_before > 4).any()      # some image really was reduced
    for row in range(num_rows):
        alone = run(model, rows(model, row))
        torch.testing.assert_close(logits(batched)[row], logits(alone)[0], atol=1e-5, rtol=0)
        prompt = rows(model, row)["input_ids"].shape[1]
        assert torch.equal(batched.sequences[row, -GENERATE["max_new_tokens"]:], alone.sequences[0, prompt:])
    object.__setattr__(model._vtr, "arguments", arguments)
    vtr.unpatch(model)
