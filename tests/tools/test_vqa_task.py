"""The VLM yardstick's task and the layout of its models' inputs (no training: seconds)."""
import collections

import pytest
import torch

from vtr.tools import vlm_yardstick, vqa_task as task

EXAMPLES = task.make_examples(1200, seed=3)


def words(ids) -> list:
    return [task.VOCABULARY[int(i)] for i in ids]


def test_same_seed_same_examples_and_other_seed_other():
    again = task.make_examples(12, seed=3)
    assert torch.equal(again.images, EXAMPLES.images[:12]) and again.questions == EXAMPLES.questions[:12]
    assert not torch.equal(task.make_examples(12, seed=4).images, again.images)


def test_questions_on_one_scene_share_its_pixels_stored_once():
    """Training asks six questions per scene: its pixels are stored once (48,000 scenes: 2.4 GB, not 14), and every
    question of a scene, and every subset, sees that scene's image."""
    examples = task.make_examples(18, seed=3, per_scene=6)
    assert examples.scene_images.shape[0] == 3 and examples.images.shape[0] == 18
    for j in range(18):
        assert torch.equal(examples.images[j], examples.scene_images[j // 6])
    assert not torch.equal(examples.scene_images[0], examples.scene_images[1])
    part = examples.subset([13, 2])
    assert torch.equal(part.images, examples.images[[13, 2]]) and part.questions == [examples.questions[13],
                                                                                     examples.questions[2]]


@pytest.mark.parametrize("kind", task.TYPES)
def test_answers_are_balanced_within_each_type(kind):
    """Every answer of a type about equally often: guessing the commonest one earns the stated chance."""
    answers = [a for a, t in zip(words(EXAMPLES.answers), EXAMPLES.types) if t == kind]
    counts = collections.Counter(answers)
    assert len(counts) == round(1 / task.CHANCE[kind])
    assert max(counts.values()) / len(answers) < task.CHANCE[kind] + 0.08, counts


def test_types_come_in_turn():
    assert collections.Counter(EXAMPLES.types) == {kind: 200 for kind in task.TYPES}


def test_a_no_to_exists_names_a_colour_and_a_shape_both_in_the_scene():
    """Neither the colour alone nor the shape alone answers it: both are there, on different objects."""
    for i, kind in enumerate(EXAMPLES.types):
        if kind != "exists":
            continue
        shape, colour = words(EXAMPLES.questions[i])[2:4]
        s, c = task.SHAPES.index(shape), task.COLOURS.index(colour)
        scene = EXAMPLES.scene_colour[i]
        assert scene[s] >= 0 and bool((scene == c).any())
        assert (scene[s] == c) == (task.VOCABULARY[int(EXAMPLES.answers[i])] == "yes")


def test_the_relevant_tokens_are_the_queried_objects():
    """Object questions: the relevant map is part of the objects' map; whole-image ones: all objects."""
    for i, kind in enumerate(EXAMPLES.types[:120]):
        relevant, objects = EXAMPLES.relevant[i], EXAMPLES.objects[i]
        assert bool((relevant <= objects + 1e-6).all()) and float(relevant.sum()) > 0
        if kind in task.WHOLE_IMAGE:
            assert torch.equal(relevant, objects)
        elif kind in ("colour", "shape", "where"):
            assert int((relevant > 0).sum()) <= 4   # one object (8 px in tokens of 8 px): 1-4 tokens


def test_token_labels_follow_the_objects():
    covered = EXAMPLES.objects >= 0.125
    assert torch.equal(EXAMPLES.token_colour >= 0, covered) and torch.equal(EXAMPLES.token_shape >= 0, covered)


def test_qwen_pixels_follow_the_image_processor_layout():
    """The yardstick feeds Qwen2.5-VL exactly what transformers' image processor would give for the image."""
    from transformers import Qwen2VLImageProcessor

    processor = Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, do_resize=False,
                                      do_rescale=False, do_normalize=False)
    images = EXAMPLES.images[:2]
    expected = processor(images=[image.numpy() for image in images], return_tensors="pt",
                         input_data_format="channels_first")
    assert torch.equal(vlm_yardstick.qwen_pixels(images), expected["pixel_values"])
    assert expected["image_grid_thw"].tolist() == [[1, 16, 16]] * 2


@pytest.mark.parametrize("family", vlm_yardstick.FAMILIES)
def test_prompts_are_left_padded_with_one_placeholder_per_token(family):
    model = vlm_yardstick.build_model(vlm_yardstick.recipe(family, quick=True))
    batch = EXAMPLES.subset(range(6))
    inputs = vlm_yardstick.model_inputs(model, batch)
    placeholder = task.TOKEN["<image>" if family == "llava" else "<image_pad>"]
    assert ((inputs["input_ids"] == placeholder).sum(1) == task.GRID ** 2).all()
    for row, question in enumerate(batch.questions):
        assert inputs["input_ids"][row, -len(question):].tolist() == question
        assert inputs["attention_mask"][row].sum() == len(vlm_yardstick.prompt_ids(family, question))
        assert inputs["attention_mask"][row, -1] == 1
    logits = vlm_yardstick.answer_logits(model, batch)
    assert logits.shape == (6, len(task.VOCABULARY))


def test_unknown_family_and_type_are_clear_errors():
    with pytest.raises(ValueError, match="family must be one of llava, qwen"):
        vlm_yardstick.VlmTraining(family="gemma")
    with pytest.raises(ValueError, match="types: each must be one of"):
        task.make_examples(2, seed=0, types=("colour", "size"))
