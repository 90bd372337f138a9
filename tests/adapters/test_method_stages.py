"""A method runs only where its ``stages`` say: refused elsewhere at patch time, and an in-LM-only method on a
vision-language model prunes at its own default layers when ``layers=`` is left out."""
import pytest
import torch

import vtr
from vtr.core.state import TokenState
from vtr.reducers.base import REDUCERS, Reducer, Signals, dest_from_choice

from conftest import tiny_vit
from llava_models import generate, mixed_batch, tiny_llava


class FirstTokens(Reducer):
    """Keeps the first unprotected tokens (positions alone decide)."""

    name = "first_tokens"
    description = "keep the first tokens"

    def step(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        kept = torch.arange(num_kept - state.num_protected, device=state.x.device).expand(state.x.shape[0], -1)
        return state.reduce(dest_from_choice(state, kept), num_kept)


class InLmOnly(FirstTokens):
    name = "in_lm_only"
    stages = ("in_lm",)

    def default_layers(self, num_layers: int):
        return [num_layers // 2]


class BeforeLmOnly(FirstTokens):
    name = "before_lm_only"
    stages = ("before_lm",)


@pytest.fixture(autouse=True)
def registered():
    for cls in (InLmOnly, BeforeLmOnly):
        REDUCERS[cls.name] = cls
    yield
    for cls in (InLmOnly, BeforeLmOnly):
        del REDUCERS[cls.name]


def test_an_in_lm_method_is_refused_on_a_vit_naming_where_it_acts():
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"method 'in_lm_only' applies inside the language model, not in the vision "
                                         r"tower: patch a vision-language model \(the timm adapter would run it "
                                         r"there"):
        vtr.patch(model, "in_lm_only", keep=0.5)
    assert not vtr.is_patched(model)


def test_a_before_lm_method_is_refused_inside_the_language_model():
    with pytest.raises(ValueError, match=r"method 'before_lm_only' applies before the language model, not inside the "
                                         r"language model: leave out layers= \(the llava adapter would run it there"):
        vtr.patch(tiny_llava(), "before_lm_only", budget=4, layers=[1])


def test_an_in_lm_method_without_layers_prunes_at_its_default_layers():
    model = vtr.patch(tiny_llava(), "in_lm_only", budget=4)
    assert model._vtr.visual.layers == (2,)          # 4 decoder layers: its default_layers says layer 2
    ids, mask, pixels = mixed_batch()
    generate(model, ids, mask, pixel_values=pixels)
    report = vtr.report(model)
    assert report.stage_layers == [2] and report.image_tokens_after.tolist() == [4, 4, 4]
