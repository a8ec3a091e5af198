"""`distill`: train a student from a frozen teacher with a weighted list of loss terms."""

from typing import Literal, Optional

from pydantic import Field, model_validator

from ..config import StageSpec, TrainingSpec
from ..data import iterate
from ..engine import fit
from ..losses import Objective, term_spec_type
from ..losses.kd import KDSpec
from ..models import make_spec
from . import (StageResult, describe, input_model, plan_student, prepare, register, teacher_logits,
               teacher_of)


class DistillStage(StageSpec, TrainingSpec):
    kind: Literal["distill"] = "distill"
    from_: Optional[str] = Field(None, alias="from", description="earlier stage whose model is the student")
    model: Optional[str] = Field(None, description="models entry: a fresh student")
    teacher: str
    loss: list[term_spec_type()] = Field([KDSpec(T=4.0, alpha=0.9)], min_length=1)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.model is None) == (self.from_ is None):
            raise ValueError("give exactly one of `model` (a models entry) or `from` (an earlier stage)")
        return self


def build_objective(cfg, model, ctx):
    """The stage's Objective on the device, with teacher logits cached when possible."""
    teacher = teacher_of(cfg, ctx)
    sample = next(iterate(ctx.data.train, ctx.data, 2, channels_last=True)).x
    objective = Objective(cfg.loss, model, teacher, sample=sample)
    if objective.needs_teacher and teacher is None:
        raise ValueError("loss terms need a teacher")
    if objective.needs_teacher and not objective.teacher_features_needed:
        objective.teacher_logits = teacher_logits(ctx, cfg.teacher, teacher, cfg.augment)
    return objective.to(ctx.device)


@register("distill", DistillStage, plan_student)
def run(cfg, ctx):
    """Knowledge distillation / feature recovery of a (pruned) student.

    >>> # {name: distill, kind: distill, from: prune, teacher: teacher, loss: [{term: kd, T: 4}]}
    """
    model, spec = input_model(cfg, ctx)
    model = prepare(model, ctx)
    objective = build_objective(cfg, model, ctx)
    history = fit(model, objective, cfg, ctx, name=cfg.name)
    cached = objective.teacher_logits is not None
    return StageResult(spec=make_spec(spec["arch"], spec["args"], model), model=model,
                       metrics=describe(model, ctx),
                       info={"history": history, "teacher_logits_cached": cached})
