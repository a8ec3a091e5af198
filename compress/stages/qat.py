"""`qat`: INT8 quantization-aware fine-tuning (optionally with KD from a teacher).

BatchNorm is folded (simulated while its statistics still update), weights are fake-
quantized per channel (symmetric), activations per tensor (uint8, EMA observers). The
phase schedule freezes BN statistics, then the observers, so the last epochs train
against the exact integer grid that the ONNX file will use. ``backend`` picks the
implementation (``compress.quant``): eager modules for plain Sequential stacks, torchao
PT2E for any graph ``torch.export`` captures; ``auto`` chooses per model.
"""

import copy
from typing import Literal, Optional

from pydantic import Field, model_validator

from ..config import StageSpec, TeacherRef, TrainingSpec, check_teacher_weights, stage_ref
from ..data import iterate
from ..engine import fit
from ..losses import term_spec_type
from ..losses.ce import CESpec
from ..errors import CompressError
from .. import quant
from ..quant import QuantSpec, backend_of, calibrate, quantize_model, set_qat_phase
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
    backend: Literal["auto", "eager", "pt2e"] = Field(
        "auto", description="eager: own modules, plain Sequential stacks; pt2e: torchao, any capturable graph")
    float_convs: Literal["auto", "none"] = Field(
        "auto", description="pt2e backend: auto keeps a lead of the graph float over the convs onnxruntime "
        "runs slower in INT8 (ort_runtime.integer_conv_slow); none quantizes every conv")
    integer_sigmoid: bool = Field(
        True, description="pt2e backend: SiLU split into x * sigmoid(x), sigmoids and sigmoid-gated products "
        "quantized, so onnxruntime runs QLinearSigmoid/QLinearMul; false keeps them float")

    @model_validator(mode="after")
    def _check(self):
        if self.ema is not None:
            raise ValueError("ema: not available in a qat stage (its observer ranges and phase flags "
                             "are buffers that cannot be averaged); average in the stage it starts from")
        for f in ("freeze_bn_epoch", "freeze_observers_epoch"):
            if getattr(self, f) > self.epochs:
                raise ValueError(f"{f}: must be <= epochs ({self.epochs}), got {getattr(self, f)}")
        # a loss term that needs a teacher when none is set: refused by config._check_terms
        if self.teacher is not None and (why := check_teacher_weights(self.teacher, self.teacher_weights)):
            raise ValueError(why)
        return self

    @property
    def quant(self):
        return QuantSpec(weight_bits=self.weight_bits, act_bits=self.act_bits, backend=self.backend,
                         float_convs=self.float_convs, integer_sigmoid=self.integer_sigmoid)


def quantize_for(cfg, model, input_shape):
    """`model` prepared for QAT as `cfg` asks; one-line CompressError naming the stage
    when it cannot be (e.g. torch.export cannot capture it)."""
    from ..losses import LOSSES

    try:
        q = quantize_model(model, cfg.quant, input_shape)
    except CompressError as e:
        raise CompressError(f"stages.{cfg.name}: {e}") from None
    if backend_of(q) == "pt2e":
        for j, t in enumerate(cfg.loss):
            if LOSSES[t.term](t).student_layers():
                raise CompressError(
                    f"stages.{cfg.name}.loss[{j}]: term '{t.term}' taps the student's layers, but a model "
                    "quantized by the pt2e backend is a captured graph without module paths; use logit "
                    "terms (ce, kd, dkd, ...) in this stage")
    return q


def _plan(cfg, inputs, build):
    # Captures and prepares the skeleton: a model that cannot be quantized fails here, in
    # seconds, not after the stages before it have trained.
    return quantize_for(cfg, copy.deepcopy(inputs[cfg.from_]), build.input_shape)


@register("qat", QATStage, _plan, quantizes=True, code=quant.CODE)
def run(cfg, ctx):
    """Fine-tune stage `from`'s model with fake quantization.

    >>> # {name: qat, kind: qat, from: distill, teacher: teacher, epochs: 2, loss: [{term: kd}]}
    """
    src = ctx.results[cfg.from_]
    float_model = copy.deepcopy(src.get_model()).float().cpu()
    qmodel = prepare(quantize_for(cfg, float_model, ctx.data.input_shape), ctx)
    calib = iterate(ctx.data.train, ctx.data, cfg.batch_size, channels_last=True)
    calibrate(qmodel, (b.x for _, b in zip(range(cfg.calibration_batches), calib)))
    objective = build_objective(cfg, qmodel, ctx)

    def phase(epoch):
        set_qat_phase(qmodel, observers=epoch < cfg.freeze_observers_epoch,
                      bn_stats=epoch < cfg.freeze_bn_epoch)

    history = fit(qmodel, objective, cfg, ctx, name=cfg.name, on_epoch_start=phase)
    set_qat_phase(qmodel, observers=False, bn_stats=False)
    quant = {"weight_bits": cfg.weight_bits, "act_bits": cfg.act_bits, "backend": backend_of(qmodel)}
    if quant["backend"] == "pt2e":  # the graph is captured with an example of this shape
        quant["input_shape"] = list(ctx.data.input_shape)
        quant["float_convs"] = cfg.float_convs
        quant["float_layers"] = list(qmodel.float_layers)   # rebuilt as trained, whatever the rule
        quant["integer_sigmoid"] = cfg.quant.integer_sigmoid
    spec = {**copy.deepcopy(src.spec), "quant": quant}
    return StageResult(spec=spec, model=qmodel,
                       metrics=describe(qmodel, ctx, cost_model=float_model, history=history),
                       info={"history": history})
