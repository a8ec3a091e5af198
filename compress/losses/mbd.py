"""Merit-based distillation (Morikawa 2023): the per-sample weight of the KD term depends on
whether the teacher classifies that sample correctly."""

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from . import LossTerm, TermSpec, register
from .kd import _full


def merit_weights(teacher_logits, target, variant="delta", alpha=0.5, delta=0.2):
    """Per-sample KD weight w (CE gets 1 - w), from the teacher's merit on each sample.

    delta: alpha + delta where the teacher's argmax is the label, alpha - delta where not;
    hard: alpha (0.5 by default) where right, 0 (pure CE) where wrong;
    soft: the teacher's softmax probability (T = 1) of the true class.

    >>> merit_weights(torch.tensor([[2., 0.], [2., 0.]]), torch.tensor([0, 1]))
    tensor([0.7000, 0.3000])
    """
    t = _full(teacher_logits).detach()
    right = t.argmax(1) == target
    if variant == "delta":
        return torch.where(right, t.new_tensor(alpha + delta), t.new_tensor(alpha - delta))
    if variant == "hard":
        return torch.where(right, t.new_tensor(alpha), t.new_tensor(0.0))
    if variant == "soft":
        return F.softmax(t, dim=1).gather(1, target[:, None])[:, 0]
    raise ValueError(f"mbd: unknown variant {variant!r}")


def mbd_loss(student_logits, teacher_logits, target, variant="delta", T=4.0, alpha=0.5, delta=0.2):
    """mean_i [ w_i * T^2 * KL(softmax(t_i/T) || softmax(s_i/T)) + (1 - w_i) * CE(s_i, y_i) ],
    w from :func:`merit_weights`; KL summed over classes per sample."""
    s, t = _full(student_logits), _full(teacher_logits)
    w = merit_weights(t, target, variant, alpha, delta)
    log_ps, log_pt = F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(1)
    ce = F.cross_entropy(s, target, reduction="none")
    return (w * T * T * kl + (1 - w) * ce).mean()


class MBDSpec(TermSpec):
    term: Literal["mbd"] = "mbd"
    variant: Literal["delta", "hard", "soft"] = "delta"
    T: float = Field(4.0, gt=0, description="temperature of the KD part")
    alpha: float = Field(0.5, ge=0, le=1, description="base KD weight (delta); KD weight where the teacher is right (hard)")
    delta: float = Field(0.2, ge=0, le=1, description="delta: KD weight is alpha +- delta for a right/wrong teacher")

    @model_validator(mode="after")
    def _in_unit_interval(self):
        if self.variant == "delta" and not (0 <= self.alpha - self.delta and self.alpha + self.delta <= 1):
            raise ValueError(f"alpha +- delta must lie in [0, 1], got {self.alpha} +- {self.delta}")
        return self


@register("mbd")
class MBD(LossTerm):
    """Merit-based distillation (Morikawa 2023, the seed's "merit-based distillation"):
    a KD + CE mix whose KD weight per sample is alpha +- delta (`delta`), alpha or 0 (`hard`)
    or the teacher's probability of the true class (`soft`) by whether the teacher is right.
    Replaces both `kd` and `ce` in a loss list."""

    spec_cls = MBDSpec
    uses_teacher = True

    def forward(self, student, teacher, batch):
        s = self.spec
        return mbd_loss(student.logits, teacher.logits, batch.y, s.variant, s.T, s.alpha, s.delta)
