"""Hinton et al. 2015, "Distilling the Knowledge in a Neural Network" (arXiv:1503.02531)."""

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from . import LossTerm, TermSpec, register


def kd_loss(student_logits, teacher_logits, T=4.0, alpha=1.0, target=None, weight=None):
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, target).

    KL is averaged over the batch (``batchmean``); the T^2 factor keeps the soft-target
    gradients on the scale of the hard-target ones (Hinton et al. 2015, sec. 2). With
    `weight` ([B], data pruning's per-image loss weights) each image's KL and CE are
    multiplied by its weight before the mean.

    >>> kd_loss(torch.zeros(2, 3), torch.zeros(2, 3))
    tensor(0.)
    """
    s, t = _full(student_logits), _full(teacher_logits)
    log_p_s = F.log_softmax(s / T, dim=1)
    log_p_t = F.log_softmax(t / T, dim=1)
    if weight is None:
        kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
        ce = F.cross_entropy(s, target) if alpha < 1 else None
    else:
        kl = (F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1) * weight).mean()
        ce = (F.cross_entropy(s, target, reduction="none") * weight).mean() if alpha < 1 else None
    loss = alpha * T * T * kl
    if alpha < 1:
        loss = loss + (1 - alpha) * ce
    return loss


def _full(x):
    """bf16/fp16 logits (autocast) in fp32 for the softmax; fp32/fp64 kept as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class KDSpec(TermSpec):
    term: Literal["kd"] = "kd"
    T: float = Field(4.0, gt=0, description="softmax temperature")
    alpha: float = Field(1.0, ge=0, le=1, description="weight of the soft term; 1 - alpha goes to CE")


@register("kd")
class KD(LossTerm):
    """Hinton KD: temperature T, weight alpha, T^2 scaling."""

    spec_cls = KDSpec
    uses_teacher = True
    per_sample = True

    def forward(self, student, teacher, batch):
        return kd_loss(student.logits, teacher.logits, self.spec.T, self.spec.alpha, batch.y,
                       weight=batch.weight)
