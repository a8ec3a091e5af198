"""Cross-entropy with the true labels (optionally label-smoothed)."""

import torch.nn.functional as F
from pydantic import Field
from typing import Literal

from . import LossTerm, TermSpec, register


class CESpec(TermSpec):
    term: Literal["ce"] = "ce"
    label_smoothing: float = Field(0.0, ge=0, lt=1)


@register("ce")
class CE(LossTerm):
    """Cross-entropy of the student's logits against the labels."""

    spec_cls = CESpec
    per_sample = True

    def forward(self, student, teacher, batch):
        if batch.weight is None:
            return F.cross_entropy(student.logits, batch.y, label_smoothing=self.spec.label_smoothing)
        each = F.cross_entropy(student.logits, batch.y, label_smoothing=self.spec.label_smoothing,
                               reduction="none")
        return (each * batch.weight).mean()
