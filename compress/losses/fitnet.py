"""Romero et al. 2015, "FitNets: Hints for Thin Deep Nets" (ICLR, arXiv:1412.6550)."""

from typing import Literal

import torch.nn.functional as F
from torch import nn

from . import LossTerm, TermSpec, register


def hint_loss(regressed, teacher_feature):
    """Mean squared error between the regressed student hint and the teacher's guided layer."""
    return F.mse_loss(regressed.to(teacher_feature.dtype), teacher_feature)


class FitNetSpec(TermSpec):
    term: Literal["fitnet"] = "fitnet"
    student_layer: str
    teacher_layer: str
    regressor: Literal["conv1x1", "conv3x3"] = "conv1x1"


@register("fitnet")
class FitNet(LossTerm):
    """FitNets hint: a learned regressor maps the student's guided layer to the teacher's
    hint layer's shape; MSE between them. The regressor is built from shapes measured on
    the actual (possibly pruned) models, and is trained with the student."""

    spec_cls = FitNetSpec
    uses_teacher = True

    def setup(self, student_shapes, teacher_shapes, info=None):
        cs = student_shapes[self.spec.student_layer][0]
        ct = teacher_shapes[self.spec.teacher_layer][0]
        if self.spec.regressor == "conv1x1":
            self.regressor = nn.Conv2d(cs, ct, 1, bias=False)
        else:
            self.regressor = nn.Sequential(nn.Conv2d(cs, ct, 3, padding=1, bias=False),
                                           nn.BatchNorm2d(ct), nn.ReLU(inplace=True))
        self._size = teacher_shapes[self.spec.teacher_layer][1:]

    def forward(self, student, teacher, batch):
        s = self.regressor(student.features[self.spec.student_layer])
        t = teacher.features[self.spec.teacher_layer]
        if s.shape[-2:] != t.shape[-2:]:
            s = F.adaptive_avg_pool2d(s, t.shape[-2:])
        return hint_loss(s, t)
