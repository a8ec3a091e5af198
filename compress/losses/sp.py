"""Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation" (ICCV, arXiv:1907.09682)."""

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from . import LayerPairsSpec, LossTerm, register


def similarity(feature):
    """G = Q Q^T of the flattened batch (B x B), each row L2-normalised."""
    q = feature.flatten(1)
    return F.normalize(q @ q.t(), p=2, dim=1)


def sp_loss(student_feature, teacher_feature):
    """||G_t - G_s||_F^2 / B^2 for one layer pair (paper, eq. 4 without gamma)."""
    b = student_feature.shape[0]
    gs, gt = similarity(student_feature), similarity(teacher_feature.to(student_feature.dtype))
    return (gt - gs).pow(2).sum() / (b * b)


class SPSpec(LayerPairsSpec):
    term: Literal["sp"] = "sp"
    weight: float = Field(3000.0, ge=0, description="gamma (paper, CIFAR-10: 3000)")


@register("sp")
class SP(LossTerm):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019, arXiv:1907.09682): the batch's
    row-normalised Gram matrices G = Q Q^T (B x B) of student and teacher should agree;
    gamma / B^2 * ||G_t - G_s||_F^2 summed over layer pairs, gamma = `weight` (3000).
    Channel counts and spatial sizes may differ (G is B x B)."""

    spec_cls = SPSpec
    uses_teacher = True

    def forward(self, student, teacher, batch):
        total = 0.0
        for sp, tp in zip(self.spec.student_layers, self.spec.teacher_layers):
            s = student.features[sp].float()
            with torch.autocast(s.device.type, enabled=False):   # Gram matrices in fp32, not bf16
                total = total + sp_loss(s, teacher.features[tp].float())
        return total
