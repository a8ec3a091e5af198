"""`mutual`: K peers trained together from scratch, each learning from the labels and from
the others — deep mutual learning (Zhang et al. 2018) or online ensemble distillation
(ONE, Lan et al. 2018; KDCL, Guo et al. 2020) — with the one training loop.

The peers form an :class:`Ensemble` (``members.0``, ``members.1``, ...); the loss terms
read each peer's logits through forward hooks on those paths, so nothing in the loop
knows about cohorts. The stage's model is the cohort (the mean of the peers' logits);
the report lists every peer.
"""

from typing import Literal

from pydantic import Field

from .. import distributed
from ..config import MODEL_REF, StageSpec, TrainingSpec
from ..data import iterate
from ..engine import fit
from ..losses import Objective, TermInfo, term_spec_type
from ..losses.dml import DMLSpec
from ..models import Ensemble, ensemble_spec, make_spec
from . import StageResult, describe, new_model, prepare, register
from .ensemble import member_rows


class MutualStage(StageSpec, TrainingSpec):
    kind: Literal["mutual"] = "mutual"
    models: list[MODEL_REF] = Field(min_length=2, description="models entries, one per peer (repeat to clone)")
    loss: list[term_spec_type()] = Field([DMLSpec()], min_length=1)

    def peer_losses(self):
        """The loss specs with the cohort size filled in where a term needs it."""
        return [t.model_copy(update={"peers": len(self.models)}) if "peers" in type(t).model_fields else t
                for t in self.loss]


def _plan(cfg, inputs, build):
    return Ensemble([build(m) for m in cfg.models])


@register("mutual", MutualStage, _plan, trains_cohort=True)
def run(cfg, ctx):
    """Train a cohort of peers together.

    >>> # {name: dml, kind: mutual, models: [student, student], loss: [{term: dml}]}
    """
    shape, ncls = ctx.data.input_shape, ctx.data.num_classes
    built = [new_model(ctx.recipe, m, shape[0], ncls, salt=f"#peer{i}") for i, m in enumerate(cfg.models)]
    cohort = prepare(Ensemble([m for m, _ in built]), ctx)
    sample = next(iterate(ctx.data.train, ctx.data, 2, channels_last=True)).x
    info = TermInfo(num_samples=len(ctx.data.train), num_classes=ncls,
                    batch_size=min(cfg.batch_size, len(ctx.data.train)) // distributed.world_size(),
                    world_size=distributed.world_size())   # images per rank and step
    objective = Objective(cfg.peer_losses(), cohort, None, sample=sample, info=info).to(ctx.device)
    history = fit(cohort, objective, cfg, ctx, name=cfg.name)
    specs = [make_spec(s["arch"], s["args"], m) for (_, s), m in zip(built, cohort.members)]
    names = [f"{cfg.name}.peer{i}" for i in range(len(cfg.models))]
    return StageResult(spec=ensemble_spec(specs), model=cohort, metrics=describe(cohort, ctx),
                       info={"history": history, "members": member_rows(names, cohort.members, ctx)})
