"""Zhang, Xiang, Hospedales & Lu 2018, "Deep Mutual Learning" (CVPR, arXiv:1706.00384)."""

from typing import Literal

import torch.nn.functional as F
from pydantic import Field

from . import LossTerm, TermSpec, register


def dml_loss(peer_logits, target):
    """sum_k [ CE(z_k, y) + 1/(K-1) sum_{j != k} KL(p_j || p_k) ], p = softmax(z).

    Each peer learns towards the others' current predictions, which are held fixed
    (detached) for its update — the simultaneous form of the paper's alternating updates.

    >>> z = torch.randn(4, 3); dml_loss([z, z], torch.tensor([0, 1, 2, 0])).item() > 0
    True
    """
    k = len(peer_logits)
    log_p = [F.log_softmax(z.float(), 1) for z in peer_logits]
    total = 0.0
    for i in range(k):
        total = total + F.cross_entropy(peer_logits[i].float(), target)
        for j in range(k):
            if j != i:
                total = total + F.kl_div(log_p[i], log_p[j].detach(), reduction="batchmean",
                                         log_target=True) / (k - 1)
    return total


class DMLSpec(TermSpec):
    term: Literal["dml"] = "dml"
    peers: int = Field(2, ge=2, description="cohort size; the mutual stage fills it in")


@register("dml")
class DML(LossTerm):
    """Deep mutual learning: every peer's CE plus its mean KL towards each other peer."""

    spec_cls = DMLSpec
    uses_cohort = True

    def student_layers(self):
        return [f"members.{i}" for i in range(self.spec.peers)]

    def forward(self, student, teacher, batch):
        return dml_loss([student.features[p] for p in self.student_layers()], batch.y)
