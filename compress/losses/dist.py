"""Huang, You, Wang, Qian & Xu 2022, "Knowledge Distillation from A Stronger Teacher"
(DIST, NeurIPS, arXiv:2205.10536)."""

from typing import Literal

import torch
from pydantic import Field

from . import LossTerm, TermSpec, register
from .kd import _full

_EPS = 1e-8   # added to the product of the norms, as in the paper's code


def pearson_rows(a, b, eps=_EPS, w=None):
    """Pearson correlation of each row of `a` with the same row of `b` ([N, K] -> [N]):
    both rows centred on their mean, then cos(a_c, b_c) = <a_c, b_c> / (|a_c| |b_c| + eps).

    With `w` ([K] weights of the K entries of every row) the weighted correlation: rows
    centred on their w-weighted mean, inner product and norms w-weighted, the weights scaled
    to mean 1 (so equal weights give the unweighted correlation, eps included). An integer
    weight k counts an entry as k copies of it (up to eps)."""
    if w is None:
        a = a - a.mean(1, keepdim=True)
        b = b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)
    w = (w * (w.numel() / w.sum())).to(a.dtype)
    a = a - (a * w).sum(1, keepdim=True) / w.numel()
    b = b - (b * w).sum(1, keepdim=True) / w.numel()
    return (w * a * b).sum(1) / (((w * a * a).sum(1) * (w * b * b).sum(1)).sqrt() + eps)


def dist_parts(student_logits, teacher_logits, T=1.0, weight=None):
    """(inter, intra), each T^2-scaled, of the softmax probabilities at temperature T
    (Y = softmax(Z / T) over classes, [B, C]):

    - inter-class relation: 1 - mean over the B images of the Pearson correlation between
      the student's and the teacher's class-probability vectors (rows of Y);
    - intra-class relation: 1 - mean over the C classes of the Pearson correlation between
      the student's and the teacher's probabilities of that class across the batch (columns).

    `weight` ([B], data pruning's per-image loss weights): the inter-class relation becomes
    the mean of weight * (1 - correlation), as cross-entropy weights each image's loss, and
    the intra-class correlations are weighted over the batch (an image of weight 2 counts
    as two), so the kept images stand for those pruned from the batch.

    >>> z = torch.randn(4, 3); [round(v.item(), 6) for v in dist_parts(z, z)]
    [0.0, 0.0]
    """
    ys = torch.softmax(_full(student_logits) / T, dim=1)
    yt = torch.softmax(_full(teacher_logits).to(ys.dtype) / T, dim=1)
    if weight is None:
        inter = 1 - pearson_rows(ys, yt).mean()
        intra = 1 - pearson_rows(ys.t(), yt.t()).mean()
    else:
        inter = ((1 - pearson_rows(ys, yt)) * weight).mean()
        intra = 1 - pearson_rows(ys.t(), yt.t(), w=weight).mean()
    return T * T * inter, T * T * intra


def dist_loss(student_logits, teacher_logits, beta=1.0, gamma=1.0, T=1.0, weight=None):
    """beta * inter + gamma * intra (see :func:`dist_parts`); CE is a separate `ce` term."""
    inter, intra = dist_parts(student_logits, teacher_logits, T, weight)
    return beta * inter + gamma * intra


class DISTSpec(TermSpec):
    term: Literal["dist"] = "dist"
    beta: float = Field(1.0, ge=0, description="weight of the inter-class relation (paper: 1)")
    gamma: float = Field(1.0, ge=0, description="weight of the intra-class relation (paper: 1)")
    T: float = Field(1.0, gt=0, description="softmax temperature (paper, ImageNet: 1)")


@register("dist")
class DIST(LossTerm):
    """DIST (Huang et al., NeurIPS 2022, arXiv:2205.10536): the student matches the teacher's
    predictions up to a linear relation, per image (inter-class: Pearson correlation of the
    class-probability vectors) and per class across the batch (intra-class: Pearson
    correlation of each class's probabilities over the images), instead of matching them
    exactly as KL does. beta * inter + gamma * intra, both T^2-scaled; combine with a `ce`
    term as the paper does. Needs only the teacher's logits, so they are cached where the
    views are finite. The intra-class relation is taken over the batch each process sees
    (under torchrun, its shard of the global batch). Under data pruning both relations take
    the images' weights (:func:`dist_parts`)."""

    spec_cls = DISTSpec
    uses_teacher = True
    per_sample = True
    min_batch = 2      # one image has no spread across the batch: the intra-class relation is 0/0

    def forward(self, student, teacher, batch):
        return dist_loss(student.logits, teacher.logits, self.spec.beta, self.spec.gamma, self.spec.T,
                         weight=batch.weight)
