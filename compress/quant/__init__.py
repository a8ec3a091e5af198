"""INT8 quantization: fake-quant models for QAT and post-training calibration, and the
integer modules that export to a standard QDQ ONNX graph.

Backends, one file each:

- ``eager``: own fake-quant modules for plain ``nn.Sequential`` conv/BN/ReLU/pool/linear
  stacks (the VGGs), BN folding simulated as in Jacob et al. 2018.
- ``pt2e``: torchao's graph-mode flow (``torch.export`` -> ``prepare_qat_pt2e`` ->
  ``convert_pt2e``) with our own quantizer, for any model ``torch.export`` can capture
  (residual adds, depthwise convs, ReLU6).

Both compute the same scheme (``QuantSpec``). The functions below dispatch on the model:

    q = quantize_model(model, QuantSpec(), input_shape=(1, 28, 28))
    calibrate(q, batches); ... train q; set_qat_phase(q, observers=False, bn_stats=False)
    export_onnx(to_int8_module(q), ...)
"""

from typing import Iterable

from torch import Tensor, nn

from . import eager, pt2e
from .eager import ActQuant, Int8Conv2d, Int8Linear, QConv2d, QLinear  # noqa: F401
from .spec import BACKENDS, QuantSpec  # noqa: F401
from ..errors import CompressError

# The modules whose code turns a float model into the integer one and its ONNX file (the
# backends, the scheme, onnx_io's export, and ort_runtime's rule for which convs stay float
# and its checks of the file): part of the cache key of the stages that quantize or export
# (``StageKind.code``).
_PACKAGE = __package__.rsplit(".", 1)[0]
CODE = (__name__, eager.__name__, pt2e.__name__, f"{__name__}.spec", f"{_PACKAGE}.onnx_io", f"{_PACKAGE}.ort_runtime")


def eager_supports(model: nn.Module) -> bool:
    """True when the eager backend can quantize `model` (a plain nn.Sequential stack)."""
    if not eager._plain_sequential(model):
        return False
    try:
        eager.quantize_model(model, QuantSpec(backend="eager"))
    except CompressError:
        return False
    return True


def resolve_backend(model: nn.Module, spec: QuantSpec) -> str:
    """``spec.backend``, with ``auto`` made concrete for `model`.

    >>> from compress.models import VGG
    >>> resolve_backend(VGG([8], in_channels=1), QuantSpec())
    'eager'
    """
    if spec.backend != "auto":
        return spec.backend
    return "eager" if eager_supports(model) else "pt2e"


# Backend name -> its module; each has quantize_model, is_quantized, set_qat_phase, calibrate and
# to_int8_module with the same signatures, so the functions below dispatch without naming one.
BACKEND_MODULES = {"eager": eager, "pt2e": pt2e}


def backend_of(qmodel: nn.Module) -> str:
    """The backend that made a quantized model (``eager`` for anything else)."""
    return next((n for n, m in BACKEND_MODULES.items() if m.is_quantized(qmodel)), "eager")


def _backend(qmodel: nn.Module):
    return BACKEND_MODULES[backend_of(qmodel)]


def quantize_model(model: nn.Module, spec: QuantSpec, input_shape=None) -> nn.Module:
    """A new QAT-ready model (fake quantization of input, weights and activations, BN
    folding simulated); `model` is left untouched. `input_shape` (C, H, W) is needed by
    the pt2e backend, which captures the graph with an example input.

    >>> from compress.models import VGG
    >>> q = quantize_model(VGG([8, "M", 16], in_channels=1), QuantSpec(), (1, 28, 28))
    >>> backend_of(q)
    'eager'
    """
    if is_quantized(model):
        raise CompressError("the model is already quantized")
    # Without an input shape nothing can be captured: auto means eager, whose error then
    # names the layer it cannot quantize.
    backend = "eager" if input_shape is None and spec.backend == "auto" else resolve_backend(model, spec)
    if backend == "pt2e" and input_shape is None:
        raise CompressError("quantize_model: the pt2e backend needs the input shape (C, H, W)")
    return BACKEND_MODULES[backend].quantize_model(model, spec, input_shape)


def is_quantized(model: nn.Module) -> bool:
    """True for models returned by ``quantize_model``."""
    return any(m.is_quantized(model) for m in BACKEND_MODULES.values())


def set_qat_phase(qmodel: nn.Module, *, observers: bool, bn_stats: bool) -> None:
    """``observers=False`` fixes all activation ranges; ``bn_stats=False`` freezes BN
    running statistics and trains on the folded weights. Saved in the state_dict."""
    _backend(qmodel).set_qat_phase(qmodel, observers=observers, bn_stats=bn_stats)


def calibrate(qmodel: nn.Module, batches: Iterable[Tensor]) -> None:
    """Post-training calibration: every activation range becomes the mean of the batches'
    min/max, with BN in eval (folded). Modes and phase flags are restored."""
    _backend(qmodel).calibrate(qmodel, batches)


def to_int8_module(qmodel: nn.Module, float_first_conv: bool = True) -> nn.Module:
    """Eval-only module with int8 weights and Q/DQ activations computing what the
    eval-mode fake-quant `qmodel` computes; ``onnx_io.export_onnx`` writes it as QDQ.
    `float_first_conv` (eager backend): a first conv + max-pool on 1-3 input channels
    runs in float, where onnxruntime's integer kernel is slower (``eager._float_first_conv``)."""
    return _backend(qmodel).to_int8_module(qmodel, float_first_conv=float_first_conv)
