"""INT8 quantization-aware training with our own fake-quant modules, and the INT8 module
that exports to a standard QDQ ONNX graph.

Scheme (what onnxruntime's CPU integer kernels run): weights per-output-channel
symmetric int8 (7 bits by default, see ``QuantSpec``), activations per-tensor
asymmetric uint8, biases int32 with scale ``input_scale * weight_scale[c]``.
BatchNorm is folded into the preceding convolution, simulated during training as in
Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", section 3.2.

``torch.ao.quantization``'s QAT is deprecated and its models do not export with the
dynamo ONNX exporter (see FINDINGS), hence these modules. The flow:

    qmodel = quantize_model(model, QuantSpec())     # QAT-ready deep copy
    ... train qmodel; later set_qat_phase(qmodel, observers=False, bn_stats=False) ...
    int8 = to_int8_module(qmodel)                    # eval-only, int8/int32 buffers
    export_onnx(int8, ...)                           # compress.onnx_io
"""

import copy
import itertools
from collections import OrderedDict
from typing import Iterable

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  registers quantized_decomposed ops
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CompressError
from .spec import QuantSpec

_QD = torch.ops.quantized_decomposed
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
# Smallest activation scale; torch.ao uses float32 eps too. Keeps a constant-zero
# tensor (range [0, 0]) from dividing by zero.
_MIN_SCALE = torch.finfo(torch.float32).eps

_SUPPORTED = ("nn.Sequential containers of Conv2d[+BatchNorm2d][+ReLU], Linear[+ReLU], "
              "MaxPool2d, AdaptiveAvgPool2d, AvgPool2d, Flatten, Dropout, Identity")
# Ops that do not change values on the quantization grid (max of grid points is a grid
# point; Dropout/Identity are identities in eval), so no new observer is needed after them.
_PASSTHROUGH = (nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity)
# Averaging leaves the grid: a fresh activation quantizer follows.
_AVG_POOLS = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)


# ---- fake-quant building blocks ----------------------------------------------------------


class _FakeQuantPerTensor(torch.autograd.Function):
    """``torch.fake_quantize_per_tensor_affine`` (tensor qparams) composed of vectorized
    elementwise ops: ATen's CPU kernel rounds one element at a time and took 15 ms for a
    256x16x28x28 map on a 2-core AVX2 CPU, where this takes about a third of that.

    Same values and gradients bit for bit, NaN and infinities included: ATen computes
    ``q = z + nearbyint(x * (1 / s))`` (float32), clamps with fmax/fmin (a NaN becomes qmin),
    and rounds ``(q - z) * s`` computed exactly (in double) to float32 -- the one rounding
    that the float32 product of these integer-valued q - z and s also does. The
    straight-through gradient passes where the unclamped ``q`` lies in [qmin, qmax].
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        q = torch.round(x * (1.0 / scale)).add_(zero_point)
        clamped = q.clamp(qmin, qmax).nan_to_num_(nan=float(qmin))   # (torch.fmax/fmin: 8x slower)
        ctx.save_for_backward(clamped == q)
        return clamped.sub_(zero_point).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        # one pass; `grad * inside` first converts the bool mask to a float tensor
        return torch.where(inside, grad, 0.0), None, None, None, None


def memory_order(x: Tensor) -> Tensor:
    """`x`'s elements as a contiguous view where `x` is a channels_last 4-d tensor, else `x`:
    a reduction over all of them (min, max) then reads memory in order, where ``aminmax``
    of a channels_last map first copies it to NCHW."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1)
    return x


def fake_quant_per_tensor(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Per-tensor affine fake quantization with a straight-through gradient (float32 `x`,
    float32 scalar or 1-element `scale`, int32 `zero_point` alike); `_FakeQuantPerTensor` on
    the CPU, ATen's kernel elsewhere."""
    if x.dtype != torch.float32 or x.device.type != "cpu":   # CUDA's kernel is vectorized
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
    return _FakeQuantPerTensor.apply(x, scale, zero_point, qmin, qmax)


def _refresh_flags(module, incompatible_keys):
    """load_state_dict post-hook re-reading flag buffers into their Python mirrors.

    Flags live in bool buffers so they travel with the state_dict, but forward reads a
    Python copy: reading a CUDA buffer would sync host and device on every step."""
    module._sync_flags()


class ActQuant(nn.Module):
    """Per-tensor asymmetric fake quantization with an EMA min/max observer.

    The observer updates only in training mode with ``observing`` on, so evaluating a
    model during QAT does not move its scales. Before any batch was observed the module
    is an identity. Buffers: ``min_val``/``max_val`` (inf/-inf until the first batch,
    which initializes them), ``observing`` (bool).
    """

    def __init__(self, bits: int = 8, ema: float = 0.01):
        super().__init__()
        self.qmin, self.qmax, self.ema = 0, 2**bits - 1, ema
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("observing", torch.tensor(True))
        self._sync_flags()
        self.register_load_state_dict_post_hook(_refresh_flags)

    def _sync_flags(self):
        self._observing = bool(self.observing)
        self._seen = bool(torch.isfinite(self.min_val))

    def set_observing(self, on: bool):
        self.observing.fill_(on)
        self._observing = on

    @property
    def calibrated(self) -> bool:
        return self._seen

    @torch.no_grad()
    def _observe(self, x: Tensor):
        lo, hi = torch.aminmax(memory_order(x.detach().float()))
        if not self._seen:
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
            self._seen = True
        else:
            self.min_val.lerp_(lo, self.ema)
            self.max_val.lerp_(hi, self.ema)

    def qparams(self) -> tuple[Tensor, Tensor]:
        """(scale float32 scalar, zero_point int32 scalar) of the current range."""
        # The range must contain 0 so that zero padding and ReLU zeros are exact.
        lo = self.min_val.clamp(max=0.0)
        hi = self.max_val.clamp(min=0.0)
        scale = ((hi - lo) / float(self.qmax - self.qmin)).clamp(min=_MIN_SCALE)
        zero_point = (self.qmin - torch.round(lo / scale)).clamp(self.qmin, self.qmax)
        return scale.detach(), zero_point.to(torch.int32).detach()

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self._observing:
            self._observe(x)
        if not self._seen:
            return x
        scale, zero_point = self.qparams()
        # Straight-through estimator: identity gradient inside the range, zero outside.
        return fake_quant_per_tensor(x, scale, zero_point, self.qmin, self.qmax)

    def extra_repr(self):
        return f"qmin={self.qmin}, qmax={self.qmax}, ema={self.ema}"


def weight_scale(w: Tensor, qmax: int) -> Tensor:
    """Per-output-channel symmetric scale max|w_c| / qmax (float32, detached).

    An all-zero channel gets scale 1: any scale represents it, and a tiny one would
    overflow the int32 bias scale ``input_scale * weight_scale``.
    """
    amax = w.detach().abs().flatten(1).amax(dim=1)
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).float()


def fake_quant_weight(w: Tensor, scale: Tensor, qmax: int) -> Tensor:
    """Per-channel symmetric fake quantization onto [-qmax, qmax] * scale[c] (STE)."""
    zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -qmax, qmax)


def fake_quant_bias(b: Tensor, scale: Tensor) -> Tensor:
    """int32 fake quantization of a bias with per-channel ``scale`` (STE)."""
    q = torch.round(b.detach() / scale).clamp(_INT32_MIN, _INT32_MAX) * scale
    return b + (q - b).detach()


class _QWeighted(nn.Module):
    """Shared by QConv2d / QLinear: weight and bias quantization, fused ReLU and the
    output quantizer (``output_quant``, created by the subclass after its layer so the
    state_dict lists the layer first).

    ``_input`` is the upstream ActQuant whose scale the int32 bias needs. It is kept
    in a list so it is not registered as a child: it belongs to the module before us.
    """

    def __init__(self, input_quant: ActQuant, relu: bool, spec: QuantSpec):
        super().__init__()
        self._input = [input_quant]
        self.relu = relu
        self.qmax = 2 ** (spec.weight_bits - 1) - 1

    def quantized_weight_bias(self, w: Tensor, b: Tensor | None):
        """(fake-quant weight, fake-quant bias or None, weight scale, bias scale or None)."""
        w_scale = weight_scale(w, self.qmax)
        wq = fake_quant_weight(w, w_scale, self.qmax)
        if b is None or not self._input[0].calibrated:
            return wq, b, w_scale, None
        b_scale = self._input[0].qparams()[0] * w_scale  # float32, exactly what ORT assumes
        return wq, fake_quant_bias(b, b_scale), w_scale, b_scale

    def _finish(self, y: Tensor) -> Tensor:
        if self.relu:
            y = F.relu(y)
        return self.output_quant(y)

    def extra_repr(self):
        return f"relu={self.relu}, weight_qmax={self.qmax}"


class QConv2d(_QWeighted):
    """Conv2d [+ BatchNorm2d] [+ ReLU] with fake-quantized folded weights, int32 bias and
    fake-quantized output.

    With BN live (training, ``bn_frozen`` off) the weight is scaled by
    gamma/sqrt(running_var+eps) before fake quantization, the scale is divided back out
    after the convolution and BN normalizes with batch statistics (Jacob et al. 2018,
    as torch.ao's ConvBn). Frozen or in eval, the folded weight and bias are used
    directly -- exactly what the INT8 graph computes.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, relu: bool,
                 input_quant: ActQuant, spec: QuantSpec):
        super().__init__(input_quant, relu, spec)
        self.conv = conv
        self.bn = bn
        self.output_quant = ActQuant(spec.act_bits, spec.ema)
        self.register_buffer("bn_frozen", torch.tensor(False))
        self._sync_flags()
        self.register_load_state_dict_post_hook(_refresh_flags)

    def _sync_flags(self):
        self._bn_frozen = bool(self.bn_frozen)

    def set_bn_frozen(self, frozen: bool):
        self.bn_frozen.fill_(frozen)
        self._bn_frozen = frozen

    def _bn_factor(self) -> Tensor:
        bn = self.bn
        gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
        return gamma / torch.sqrt(bn.running_var + bn.eps)

    def folded_weight_bias(self) -> tuple[Tensor, Tensor | None]:
        """Float weight and bias of the conv with eval-mode BN folded in (differentiable)."""
        w, b = self.conv.weight, self.conv.bias
        if self.bn is None:
            return w, b
        bn, f = self.bn, self._bn_factor()
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        b0 = b if b is not None else torch.zeros_like(bn.running_mean)
        return w * f.reshape(-1, 1, 1, 1), beta + (b0 - bn.running_mean) * f

    def _conv(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        c = self.conv
        return F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)

    def forward(self, x: Tensor) -> Tensor:
        if self.bn is not None and self.training and not self._bn_frozen:
            f = self._bn_factor().reshape(-1, 1, 1, 1)
            wq = self.quantized_weight_bias(self.conv.weight * f, None)[0]
            # times 1/f, not / f: the backward of a broadcast product is one multiply and a
            # sum per channel, that of a quotient four passes over the activation
            y = self._conv(x, wq, None) * f.reciprocal().reshape(1, -1, 1, 1)
            if self.conv.bias is not None:
                y = y + self.conv.bias.reshape(1, -1, 1, 1)
            return self._finish(self.bn(y))  # batch statistics; updates running stats
        wq, bq, _, _ = self.quantized_weight_bias(*self.folded_weight_bias())
        return self._finish(self._conv(x, wq, bq))


class QLinear(_QWeighted):
    """Linear [+ ReLU] with fake-quantized weight, int32 bias and output."""

    def __init__(self, linear: nn.Linear, relu: bool, input_quant: ActQuant, spec: QuantSpec):
        super().__init__(input_quant, relu, spec)
        self.linear = linear
        self.output_quant = ActQuant(spec.act_bits, spec.ema)

    def forward(self, x: Tensor) -> Tensor:
        wq, bq, _, _ = self.quantized_weight_bias(self.linear.weight, self.linear.bias)
        return self._finish(F.linear(x, wq, bq))


class QPool(nn.Module):
    """An averaging pool followed by a fresh activation quantizer."""

    def __init__(self, pool: nn.Module, spec: QuantSpec):
        super().__init__()
        self.pool = pool
        self.output_quant = ActQuant(spec.act_bits, spec.ema)

    def forward(self, x: Tensor) -> Tensor:
        return self.output_quant(self.pool(x))


class QuantModel(nn.Sequential):
    """Root of a quantized model: ``input_quant`` then the original top-level children
    (same names, so paths like ``features.0`` keep meaning the first conv)."""

    def forward(self, x):
        # Quantization is simulated in fp32: under bf16 autocast the rounding grid itself
        # would be coarser than the int8 grid being simulated.
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


# ---- building the QAT model ---------------------------------------------------------------


def _device(model: nn.Module) -> torch.device:
    t = next(itertools.chain(model.parameters(), model.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


def _plain_sequential(m: nn.Module) -> bool:
    """A Sequential whose forward is Sequential's (VGG qualifies); an overridden forward
    could do anything between the children, so it is refused."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _quantize_sequential(seq: nn.Sequential, prefix: str, state: dict, spec: QuantSpec):
    """Fused, quantized copy of `seq`. ``state["act"]`` is the ActQuant feeding the next
    module in execution order; fused groups keep the name of their first member."""
    items = list(seq.named_children())
    out, i = OrderedDict(), 0
    while i < len(items):
        name, m = items[i]
        path = f"{prefix}{name}"
        nxt = [type(x) for _, x in items[i + 1:i + 3]]
        if type(m) is nn.Conv2d:
            if m.padding_mode != "zeros":
                raise CompressError(f"cannot quantize '{path}' (Conv2d): padding_mode "
                                    f"'{m.padding_mode}' is not supported, only 'zeros'")
            bn = None
            if nxt[:1] == [nn.BatchNorm2d]:
                bn = items[i + 1][1]
                if bn.running_var is None:
                    raise CompressError(f"cannot quantize '{prefix}{items[i + 1][0]}' "
                                        "(BatchNorm2d): needs track_running_stats=True to fold")
                nxt = nxt[1:]
            relu = nxt[:1] == [nn.ReLU]
            q = QConv2d(m, bn, relu, state["act"], spec)
            i += 1 + (bn is not None) + relu
        elif type(m) is nn.Linear:
            relu = nxt[:1] == [nn.ReLU]
            q = QLinear(m, relu, state["act"], spec)
            i += 1 + relu
        elif isinstance(m, _AVG_POOLS):
            q = QPool(m, spec)
            i += 1
        elif isinstance(m, _PASSTHROUGH):
            q = m
            i += 1
        elif _plain_sequential(m):
            q = _quantize_sequential(m, f"{path}.", state, spec)
            i += 1
        else:
            raise CompressError(f"cannot quantize '{path}' ({type(m).__name__}): "
                                f"supported are {_SUPPORTED}")
        if hasattr(q, "output_quant"):
            state["act"] = q.output_quant
        out[name] = q
    return nn.Sequential(out)


def quantize_model(model: nn.Module, spec: QuantSpec, input_shape=None) -> nn.Module:
    """A new QAT-ready model: fake quantization of the input, every weight, bias and
    activation, with BatchNorm folding simulated. `model` is left untouched.

    The structure depends only on the layer types and shapes, so a checkpoint of a
    quantized model loads into ``quantize_model(same_arch_model, spec)``. Observers and
    BN start live (QAT); see ``set_qat_phase`` and ``calibrate``.

    >>> from compress.models import VGG
    >>> q = quantize_model(VGG([8, "M", 16], in_channels=1), QuantSpec())
    >>> q(torch.rand(4, 1, 28, 28)).shape
    torch.Size([4, 10])
    """
    if is_quantized(model):
        raise CompressError("the model is already quantized")
    if not _plain_sequential(model):
        raise CompressError(f"cannot quantize the model ({type(model).__name__}): "
                            f"supported are {_SUPPORTED}")
    src = copy.deepcopy(model)
    input_quant = ActQuant(spec.act_bits, spec.ema)
    body = _quantize_sequential(src, "", {"act": input_quant}, spec)
    q = QuantModel(OrderedDict([("input_quant", input_quant), *body.named_children()]))
    # The new observers are created on the CPU; follow the model to its device.
    return q.to(_device(model)).train(model.training)


def is_quantized(model: nn.Module) -> bool:
    """True for models returned by ``quantize_model``.

    >>> is_quantized(nn.Sequential(nn.Linear(2, 2)))
    False
    """
    return any(isinstance(m, ActQuant) for m in model.modules())


def set_qat_phase(qmodel: nn.Module, *, observers: bool, bn_stats: bool) -> None:
    """Switch QAT phases: ``observers=False`` fixes all activation scales;
    ``bn_stats=False`` freezes BN running statistics and trains on the folded weights.
    The flags are buffers, so they survive ``state_dict`` save/load.

    >>> from compress.models import VGG
    >>> q = quantize_model(VGG([8], in_channels=1), QuantSpec())
    >>> set_qat_phase(q, observers=False, bn_stats=False)
    """
    for m in qmodel.modules():
        if isinstance(m, ActQuant):
            m.set_observing(observers)
        elif isinstance(m, QConv2d):
            m.set_bn_frozen(not bn_stats)


@torch.no_grad()
def calibrate(qmodel: nn.Module, batches: Iterable[Tensor]) -> None:
    """Post-training calibration (PTQ of a model that had no QAT): run `batches` with BN
    in eval (folded weights) and set every activation range to the mean of the
    batches' min/max, whatever ``spec.ema`` and earlier ranges were. Training modes,
    observer flags and ``ema`` are restored afterwards.

    >>> from compress.models import VGG
    >>> q = quantize_model(VGG([8], in_channels=1), QuantSpec())
    >>> calibrate(q, [torch.rand(16, 1, 28, 28)])
    """
    training = {m: m.training for m in qmodel.modules()}
    observers = {m: (m._observing, m.ema) for m in qmodel.modules() if isinstance(m, ActQuant)}
    qmodel.eval()
    for m in observers:
        m.train()  # ActQuant's only training-mode behaviour is observing
        m.set_observing(True)
    try:
        device = _device(qmodel)
        for k, x in enumerate(batches):
            for m in observers:
                m.ema = 1.0 / (k + 1)  # running mean; batch 0 replaces the range
            qmodel(x.to(device))
    finally:
        for m, was_training in training.items():
            m.train(was_training)
        for m, (observing, ema) in observers.items():
            m.set_observing(observing)
            m.ema = ema


# ---- INT8 module for export ------------------------------------------------------------


def _act_params(act: ActQuant, path: str) -> tuple[float, int, int]:
    """Frozen (scale, zero_point, qmax) of an ActQuant as Python numbers, which the
    exporter bakes into the graph as constants."""
    if not act.calibrated:
        raise CompressError(f"activation quantizer '{path}' never observed data: "
                            "run QAT or calibrate() before converting to INT8")
    scale, zero_point = act.qparams()
    return float(scale), int(zero_point), act.qmax


class Int8Act(nn.Module):
    """Quantize to uint8 and dequantize: QuantizeLinear -> DequantizeLinear in ONNX."""

    def __init__(self, params: tuple[float, int, int]):
        super().__init__()
        self.scale, self.zero_point, self.qmax = params

    def forward(self, x: Tensor) -> Tensor:
        q = _QD.quantize_per_tensor(x, self.scale, self.zero_point, 0, self.qmax, torch.uint8)
        return _QD.dequantize_per_tensor(q, self.scale, self.zero_point, 0, self.qmax,
                                         torch.uint8)

    def extra_repr(self):
        return f"scale={self.scale:.6g}, zero_point={self.zero_point}"


class Int8After(nn.Module):
    """`module` then re-quantization with the given parameters. After a max-pool or a
    flatten the values are still on the input's grid, so this is numerically an
    identity there; it gives the next integer op the DequantizeLinear input that
    onnxruntime needs to fuse it."""

    def __init__(self, module: nn.Module, params: tuple[float, int, int]):
        super().__init__()
        self.module = module
        self.act = Int8Act(params)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.module(x))


class _Int8Weighted(nn.Module):
    """int8 weight + per-channel scale, int32 bias + per-channel scale, dequantized in
    forward (DequantizeLinear on int8/int32 initializers in ONNX)."""

    def __init__(self, q: _QWeighted, w: Tensor, b: Tensor | None,
                 out: tuple[float, int, int]):
        super().__init__()
        with torch.no_grad():
            wq, bq, w_scale, b_scale = q.quantized_weight_bias(w, b)
            self.qmax = q.qmax
            # wq is k * scale exactly, so dividing and rounding recovers the integer k.
            self.register_buffer("weight_int8", torch.round(wq / w_scale.reshape(
                -1, *[1] * (wq.dim() - 1))).to(torch.int8))
            self.register_buffer("weight_scale", w_scale.clone())
            self.register_buffer("weight_zero_point", torch.zeros(len(w_scale), dtype=torch.int8))
            if bq is None:
                self.bias_int32 = self.bias_scale = None
            else:
                self.register_buffer("bias_int32", torch.round(bq / b_scale).to(torch.int32))
                self.register_buffer("bias_scale", b_scale.clone())
        self.relu = q.relu
        self.out = Int8Act(out)

    def weight_bias(self) -> tuple[Tensor, Tensor | None]:
        w = _QD.dequantize_per_channel(self.weight_int8, self.weight_scale,
                                       self.weight_zero_point, 0, -self.qmax, self.qmax,
                                       torch.int8)
        if self.bias_int32 is None:
            return w, None
        # No zero point: an int32 DequantizeLinear's zero point must be absent or 0.
        b = _QD.dequantize_per_channel(self.bias_int32, self.bias_scale, None, 0,
                                       _INT32_MIN, _INT32_MAX, torch.int32)
        return w, b

    def _finish(self, y: Tensor) -> Tensor:
        return self.out(F.relu(y) if self.relu else y)


class Int8Conv2d(_Int8Weighted):
    """QConv2d with BN folded, frozen to integers: DQ(int8 W), DQ(int32 b) -> Conv
    [-> Relu] -> Q/DQ, which onnxruntime turns into QLinearConv."""

    def __init__(self, q: QConv2d, out: tuple[float, int, int]):
        super().__init__(q, *q.folded_weight_bias(), out)
        c = q.conv
        self.stride, self.padding, self.dilation, self.groups = (c.stride, c.padding,
                                                                 c.dilation, c.groups)

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight_bias()
        return self._finish(F.conv2d(x, w, b, self.stride, self.padding, self.dilation,
                                     self.groups))


class Int8Linear(_Int8Weighted):
    """QLinear frozen to integers; onnxruntime turns the exported Gemm into QGemm."""

    def __init__(self, q: QLinear, out: tuple[float, int, int]):
        super().__init__(q, q.linear.weight, q.linear.bias, out)

    def forward(self, x: Tensor) -> Tensor:
        return self._finish(F.linear(x, *self.weight_bias()))


def _int8_sequential(seq: nn.Sequential, prefix: str, state: dict) -> nn.Sequential:
    out = OrderedDict()
    for name, m in seq.named_children():
        path = f"{prefix}{name}"
        if isinstance(m, ActQuant):  # only the model input
            state["act"] = _act_params(m, path)
            out[name] = Int8Act(state["act"])
        elif isinstance(m, (QConv2d, QLinear)):
            state["act"] = _act_params(m.output_quant, f"{path}.output_quant")
            out[name] = (Int8Conv2d if isinstance(m, QConv2d) else Int8Linear)(m, state["act"])

        elif isinstance(m, QPool):
            state["act"] = _act_params(m.output_quant, f"{path}.output_quant")
            out[name] = Int8After(copy.deepcopy(m.pool), state["act"])
        elif isinstance(m, (nn.MaxPool2d, nn.Flatten)):
            out[name] = Int8After(copy.deepcopy(m), state["act"])
        elif isinstance(m, (nn.Dropout, nn.Identity)):
            continue  # identities in eval
        elif type(m) is nn.Sequential:
            out[name] = _int8_sequential(m, f"{path}.", state)
        else:
            raise CompressError(f"cannot convert '{path}' ({type(m).__name__}) to INT8: "
                                "not a module made by quantize_model")
    return nn.Sequential(out)


def _leaves(seq: nn.Sequential):
    """(parent, name, module) of the non-Sequential modules of nested Sequentials, in order."""
    for name, m in seq.named_children():
        if type(m) is nn.Sequential:
            yield from _leaves(m)
        else:
            yield seq, name, m


def _float_first_conv(int8: nn.Sequential) -> None:
    """Run the first convolution in float when the model starts with input quantization,
    a convolution and a max-pool: a float Conv2d with the dequantized weights and bias (the
    very values the INT8 graph would use), then max-pool, ReLU and the conv's output
    quantization (max and ReLU commute with each other and with monotone rounding: the same
    integers).

    Why: with 1-3 input channels onnxruntime's integer convolution runs a GEMM with K = 9-27
    and is slower than its float one (measured, 64 images of 28x28, 8 output channels:
    1.45 ms vs 0.26 ms, over half of the INT8 student's time). The input keeps its Q/DQ
    pair, so the conv sees the fake-quant model's input; with float (not dequantized)
    weights onnxruntime cannot fuse the conv into QLinearConv. ReLU after the pool keeps
    onnxruntime from moving the quantization in front of the pool, where a uint8 NCHW
    max-pool is slow, so conv and pool run in its blocked float layout."""
    leaves = list(_leaves(int8))
    if len(leaves) < 3:
        return
    (_, _, act), (p1, n1, conv), (_, _, pool) = leaves[:3]
    if not (isinstance(act, Int8Act) and isinstance(conv, Int8Conv2d)
            and isinstance(pool, Int8After) and isinstance(pool.module, nn.MaxPool2d)):
        return
    w, b = conv.weight_bias()
    fc = nn.Conv2d(w.shape[1] * conv.groups, w.shape[0], tuple(w.shape[2:]), conv.stride, conv.padding,
                   conv.dilation, conv.groups, bias=b is not None)
    with torch.no_grad():
        fc.weight.copy_(w)
        if b is not None:
            fc.bias.copy_(b)
    p1._modules[n1] = fc
    if conv.relu:
        pool.module = nn.Sequential(pool.module, nn.ReLU())


def to_int8_module(qmodel: nn.Module, float_first_conv: bool = True) -> nn.Module:
    """Eval-only module computing what the eval-mode fake-quant `qmodel` computes, with
    int8 weights (per-channel scales), int32 biases and uint8 activation Q/DQ through
    ``torch.ops.quantized_decomposed``, so its ONNX export is a standard QDQ graph that
    onnxruntime fuses into integer kernels. Returns float logits. With `float_first_conv`
    a first convolution followed by a max-pool stays float (see ``_float_first_conv``).

    >>> from compress.models import VGG
    >>> q = quantize_model(VGG([8], in_channels=1), QuantSpec())
    >>> calibrate(q, [torch.rand(16, 1, 28, 28)])
    >>> to_int8_module(q)(torch.rand(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """
    if not isinstance(qmodel, QuantModel):
        raise CompressError(f"to_int8_module needs a model made by quantize_model, "
                            f"got {type(qmodel).__name__}")
    int8 = _int8_sequential(qmodel, "", {})
    if float_first_conv:
        _float_first_conv(int8)
    return int8.eval().requires_grad_(False)
