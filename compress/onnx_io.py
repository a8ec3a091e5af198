"""ONNX export, and the checks that compare an exported file with the PyTorch model it came
from (onnxruntime's side, with no torch, is in ``ort_runtime``).

An exported file takes float32 NCHW images in [0, 1] at native size (input "images",
dynamic batch axis), normalizes them inside the graph and returns float "logits". Every
number a report quotes about a file is measured with onnxruntime running it, here or in
``ort_runtime``.
"""

import collections
import contextlib
import copy
import io
import itertools
import json
import logging
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch
from torch import nn

from .errors import CompressError, one_line
from .ort_runtime import _as_images, _optimized_op_types, ort_logits
from .storage import atomic_write

INPUT_NAME, OUTPUT_NAME = "images", "logits"
# Metadata key recording the normalization the graph applies itself, as JSON
# {"mean": [...], "std": [...]}; the check functions read it to mirror the graph.
NORMALIZATION_KEY = "normalization"


class Normalized(nn.Module):
    """``model((x - mean) / std)``: the graph takes raw [0, 1] images, so callers need
    not know the training normalization."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise CompressError(f"normalization: need equal-length mean and positive std, "
                                f"got mean={list(mean)} std={list(std)}")
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


@contextlib.contextmanager
def quiet(names=("torch.onnx", "torch.export", "onnxscript"), level=logging.ERROR):
    """Silence prints, warnings and the logging of `names` below `level` (the exporter's
    progress lines, a failed capture's graph dumps): the user gets one line from us instead."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


_TORCHLIB_REGISTRIES: dict = {}   # (args, kwargs) of ONNXRegistry.from_torchlib -> the registry it built


@contextlib.contextmanager
def reused_torchlib_registry():
    """Within this block torch.onnx builds its aten-to-ONNX registry from torchlib once per
    process and opset, not on every export: building it parses ~500 onnxscript functions,
    0.6-1.1 s of a 1.5-3 s export of a small CNN on a 2-core CPU (78 exports took 49 s of
    the test suite). Without a custom translation table, which `export_onnx` never passes,
    an export only reads the registry (`get_decomps`, `functions`, `opset_version`). The
    hook is torch's private `ONNXRegistry.from_torchlib`; where a torch version lacks it,
    every export builds its own registry as before."""
    try:
        from torch.onnx._internal.exporter import _registration
        cls = _registration.ONNXRegistry
        original = cls.__dict__["from_torchlib"]
        build = original.__func__
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def from_torchlib(klass, *args, **kwargs):
        if klass is not cls:
            return build(klass, *args, **kwargs)
        key = (args, tuple(sorted(kwargs.items())))
        if key not in _TORCHLIB_REGISTRIES:
            _TORCHLIB_REGISTRIES[key] = build(klass, *args, **kwargs)
        return _TORCHLIB_REGISTRIES[key]

    cls.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        cls.from_torchlib = original


def _strip(proto: onnx.ModelProto) -> None:
    """Drop what the dynamo exporter adds for debugging: per-node stack traces and FX
    names, intermediate value_info, doc strings. Measured: a 48K-parameter INT8 VGG
    162 KB -> 78 KB, a 6K-parameter one 55 KB -> 10 KB."""
    for g in [proto.graph, *proto.functions]:
        for node in g.node:
            node.ClearField("metadata_props")
            node.doc_string = ""
        g.ClearField("value_info")
        g.ClearField("metadata_props")
        g.doc_string = ""
    proto.doc_string = ""


def _shapes(proto: onnx.ModelProto) -> dict[str, list[int | None]] | None:
    """{value name: dims (None where symbolic, such as the batch)} by ONNX shape inference;
    None where inference fails (the rewrites then leave the graph alone)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - the checker reports a broken graph later
        return None
    return {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
            if v.type.tensor_type.HasField("shape")}


def _global_pools(proto: onnx.ModelProto) -> int:
    """Rewrite each ReduceMean over the two spatial axes of a 4-D tensor (keepdims), which
    is what the exporter makes of ``AdaptiveAvgPool2d(1)``, as GlobalAveragePool: the same
    values, but onnxruntime fuses DequantizeLinear -> GlobalAveragePool -> QuantizeLinear
    into the integer QLinearGlobalAveragePool (in the NHWC layout of its QLinearConvs),
    where a ReduceMean stays a float op between a dequantize and a quantize. Over a 1x1 map
    (a 32x32 image through an ImageNet network) the mean is its input: an Identity, which
    onnxruntime removes, and with it the dequantize / quantize pair around it (the op before
    then writes straight to the pool's output scale: one rounding where the fake-quant model
    rounds twice, so logits can move by one output step). The INT8 QLinearGlobalAveragePool
    of a 64x256x1x1 batch took 0.21 ms of a ResNet-18's 2.5. Returns how many nodes were
    rewritten."""
    g = proto.graph
    shapes = _shapes(proto)
    if shapes is None:
        return 0
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
    consts.update({n.output[0]: onnx.numpy_helper.to_array(a.t) for n in g.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value"})
    done = 0
    for n in g.node:
        if n.op_type != "ReduceMean" or len(shapes.get(n.input[0], ())) != 4 or len(n.input) != 2:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        axes = consts.get(n.input[1])
        if attrs.get("keepdims", 1) != 1 or axes is None or sorted(int(a) % 4 for a in axes.ravel()) != [2, 3]:
            continue
        n.op_type = "Identity" if shapes[n.input[0]][2:] == [1, 1] else "GlobalAveragePool"
        del n.input[1:]
        del n.attribute[:]
        done += 1
    if done:   # the axes those ReduceMeans read, if nothing else reads them
        _drop_unread_constants(g)
    return done


def _live_taps(size: int, out: int, kernel: int, stride: int, pad: int) -> tuple[int, int]:
    """First and last kernel offsets along one axis that read an input position (not only
    padding) for some output position."""
    live = [k for k in range(kernel) if any(0 <= o * stride - pad + k < size for o in range(out))]
    return (live[0], live[-1]) if live else (0, kernel - 1)


def _crop_kernels(proto: onnx.ModelProto) -> int:
    """Cut from each Conv's kernel the rows and columns that only ever multiply padding, and
    its padding with them: the same sums without the zero terms (exactly the same in integer
    arithmetic). A 3x3 conv (padding 1) on a 1x1 map becomes a 1x1 conv, a 3x3 stride-2 one
    from a 2x2 map to a 1x1 map a 2x2 one: what the last stages of an ImageNet network do
    to a 28x28 or 32x32 image. onnxruntime's integer convolutions compute the padding's
    zero-point taps (its im2col fills them in), one image at a time. On torchvision's
    ResNet-18 pruned to half width, 1x28x28 input, two threads, batch 64 (README, "Exported
    files"), this and the Identity pool of :func:`_global_pools` took INT8 from 3.72 to 2.33
    ms and FP32 from 3.97 to 3.65 ms. The weight is an initializer, or one
    behind a DequantizeLinear (INT8), read by that conv alone; dilated convs and automatic
    padding are left alone. Returns how many convs were cropped."""
    g = proto.graph
    shapes = _shapes(proto)
    if shapes is None:
        return 0
    inits = {i.name: i for i in g.initializer}
    made_by = {o: n for n in g.node for o in n.output}
    readers = collections.Counter(i for n in g.node for i in n.input)
    done = 0
    for n in g.node:
        if n.op_type != "Conv":
            continue
        x, y = shapes.get(n.input[0]), shapes.get(n.output[0])
        if not x or not y or len(x) != 4 or len(y) != 4 or None in (*x[2:], *y[2:]):
            continue
        a = {t.name: onnx.helper.get_attribute_value(t) for t in n.attribute}
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") \
                or any(d != 1 for d in a.get("dilations", [1, 1])):
            continue
        w = n.input[1]
        if w not in inits and w in made_by and made_by[w].op_type == "DequantizeLinear":
            w = made_by[w].input[0]   # the int8 weights of a QDQ conv (per output channel: not spatial)
        if w not in inits or readers[w] != 1 or readers[n.input[1]] != 1:
            continue
        weight = onnx.numpy_helper.to_array(inits[w])
        (kh, kw), (sh, sw) = weight.shape[2:], a.get("strides", [1, 1])
        top, left, bottom, right = a.get("pads", [0, 0, 0, 0])
        r0, r1 = _live_taps(x[2], y[2], kh, sh, top)
        c0, c1 = _live_taps(x[3], y[3], kw, sw, left)
        if (r0, r1, c0, c1) == (0, kh - 1, 0, kw - 1):
            continue
        kh, kw, top, left = r1 - r0 + 1, c1 - c0 + 1, top - r0, left - c0
        bottom = max(0, (y[2] - 1) * sh + kh - x[2] - top)
        right = max(0, (y[3] - 1) * sw + kw - x[3] - left)
        if (x[2] + top + bottom - kh) // sh + 1 != y[2] or (x[3] + left + right - kw) // sw + 1 != y[3]:
            continue
        inits[w].CopyFrom(onnx.numpy_helper.from_array(
            np.ascontiguousarray(weight[:, :, r0:r1 + 1, c0:c1 + 1]), w))
        kept = [t for t in n.attribute if t.name not in ("kernel_shape", "pads")]
        del n.attribute[:]
        n.attribute.extend([*kept, onnx.helper.make_attribute("kernel_shape", [kh, kw]),
                            onnx.helper.make_attribute("pads", [top, left, bottom, right])])
        done += 1
    return done


def _drop_unread_constants(g: onnx.GraphProto) -> None:
    """Remove the initializers and Constant nodes of `g` that no node reads."""
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    for n in [n for n in g.node if n.op_type == "Constant" and n.output[0] not in used]:
        g.node.remove(n)


# Float ops onnxruntime runs in its blocked NCHWc layout (x86), given channels in multiples
# of its block (8 with AVX2, 16 with AVX-512), and whose output a Transpose to NHWC can then
# be folded into (``ReorderOutput(channels_last=1)``).
_NCHWC_OPS = ("Conv", "MaxPool", "AveragePool", "Add")
# channels that both AVX2's (8) and AVX-512's (16) NCHWc blocks divide: the hand-off below
HANDOFF_CHANNELS = 16


def _nhwc_handoff(proto: onnx.ModelProto) -> int:
    """`_rewrite_nhwc_handoff`, kept only where onnxruntime on this CPU then runs fewer
    Transposes (it folds them on x86 only: elsewhere the rewrite would leave a float
    Transpose in place of a uint8 one). Returns how many hand-offs were rewritten."""
    trial = onnx.ModelProto()
    trial.CopyFrom(proto)
    done = _rewrite_nhwc_handoff(trial)
    if not done:
        return 0
    try:
        before, after = (_optimized_op_types(p.SerializeToString()).count("Transpose") for p in (proto, trial))
    except CompressError:
        return 0
    if after >= before:
        return 0
    proto.CopyFrom(trial)
    return done


def _relu_after_pool(g: onnx.GraphProto) -> int:
    """Where a float lead hands ``Relu -> MaxPool -> QuantizeLinear`` to the integer part (a
    ResNet's stem and its padded 3x3/2 pool), run the Relu after the pool: max and ReLU
    commute, and ONNX pads a MaxPool with -inf, so the values are the same, and the hand-off
    below then sees ``MaxPool -> Relu -> QuantizeLinear``. Without it onnxruntime moves the
    quantization above the pool and runs it as a uint8 NCHW MaxPool between Transposes.
    Returns how many were swapped."""
    nodes = list(g.node)
    producer = {o: n for n in nodes for o in n.output}
    readers = collections.Counter(i for n in nodes for i in n.input)
    outputs = {o.name for o in g.output}
    done = 0
    for q in [n for n in nodes if n.op_type == "QuantizeLinear"]:
        pool = producer.get(q.input[0])
        relu = producer.get(pool.input[0]) if pool is not None and pool.op_type == "MaxPool" else None
        if relu is None or relu.op_type != "Relu" or len(pool.output) != 1 \
                or readers[relu.output[0]] != 1 or readers[pool.output[0]] != 1 \
                or {relu.output[0], pool.output[0]} & outputs:
            continue
        # the Relu's output gets a new name: the old one is the conv output's shape
        pool.input[0], relu.input[0], relu.output[0] = relu.input[0], pool.output[0], pool.output[0] + "_relu"
        q.input[0] = relu.output[0]
        i, j = nodes.index(relu), nodes.index(pool)
        nodes[i], nodes[j] = pool, relu
        done += 1
    if done:
        del g.node[:]
        g.node.extend(nodes)
    return done


def _rewrite_nhwc_handoff(proto: onnx.ModelProto) -> int:
    """Where a float part of the graph (a float lead) hands a ReLU'd tensor to the integer
    part, ``x -> Relu -> QuantizeLinear``, rewrite it as ``x -> Transpose(NHWC) -> Reshape
    -> Relu -> QuantizeLinear -> Transpose(NCHW)``: the same values, but onnxruntime (x86)
    then writes the float op's NCHWc output straight to NHWC (``ReorderOutput`` with
    ``channels_last``), the layout its integer convolutions read, where it otherwise reorders
    to NCHW, quantizes and transposes the uint8 tensor one image at a time. The Reshape
    (same shape) keeps its transpose optimizer from cancelling the pair, the Relu keeps its
    QDQ propagation from moving the quantization in front of the transpose; it then drops
    the Relu (the quantization clamps at the same zero). Only for x made by a Conv, pool or
    Add with a static channel count that is a multiple of 16, so that the NCHWc pass takes
    it on AVX2 and on AVX-512 CPUs alike; a Relu before a max-pool is moved after it first
    (:func:`_relu_after_pool`). Measured on the default recipe's student, two
    threads, batch 64 (the uint8 Transpose was 0.12 ms of 1.54 as AVX2): 0.84x / 0.83x ->
    0.82x / 0.79x its FP32 twin's latency as AVX2, 0.63x / 0.62x -> 0.57x / 0.57x natively
    (see the README). Returns how many were rewritten."""
    g = proto.graph
    _relu_after_pool(g)
    shapes = _shapes(proto)
    if shapes is None:
        return 0
    producer = {o: n for n in g.node for o in n.output}
    readers = collections.Counter(i for n in g.node for i in n.input)
    outputs = {o.name for o in g.output}
    nodes, done = list(g.node), 0
    for q in [n for n in nodes if n.op_type == "QuantizeLinear"]:
        relu = producer.get(q.input[0])
        if relu is None or relu.op_type != "Relu" or readers.get(relu.output[0]) != 1 \
                or relu.output[0] in outputs or q.output[0] in outputs:
            continue
        x = relu.input[0]
        shape = shapes.get(x)
        src = producer.get(x)
        if src is None or src.op_type not in _NCHWC_OPS or shape is None or len(shape) != 4 \
                or None in shape[1:] or shape[1] % HANDOFF_CHANNELS:
            continue
        # a float op: one that reads a DequantizeLinear is part of an integer kernel (even a
        # Conv with float weights: onnxruntime quantizes them itself between a DQ and a Q)
        if any(getattr(producer.get(i), "op_type", None) == "DequantizeLinear" for i in src.input):
            continue
        _, c, h, w = shape
        tag = f"nhwc_handoff_{done}"
        g.initializer.append(onnx.numpy_helper.from_array(np.array([-1, h, w, c], np.int64), tag + "_shape"))
        to_nhwc = onnx.helper.make_node("Transpose", [x], [tag + "_t"], perm=[0, 2, 3, 1], name=tag + "_t")
        same = onnx.helper.make_node("Reshape", [tag + "_t", tag + "_shape"], [tag + "_x"], name=tag + "_r")
        relu.input[0] = tag + "_x"
        back = onnx.helper.make_node("Transpose", [tag + "_q"], [q.output[0]], perm=[0, 3, 1, 2],
                                     name=tag + "_back")
        q.output[0] = tag + "_q"
        nodes.insert(nodes.index(relu), to_nhwc)
        nodes.insert(nodes.index(relu), same)
        nodes.insert(nodes.index(q) + 1, back)
        done += 1
    if done:
        del g.node[:]
        g.node.extend(nodes)
    return done


def _pixel_input(proto: onnx.ModelProto) -> int:
    """Where the graph quantizes its normalized input, ``images -> Sub(mean) -> Div(std) ->
    QuantizeLinear(scale, zero_point)`` (uint8), and that quantization maps each 8-bit pixel
    value k/255 to the integer k, in every channel (a scale of one pixel step and the mean's
    zero point: what an input observer measures on 8-bit images), quantize the images
    themselves instead: ``QuantizeLinear(images, 1/255, 0)``. On 8-bit images that gives the
    same integers, so the same logits, with two float ops fewer; other inputs are rounded to
    the nearest 1/255 rather than to the nearest level of the normalized grid (at most 0.5
    pixel steps either way). The DequantizeLinear after it is kept. Measured on the default
    recipe's INT8 student, two threads, batch 64: 1.78 -> 1.75 and 1.75 -> 1.71 ms as AVX2,
    1.01 -> 0.98 ms natively. Returns 1 if rewritten, else 0 (the graph is left alone)."""
    g = proto.graph
    nodes = list(g.node)
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
    readers = collections.Counter(i for n in nodes for i in n.input)
    outputs = {o.name for o in g.output}
    reader = {n.input[0]: k for k, n in enumerate(nodes) if n.input}   # index of a value's reader

    def only_reader(value, op):
        """Index of the node of type `op` that alone reads `value` (its first input), with
        constant other inputs; None if there is no such node."""
        k = reader.get(value)
        if k is None or readers[value] != 1 or value in outputs:
            return None
        n = nodes[k]
        ok = n.op_type == op and len(n.input) >= 2 and all(i in consts for i in n.input[1:])
        return k if ok else None

    sub = only_reader(INPUT_NAME, "Sub")
    div = None if sub is None else only_reader(nodes[sub].output[0], "Div")
    q = None if div is None else only_reader(nodes[div].output[0], "QuantizeLinear")
    if q is None or len(nodes[q].input) != 3:
        return 0
    q_scale, q_zero = (consts[i] for i in nodes[q].input[1:])
    if q_zero.dtype != np.uint8 or q_scale.size != 1 or q_zero.size != 1:
        return 0
    mean, std = (consts[nodes[k].input[1]].astype(np.float64) for k in (sub, div))
    scale, zero_point = float(q_scale.ravel()[0]), int(q_zero.ravel()[0])
    if (std <= 0).any():
        return 0
    # every pixel value against every (mean, std) pair: safe however the two broadcast
    pix = np.arange(256, dtype=np.float64)[:, None, None]
    level = (pix / 255 - mean.ravel()[None, :, None]) / std.ravel()[None, None, :] / scale + zero_point
    # each level well inside its pixel value's rounding interval, whatever float32 rounding
    # the runtime adds
    if not (np.abs(level - pix) < 0.499).all():
        return 0
    pixel = "pixel_quantize"
    g.initializer.extend([onnx.numpy_helper.from_array(np.array(1 / 255, np.float32), pixel + "_scale"),
                          onnx.numpy_helper.from_array(np.array(0, np.uint8), pixel + "_zero_point")])
    nodes[sub] = onnx.helper.make_node("QuantizeLinear", [INPUT_NAME, pixel + "_scale", pixel + "_zero_point"],
                                       [nodes[q].output[0]], name=pixel)
    del g.node[:]
    g.node.extend(n for k, n in enumerate(nodes) if k not in (div, q))
    _drop_unread_constants(g)   # the mean and std
    return 1


def _atomic_write(data: bytes, path: Path) -> None:
    """Temp file in the same directory, then rename: readers never see half a file."""
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    except OSError as e:
        raise CompressError(f"cannot write {path}: {e.strerror}") from e


def export_onnx(model: nn.Module, path, *, input_shape: tuple[int, int, int],
                mean: Sequence[float], std: Sequence[float], metadata: dict[str, str],
                opset: int = 20) -> None:
    """Export ``Normalize(mean, std) -> model`` to one self-contained ONNX file with a
    dynamic batch axis, input "images" (float32 [0, 1], shape (N, *input_shape)) and
    output "logits"; model-level ``metadata_props`` from `metadata`. Works for float
    models and for ``quant.to_int8_module`` output (a QDQ graph). Written atomically.

    >>> from compress.models import VGG
    >>> export_onnx(VGG([8], in_channels=1), "m.onnx", input_shape=(1, 28, 28),
    ...             mean=[0.286], std=[0.353], metadata={"recipe": "demo"})  # doctest: +SKIP
    """
    path = Path(path)
    bad = {k: v for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
        raise CompressError(f"ONNX metadata must map str to str, got {bad!r}"[:300])
    if len(input_shape) != 3 or len(mean) != input_shape[0]:
        raise CompressError(f"input_shape must be (C, H, W) with C = len(mean), got "
                            f"{tuple(input_shape)} and {len(mean)} mean values")
    # An NCHW-contiguous float32 CPU copy: channels_last weights export extra
    # Shape/Range/Gather nodes. float() leaves the INT8 module's integer buffers alone.
    net = copy.deepcopy(model).cpu().float().to(memory_format=torch.contiguous_format).eval()
    wrapped = Normalized(net, mean, std).eval()
    # Batch 2, not 1: torch.export specializes a dimension whose example size is 0 or 1.
    example = torch.rand(2, *input_shape)
    try:
        with quiet(), torch.no_grad(), reused_torchlib_registry():
            program = torch.onnx.export(
                wrapped, (example,), dynamo=True, external_data=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], verbose=False,
                dynamic_shapes=({0: torch.export.Dim("batch")},))
            proto = program.model_proto
    except Exception as e:  # the exporter raises many types; the user needs one line
        raise CompressError(f"ONNX export of {type(model).__name__} failed: {one_line(e)}") from e
    # the exporter's shapes of intermediate values go stale as the rewrites change the graph
    # (a cut kernel, a moved Relu), and shape inference then fails on them: infer afresh
    proto.graph.ClearField("value_info")
    _global_pools(proto)
    _crop_kernels(proto)
    _nhwc_handoff(proto)
    _pixel_input(proto)
    _strip(proto)
    onnx.helper.set_model_props(proto, {
        **metadata,
        NORMALIZATION_KEY: json.dumps({"mean": [float(v) for v in mean],
                                       "std": [float(v) for v in std]})})
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise CompressError(f"exported ONNX model is invalid: {one_line(e)}") from e
    _atomic_write(proto.SerializeToString(), path)


def _normalization(path) -> tuple[list[float], list[float]]:
    """(mean, std) that `path`'s graph applies, from the metadata export_onnx writes."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
        props = {p.key: p.value for p in proto.metadata_props}
        norm = json.loads(props[NORMALIZATION_KEY])
        return [float(v) for v in norm["mean"]], [float(v) for v in norm["std"]]
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise CompressError(f"{path}: no '{NORMALIZATION_KEY}' metadata; was it written by "
                            f"export_onnx? ({one_line(e)})") from e


@torch.no_grad()
def _torch_logits(model: nn.Module, images, mean, std, batch_size: int = 1024) -> np.ndarray:
    """Logits of `model` in eval mode (its mode is restored) behind the same
    normalization as the graph."""
    was_training = model.training
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    x = torch.from_numpy(_as_images(images))
    net = Normalized(model, mean, std).to(device).eval()
    try:
        outs = [net(x[i:i + batch_size].to(device)).float().cpu()
                for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outs).numpy() if outs else np.zeros((0, 0), np.float32)


def check_fp32_parity(path, model: nn.Module, images, atol: float = 1e-4) -> float:
    """Max |onnxruntime - torch| logit difference of a float export on `images`
    (float32 [0, 1]; `model` is the torch model without normalization). Raises
    CompressError above `atol` times the largest |logit| when that exceeds 1: float32
    rounding grows with the values summed (a deep net with logits near 70 differs by ~1e-3
    between onnxruntime's and torch's kernels), so the bound is relative to the logits' scale.

    >>> check_fp32_parity("model.onnx", model, torch.rand(64, 1, 28, 28))  # doctest: +SKIP
    3.1e-06
    """
    mean, std = _normalization(path)
    ref = _torch_logits(model, images, mean, std)
    got = ort_logits(path, images)
    if got.shape != ref.shape:
        raise CompressError(f"{path}: onnxruntime logits have shape {got.shape}, "
                            f"torch {ref.shape}")
    err = float(np.abs(got - ref).max()) if ref.size else 0.0
    bound = atol * max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
    if not err <= bound:  # also catches NaN
        raise CompressError(f"{path}: onnxruntime logits differ from torch by {err:.3g} "
                            f"(> {bound:.3g}, {atol:g} x the largest |logit|); the export does not match the model")
    return err


def check_int8_agreement(path, qmodel: nn.Module, images, min_agreement: float = 0.99,
                         logits: np.ndarray | None = None) -> float:
    """Fraction of `images` (float32 [0, 1]) on which the INT8 file's top-1 class equals
    the eval-mode fake-quant `qmodel`'s. Raises CompressError below `min_agreement`.
    `logits`: the file's onnxruntime logits on `images`, when the caller already has them.

    >>> check_int8_agreement("model_int8.onnx", qmodel, test_images[:256])  # doctest: +SKIP
    1.0
    """
    mean, std = _normalization(path)
    ref = _torch_logits(qmodel, images, mean, std)
    got = ort_logits(path, images) if logits is None else logits
    if got.shape != ref.shape or not len(ref):
        raise CompressError(f"{path}: onnxruntime logits have shape {got.shape}, "
                            f"torch {ref.shape}")
    got_top, ref_top = got.argmax(1), ref.argmax(1)
    agreement = float((got_top == ref_top).mean())
    if agreement < min_agreement:
        differ = np.flatnonzero(got_top != ref_top)
        # how close the fake-quant model itself was to the INT8 file's class on those images
        gap = float((ref[differ, ref_top[differ]] - ref[differ, got_top[differ]]).max())
        raise CompressError(f"{path}: INT8 top-1 agrees with the fake-quant model on only "
                            f"{agreement:.2%} of {len(ref)} images (< {min_agreement:.2%}); on the "
                            f"{len(differ)} others the fake-quant model's logit for the INT8 file's class "
                            f"is at most {gap:.4g} below its top-1's (largest logit difference "
                            f"{float(np.abs(got - ref).max()):.4g}); where those are near-ties (an undertrained "
                            "model), lower the export stage's int8_min_agreement")
    return agreement
