"""`train`: plain supervised training (the teacher, or any model from scratch)."""

from typing import Literal, Optional

from pydantic import Field, model_validator

from ..config import MODEL_REF, StageSpec, TrainingSpec, stage_ref
from ..engine import fit
from ..losses import Objective
from ..losses.ce import CESpec
from ..models import make_spec
from . import StageResult, describe, input_model, plan_student, prepare, register


class TrainStage(StageSpec, TrainingSpec):
    kind: Literal["train"] = "train"
    model: Optional[MODEL_REF] = Field(None, description="models entry to build and train from scratch")
    from_: Optional[stage_ref()] = Field(None, alias="from", description="earlier stage whose model to keep training")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.model is None) == (self.from_ is None):
            raise ValueError("give exactly one of `model` (a models entry) or `from` (an earlier stage)")
        return self


@register("train", TrainStage, plan_student)
def run(cfg, ctx):
    """Train with cross-entropy (optionally label-smoothed).

    >>> # stages: [{name: teacher, kind: train, model: teacher, epochs: 4}]
    """
    model, spec = input_model(cfg, ctx)
    model = prepare(model, ctx)
    objective = Objective([CESpec(label_smoothing=cfg.label_smoothing)], model).to(ctx.device)
    history = fit(model, objective, cfg, ctx, name=cfg.name)
    return StageResult(spec=make_spec(spec["arch"], spec["args"], model), model=model,
                       metrics=describe(model, ctx), info={"history": history})
