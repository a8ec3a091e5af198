"""Hidden-state distillation by cosine similarity: 1 - cos(student, teacher) at named layer
pairs, as used for hidden states in e.g. Sanh et al. 2019, "DistilBERT, a distilled version
of BERT" (arXiv:1910.01108, the cosine embedding loss)."""

from typing import Literal

import torch.nn.functional as F
from torch import nn

from . import LayerPairsSpec, LossTerm, match_spatial, register


def cosine_distance(student_feature, teacher_feature):
    """mean over the batch of 1 - cos(s_i, t_i), each sample's feature flattened.

    >>> import torch; x = torch.randn(3, 4, 2, 2)
    >>> cosine_distance(x, 2 * x).abs().item() < 1e-6
    True
    """
    s, t = student_feature.flatten(1), teacher_feature.flatten(1)
    return (1 - F.cosine_similarity(s, t.to(s.dtype), dim=1)).mean()


def projection(s_shape, t_shape, what):
    """The learned map of a student feature onto the teacher's channels: identity when they
    agree, else a 1x1 conv (C x H x W maps) or a linear layer (flat D vectors), no bias."""
    if len(s_shape) != len(t_shape) or len(s_shape) not in (1, 3):
        if tuple(s_shape) == tuple(t_shape):
            return nn.Identity()
        raise ValueError(f"{what}: cannot map a student feature of shape {tuple(s_shape)} onto a "
                         f"teacher feature of shape {tuple(t_shape)} (need both C x H x W or both D)")
    cs, ct = s_shape[0], t_shape[0]
    if cs == ct:
        return nn.Identity()
    return nn.Conv2d(cs, ct, 1, bias=False) if len(s_shape) == 3 else nn.Linear(cs, ct, bias=False)


class CosineSpec(LayerPairsSpec):
    term: Literal["cosine"] = "cosine"


@register("cosine")
class Cosine(LossTerm):
    """Hidden-state cosine distillation (cosine embedding loss of Sanh et al. 2019,
    DistilBERT, arXiv:1910.01108, applied to named layer pairs): mean over layer pairs of
    the batch mean of 1 - cos(P(s), t), P a learned 1x1 conv / linear projection where the
    channel counts differ (identity otherwise); a spatial mismatch is resolved by adaptive
    average pooling of the larger map to the smaller size."""

    spec_cls = CosineSpec
    uses_teacher = True

    def setup(self, student_shapes, teacher_shapes, info=None):
        self.proj = nn.ModuleList(
            projection(student_shapes[s], teacher_shapes[t], f"cosine {s} -> {t}")
            for s, t in zip(self.spec.student_layers, self.spec.teacher_layers))

    def forward(self, student, teacher, batch):
        total = 0.0
        for p, s_path, t_path in zip(self.proj, self.spec.student_layers, self.spec.teacher_layers):
            s, t = match_spatial(p(student.features[s_path]).float(), teacher.features[t_path].float())
            total = total + cosine_distance(s, t)
        return total / len(self.proj)
