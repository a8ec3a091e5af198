"""Passalis & Tefas 2018, "Learning Deep Representations with Probabilistic Knowledge
Transfer" (ECCV, arXiv:1803.10837)."""

from typing import Literal

import torch
from pydantic import Field

from . import LossTerm, TermSpec, register


def conditional_probabilities(feature, eps=1e-7):
    """P[i, j] = K(x_i, x_j) / sum_k K(x_i, x_k) with the cosine kernel K = (cos + 1) / 2 on
    the flattened features (x / (||x|| + eps), as in the authors' code; i = j included)."""
    x = feature.flatten(1)
    x = x / (x.norm(dim=1, keepdim=True) + eps)
    k = (x @ x.t() + 1) / 2
    return k / k.sum(1, keepdim=True)


def pkt_loss(student_feature, teacher_feature, eps=1e-7):
    """KL(P_t || P_s) = sum_{i,j} p_t[i,j] log((p_t[i,j] + eps) / (p_s[i,j] + eps)) / B.

    Divided by the batch size B (mean over anchors of each row's KL); the authors' code
    takes the mean over all B^2 entries instead, i.e. this value / B.
    """
    ps = conditional_probabilities(student_feature, eps)
    pt = conditional_probabilities(teacher_feature.to(ps.dtype), eps)
    return (pt * ((pt + eps) / (ps + eps)).log()).sum() / ps.shape[0]


class PKTSpec(TermSpec):
    term: Literal["pkt"] = "pkt"
    student_layer: str = Field("penultimate", description="feature point or module path")
    teacher_layer: str = Field("penultimate", description="feature point or module path")
    eps: float = Field(1e-7, gt=0, description="authors' code: 1e-7")


@register("pkt")
class PKT(LossTerm):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018, arXiv:1803.10837):
    the batch's cosine-kernel conditional probabilities P[i, j] of the teacher's and the
    student's embeddings should agree, KL(P_t || P_s) summed over pairs, divided by the
    batch size. Dimensions may differ (P is B x B): no adapter."""

    spec_cls = PKTSpec
    uses_teacher = True

    def forward(self, student, teacher, batch):
        s = student.features[self.spec.student_layer].float()
        with torch.autocast(s.device.type, enabled=False):   # kernel in fp32, not bf16
            return pkt_loss(s, teacher.features[self.spec.teacher_layer].float(), self.spec.eps)
