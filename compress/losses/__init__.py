"""Loss-term registry and the objective: a weighted list of named terms.

A term is one file: a pure function with the math (unit-testable against hand-computed
values), a config class, and an ``nn.Module`` whose forward takes what it needs:
``forward(student: Outputs, teacher: Outputs | None, batch) -> Tensor``. Features come
from forward hooks on the module paths the term declares. Adding a term is one new
file plus its ``@LOSSES.register`` entry; the training loop never names a method.
"""

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ..config import Spec
from ..hooks import FeatureTaps
from ..registry import Registry

LOSSES = Registry("loss term")


class TermSpec(Spec):
    """Fields every loss term has. `term` selects the registry entry."""

    term: str
    weight: float = Field(1.0, ge=0)


class LayerPairsSpec(TermSpec):
    """Base of terms that compare features at several (student, teacher) layer pairs,
    named by module path: ``student_layers: [features.6, features.13]``."""

    student_layers: list[str] = Field(min_length=1, description="student module paths")
    teacher_layers: list[str] = Field(min_length=1, description="teacher module paths, one per student path")

    @model_validator(mode="after")
    def _paired(self):
        if len(self.student_layers) != len(self.teacher_layers):
            raise ValueError(f"student_layers and teacher_layers must pair up, got "
                             f"{len(self.student_layers)} and {len(self.teacher_layers)} paths")
        return self


@dataclass
class Outputs:
    logits: torch.Tensor
    features: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TermInfo:
    """Facts about the run a term may need at setup, passed by the Objective (never read
    from the training loop): e.g. CRD's memory bank has one row per training image."""

    num_samples: Optional[int] = None   # training images; batch.index is in [0, num_samples)
    num_classes: Optional[int] = None
    world_size: int = 1                 # processes sharing each global batch (torchrun)


def match_spatial(s, t):
    """Adaptive-average-pool the larger of two NCHW maps to the other's height and width
    (each dimension to the smaller of the two); 2-D inputs are returned unchanged."""
    if s.dim() != 4 or t.dim() != 4 or s.shape[-2:] == t.shape[-2:]:
        return s, t
    size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
    if tuple(s.shape[-2:]) != size:
        s = F.adaptive_avg_pool2d(s, size)
    if tuple(t.shape[-2:]) != size:
        t = F.adaptive_avg_pool2d(t, size)
    return s, t


class LossTerm(nn.Module):
    """Base of loss terms. Subclasses set `spec_cls` and implement `forward`."""

    spec_cls = TermSpec
    uses_teacher = False
    # Why the term cannot train under DDP (state DDP does not keep in step across processes),
    # or None; the pipeline refuses such a recipe under torchrun before training.
    distributed_problem = None

    def __init__(self, spec):
        super().__init__()
        self.spec = spec

    def student_layers(self):
        """Module paths of the student this term taps: its spec's `student_layers` list or
        `student_layer` path, if it has one."""
        return _layers(self.spec, "student")

    def teacher_layers(self):
        return _layers(self.spec, "teacher")

    def setup(self, student_shapes, teacher_shapes, info=None):
        """Build adapters from feature shapes ({path: shape without the batch dim}) measured
        by one dummy forward on the actual (possibly pruned) models; `info` is a
        :class:`TermInfo` (dataset size, classes)."""

    def forward(self, student, teacher, batch):
        raise NotImplementedError


def _layers(spec, role):
    many, one = getattr(spec, f"{role}_layers", None), getattr(spec, f"{role}_layer", None)
    return list(many) if many is not None else [one] if one is not None else []


def register(name):
    """Register a LossTerm subclass under `name` (the YAML `term:` value)."""
    return LOSSES.register(name)


for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")


def term_spec_type():
    """The discriminated union of every registered term's config (for stage configs)."""
    from typing import Annotated, Union

    classes = tuple(LOSSES[n].spec_cls for n in sorted(LOSSES))
    return Annotated[Union[classes], Field(discriminator="term")]


class Objective(nn.Module):
    """Sum of weighted loss terms over student (and optional frozen teacher) outputs.

    Teacher logits come from a per-run cache ([views, N, classes], looked up by each
    image's view and index) when every term needs only logits and the batches come from a
    finite set of transforms; otherwise the teacher runs on each batch.

    With `sample` (one input batch) the tapped features are measured once and every term's
    ``setup(student_shapes, teacher_shapes, info)`` builds its adapters; `info` (a
    :class:`TermInfo`: training-set size, classes) reaches terms such as CRD that need it.
    """

    def __init__(self, specs, student, teacher=None, *, sample=None, teacher_logits=None, info=None):
        super().__init__()
        self.names = []
        terms = {}
        for s in specs:
            name = s.term if s.term not in terms else f"{s.term}_{len(terms)}"
            terms[name] = LOSSES[s.term](s)
            self.names.append(name)
        self.terms = nn.ModuleDict(terms)
        self.weights = {n: s.weight for n, s in zip(self.names, specs)}
        self.teacher = teacher
        self.teacher_logits = teacher_logits
        s_paths = [p for t in terms.values() for p in t.student_layers()]
        t_paths = [p for t in terms.values() for p in t.teacher_layers()]
        self.s_taps = FeatureTaps(student, s_paths, "student_layer")
        self.t_taps = FeatureTaps(teacher.module, t_paths, "teacher_layer") if teacher is not None else None
        if sample is not None or info is not None:
            # The dummy forward runs only when a term taps layers (as before: a QAT model's
            # observers see no extra batch); every term gets setup() with the run's facts.
            shapes = self._measure(student, sample) if sample is not None and (s_paths or t_paths) else ({}, {})
            for t in terms.values():
                t.setup(*shapes, info if info is not None else TermInfo())

    @property
    def needs_teacher(self):
        return any(t.uses_teacher for t in self.terms.values())

    @property
    def teacher_features_needed(self):
        return bool(self.t_taps and self.t_taps.paths)

    @torch.no_grad()
    def _measure(self, student, sample):
        was = student.training
        student.eval()
        with self.s_taps.attached():
            student(sample)
        s_shapes = {p: tuple(f.shape[1:]) for p, f in self.s_taps.features.items()}
        t_shapes = {}
        if self.t_taps is not None and self.t_taps.paths:
            with self.t_taps.attached():
                self.teacher(sample)
            t_shapes = {p: tuple(f.shape[1:]) for p, f in self.t_taps.features.items()}
        student.train(was)
        return s_shapes, t_shapes

    def forward(self, model, batch):
        with self.s_taps.attached():
            logits = model(batch.x)
        student = Outputs(logits, dict(self.s_taps.features))
        teacher = None
        if self.needs_teacher:
            if self.teacher_logits is not None and not self.teacher_features_needed:
                teacher = Outputs(self.teacher_logits[batch.view, batch.index])
            else:
                with self.t_taps.attached():
                    t_logits = self.teacher(batch.x)
                teacher = Outputs(t_logits, dict(self.t_taps.features))
        parts = {n: self.weights[n] * self.terms[n](student, teacher, batch).float() for n in self.names}
        return sum(parts.values()), parts, logits
