"""`export`: ONNX files of earlier stages' models, each verified in onnxruntime.

FP32 files must match PyTorch's logits within 1e-4 (relative to the largest |logit| above 1); INT8 files must agree with the
fake-quant model's top-1 on >= 99% of the test set, and onnxruntime must run every conv
of them as an integer kernel. Every number in the report is
measured on the exported file: top-1 by onnxruntime on the whole test set, latency by
onnxruntime on the CPU.
"""

import copy
import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from ..config import Spec, StageSpec, stage_ref
from ..data import iterate
from ..errors import CompressError
from ..onnx_io import check_fp32_parity, check_int8_agreement, export_onnx
from ..ort_runtime import (check_int8_kernels, float_islands, ort_latency_side_by_side, ort_logits,
                           slow_integer_convs)
from .. import quant
from ..quant import QuantSpec, calibrate, is_quantized, quantize_model, to_int8_module
from . import StageResult, register


class ExportItem(Spec):
    model: stage_ref("export") = Field(description="the stage whose model to export")
    format: Literal["onnx-fp32", "onnx-int8"] = "onnx-fp32"
    float_stem: bool = Field(True, description="onnx-int8 of a plain VGG: a first conv on 1-3 input channels "
                             "and its max-pool stay float, where onnxruntime's integer kernel is slower; "
                             "false runs every conv as an integer kernel")


class ExportStage(StageSpec):
    kind: Literal["export"] = "export"
    models: list[ExportItem] = Field(min_length=1)
    latency_runs: int = Field(50, ge=1, description="timed runs per batch size (median reported)")
    calibration_batches: int = Field(16, ge=1, description="for onnx-int8 of a float model (post-training)")
    fp32_atol: float = Field(1e-4, gt=0)
    int8_min_agreement: float = Field(0.99, gt=0, le=1)

    def output_files(self):
        return [(f"models[{i}]", export_name(m)) for i, m in enumerate(self.models)]


def export_name(item):
    """The file an export item writes: ``<stage>-<fp32|int8>.onnx``."""
    return f"{item.model}-{item.format.removeprefix('onnx-')}.onnx"


def _images01(split):
    """Test images as float32 in [0, 1], NCHW, on the CPU: what the ONNX graph takes."""
    return split.x.cpu().float().div_(255)


def _int8_source(model, ctx, cfg, qspec=None):
    """A fake-quant model for INT8 export: the QAT model itself, or post-training
    quantization (BN folded, observers calibrated on training batches) of a float model."""
    if is_quantized(model):
        return model
    q = quantize_model(copy.deepcopy(model).float().cpu(), qspec or QuantSpec(),
                       ctx.data.input_shape).to(ctx.device)
    batches = iterate(ctx.data.train, ctx.data, 256, channels_last=True)
    calibrate(q, (b.x for _, b in zip(range(cfg.calibration_batches), batches)))
    return q


def _plan(cfg, inputs, build):
    """Prove each onnx-int8 item can be quantized: a float model is captured and prepared
    as post-training quantization will do (a qat stage's model already was)."""
    for i, item in enumerate(cfg.models):
        skel = inputs.get(item.model)
        if item.format == "onnx-int8" and skel is not None and not is_quantized(skel):
            try:
                quantize_model(copy.deepcopy(skel), QuantSpec(), build.input_shape)
            except CompressError as e:
                raise CompressError(f"stages.{cfg.name}.models[{i}]: onnx-int8 of stage '{item.model}': {e}") from None
        if item.format == "onnx-fp32" and skel is not None and is_quantized(skel):
            raise CompressError(f"stages.{cfg.name}.models[{i}]: stage '{item.model}' holds a quantized model; "
                                "export it as onnx-int8")
    return None


@register("export", ExportStage, _plan, makes_model=False, code=quant.CODE)
def run(cfg, ctx):
    """Write, check and measure one ONNX file per `models` entry.

    >>> # {name: export, kind: export, models: [{model: qat, format: onnx-int8}]}
    """
    out_dir = Path(ctx.export_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = ctx.data
    images = _images01(data.test)
    labels = data.test.y.cpu().numpy()
    meta = {"class_names": json.dumps(data.classes), "input_shape": json.dumps([None, *data.input_shape]),
            "recipe": ctx.recipe.name, "dataset": data.name}
    exports, files = [], []
    for item in cfg.models:
        model = ctx.results[item.model].get_model().eval()
        fmt = item.format
        path = out_dir / export_name(item)
        if ctx.storage is not None:
            ctx.storage.owned(path)   # overwritten only inside exports/<recipe>/
        check = {}
        if fmt == "onnx-fp32":
            if is_quantized(model):
                raise CompressError(f"stages.{cfg.name}.models: stage '{item.model}' holds a quantized model; "
                                    "export it as onnx-int8")
            cpu_model = copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format)
            export_onnx(cpu_model, path, input_shape=data.input_shape, mean=data.mean, std=data.std,
                        metadata={**meta, "stage": item.model, "format": fmt})
            check["max_abs_diff"] = float(check_fp32_parity(path, cpu_model, images[:512], atol=cfg.fp32_atol))
            logits = ort_logits(path, images)
        else:
            qmodel = _int8_source(model, ctx, cfg)
            int8 = to_int8_module(copy.deepcopy(qmodel).cpu(), float_first_conv=item.float_stem)
            export_onnx(int8, path, input_shape=data.input_shape, mean=data.mean, std=data.std,
                        metadata={**meta, "stage": item.model, "format": fmt})
            logits = ort_logits(path, images)   # one onnxruntime pass: the agreement check and top-1
            check["top1_agreement"] = float(check_int8_agreement(
                path, copy.deepcopy(qmodel).cpu(), images, min_agreement=cfg.int8_min_agreement, logits=logits))
            # no float Conv left after ORT's fusion but those kept float on purpose
            kept = list(getattr(qmodel, "float_layers", []))
            float_convs = len(kept) or sum(type(m) is torch.nn.Conv2d for m in int8.modules())
            check["ort_int8_ops"] = check_int8_kernels(path, float_convs)
            if kept:
                check["float_convs"] = kept
            slow = slow_integer_convs(path)
            if slow:
                check["slow_int8_convs"] = slow
            islands = float_islands(path)
            if islands:
                check["float_ops"] = islands
            if not is_quantized(model):
                check["post_training"] = True
        top1 = 100.0 * float((logits.argmax(1) == labels).mean())
        rel = path.relative_to(out_dir).as_posix()
        exports.append({"model": item.model, "format": fmt, "path": rel, "bytes": path.stat().st_size,
                        "top1": round(top1, 2), "latency_ms": {}, "check": check})
        files.append(str(path))
    # All files timed in turns (one call of each per round): on a machine whose load changes,
    # the INT8-vs-FP32 ratios the report states stay meaningful.
    for b in (1, 64):
        for e, lat in zip(exports, ort_latency_side_by_side(files, b, runs=cfg.latency_runs)):
            e["latency_ms"][f"b{b}"] = round(lat["median"], 3)
    for e in exports:
        lat = e["latency_ms"]
        print(f"  {e['path']}: {e['bytes'] / 1024:.1f} KB, top1 {e['top1']:.2f}%, "
              f"b1 {lat['b1']:.3f} ms, b64 {lat['b64']:.3f} ms, {e['check']}")
    return StageResult(info={"exports": exports}, files=files)
