"""The VLM yardstick trained here: the cache, and the CI guard on the quick trained LLaVA (about a minute to train
once per test session): informed methods keep more of its answers than a random subset at 25% of the tokens."""
import json

import pytest
import torch

import vtr
from vtr.cli import main
from vtr.tools import fidelity, vlm_fidelity, vlm_yardstick, vqa_task as task

BEFORE, IN = vlm_fidelity.STAGES
# Informed methods guarded at 25% of the visual tokens before the LM (the margins hold for training seeds 0-4,
# benchmarks/RESULTS-vlm-fidelity.md).
INFORMED = ("tome", "pitome", "query")


@pytest.fixture(scope="session")
def quick_cache():
    """The user cache dir, holding the quick model after its one training (shared with the README's example)."""
    vlm_yardstick.trained_model(vlm_yardstick.recipe("llava", quick=True), log=lambda *_: None)
    return fidelity.cache_dir()


@pytest.fixture(scope="session")
def quick_rows(quick_cache):
    model = vlm_yardstick.trained_model(vlm_yardstick.recipe("llava", quick=True), root=quick_cache)
    examples = task.make_examples(600, seed=10_000)
    rows = vlm_fidelity.evaluate(model, examples, methods=[*INFORMED, "random"], budgets=(0.25,), stages=(BEFORE,),
                                 variants={}, log=lambda *_: None)
    return {r.method: r for r in rows}, vlm_fidelity.chance_accuracy(examples)


def test_the_quick_vlm_learns(quick_rows):
    rows, chance = quick_rows
    assert rows["none"].accuracy > chance + 0.3, (rows["none"].accuracy, chance)


def test_the_task_punishes_losing_the_right_tokens(quick_rows):
    """The oracle (the answering objects' tokens) keeps most answers, a random quarter loses many."""
    rows, _ = quick_rows
    assert rows["oracle"].agreement > rows["random"].agreement + 0.1


def test_informed_methods_beat_random_at_a_quarter_of_the_tokens(quick_rows):
    """The guard against collapse on a VLM: agreement with the unreduced model's answers (paired: same questions,
    same model) above random's by a margin."""
    rows, _ = quick_rows
    for method in INFORMED:
        assert rows[method].status == "ok", rows[method].status
        assert rows[method].agreement > rows["random"].agreement + 0.05, (method, rows[method], rows["random"])


def test_cli_runs_the_yardstick_from_the_cache(quick_cache, capsys):
    assert main(["fidelity", "--model", "llava-task", "--quick", "--cache", str(quick_cache), "--methods", "tome",
                 "--budgets", "0.25", "--stages", "in", "--test-images", "24", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["setting"]["model"] == "llava-task" and document["setting"]["test_examples"] == 24
    rows = {(r["method"], r["stage"]): r for r in document["results"]}
    assert rows[("tome", IN)]["status"] == "ok" and rows[("tome", IN)]["tokens"] == 16
    assert ("oracle", BEFORE) in rows


def test_a_trained_model_is_cached_and_loaded(tmp_path):
    training = vlm_yardstick.recipe("qwen", quick=True, tower_images=48, tower_epochs=1, examples=48, epochs=1)
    logs = []
    first = vlm_yardstick.trained_model(training, root=tmp_path, log=logs.append)
    assert len(logs) > 1 and vlm_yardstick.checkpoint_path(training, tmp_path).is_file()
    logs.clear()
    again = vlm_yardstick.trained_model(training, root=tmp_path, log=logs.append)
    assert logs == []
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert not vtr.is_patched(again)
