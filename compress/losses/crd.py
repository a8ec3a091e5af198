"""Tian, Krishnan & Isola 2020, "Contrastive Representation Distillation" (ICLR, arXiv:1910.10699)."""

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from . import LossTerm, TermSpec, register


def sample_contrast(index, num_samples, k, generator=None):
    """[B, k + 1] dataset indices: column 0 the positive (`index`), then k negatives drawn
    uniformly, with replacement, from the other num_samples - 1 indices."""
    r = torch.randint(0, num_samples - 1, (len(index), k), device=index.device, generator=generator)
    neg = r + (r >= index[:, None]).long()     # skip the positive: uniform over the rest
    return torch.cat([index[:, None], neg], 1)


def bank_scores(memory, v, contrast):
    """s[b, j] = memory[contrast[b, j]] . v[b]. Gathers [B, k+1, D] rows as the authors'
    code does, or scores the whole bank ([B, N]) and picks, whichever is smaller."""
    n, d = memory.shape
    if n <= contrast.shape[1] * d:
        return (v @ memory.t()).gather(1, contrast)
    return torch.bmm(memory[contrast], v[:, :, None])[:, :, 0]


def nce_loss(x, num_samples, eps=1e-7):
    """NCE loss of the authors' `ContrastLoss`. x [B, k+1]: column 0 the positive's
    estimate P(i | v) = exp(v.m_i / tau) / Z, then the k negatives'; the noise distribution
    is uniform, P_n = 1 / N. With m = k:

        -(1/B) sum_b [ log x_b0 / (x_b0 + m P_n + eps) + sum_j log m P_n / (x_bj + m P_n + eps) ]
    """
    m_pn = (x.shape[1] - 1) / num_samples
    log_d1 = (x[:, 0] / (x[:, 0] + m_pn + eps)).log()
    log_d0 = (m_pn / (x[:, 1:] + m_pn + eps)).log()
    return -(log_d1.sum() + log_d0.sum()) / x.shape[0]


class CRDSpec(TermSpec):
    term: Literal["crd"] = "crd"
    weight: float = Field(0.8, ge=0, description="beta (the authors' run scripts: 0.8)")
    student_layer: str = Field("penultimate", description="feature point or module path")
    teacher_layer: str = Field("penultimate", description="feature point or module path")
    feat_dim: int = Field(128, ge=1, le=1024, description="embedding size (paper: 128)")
    nce_k: int = Field(4096, ge=1, description="negatives per sample (paper: 16384; code: 4096); at most N - 1")
    nce_t: float = Field(0.07, gt=0, description="temperature tau")
    nce_m: float = Field(0.5, ge=0, lt=1, description="momentum of the memory-bank update")


@register("crd")
class CRD(LossTerm):
    """Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020,
    arXiv:1910.10699), NCE variant of the authors' code (`CRDLoss` / `ContrastMemory` /
    `ContrastLoss`, not the InfoNCE/softmax one): linear embeddings of student and teacher
    penultimate features (feat_dim 128, L2-normalised); one memory bank of N x feat_dim per
    model, initialised uniformly in [-1/sqrt(feat_dim/3), +1/sqrt(feat_dim/3)] and updated at
    the batch's `batch.index` rows with momentum 0.5 (then re-normalised); k negatives per
    sample drawn uniformly from the other N - 1 indices (the authors' CIFAR code draws them
    from other classes); P(i|v) = exp(v.m_i / tau) / Z with Z = N * mean(exp(.)) fixed on the
    first batch; loss = NCE(student vs teacher bank) + NCE(teacher vs student bank).

    N (the training-set size) comes from setup()'s `info`; both embeddings are trained,
    the teacher network stays frozen.
    """

    spec_cls = CRDSpec
    uses_teacher = True
    distributed_problem = ("its memory bank holds one row per training image and each process "
                           "would update only its own shard's rows")

    def setup(self, student_shapes, teacher_shapes, info=None):
        n = info.num_samples if info is not None else None
        if not n or n < 2:
            raise ValueError("crd: needs the training-set size (>= 2) at setup: "
                             "Objective(..., info=TermInfo(num_samples=N))")
        d = self.spec.feat_dim
        self.num_samples, self.k = n, min(self.spec.nce_k, n - 1)
        self.embed_s = nn.Linear(math.prod(student_shapes[self.spec.student_layer]), d)
        self.embed_t = nn.Linear(math.prod(teacher_shapes[self.spec.teacher_layer]), d)
        stdv = 1.0 / math.sqrt(d / 3)
        self.register_buffer("memory_s", torch.rand(n, d) * 2 * stdv - stdv, persistent=False)
        self.register_buffer("memory_t", torch.rand(n, d) * 2 * stdv - stdv, persistent=False)
        self.register_buffer("z_s", torch.tensor(-1.0), persistent=False)   # < 0: not yet estimated
        self.register_buffer("z_t", torch.tensor(-1.0), persistent=False)

    def _normalised(self, scores, z_name):
        """exp(scores / tau) / Z, Z estimated once (first batch, detached) without a host sync."""
        out = (scores / self.spec.nce_t).exp()
        z_old = getattr(self, z_name)
        z = torch.where(z_old < 0, out.detach().mean() * self.num_samples, z_old)
        z_old.copy_(z)
        return out / z

    def forward(self, student, teacher, batch):
        fs = student.features[self.spec.student_layer].flatten(1)
        ft = teacher.features[self.spec.teacher_layer].flatten(1)
        vs = F.normalize(self.embed_s(fs).float(), dim=1)
        vt = F.normalize(self.embed_t(ft.to(fs.dtype)).float(), dim=1)
        idx = batch.index
        contrast = sample_contrast(idx, self.num_samples, self.k)
        with torch.autocast(vs.device.type, enabled=False):    # exp(x / 0.07) needs fp32
            out_s = self._normalised(bank_scores(self.memory_t, vs, contrast), "z_s")  # student anchor
            out_t = self._normalised(bank_scores(self.memory_s, vt, contrast), "z_t")  # teacher anchor
            loss = nce_loss(out_s, self.num_samples) + nce_loss(out_t, self.num_samples)
            if self.training:
                with torch.no_grad():
                    # Out of place: the whole-bank scores above keep the old bank for backward.
                    self.memory_s = self._updated(self.memory_s, idx, vs)
                    self.memory_t = self._updated(self.memory_t, idx, vt)
        return loss

    def _updated(self, memory, idx, v):
        m = self.spec.nce_m
        rows = F.normalize(memory[idx] * m + v.detach() * (1 - m), dim=1)
        return memory.index_copy(0, idx, rows)
