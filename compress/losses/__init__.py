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
from typing import Annotated, Optional

import torch
import torch.nn.functional as F
from pydantic import BeforeValidator, Field, SerializeAsAny, model_validator
from torch import nn

from ..config import Spec
from ..errors import CompressError
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
    batch_size: Optional[int] = None    # images per training batch (all batches are full)
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
    # Reads each peer of a cohort (module paths members.0 ... members.K-1; K is the spec's
    # `peers`, filled in by the stage): only a stage kind registered with trains_cohort
    # (mutual) can run it; parsing refuses it elsewhere.
    uses_cohort = False
    min_batch = 1      # fewest images per batch the term's math is defined for
    # Whether the term is a mean over images that applies `batch.weight` (each image's loss
    # weight) when a batch has one: only such terms can train under data pruning.
    per_sample = False

    @classmethod
    def batch_problem(cls, batch_size):
        """None, or why this term cannot be computed on batches of `batch_size` images."""
        if batch_size is not None and batch_size < cls.min_batch:
            return (f"loss term '{cls.spec_cls.model_fields['term'].default}' needs at least "
                    f"{cls.min_batch} images per batch, got {batch_size}")
        return None
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


class _TermList:
    """Marker on the item type of a stage field holding loss terms (see term_spec_type)."""

    def __repr__(self):
        return "TERM_LIST"


TERM_LIST = _TermList()


def _registered_term(value):
    """A term mapping validated by the config class registered for its `term`, looked up
    now: a plugin may register terms after the stage modules were imported."""
    if isinstance(value, dict) and isinstance(value.get("term"), str) and value["term"] in LOSSES:
        return LOSSES[value["term"]].spec_cls.model_validate(value)
    return value


def term_spec_type():
    """The item type of a stage's `loss` list: any registered term's config, resolved through
    the registry when a recipe is parsed (``compress.config`` parses each item with its
    term's class and names the field path of any error), serialised with all its fields.

    >>> loss: list[term_spec_type()] = Field([KDSpec()], min_length=1)
    """
    return Annotated[SerializeAsAny[TermSpec], BeforeValidator(_registered_term), TERM_LIST]


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
        batch = info.batch_size if info is not None else None
        for n, t in terms.items():
            if why := t.batch_problem(batch):
                raise CompressError(f"{why}; raise batch_size (or the training images) or drop '{n}'")
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
            elif not self.teacher_features_needed:   # logits only: no module output to keep
                teacher = Outputs(self.teacher.logits(batch.x))
            else:
                with self.t_taps.attached():
                    t_logits = self.teacher(batch.x)
                teacher = Outputs(t_logits, dict(self.t_taps.features))
        parts = {n: self.weights[n] * self.terms[n](student, teacher, batch).float() for n in self.names}
        return sum(parts.values()), parts, logits
