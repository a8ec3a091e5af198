"""Online ensemble distillation: the peers' averaged logits teach every peer — Lan, Zhu &
Gong 2018, "Knowledge Distillation by On-the-Fly Native Ensemble" (ONE, NeurIPS), and Guo
et al. 2020, "Online Knowledge Distillation via Collaborative Learning" (KDCL, CVPR)."""

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from . import LossTerm, TermSpec, register
from .kd import kd_loss


def online_kd_loss(peer_logits, target, T=3.0):
    """sum_k CE(z_k, y) + CE(mean_k z_k, y) + sum_k T^2 KL(softmax(z_e/T) || softmax(z_k/T)),
    with the ensemble logits z_e = mean_k z_k held fixed as the soft target.

    >>> z = torch.randn(4, 3); online_kd_loss([z, z], torch.tensor([0, 1, 2, 0])).item() > 0
    True
    """
    ens = torch.stack([z.float() for z in peer_logits]).mean(0)
    total = F.cross_entropy(ens, target)
    for z in peer_logits:
        total = total + F.cross_entropy(z.float(), target) + kd_loss(z, ens.detach(), T=T)
    return total


class OnlineKDSpec(TermSpec):
    term: Literal["online_kd"] = "online_kd"
    T: float = Field(3.0, gt=0, description="temperature of the ensemble's soft targets (ONE uses 3)")
    peers: int = Field(2, ge=2, description="cohort size; the mutual stage fills it in")


@register("online_kd")
class OnlineKD(LossTerm):
    """Online ensemble KD: each peer's CE, the ensemble's CE, and KD from the ensemble."""

    spec_cls = OnlineKDSpec
    uses_cohort = True

    def student_layers(self):
        return [f"members.{i}" for i in range(self.spec.peers)]

    def forward(self, student, teacher, batch):
        return online_kd_loss([student.features[p] for p in self.student_layers()], batch.y, self.spec.T)
