"""The tiny CLIP task (vtr.tools.clip_task): its tokenizer, its contrastive loss, its domain shift, its cache."""
from __future__ import annotations

import pytest
import torch

from vtr.tools import clip_task
from vtr.tools.fidelity import Task

TINY = clip_task.ClipTraining(embed_dim=16, width=16, depth=2, heads=2, text_width=16, text_depth=1,
                              train_images=64, epochs=1, batch_size=32)
SMALL_TASK = Task(image_size=16, patch_size=8)


def test_tokenize_pools_at_end_of_text():
    vocab = clip_task.vocabulary()
    tokens = clip_task.tokenize(["a photo of a ring", "the plus"])
    assert tokens.shape == (2, clip_task.CONTEXT)
    assert vocab[int(tokens[0, tokens[0].argmax()])] == "<eot>"   # open_clip pools the text at the highest id
    assert [vocab[i] for i in tokens[1, :4]] == ["<sot>", "the", "plus", "<eot>"]
    with pytest.raises(ValueError, match="cannot tokenize"):
        clip_task.tokenize(["a photo of a dog"])


def test_loss_treats_same_class_images_as_positives():
    torch.manual_seed(0)
    model = clip_task.build_clip(SMALL_TASK, TINY)
    images = torch.randn(4, 3, 16, 16)
    labels = torch.tensor([0, 0, 1, 3])
    loss, logits = clip_task._loss(model, images, labels, clip_task.PROMPT)
    logp = logits.log_softmax(1)
    image_loss = -logp[torch.arange(4), labels].mean()
    text = logits.t().log_softmax(1)                           # classes 0, 1, 3 present; 0 has two positives
    text_loss = -(text[0, :2].mean() + text[1, 2] + text[3, 3]) / 3
    assert torch.allclose(loss, (image_loss + text_loss) / 2)


def test_shift():
    images = torch.randn(3, 3, 16, 16)
    assert torch.equal(clip_task.shift(images, strength=0.0), images)
    cast = clip_task.shift(images, ("cast",))
    delta = cast - images * (1 + torch.tensor([0.35, -0.25, -0.45]))[None, :, None, None]
    assert torch.allclose(delta, torch.tensor([0.6, 0.2, -0.5])[None, :, None, None].expand_as(delta))
    assert not torch.equal(clip_task.shift(images, ("noise",), seed=0), clip_task.shift(images, ("noise",), seed=1))
    with pytest.raises(ValueError, match="kinds"):
        clip_task.shift(images, ("blur",))
    with pytest.raises(ValueError, match="strength"):
        clip_task.shift(images, strength=-1.0)


def test_train_and_cache(tmp_path):
    model = clip_task.trained_clip(SMALL_TASK, TINY, root=tmp_path, log=lambda *_: None)
    assert not model.training and model.logit_scale.exp() <= 100 + 1e-4
    path = clip_task.checkpoint_path(SMALL_TASK, TINY, tmp_path)
    assert path.is_file() and path.parent == tmp_path
    again = clip_task.trained_clip(SMALL_TASK, TINY, root=tmp_path, log=lambda *_: pytest.fail("retrained"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    other = clip_task.ClipTraining(**{**TINY.__dict__, "seed": 1})
    assert clip_task.checkpoint_path(SMALL_TASK, other, tmp_path) != path      # the recipe is in the cache key
