"""Huang & Wang 2017, "Like What You Like: Knowledge Distill via Neuron Selectivity
Transfer" (arXiv:1707.01219)."""

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from . import LayerPairsSpec, LossTerm, match_spatial, register


def poly_kernel(a, b, degree=2, c=0.0):
    """k(x, y) = (x^T y + c)^d between the rows of a [N, M, D] and b [N, K, D]: [N, M, K]."""
    return (a @ b.transpose(1, 2) + c).pow(degree)


def nst_mmd2(student_feature, teacher_feature, degree=2, c=0.0):
    """Squared MMD between the student's and the teacher's channels, mean over the batch.

    Each channel's map (H*W values) is one sample, L2-normalised along the spatial
    dimension; MMD^2 = mean_{i,i'} k(t_i, t_i') + mean_{j,j'} k(s_j, s_j')
    - 2 mean_{i,j} k(s_j, t_i) with the polynomial kernel (paper: d = 2, c = 0). Spatial
    sizes must match: the larger map is adaptive-average-pooled to the smaller.
    """
    s, t = match_spatial(student_feature, teacher_feature.to(student_feature.dtype))
    s, t = F.normalize(s.flatten(2), dim=2), F.normalize(t.flatten(2), dim=2)
    mmd2 = (poly_kernel(t, t, degree, c).mean((1, 2)) + poly_kernel(s, s, degree, c).mean((1, 2))
            - 2 * poly_kernel(s, t, degree, c).mean((1, 2)))
    return mmd2.mean()


class NSTSpec(LayerPairsSpec):
    term: Literal["nst"] = "nst"
    degree: int = Field(2, ge=1, description="polynomial kernel degree d (paper: 2)")
    c: float = Field(0.0, ge=0, description="polynomial kernel offset (paper: 0)")


@register("nst")
class NST(LossTerm):
    """Neuron selectivity transfer (Huang & Wang 2017, "Like What You Like", arXiv:1707.01219):
    squared MMD with the polynomial kernel (x^T y + c)^d between the spatially L2-normalised
    channel maps of student and teacher, batch mean, summed over layer pairs. The paper's
    lambda/2 factor is the term's `weight` (RepDistiller's scripts use 50 for NST)."""

    spec_cls = NSTSpec
    uses_teacher = True

    def forward(self, student, teacher, batch):
        total = 0.0
        for sp, tp in zip(self.spec.student_layers, self.spec.teacher_layers):
            s = student.features[sp].float()
            with torch.autocast(s.device.type, enabled=False):   # kernels in fp32, not bf16
                total = total + nst_mmd2(s, teacher.features[tp].float(), self.spec.degree, self.spec.c)
        return total
