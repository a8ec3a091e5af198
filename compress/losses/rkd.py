"""Park, Kim, Lu & Cho 2019, "Relational Knowledge Distillation" (CVPR, arXiv:1904.05068)."""

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from . import LossTerm, TermSpec, register


def pairwise_distances(e, eps=1e-12):
    """Euclidean distances between the rows of e [B, D] ([B, B], zero diagonal), computed
    as in the authors' code: sqrt(clamp(|a|^2 + |b|^2 - 2 a.b, eps))."""
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))


def distance_potential(e):
    """psi_D = ||e_i - e_j|| / mu, mu the mean distance over the non-zero (i != j) pairs."""
    d = pairwise_distances(e)
    return d / (d.sum() / (d > 0).sum())


def angle_potential(e):
    """psi_A[i, j, k] = <(e_j - e_i)/||e_j - e_i||, (e_k - e_i)/||e_k - e_i||>: the cosine of
    the angle at anchor i ([B, B, B]; 0 where a difference vector is zero)."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)
    return diff @ diff.transpose(1, 2)


def rkd_distance_loss(student_embedding, teacher_embedding):
    """Huber (smooth L1, delta 1) between psi_D of student and teacher, mean over all B^2 pairs."""
    s, t = student_embedding.flatten(1), teacher_embedding.flatten(1).to(student_embedding.dtype)
    return F.smooth_l1_loss(distance_potential(s), distance_potential(t).detach())


def rkd_angle_loss(student_embedding, teacher_embedding):
    """Huber (smooth L1, delta 1) between psi_A of student and teacher, mean over all B^3 triplets."""
    s, t = student_embedding.flatten(1), teacher_embedding.flatten(1).to(student_embedding.dtype)
    return F.smooth_l1_loss(angle_potential(s), angle_potential(t).detach())


def rkd_loss(student_embedding, teacher_embedding, w_dist=25.0, w_angle=50.0):
    """w_dist * RKD-D + w_angle * RKD-A."""
    loss = 0.0
    if w_dist:
        loss = loss + w_dist * rkd_distance_loss(student_embedding, teacher_embedding)
    if w_angle:
        loss = loss + w_angle * rkd_angle_loss(student_embedding, teacher_embedding)
    return loss


class RKDSpec(TermSpec):
    term: Literal["rkd"] = "rkd"
    student_layer: str = Field("penultimate", description="feature point or module path")
    teacher_layer: str = Field("penultimate", description="feature point or module path")
    w_dist: float = Field(25.0, ge=0, description="weight of the distance term (paper: 25)")
    w_angle: float = Field(50.0, ge=0, description="weight of the angle term (paper: 50)")


@register("rkd")
class RKD(LossTerm):
    """Relational KD (Park, Kim, Lu & Cho, CVPR 2019, arXiv:1904.05068): Huber loss between
    the student's and teacher's mean-normalised pairwise distances (RKD-D) and triplet angle
    cosines (RKD-A) of the flattened embeddings, w_dist = 25, w_angle = 50. As in the
    authors' code the means run over all B^2 pairs and B^3 triplets, degenerate ones
    (zero on both sides) included. Dimensions may differ: no adapter."""

    spec_cls = RKDSpec
    uses_teacher = True
    min_batch = 2      # one image has no pairs: the mean distance is 0/0

    def forward(self, student, teacher, batch):
        s = student.features[self.spec.student_layer].float()
        with torch.autocast(s.device.type, enabled=False):   # distances and angles in fp32, not bf16
            return rkd_loss(s, teacher.features[self.spec.teacher_layer].float(), self.spec.w_dist,
                            self.spec.w_angle)
