"""Losses of the fine-tuning recipes the token-reduction papers use.

- :func:`logit_distillation`: KL from the unreduced teacher's predictions (``vtr.disabled`` gives the
  teacher with the same weights), as DynamicViT and SiT distil.
- :func:`token_distillation`: each kept token towards the teacher's tokens it stands for.
- :func:`keep_ratio`: DynamicViT's loss that holds each row's kept fraction at the schedule's.
- :func:`clip_contrastive`: the symmetric image-text InfoNCE loss of a CLIP training step.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .core.run import Decision, Report


def logit_distillation(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """``KL(softmax(teacher / T) || softmax(student / T)) * T^2``, averaged over the batch; the teacher
    gets no gradient. ``student``, ``teacher``: ``[B, K]`` logits."""
    if student.shape != teacher.shape:
        raise ValueError(f"student and teacher logits must have one shape, got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature ** 2


def token_distillation(student: Tensor, teacher: Tensor, report: Report) -> Tensor:
    """Mean squared error of each final token against the mean of the teacher's tokens it stands for (its ``report.assignment``), over the tokens that carry any; the teacher gets no gradient.

    ``student``: ``[B, N, C]`` the reduced pass's final tokens (e.g. ``forward_features``); ``teacher``:
    ``[B, N0, C]`` the unreduced pass's; ``report``: ``vtr.report(model)`` of the reduced pass. Under
    training-time masking (``dynamicvit`` in train mode) every token keeps its place and the loss counts
    the kept ones (DynamicViT's token distillation); a soft merge (``sit``) is compared with the tokens
    whose dominant output it is.
    """
    batch, num_tokens = report.size.shape
    if tuple(student.shape[:2]) != (batch, num_tokens) or tuple(teacher.shape[:2]) != tuple(report.assignment.shape):
        raise ValueError(f"student must be [B, N, C] = [{batch}, {num_tokens}, C] and teacher [B, N0, C] = "
                         f"{list(report.assignment.shape)} + [C] as in the report of the reduced pass, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    carried = report.assignment >= 0
    dest = report.assignment.clamp_min(0)
    weight = carried.to(teacher.dtype)
    target = teacher.new_zeros(batch, num_tokens, teacher.shape[-1]).scatter_add_(
        1, dest[..., None].expand_as(teacher), teacher.detach() * weight[..., None])
    count = teacher.new_zeros(batch, num_tokens).scatter_add_(1, dest, weight)
    target = target / count.clamp_min(1)[..., None]
    counted = (count > 0).float()
    if report.mask is not None:
        counted = counted * report.mask
    error = (student.float() - target.float()).square().mean(dim=-1)
    return (error * counted).sum() / counted.sum().clamp_min(1)


def keep_ratio(decisions: Sequence[Decision]) -> Tensor:
    """DynamicViT's keep-ratio loss: the mean over steps and rows of ``(kept fraction - target)^2``, where the
    target is the fraction the schedule keeps there (what eval mode keeps exactly). ``decisions`` come from
    ``vtr.decisions(model)`` around a training-mode call."""
    if not decisions:
        raise ValueError("decisions is empty: collect them with `with vtr.decisions(model) as kept:` around a call "
                         "in training mode of a model patched with a masking learned reducer (dynamicvit)")
    losses = [(decision.keep.float().mean(dim=1) - decision.target).square().mean() for decision in decisions]
    return torch.stack(losses).mean()


def clip_contrastive(image: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
    """The CLIP loss: symmetric cross-entropy of cosine logits times ``logit_scale.exp()``, matching image i
    with text i. ``image``, ``text``: ``[B, D]`` embeddings; ``logit_scale``: the model's (log) scale."""
    if image.shape != text.shape or image.dim() != 2:
        raise ValueError(f"image and text must both be [B, D] embeddings, got {tuple(image.shape)} and "
                         f"{tuple(text.shape)}")
    logits = logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
