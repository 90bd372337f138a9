"""VLM fidelity harness: every row, the oracle's choice and the table, on untrained yardstick-shaped models
(seconds); what the methods keep is measured on the quick trained model (tests/tools/test_vlm_yardstick.py)."""
import pytest

import vtr
from vtr.tools import vlm_fidelity, vlm_yardstick, vqa_task as task

EXAMPLES = task.make_examples(12, seed=7)


@pytest.fixture(scope="module", params=vlm_yardstick.FAMILIES)
def model(request):
    return vlm_yardstick.build_model(vlm_yardstick.recipe(request.param, quick=True))


def test_every_method_stage_and_budget_has_a_row(model):
    rows = vlm_fidelity.evaluate(model, EXAMPLES, methods=["tome", "fastv"], budgets=(0.5, 0.11), batch_size=5,
                                 log=lambda *_: None)
    seen = {(r.method, r.stage, r.budget): r for r in rows}
    assert seen[("none", "-", 1.0)].agreement == 1.0 and seen[("none", "-", 1.0)].tokens == 64
    for method in ("tome", "fastv"):
        for stage in vlm_fidelity.STAGES:
            for budget, kept in ((0.5, 32), (0.11, 7)):
                row = seen[(method, stage, budget)]
                assert row.status == "ok", row.status
                assert row.tokens == kept
                assert 0 < row.flops < 1 and set(row.per_type) <= set(task.TYPES)
    # the oracle acts before the LM only; the variant row comes with its method
    assert {r.stage for r in rows if r.method == "oracle"} == {vlm_fidelity.STAGES[0]}
    assert not any(r.method == "query (no question)" for r in rows)
    # fewer tokens, fewer FLOPs; in the LM (after layer 1) saves less than before it
    before = [seen[("tome", vlm_fidelity.STAGES[0], b)].flops for b in (0.5, 0.11)]
    assert before[1] < before[0] < seen[("tome", vlm_fidelity.STAGES[1], 0.5)].flops
    assert not vtr.is_patched(model)


def test_the_oracle_keeps_the_tokens_of_the_objects_that_answer(model):
    """Its kept set is the top of the relevance map: the queried object's tokens, then a random fill that differs
    between rows."""
    scores = vlm_fidelity.oracle_scores(EXAMPLES)
    with vlm_fidelity._oracle_registered():
        vtr.patch(model, "oracle", budget=5)
        try:
            with vtr.conditioned(model, scores.float()):
                vlm_yardstick.answer_logits(model, EXAMPLES)
            assignment = vtr.report(model).assignment
        finally:
            vtr.unpatch(model)
    for row in range(len(EXAMPLES)):
        kept = set(assignment[row].ge(0).nonzero().flatten().tolist())
        assert kept == set(scores[row].topk(5).indices.tolist())
        relevant = set(EXAMPLES.relevant[row].flatten().nonzero().flatten().tolist())
        assert kept >= relevant if len(relevant) <= 5 else kept <= relevant
    empty = EXAMPLES.objects.flatten(1) == 0     # tokens under no object: the fill ranks them at random
    assert not all(bool((scores[row][empty[row]].diff() < 0).all()) for row in range(len(EXAMPLES)))   # not raster
    assert "oracle" not in vtr.methods()      # registered for the evaluation only


def test_the_table_has_a_column_per_question_type(model):
    rows = vlm_fidelity.evaluate(model, EXAMPLES, methods=["random"], budgets=(0.25,),
                                 stages=(vlm_fidelity.STAGES[0],), log=lambda *_: None)
    table = vlm_fidelity.format_table(rows).splitlines()
    assert all(kind in table[0] for kind in task.TYPES)
    assert len(table) == 2 + len(rows)
    series = vlm_fidelity.accuracy_series(rows)
    assert set(series) == {"oracle (before LM)", "random (before LM)"}


@pytest.mark.parametrize("keywords, message", [
    (dict(budgets=(1.0,)), "budgets: each must be a fraction in"),
    (dict(budgets=(0.0,)), "budgets: each must be a fraction in"),
    (dict(stages=("after LM",)), "stages: each must be one of"),
])
def test_bad_settings_are_clear_errors(model, keywords, message):
    with pytest.raises(ValueError, match=message):
        vlm_fidelity.evaluate(model, EXAMPLES, **keywords)


def test_chance_is_the_mean_of_the_types_chances():
    assert vlm_fidelity.chance_accuracy(EXAMPLES) == pytest.approx(
        sum(task.CHANCE.values()) / len(task.TYPES))
