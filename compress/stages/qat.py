"""`qat`: INT8 quantization-aware fine-tuning (optionally with KD from a teacher).

BatchNorm is folded (simulated while its statistics still update), weights are fake-
quantized per channel (symmetric), activations per tensor (uint8, EMA observers). The
phase schedule freezes BN statistics, then the observers, so the last epochs train
against the exact integer grid that the ONNX file will use.
"""

import copy
from typing import Literal, Optional

from pydantic import Field, model_validator

from ..config import StageSpec, TeacherRef, TrainingSpec, check_teacher_weights, stage_ref
from ..data import iterate
from ..engine import fit
from ..losses import term_spec_type
from ..losses.ce import CESpec
from ..quant import QuantSpec, calibrate, quantize_model, set_qat_phase
from . import StageResult, describe, prepare, register
from .distill import build_objective


class QATStage(StageSpec, TrainingSpec):
    kind: Literal["qat"] = "qat"
    from_: stage_ref(float_model=True) = Field(alias="from", description="earlier stage with a float model")
    teacher: Optional[TeacherRef] = None
    teacher_weights: Optional[list[float]] = None
    loss: list[term_spec_type()] = Field([CESpec()], min_length=1)
    weight_bits: int = Field(7, ge=2, le=8, description="7 (+-63) avoids U8S8 saturation on CPUs without VNNI")
    act_bits: int = Field(8, ge=2, le=8)
    calibration_batches: int = Field(8, ge=1, description="batches that set the observers before training")
    freeze_bn_epoch: int = Field(1, ge=0, description="epoch from which BN statistics are frozen")
    freeze_observers_epoch: int = Field(1, ge=0, description="epoch from which activation ranges are frozen")

    @model_validator(mode="after")
    def _check(self):
        for f in ("freeze_bn_epoch", "freeze_observers_epoch"):
            if getattr(self, f) > self.epochs:
                raise ValueError(f"{f}: must be <= epochs ({self.epochs}), got {getattr(self, f)}")
        from ..losses import LOSSES

        if self.teacher is not None and (why := check_teacher_weights(self.teacher, self.teacher_weights)):
            raise ValueError(why)
        if self.teacher is None and any(LOSSES[t.term].uses_teacher for t in self.loss):
            raise ValueError("loss: a term needs a teacher; set `teacher` to an earlier stage")
        return self

    @property
    def quant(self):
        return QuantSpec(weight_bits=self.weight_bits, act_bits=self.act_bits)


def _plan(cfg, inputs, build):
    return quantize_model(copy.deepcopy(inputs[cfg.from_]), cfg.quant)


@register("qat", QATStage, _plan, quantizes=True)
def run(cfg, ctx):
    """Fine-tune stage `from`'s model with fake quantization.

    >>> # {name: qat, kind: qat, from: distill, teacher: teacher, epochs: 2, loss: [{term: kd}]}
    """
    src = ctx.results[cfg.from_]
    float_model = copy.deepcopy(src.get_model()).float().cpu()
    qmodel = prepare(quantize_model(float_model, cfg.quant), ctx)
    calib = iterate(ctx.data.train, ctx.data, cfg.batch_size, channels_last=True)
    calibrate(qmodel, (b.x for _, b in zip(range(cfg.calibration_batches), calib)))
    objective = build_objective(cfg, qmodel, ctx)

    def phase(epoch):
        set_qat_phase(qmodel, observers=epoch < cfg.freeze_observers_epoch,
                      bn_stats=epoch < cfg.freeze_bn_epoch)

    history = fit(qmodel, objective, cfg, ctx, name=cfg.name, on_epoch_start=phase)
    set_qat_phase(qmodel, observers=False, bn_stats=False)
    spec = {**copy.deepcopy(src.spec), "quant": {"weight_bits": cfg.weight_bits, "act_bits": cfg.act_bits}}
    return StageResult(spec=spec, model=qmodel, metrics=describe(qmodel, ctx, cost_model=float_model),
                       info={"history": history})
