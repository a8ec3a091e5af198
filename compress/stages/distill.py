"""`distill`: train a student from a frozen teacher with a weighted list of loss terms."""

from typing import Literal, Optional

import torch
from pydantic import Field, model_validator

from .. import distributed
from ..config import MODEL_REF, StageSpec, TeacherRef, TrainingSpec, check_teacher_weights, stage_ref
from ..data import iterate
from ..engine import fit
from ..losses import Objective, TermInfo, term_spec_type
from ..losses.kd import KDSpec
from ..models import make_spec
from . import (StageResult, describe, input_model, plan_student, prepare, register, teacher_key,
               teacher_logits, teacher_of)


class DistillStage(StageSpec, TrainingSpec):
    kind: Literal["distill"] = "distill"
    from_: Optional[stage_ref()] = Field(None, alias="from", description="earlier stage whose model is the student")
    model: Optional[MODEL_REF] = Field(None, description="models entry: a fresh student")
    teacher: TeacherRef = Field(description="earlier stage, or a list of stages (mean of their logits)")
    teacher_weights: Optional[list[float]] = Field(None, description="weights of several teachers' logits")
    loss: list[term_spec_type()] = Field([KDSpec(T=4.0, alpha=0.9)], min_length=1)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.model is None) == (self.from_ is None):
            raise ValueError("give exactly one of `model` (a models entry) or `from` (an earlier stage)")
        if why := check_teacher_weights(self.teacher, self.teacher_weights):
            raise ValueError(why)
        return self


def build_objective(cfg, model, ctx):
    """The stage's Objective on the device, with teacher logits cached when possible."""
    teacher = teacher_of(cfg, ctx)
    sample = next(iterate(ctx.data.train, ctx.data, 2, channels_last=True)).x
    info = TermInfo(num_samples=len(ctx.data.train), num_classes=ctx.data.num_classes,
                    # images per rank and step (drop_last: all batches full; the global batch is split)
                    batch_size=min(cfg.batch_size, len(ctx.data.train)) // distributed.world_size(),
                    world_size=distributed.world_size())
    objective = Objective(cfg.loss, model, teacher, sample=sample, info=info)
    if objective.needs_teacher and teacher is None:
        raise ValueError("loss terms need a teacher")
    if objective.needs_teacher and not objective.teacher_features_needed:
        objective.teacher_logits = teacher_logits(ctx, teacher_key(cfg), teacher, cfg.augment)
    # adapters (regressors, projections) in the student's channels_last layout: no reorders per step
    return objective.to(ctx.device).to(memory_format=torch.channels_last)


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
