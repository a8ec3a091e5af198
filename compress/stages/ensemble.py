"""`ensemble`: the weighted mean of earlier stages' models (e.g. born-again generations,
Furlanello et al. 2018), evaluated as one model and usable as a teacher or for export."""

import copy
from typing import Literal, Optional

from pydantic import Field, model_validator

from ..config import StageSpec, stage_ref
from ..engine import evaluate
from ..models import Ensemble, count_params, ensemble_spec
from . import StageResult, describe, prepare, register


class EnsembleStage(StageSpec):
    kind: Literal["ensemble"] = "ensemble"
    members: list[stage_ref("member")] = Field(min_length=2, description="earlier stages whose models are averaged")
    weights: Optional[list[float]] = Field(None, description="weights of the members' logits")

    @model_validator(mode="after")
    def _check(self):
        if self.weights is not None and (len(self.weights) != len(self.members) or min(self.weights) <= 0):
            raise ValueError(f"weights: need {len(self.members)} positive weights, got {self.weights}")
        return self


def _plan(cfg, inputs, build):
    return Ensemble([copy.deepcopy(inputs[m]) for m in cfg.members], cfg.weights)


def member_rows(names, models, ctx):
    """[{name, top1, params}] of each member, measured on the whole test set."""
    return [{"name": n, "top1": round(evaluate(m, ctx), 2), "params": count_params(m)}
            for n, m in zip(names, models)]


@register("ensemble", EnsembleStage, _plan)
def run(cfg, ctx):
    """Average the logits of `members`.

    >>> # {name: ensemble, kind: ensemble, members: [gen1, gen2, gen3]}
    """
    models = [copy.deepcopy(ctx.results[m].get_model()) for m in cfg.members]
    model = prepare(Ensemble(models, cfg.weights), ctx)
    spec = ensemble_spec([ctx.results[m].spec for m in cfg.members], cfg.weights)
    return StageResult(spec=spec, model=model, metrics=describe(model, ctx),
                       info={"members": member_rows(cfg.members, model.members, ctx)})
