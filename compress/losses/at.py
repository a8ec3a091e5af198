"""Zagoruyko & Komodakis 2017, "Paying More Attention to Attention: Improving the Performance
of Convolutional Neural Networks via Attention Transfer" (ICLR, arXiv:1612.03928)."""

from typing import Literal

import torch.nn.functional as F
from pydantic import Field

from . import LayerPairsSpec, LossTerm, match_spatial, register


def attention_map(feature, p=2.0):
    """Q = sum_c |A_c|^p over the channels of an N x C x H x W map, flattened to N x HW and
    L2-normalised per sample (Q / ||Q||_2)."""
    q = feature.abs().pow(p).sum(1).flatten(1)
    return F.normalize(q, p=2, dim=1)


def at_loss(student_features, teacher_features, beta=1000.0, p=2.0):
    """beta / 2 * sum_j mean_batch || Q_s^j / ||Q_s^j|| - Q_t^j / ||Q_t^j|| ||_2  (paper, eq. 2).

    The distance is the L2 norm of the difference of the normalised maps (the paper's
    formula; torchdistill's `paper` mode), not the squared-difference mean of the authors'
    code and of mdistiller/RepDistiller. Where the spatial sizes of a pair differ, the
    larger feature map is adaptive-average-pooled to the smaller before the maps are formed.
    """
    total = 0.0
    for s, t in zip(student_features, teacher_features):
        s, t = match_spatial(s, t.to(s.dtype))
        total = total + (attention_map(s, p) - attention_map(t, p)).norm(p=2, dim=1).mean()
    return beta / 2 * total


class ATSpec(LayerPairsSpec):
    term: Literal["at"] = "at"
    beta: float = Field(1000.0, gt=0, description="paper: 1e3 (see the class docstring on its scale)")
    p: float = Field(2.0, gt=0, description="power in the attention map sum_c |A_c|^p (paper: 2)")


@register("at")
class AT(LossTerm):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017, arXiv:1612.03928), activation-
    based, paper formula: beta/2 * sum over layer pairs of the batch mean of
    ||Q_s/||Q_s|| - Q_t/||Q_t|| ||_2 with Q = sum_c |A_c|^2 flattened.

    Scale: the paper sets beta = 1e3 "divided by number of elements in attention map and
    batch size for each layer"; this term already takes the batch mean but does not divide
    by H*W, so beta = 1000 weighs the term H*W times more than that reading (the norm of a
    difference of unit vectors is at most 2). Lower `beta` (e.g. 1000 / (H*W)) for that
    scale; the field keeps the paper's number as the default.
    """

    spec_cls = ATSpec
    uses_teacher = True

    def forward(self, student, teacher, batch):
        s = [student.features[p].float() for p in self.spec.student_layers]
        t = [teacher.features[p].float() for p in self.spec.teacher_layers]
        return at_loss(s, t, self.spec.beta, self.spec.p)
