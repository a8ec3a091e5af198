"""Zhao, Cui, Song, Qiu & Liang 2022, "Decoupled Knowledge Distillation" (CVPR, arXiv:2203.08679)."""

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from . import LossTerm, TermSpec, register
from .kd import _full

_MASK = 1000.0   # subtracted from the target logit to drop it from the softmax (as in mdistiller)


def dkd_parts(student_logits, teacher_logits, target, T=4.0):
    """(TCKD, NCKD), each T^2 * KL summed over classes and averaged over the batch.

    TCKD = KL(b^t || b^s) with b = [p_target, 1 - p_target] at temperature T (the binary
    target / non-target split); NCKD = KL(p^t || p^s) among the non-target classes only
    (target logit minus 1000 before the softmax). The binary probabilities are formed in
    log space (log(1 - p_target) = logsumexp of the non-target log-probabilities), so a
    confident teacher gives no log(0).

    >>> z = torch.randn(2, 5); dkd_parts(z, z, torch.tensor([0, 3]))
    (tensor(0.), tensor(0.))
    """
    s, t = _full(student_logits) / T, _full(teacher_logits) / T
    gt = F.one_hot(target, s.shape[1]).to(s.dtype)

    def binary(z):
        logp = F.log_softmax(z, dim=1)
        return torch.stack([(logp * gt).sum(1), torch.logsumexp(logp - _MASK * gt, dim=1)], 1)

    bs, bt = binary(s), binary(t)
    tckd = (bt.exp() * (bt - bs)).sum(1).mean()
    ls, lt = F.log_softmax(s - _MASK * gt, dim=1), F.log_softmax(t - _MASK * gt, dim=1)
    nckd = (lt.exp() * (lt - ls)).sum(1).mean()
    return T * T * tckd, T * T * nckd


def dkd_loss(student_logits, teacher_logits, target, alpha=1.0, beta=8.0, T=4.0):
    """alpha * TCKD + beta * NCKD (see :func:`dkd_parts`); CE is a separate `ce` term."""
    tckd, nckd = dkd_parts(student_logits, teacher_logits, target, T)
    return alpha * tckd + beta * nckd


class DKDSpec(TermSpec):
    term: Literal["dkd"] = "dkd"
    alpha: float = Field(1.0, ge=0, description="weight of TCKD (paper: 1)")
    beta: float = Field(8.0, ge=0, description="weight of NCKD (paper, CIFAR-100: 8; ImageNet: 0.5)")
    T: float = Field(4.0, gt=0, description="softmax temperature (paper, CIFAR-100: 4)")
    warmup_epochs: float = Field(0.0, ge=0, description="linear ramp of the term's weight over this many "
                                 "epochs of training images (mdistiller: 20 of 240); 0: none")


@register("dkd")
class DKD(LossTerm):
    """Decoupled KD (Zhao et al., CVPR 2022, arXiv:2203.08679): alpha * TCKD + beta * NCKD,
    both T^2-scaled. Combine with a `ce` term as the paper does (CE weight 1).

    Warm-up without the loop knowing: the term counts the training images it has seen
    (a device tensor, no host sync) and scales itself by min(seen / (warmup_epochs * N), 1),
    N the training-set size from setup(). mdistiller steps the same ramp once per epoch
    (epoch / warmup, epochs counted from 1); here it rises per batch and reaches
    1 / warmup_epochs at the end of the first epoch and 1 after `warmup_epochs` epochs.
    """

    spec_cls = DKDSpec
    uses_teacher = True

    def __init__(self, spec):
        super().__init__(spec)
        self.num_samples, self.world_size = None, 1
        self.register_buffer("seen", torch.zeros((), dtype=torch.long), persistent=False)

    def setup(self, student_shapes, teacher_shapes, info=None):
        self.num_samples = info.num_samples if info is not None else None
        self.world_size = info.world_size if info is not None else 1

    def forward(self, student, teacher, batch):
        loss = dkd_loss(student.logits, teacher.logits, batch.y, self.spec.alpha, self.spec.beta, self.spec.T)
        if self.spec.warmup_epochs > 0:
            if not self.num_samples:
                raise ValueError("dkd: warmup_epochs needs the training-set size (Objective(..., info=TermInfo(num_samples=N)))")
            if self.training:
                self.seen += batch.y.numel() * self.world_size   # images of the global batch
            ramp = (self.seen.float() / (self.spec.warmup_epochs * self.num_samples)).clamp(max=1.0)
            loss = loss * ramp
        return loss
