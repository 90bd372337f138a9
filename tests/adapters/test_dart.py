"""DART (``dart``): its kept set equals a float64 transcription of the official get_retained_image_token (pivots by
the L1 norm of the keys, each taking the image tokens least similar to it after the final norm), with an exact
budget; bad options are refused."""
import pytest
import torch

import vtr
from vtr.core.signals import Instruction
from vtr.core.state import TokenState
from vtr.reducers import Signals
from vtr.reducers.dart import shares

from in_lm_reference import keys_of, stage_columns, top
from llava_models import IMAGE_TOKEN, generate, left_padded, prompt_row, tiny_llava


def dart_rule(budget: int, pivot_image: int = 4, pivot_text: int = 4):
    """The official step for one image at layer K: pivots by key L1 norm (image tokens; the tokens after the
    image), then, pivot by pivot, the candidates least similar (cosine after the final norm) to it. Per-pivot
    counts: the budget less the image pivots, shared in order (the official code: max_num_trunction // 8 each)."""
    def rule(layer, hidden, present, image, stage, cos, sin, language, embedded):
        keys = keys_of(layer, hidden, cos, sin)
        image_columns = image.nonzero().flatten()
        after = (~image & (torch.arange(len(present)) > image_columns.max())).nonzero().flatten()
        image_pivots = image_columns[top(keys[image_columns].abs().sum(-1), pivot_image)].sort().values
        text_pivots = after[top(keys[after].abs().sum(-1), min(pivot_text, len(after)))].sort().values
        pivots = torch.cat([image_pivots, text_pivots])
        remaining = budget - len(image_pivots)
        counts = [remaining // len(pivots) + (i < remaining % len(pivots)) for i in range(len(pivots))]
        normed = language.norm(hidden)[0]
        candidates = [int(c) for c in image_columns if c not in image_pivots]
        kept = [int(c) for c in image_pivots]
        for pivot, count in zip(pivots.tolist(), counts):
            similarity = -torch.nn.functional.cosine_similarity(normed[pivot][None], normed[candidates], dim=-1)
            taken = [candidates[i] for i in top(similarity, count).tolist()]
            kept += taken
            candidates = [c for c in candidates if c not in taken]
        return present[torch.tensor(sorted(kept))]
    return rule


@pytest.mark.parametrize("seed, budget", [(0, 9), (1, 12), (2, 6), (3, 4)])
def test_kept_set_equals_the_official_rule(seed, budget):
    model = tiny_llava(seed=seed)
    with torch.no_grad():   # a final norm that is no identity (random init leaves it at ones): DART compares after it
        norm = model.model.language_model.norm.weight
        norm.copy_(torch.rand(norm.shape, generator=torch.Generator().manual_seed(seed)) * 2 + 0.1)
    ids, mask = left_padded([prompt_row([1, 5], 1, [7, 8, 9, 10, 11, 12])])
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(seed))
    vtr.patch(model, "dart", budget=budget)              # its layer K = 2 by default
    assert model._vtr.visual.layers == (2,)
    generate(model, ids, mask, pixel_values=pixels)
    got = vtr.report(model).stage_positions[0][0]
    vtr.unpatch(model)
    expected = stage_columns(model, ids, pixels, {2: dart_rule(budget)})[0]
    assert got.tolist() == expected.tolist()
    assert int((ids[0, got] == IMAGE_TOKEN).sum()) == budget


def test_pivots_share_the_budget_in_order():
    live = torch.tensor([[True] * 8, [True] * 5 + [False] * 3])
    assert shares(torch.tensor([12, 12]), live).tolist() == [[2, 2, 2, 2, 1, 1, 1, 1], [3, 3, 2, 2, 2, 0, 0, 0]]
    assert shares(torch.tensor([0, 3]), live).tolist() == [[0] * 8, [1, 1, 1, 0, 0, 0, 0, 0]]


def test_rows_are_independent_of_the_batch():
    """Two images with different instructions: each row alone keeps what it keeps in the batch (text rows of
    different lengths, padding at the end of the shorter)."""
    generator = torch.Generator().manual_seed(0)
    x, keys = torch.randn(2, 20, 16, generator=generator), torch.randn(2, 20, 8, generator=generator)
    text, text_keys = torch.randn(2, 6, 16, generator=generator), torch.randn(2, 6, 8, generator=generator)
    valid = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    reducer = vtr.make_reducer("dart")
    batch = reducer(TokenState.start(x), 10, Signals(metric=x, keys=keys,
                                                   instruction=Instruction(text, valid, text_keys)))
    for row, count in ((0, 6), (1, 3)):
        one = slice(row, row + 1)
        alone = reducer(TokenState.start(x[one]), 10, Signals(
            metric=x[one], keys=keys[one], instruction=Instruction(text[one, :count], valid[one, :count],
                                                                   text_keys[one, :count])))
        assert torch.equal(batch.first_carried()[row], alone.first_carried()[0])


@pytest.mark.parametrize("options, message", [
    ({"pivot_image": 0}, r"dart: pivot_image must be an integer >= 1 \(image pivots\), got 0"),
    ({"pivot_text": -1}, r"dart: pivot_text must be an integer >= 0 \(instruction pivots\), got -1"),
    ({"pivot_image": 2.5}, r"dart: pivot_image must be an integer >= 1"),
    ({"fuse": "x"}, r"dart: fuse must be one of"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        vtr.make_reducer("dart", **options)


def test_without_keys_it_says_where_it_acts():
    x = torch.randn(1, 8, 4)
    with pytest.raises(ValueError, match=r"dart needs signals.metric \(hidden states\) and signals.keys"):
        vtr.make_reducer("dart")(TokenState.start(x), 4, Signals(metric=x))


def test_it_gets_the_instruction_without_the_text_attention_it_does_not_read(monkeypatch):
    """The text's attention rows cost T query rows over the sequence: only reducers that need "text_attention"
    (SparseVLM) are handed them."""
    from vtr.reducers.dart import DART
    seen, step = [], DART.step
    monkeypatch.setattr(DART, "step", lambda self, state, k, signals: seen.append(signals) or step(self, state, k, signals))
    model = vtr.patch(tiny_llava(), "dart", budget=6)
    ids, mask = left_padded([prompt_row([1, 5], 1, [7, 8, 9])])
    generate(model, ids, mask, pixel_values=torch.randn(1, 3, 56, 56))
    instruction = seen[0].instruction
    assert instruction.attention is None and instruction.keys.shape[:2] == instruction.hidden.shape[:2] == (1, 3)
    assert seen[0].keys.shape[:2] == (1, 16)
