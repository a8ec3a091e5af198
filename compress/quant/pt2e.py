"""INT8 quantization-aware training of any graph ``torch.export`` can capture (residual
adds, depthwise convs, ReLU6, average pools), with torchao's PT2E flow.

What comes from torchao: graph capture (``torch.export``), observer/fake-quant insertion
(``prepare_qat_pt2e``) including its simulated conv-BN fold, the fake-quant and observer
modules, train/eval switching of exported graphs and the conversion to a Q/DQ graph
(``convert_pt2e``). What is our own, and why:

- ``make_quantizer``: the library's quantizers do not produce the graph onnxruntime
  fuses into integer kernels on CPUs (the XNNPACK one uses int8 activations and leaves
  adds float, the X86 one fuses conv+add into a float op; see FINDINGS). Ours annotates
  our scheme -- uint8 per-tensor activations, per-channel symmetric weights (7 bits by
  default) -- on conv[-bn][-relu/relu6], linear[-relu], add[-relu], averaging pools and
  value-preserving ops (max-pool, flatten, dropout, cat) that share their input's grid.
- ``fold_bn``: convert_pt2e folds BN by matching ~96 captured pattern graphs (38-123 s on
  the project's CPU, for any model). In eval mode the prepared conv-BN subgraph computes
  ``conv(x, fq(w * f)) / f + b -> BN(running stats)`` with ``f = gamma / sqrt(var + eps)``,
  which equals ``conv(x, fq(w * f)) + beta + (b - mean) * f``. Rewriting those few nodes
  in place leaves the weight path (``w * f -> fake quant``) untouched, so the INT8 weights
  are bit-identical to what the fake-quant model used, and convert_pt2e then finds no BN
  and skips its pattern matching (measured in README).
- ``PT2EModel``: exported graphs raise on ``.train()``/``.eval()``; the wrapper calls
  torchao's ``move_exported_model_to_train/eval`` and re-applies the phase flags (frozen
  BN statistics, frozen activation observers) that moving to train would undo, so the
  one training loop uses it unchanged. In training mode the conv-BN subgraph multiplies
  by the BN factor's reciprocal instead of dividing by it (``conv_bn_scaling``: a cheaper
  backward); eval mode and the conversion keep torchao's division.
"""

import collections
import copy
import dataclasses
import enum
import functools
import hashlib
import itertools
import logging
import sys
from typing import Iterable

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from ..errors import CompressError, one_line

_ATEN = torch.ops.aten


def _quiet():
    """Silence what torch.export and torchao print while capturing (graph dumps of a
    failed capture, deprecation notes)."""
    from ..onnx_io import quiet

    return quiet(("torch", "torch.export", "torch._dynamo", "torch.fx", "torch.fx.experimental.symbolic_shapes",
                  "torch.utils._pytree", "torchao"), logging.CRITICAL)


def _torchao():
    """torchao's PT2E modules, imported on first use (importing torchao takes ~2 s)."""
    try:
        with _quiet():   # torchao's import warns about a torch.compile registration
            import torchao.quantization.pt2e as pt2e
            import torchao.quantization.pt2e.quantize_pt2e as qpt2e
            from torchao.quantization.pt2e.quantizer import quantizer as qz
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise CompressError(f"the pt2e quantization backend needs torchao ({e})") from None
    _cache_pattern_graphs()
    return pt2e, qpt2e, qz


_PATTERNS: dict = {}


def _pattern_key(pattern, example_inputs, is_cuda, kwargs):
    """What a captured pattern graph depends on: the pattern function's code, closure and
    defaults, and the example inputs' shapes and dtypes. None when something is not
    hashable (then the pattern is captured as usual)."""
    fn = getattr(pattern, "fn", pattern)   # torchao wraps pattern functions in WrapperModule
    code = getattr(fn, "__code__", None)
    if code is None:
        return None

    def desc(v):
        return ("tensor", tuple(v.shape), v.dtype) if isinstance(v, Tensor) else v

    key = (code, tuple(c.cell_contents for c in fn.__closure__ or ()), fn.__defaults__,
           tuple(desc(v) for v in example_inputs), bool(is_cuda),
           tuple(sorted((k, desc(v)) for k, v in kwargs.items())))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _cache_pattern_graphs():
    """Capture each torchao pattern graph once per process.

    ``prepare_qat_pt2e`` and every ``move_exported_model_to_train/eval`` capture small
    pattern functions with ``torch.export`` (12 captures in prepare, 4 per mode switch;
    measured 0.4-0.8 s each on the project's CPU), whatever the model. The captures depend
    only on the pattern function and the example shapes, so we keep them and hand out
    copies. This wraps a private torchao function, hence the exact version pin."""
    import torchao.quantization.pt2e.qat_utils as qat_utils
    import torchao.quantization.pt2e.utils as utils

    if getattr(utils._get_aten_graph_module_for_pattern, "_compress_cached", False):
        return
    capture_pattern = utils._get_aten_graph_module_for_pattern

    def cached(pattern, example_inputs, is_cuda=False, **kwargs):
        key = _pattern_key(pattern, example_inputs, is_cuda, kwargs)
        if key is None:
            return capture_pattern(pattern, example_inputs, is_cuda, **kwargs)
        if key not in _PATTERNS:
            _PATTERNS[key] = capture_pattern(pattern, example_inputs, is_cuda, **kwargs)
        return copy.deepcopy(_PATTERNS[key])

    cached._compress_cached = True
    utils._get_aten_graph_module_for_pattern = cached       # export_utils imports it per call
    qat_utils._get_aten_graph_module_for_pattern = cached   # qat_utils imported it by name


# ---- the quantizer ------------------------------------------------------------------------

_CONVS = (_ATEN.conv2d.default, _ATEN.conv1d.default)
_LINEARS = (_ATEN.linear.default,)
_BNS = (_ATEN.batch_norm.default, _ATEN._native_batch_norm_legit.default,
        _ATEN._native_batch_norm_legit_no_training.default, _ATEN.cudnn_batch_norm.default)
_ADDS = (_ATEN.add.Tensor, _ATEN.add_.Tensor)
# Activations whose output lower bound is 0, so the uint8 range makes them free in ONNX
# (onnxruntime folds a Relu/Clip into the following QuantizeLinear).
_RELUS = (_ATEN.relu.default, _ATEN.relu_.default, _ATEN.hardtanh.default,
          _ATEN.hardtanh_.default, _ATEN.clamp.default, _ATEN.clamp_.default)
# SiLU is split into x * sigmoid(x) (``split_silu``); sigmoids and the products they gate get
# their own quantizers (onnxruntime: QLinearSigmoid, QLinearMul).
_SILUS = (_ATEN.silu.default, _ATEN.silu_.default)
_SIGMOIDS = (_ATEN.sigmoid.default, _ATEN.sigmoid_.default)
_MULS = (_ATEN.mul.Tensor, _ATEN.mul_.Tensor)
# Averaging leaves the grid: a fresh activation quantizer follows.
_AVERAGING = (_ATEN.adaptive_avg_pool2d.default, _ATEN.avg_pool2d.default, _ATEN.mean.dim)
# Value-preserving: the output stays on the input's grid and shares its quantizer.
_PASSTHROUGH = (_ATEN.max_pool2d.default, _ATEN.flatten.using_ints, _ATEN.view.default,
                _ATEN.reshape.default, _ATEN.dropout.default, _ATEN.dropout_.default,
                _ATEN.squeeze.dim, _ATEN.squeeze.dims)


def _relu_like(n: Node) -> bool:
    if n.op != "call_function" or n.target not in _RELUS:
        return False
    if n.target in (_ATEN.relu.default, _ATEN.relu_.default):
        return True
    low = n.args[1] if len(n.args) > 1 else n.kwargs.get("min_val", n.kwargs.get("min", -1.0))
    return isinstance(low, (int, float)) and low >= 0  # ReLU6 = hardtanh(0, 6)


def _only_user(n: Node) -> Node | None:
    users = list(n.users)
    return users[0] if len(users) == 1 else None


def _module_path(n: Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else n.name


@functools.cache
def _current_minmax():
    """torchao's per-channel min/max observer holding the current tensor's range only. Its
    moving average at ``averaging_constant=1`` computes ``old + (new - old)``, which is not
    ``new`` in floating point: after a step that blew the weights up (1e9 and more, seen
    on an undertrained MobileNetV2), the cancellation left min > max and torchao asserted."""
    pt2e, _, _ = _torchao()

    class CurrentPerChannelMinMaxObserver(pt2e.PerChannelMinMaxObserver):
        def forward(self, x_orig):
            if x_orig.numel() == 0:
                return x_orig
            x = x_orig.detach().to(self.min_val.dtype)
            lo, hi = torch.aminmax(torch.flatten(x.transpose(0, self.ch_axis), start_dim=1), dim=1)
            self.min_val.resize_(lo.shape).copy_(lo)
            self.max_val.resize_(hi.shape).copy_(hi)
            return x_orig

    return CurrentPerChannelMinMaxObserver


@functools.cache
def _fast_fake_quantize():
    """torchao's FakeQuantize whose per-tensor fake quantization of a float32 CPU tensor
    runs `eager.fake_quant_per_tensor` (the same values and gradients bit for bit, 3-5x
    faster than ATen's per-element CPU kernel, which took 24% of a width-1 ResNet-20's QAT
    step on a 2-core AVX2 CPU; elsewhere it is ATen's kernel). Observing and the qparams it
    keeps are torchao's; per channel or with fake quantization off, torchao's forward runs."""
    pt2e, _, _ = _torchao()
    from .eager import fake_quant_per_tensor, memory_order

    class FastFakeQuantize(pt2e.FakeQuantize):
        def forward(self, X):
            if self.is_per_channel or self.fake_quant_enabled[0] != 1:
                return super().forward(X)
            if self.observer_enabled[0] == 1:
                # a per-tensor min/max: the elements in memory order (torchao's observer calls
                # aminmax, which copies a channels_last map to NCHW first)
                self.activation_post_process(memory_order(X.detach()))
                scale, zero_point = self.calculate_qparams()
                self.scale.resize_(scale.shape).copy_(scale)
                self.zero_point.resize_(zero_point.shape).copy_(zero_point)
            obs = self.activation_post_process
            return fake_quant_per_tensor(X, self.scale, self.zero_point, obs.quant_min, obs.quant_max)

    return FastFakeQuantize


def make_quantizer(spec):
    """A torchao ``Quantizer`` annotating a captured graph with our scheme for `spec`
    (weight_bits, act_bits, ema of ``QuantSpec``); see the module docstring.

    Defined here, not at import, so that torchao is imported only when used."""
    pt2e, _, qz = _torchao()
    act = qz.QuantizationSpec(
        dtype=torch.uint8, quant_min=0, quant_max=2**spec.act_bits - 1,
        qscheme=torch.per_tensor_affine,
        observer_or_fake_quant_ctr=_fast_fake_quantize().with_args(
            observer=pt2e.MovingAverageMinMaxObserver, averaging_constant=spec.ema))
    qmax = 2 ** (spec.weight_bits - 1) - 1
    # The non-fused FakeQuantize: the fused kernel of torchao 0.18 scales by amax/(qmax+0.5)
    # while convert uses amax/qmax (up to 2% top-1 disagreement measured, see FINDINGS).
    # The scale follows the current weights exactly, as in eager QAT.
    weight = qz.QuantizationSpec(
        dtype=torch.int8, quant_min=-qmax, quant_max=qmax, qscheme=torch.per_channel_symmetric,
        ch_axis=0, observer_or_fake_quant_ctr=pt2e.FakeQuantize.with_args(observer=_current_minmax()))

    class CompressQuantizer(qz.Quantizer):
        def __init__(self):
            super().__init__()
            self.float_layers: list[str] = []   # module paths of the convs left float

        def annotate(self, gm: GraphModule) -> GraphModule:
            # The float lead: with ``float_convs: auto`` the convs `_best_lead` picks from the
            # input on (those onnxruntime runs slower as integer kernels, by
            # ``ort_runtime.integer_conv_slow``, and any integer-worthy ones between them) stay float,
            # and so does everything computed only from them; the graph turns integer at the
            # first op that takes an integer input. Only a lead, never a float island inside the
            # integer graph: there onnxruntime would quantize a float conv's weights itself.
            if spec.float_layers is not None:   # a checkpoint's lead, as it was trained
                lead = {n for n in gm.graph.nodes if n.op == "call_function" and n.target in _CONVS
                        and _module_path(n) in spec.float_layers}
            else:
                lead = _best_lead(gm) if spec.float_convs == "auto" else set()
            floating: set[Node] = set()
            for n in gm.graph.nodes:
                if n.op == "placeholder" and lead:
                    floating.add(n)
                if n.op != "call_function" or _annotated(n):
                    continue
                if _floats(n, floating, lead):
                    floating.add(n)
                    if n.target in _CONVS:
                        self.float_layers.append(_module_path(n))
                    continue
                if n.target in _CONVS or n.target in _LINEARS:
                    x, w = n.args[0], n.args[1]
                    tail = [n]
                    nxt = _only_user(n)
                    if n.target in _CONVS and nxt is not None and nxt.target in _BNS:
                        tail.append(nxt)
                        nxt = _only_user(nxt)
                    if nxt is not None and _relu_like(nxt):
                        tail.append(nxt)
                    _annotate(n, {x: act, w: weight}, None)
                    _annotate(tail[-1], None, act, extra=tail[1:-1])
                elif n.target in _ADDS and all(isinstance(a, Node) for a in n.args[:2]):
                    nxt = _only_user(n)
                    tail = [n, nxt] if nxt is not None and _relu_like(nxt) else [n]
                    _annotate(n, {n.args[0]: act, n.args[1]: act}, None)
                    _annotate(tail[-1], None, act)
                elif n.target in _AVERAGING:
                    _annotate(n, {n.args[0]: act}, act)
                elif spec.integer_sigmoid and n.target in _SIGMOIDS and isinstance(n.args[0], Node):
                    _annotate(n, {n.args[0]: act}, act)               # QLinearSigmoid
                elif (spec.integer_sigmoid and n.target in _MULS and all(isinstance(a, Node) for a in n.args[:2])
                      and any(a.op == "call_function" and a.target in _SIGMOIDS for a in n.args[:2])):
                    _annotate(n, {n.args[0]: act, n.args[1]: act}, act)   # a gate: QLinearMul
                elif n.target in _PASSTHROUGH and isinstance(n.args[0], Node):
                    _annotate(n, {n.args[0]: act}, qz.SharedQuantizationSpec((n.args[0], n)))
                elif n.target == _ATEN.cat.default:
                    first, *rest = n.args[0]
                    shared = qz.SharedQuantizationSpec((first, n))
                    _annotate(n, {first: act, **{r: shared for r in rest}}, shared)
            return gm

        def validate(self, gm: GraphModule) -> None:
            pass

    def _slow_conv(n):
        from ..ort_runtime import integer_conv_slow

        w = n.args[1].meta.get("val")
        groups = _arg(n, 6, "groups", 1)
        return w is not None and integer_conv_slow(w.shape[0], w.shape[1] * groups, groups, w.shape[2:])

    def _padded_pool(n):
        if n.op != "call_function" or n.target != _ATEN.max_pool2d.default:
            return False

        def ints(v):
            return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]

        kernel = ints(_arg(n, 1, "kernel_size", 1))
        stride = ints(_arg(n, 2, "stride", None) or kernel)
        padding = ints(_arg(n, 3, "padding", 0))
        return any(p > 0 for p in padding) or any(k > s for k, s in zip(kernel, stride))

    def _handed_off(pool):
        """A max-pool the export hands to the integer part as float NHWC: one that reads a
        ReLU (``onnx_io._relu_after_pool`` runs the ReLU after it) over a channel count the
        hand-off takes."""
        from ..onnx_io import HANDOFF_CHANNELS

        val, src = pool.meta.get("val"), pool.args[0]
        return (isinstance(src, Node) and src.op == "call_function"
                and src.target in (_ATEN.relu.default, _ATEN.relu_.default)   # exported as Relu
                and val is not None and val.dim() == 4 and val.shape[1] % HANDOFF_CHANNELS == 0)

    def _floats(n, floating, lead):
        """`n` stays float: it is computed only from float values, and is no conv outside
        `lead` and no linear layer (the classifier is always integer)."""
        ins = [a for a in n.all_input_nodes if a.op != "get_attr"]
        return bool(ins) and all(a in floating for a in ins) and n.target not in _LINEARS and (
            n.target not in _CONVS or n in lead)

    def _best_lead(gm):
        """The convs allowed to stay float: the first k in graph order, for the k that
        leaves the fewest convs on the wrong side -- integer-worthy convs kept float plus
        convs slow as INT8 (``ort_runtime.integer_conv_slow``) left integer; the smallest such k.
        A lead can pass an integer-worthy conv to reach slow ones behind it (a MobileNetV2's
        4 -> 24 expansion between 8-channel depthwise convs and projections) where a float
        conv inside the integer graph could not be: onnxruntime would quantize its weights.
        No lead ends at a max-pool with padding or overlapping windows (a ResNet's 3x3/2 pool
        after its stem) unless the export hands it over in NHWC (a pool of a ReLU over 16k
        channels): otherwise onnxruntime moves the quantization above it and runs it as a
        uint8 NCHW MaxPool, 12 ms against 0.45 ms as the integer graph's NhwcMaxPool
        (torchvision ResNet-18, 64 images of 64x64). Handed over, torchvision's ResNet-18
        pruned to half width on 1x28x28 images took 1.92 ms at batch 64 with its stem float
        against 2.39 ms with it integer (FP32 3.76 ms); at full width on 3x32x32 and 3x64x64
        images the two were within 3% (README, "Which convolutions stay float")."""
        convs = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _CONVS]
        slow = {n: _slow_conv(n) for n in convs}
        best, best_cost = set(), sum(slow.values())
        for k in range(1, len(convs) + 1):
            allowed, floating = set(convs[:k]), set()
            for n in gm.graph.nodes:
                if n.op == "placeholder" or (n.op == "call_function" and _floats(n, floating, allowed)):
                    floating.add(n)
            if any(_padded_pool(n) and not _handed_off(n) and any(u not in floating for u in n.users)
                   for n in floating):
                continue   # the lead would end at a padded/overlapping max-pool
            cost = sum(slow[c] != (c in floating) for c in convs)
            if cost < best_cost:
                best, best_cost = allowed & floating, cost
        return best

    def _annotated(n):
        a = n.meta.get("quantization_annotation")
        return a is not None and a._annotated

    def _annotate(n, inputs, output, extra=()):
        a = n.meta.get("quantization_annotation") or qz.QuantizationAnnotation()
        if inputs:
            a.input_qspec_map = {**a.input_qspec_map, **inputs}
        if output is not None:
            a.output_qspec = output
        a._annotated = True
        n.meta["quantization_annotation"] = a
        for m in extra:  # fused members (a BN between conv and ReLU): no observer of their own
            b = m.meta.get("quantization_annotation") or qz.QuantizationAnnotation()
            b._annotated = True
            m.meta["quantization_annotation"] = b

    return CompressQuantizer()


# ---- capture and prepare ----------------------------------------------------------------


# Random ops a training-mode capture can hold. torchao's move to eval mode rewrites dropout
# (aten.dropout) only: any of these left in the graph would draw in evaluation and in the
# exported file too.
_RANDOM_OPS = ("bernoulli", "rand", "randn", "rand_like", "randn_like", "randint", "randint_like", "randperm",
               "uniform", "normal", "multinomial", "exponential", "geometric", "cauchy", "log_normal")


def _without_stochastic_depth(m: nn.Module) -> list[str]:
    """Set the drop probability of `m`'s stochastic-depth layers (torchvision's
    ``StochasticDepth``, timm's ``DropPath``) to 0, in place: a training-mode capture would
    otherwise fix their random residual drop into the graph, where no mode switch removes it.
    QAT then fine-tunes without it (as it does without dropout's effect on the exported file).
    Returns their paths."""
    knobs = {"StochasticDepth": "p", "DropPath": "drop_prob"}   # class name -> its drop probability
    paths = []
    for path, mod in m.named_modules():
        knob = knobs.get(type(mod).__name__)
        if knob and getattr(mod, knob, 0):
            setattr(mod, knob, 0.0)
            paths.append(path)
    return paths


def random_nodes(gm: GraphModule) -> list[str]:
    """Names of the nodes of a captured graph that draw random numbers (dropout aside)."""
    return [n.name for n in gm.graph.nodes if n.op == "call_function"
            and getattr(getattr(n.target, "_overloadpacket", None), "__name__", "").rstrip("_") in _RANDOM_OPS]


def capture(model: nn.Module, input_shape) -> GraphModule:
    """``torch.export`` of `model` in training mode (BN on batch statistics, as QAT needs)
    with a dynamic batch axis, stochastic depth off (:func:`_without_stochastic_depth`);
    CompressError with the exporter's reason if it cannot, or naming a layer that still draws
    random numbers in training mode (its evaluation, and the INT8 file, would draw them too)."""
    m = copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format).train()
    _without_stochastic_depth(m)
    # Batch 2: torch.export specializes a dimension whose example size is 0 or 1.
    example = torch.rand(2, *input_shape)
    try:
        with _quiet():
            gm = torch.export.export(m, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    except Exception as e:  # the exporter raises many types; the user needs one line
        raise CompressError(f"cannot quantize the model ({type(model).__name__}): torch.export "
                            f"cannot capture it ({one_line(e, 240)})") from None
    drawn = random_nodes(gm)
    if drawn:
        raise CompressError(f"cannot quantize the model ({type(model).__name__}): in training mode it draws random "
                            f"numbers ({', '.join(drawn[:4])}{' ...' if len(drawn) > 4 else ''}), which its "
                            "evaluation and INT8 file would draw too; turn that layer off for QAT (dropout and "
                            "stochastic depth are handled)")
    return gm


def split_silu(gm: GraphModule) -> int:
    """Rewrite each ``silu(x)`` of a captured graph as ``x * sigmoid(x)`` (the same values)
    so that the sigmoid and the product can be quantized apart; returns how many."""
    count = 0
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target in _SILUS:
            x = n.args[0]
            with gm.graph.inserting_before(n):
                sig = gm.graph.call_function(_ATEN.sigmoid.default, (x,))
                mul = gm.graph.call_function(_ATEN.mul.Tensor, (x, sig))
            for new in (sig, mul):
                new.meta = {k: v for k, v in n.meta.items() if k in ("val", "tensor_meta", "stack_trace",
                                                                     "nn_module_stack", "source_fn_stack")}
            n.replace_all_uses_with(mul)
            gm.graph.erase_node(n)
            count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


_PRODUCT = "compress_conv_bn_product"   # node.meta tag of a rewritten conv-BN division


def conv_bn_scaling(gm: GraphModule, *, product: bool) -> int:
    """Switch the prepared graph's simulated conv-BN rescaling, ``conv(x, fq(w * f)) / f``,
    between that division (``product=False``: eval mode, what ``fold_bn`` folds and the
    INT8 file computes, bit for bit) and ``conv(...) * reciprocal(f)`` (``product=True``:
    training mode). The two differ by float rounding only. The quotient's backward makes
    five passes over the conv's output (``grad / f``, and ``-grad * x / f**2`` summed), the
    product's three; on the AVX2-only EPYC (one thread, CPU time per step, the two forms
    alternating) a width-1 MobileNetV2's QAT step took 1.08x less time with the product, a
    ResNet-20's 1.07x. The eager backend multiplies by the reciprocal too. Returns how many
    nodes were switched; calling it again with the same `product` switches none."""
    graph, count = gm.graph, 0
    for n in list(graph.nodes):
        if n.op != "call_function":
            continue
        if product and n.target == _ATEN.div.Tensor and isinstance(n.args[0], Node) \
                and n.args[0].target in _CONVS and isinstance(n.args[1], Node):
            with graph.inserting_before(n):
                inv = graph.call_function(_ATEN.reciprocal.default, (n.args[1],))
                mul = graph.call_function(_ATEN.mul.Tensor, (n.args[0], inv))
            mul.meta.update(n.meta)
            mul.meta[_PRODUCT] = True
            n.replace_all_uses_with(mul)
            graph.erase_node(n)
            count += 1
        elif not product and n.target == _ATEN.mul.Tensor and n.meta.get(_PRODUCT):
            inv = n.args[1]
            with graph.inserting_before(n):
                div = graph.call_function(_ATEN.div.Tensor, (n.args[0], inv.args[0]))
            div.meta.update({k: v for k, v in n.meta.items() if k != _PRODUCT})
            n.replace_all_uses_with(div)
            graph.erase_node(n)
            if not inv.users:
                graph.erase_node(inv)
            count += 1
    if count:
        gm.recompile()
    return count


def _weight_fq(m: nn.Module) -> bool:
    return m.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)


class PT2EModel(nn.Module):
    """A PT2E-prepared graph behind an ``nn.Module`` whose ``train()``/``eval()`` work:
    they move the graph between modes with torchao's functions (BN batch statistics and
    dropout) and re-apply the QAT phase. Activation observers update only in training
    mode with ``observing`` on (as the eager backend's), BN statistics only in training
    mode with ``bn_frozen`` off. Both flags are buffers, so they travel in the state_dict.
    """

    def __init__(self, gm: GraphModule, spec, input_shape):
        super().__init__()
        self.gm = gm
        self.spec = spec
        self.input_shape = tuple(int(v) for v in input_shape)
        self.register_buffer("observing", torch.tensor(True))
        self.register_buffer("bn_frozen", torch.tensor(False))
        self._gm_training = True      # the graph was captured and prepared in train mode
        conv_bn_scaling(gm, product=True)   # the training form; eval() switches it back
        self.float_layers: list[str] = []   # convs left float (``QuantSpec.float_convs``)
        self.training = True

    def fake_quants(self):
        pt2e, _, _ = _torchao()
        return [m for m in self.gm.modules() if isinstance(m, pt2e.FakeQuantize)]

    def train(self, mode: bool = True):
        pt2e, _, _ = _torchao()
        if mode != self._gm_training:
            (pt2e.move_exported_model_to_train if mode else pt2e.move_exported_model_to_eval)(self.gm)
            conv_bn_scaling(self.gm, product=mode)
            self._gm_training = mode
        self.training = mode
        self._apply_phase()
        return self

    def _apply_phase(self):
        """Observers and BN statistics as the mode and the phase flags say."""
        observe = self.training and bool(self.observing)
        for fq in self.fake_quants():
            # Weight scales follow the weights (as in eager QAT); activation ranges move
            # only while observing.
            fq.enable_observer(True if _weight_fq(fq) else observe)
        if self.training and bool(self.bn_frozen):
            changed = False
            for n in self.gm.graph.nodes:
                if n.op == "call_function" and n.target == _ATEN.batch_norm.default and n.args[5]:
                    n.args = (*n.args[:5], False, *n.args[6:])
                    changed = True
            if changed:
                self.gm.recompile()

    def set_phase(self, *, observers: bool, bn_stats: bool):
        was_frozen = bool(self.bn_frozen)
        self.observing.fill_(observers)
        self.bn_frozen.fill_(not bn_stats)
        if bn_stats and was_frozen and self._gm_training:
            # Un-freezing BN in training mode: torchao puts the batch-statistics pattern back.
            pt2e, _, _ = _torchao()
            pt2e.move_exported_model_to_eval(self.gm)
            pt2e.move_exported_model_to_train(self.gm)
        self._apply_phase()

    def forward(self, x: Tensor) -> Tensor:
        # Quantization is simulated in fp32 (under bf16 autocast the rounding grid itself
        # would be coarser than the int8 grid being simulated).
        with torch.autocast(x.device.type, enabled=False):
            return self.gm(x.float())


def _reapply_after_load(module, incompatible_keys):
    module._apply_phase()


# ---- prepared graphs, reused within a process ---------------------------------------------
#
# `compress run` prepares the same architecture up to three times: validation plans the QAT
# stage on the pruned skeleton, the stage prepares the trained model, and the export stage
# rebuilds the stored QAT checkpoint. Capture and preparation depend on the architecture,
# never on the weights' values (torch.export lifts every parameter and buffer to a graph
# input and prepare_qat_pt2e folds none into a constant), so a prepared copy of an
# architecture seen before is reused with the new model's weights loaded into it.

_PREPARED: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_PREPARED_MAX = 4
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def _tensor_key(t: Tensor):
    from ..checkpoint import digest_tensor

    return ("tensor", digest_tensor(hashlib.sha256(), t).hexdigest())


def _value_key(v):
    """A hashable description of a module attribute that equals another's only when the two
    values do; None when there is none (the model is then not reused)."""
    if v is None or isinstance(v, (bool, int, float, str, bytes, torch.dtype, torch.device, torch.memory_format)):
        return (type(v).__name__, repr(v))
    if isinstance(v, (tuple, list, set, frozenset)):
        items = [_value_key(x) for x in v]
        if any(i is None for i in items):
            return None
        return (type(v).__name__, tuple(sorted(items, key=repr) if isinstance(v, (set, frozenset)) else items))
    if isinstance(v, dict):
        items = [(_value_key(k), _value_key(x)) for k, x in v.items()]
        if any(k is None or x is None for k, x in items):
            return None
        return ("dict", tuple(sorted(items, key=repr)))
    if isinstance(v, Tensor):
        try:
            return _tensor_key(v)
        except (RuntimeError, TypeError):   # sparse, quantized, meta: nothing to compare
            return None
    if isinstance(v, enum.Enum):
        return ("enum", type(v).__module__, type(v).__qualname__, v.name)
    name = getattr(v, "__qualname__", None)
    if (callable(v) and isinstance(name, str) and "<" not in name   # module-level function or class
            and getattr(sys.modules.get(getattr(v, "__module__", None) or ""), name.split(".")[0], None) is not None):
        return ("callable", v.__module__, name, id(v))
    return None


def _architecture_key(model: nn.Module):
    """What capture and preparation read from `model`: every module's class (and its
    forward's code), attributes, hooks (none allowed), parameter and buffer names, shapes,
    dtypes and trainability, and the values of what is not a parameter or stored buffer
    (non-persistent buffers, tensor attributes, which a capture bakes into the graph).
    None when some attribute has no comparable description. Also returns the classes, which
    the cache keeps alive so that their ids cannot be reused."""
    parts, classes = [], []
    for path, m in model.named_modules(remove_duplicate=False):
        cls = type(m)
        if "<" in cls.__qualname__:
            return None, None
        classes.append(cls)
        attrs = []
        for k, v in sorted(m.__dict__.items()):
            if k == "training":
                continue
            if k in _HOOK_DICTS:
                if v:
                    return None, None
                continue
            if k == "_parameters":
                d = tuple((n, None if p is None else (tuple(p.shape), str(p.dtype), p.requires_grad))
                          for n, p in v.items())
            elif k == "_buffers":
                d = tuple((n, None if b is None else _tensor_key(b) if n in m._non_persistent_buffers_set
                           else (tuple(b.shape), str(b.dtype))) for n, b in v.items())
            elif k == "_modules":
                d = tuple((n, c is None) for n, c in v.items())
            else:
                d = _value_key(v)
                if d is None:
                    return None, None
            attrs.append((k, d))
        parts.append((path, cls.__module__, cls.__qualname__, id(cls), getattr(cls.forward, "__code__", None),
                      tuple(attrs)))
    return tuple(parts), classes


def _prepared_key(model, spec, input_shape):
    arch, classes = _architecture_key(model)
    if arch is None:
        return None, None
    return (arch, tuple(int(v) for v in input_shape), dataclasses.replace(spec, backend="pt2e")), classes


def _reuse_prepared(model, key):
    """A copy of the prepared model cached under `key` with `model`'s weights, or None."""
    if key is None or key not in _PREPARED:
        return None
    _PREPARED.move_to_end(key)
    q = copy.deepcopy(_PREPARED[key][0])
    result = q.gm.load_state_dict(model.state_dict(), strict=False)
    if result.unexpected_keys:   # cannot happen for an equal key; never hand out a partial load
        return None
    return q


def _remember_prepared(key, classes, q: PT2EModel, alias=None):
    if key is None:
        return
    entry = (copy.deepcopy(q), classes)
    for k in (key, alias):
        if k is not None:
            _PREPARED[k] = entry
            _PREPARED.move_to_end(k)
    while len(_PREPARED) > _PREPARED_MAX:
        _PREPARED.popitem(last=False)


def _lead_reproducible(gm: GraphModule, float_layers) -> bool:
    """Whether naming `float_layers` (as a checkpoint does) floats exactly the convs the rule
    floated here: no conv outside the lead shares a module path with one inside it."""
    paths = set(float_layers)
    named = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _CONVS
             and _module_path(n) in paths]
    return len(named) == len(float_layers)


def quantize_model(model: nn.Module, spec, input_shape) -> PT2EModel:
    """Capture `model` (left untouched) and prepare it for QAT with ``CompressQuantizer``.
    An architecture prepared before in this process (the same classes, attributes, shapes
    and spec) is not captured again: a copy of that preparation takes `model`'s weights.

    >>> q = quantize_model(tiny_resnet, QuantSpec(backend="pt2e"), (1, 28, 28))  # doctest: +SKIP
    """
    _, qpt2e, _ = _torchao()
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    key, classes = _prepared_key(model, spec, input_shape)
    if (q := _reuse_prepared(model, key)) is not None:
        return q.to(device).train(model.training)
    gm = capture(model, input_shape)
    if spec.integer_sigmoid:
        split_silu(gm)
    quantizer = make_quantizer(spec)
    try:
        with _quiet():
            prepared = qpt2e.prepare_qat_pt2e(gm, quantizer)
    except CompressError:
        raise
    except Exception as e:
        raise CompressError(f"cannot quantize the model ({type(model).__name__}): PT2E "
                            f"preparation failed ({one_line(e, 240)})") from None
    # a recorded lead floats only convs it names; any it names that could not float:
    if missing := sorted(set(spec.float_layers or ()) - set(quantizer.float_layers)):
        raise CompressError(f"float_layers: {', '.join(missing)} cannot stay float in this model ({type(model).__name__}): "
                            f"not a conv computed only from the input through float layers")
    _out_of_place(prepared)
    q = PT2EModel(prepared, spec, input_shape)
    q.float_layers = list(quantizer.float_layers)
    q.register_load_state_dict_post_hook(_reapply_after_load)
    # A checkpoint of this model records its lead (float_layers) and rebuilds with it: the
    # same preparation when that list picks out the same convs.
    alias = None
    if key is not None and spec.float_layers is None and _lead_reproducible(prepared, q.float_layers):
        alias = (*key[:2], dataclasses.replace(key[2], float_layers=tuple(q.float_layers)))
    _remember_prepared(key, classes, q, alias)
    q.to(device)
    return q.train(model.training)


@torch.no_grad()
def calibrate(q: PT2EModel, batches: Iterable[Tensor]) -> None:
    """Post-training calibration: BN in eval (folded weights), every activation range set
    to the mean of the batches' min/max. Mode and phase flags are restored."""
    was_training = q.training
    acts = [fq for fq in q.fake_quants() if not _weight_fq(fq)]
    ema = [fq.activation_post_process.averaging_constant for fq in acts]
    q.eval()
    for fq in q.fake_quants():
        fq.enable_observer(True)
    try:
        device = next(itertools.chain(q.parameters(), q.buffers())).device
        for k, x in enumerate(batches):
            for fq in acts:
                fq.activation_post_process.averaging_constant = 1.0 / (k + 1)
            q(x.to(device))
    finally:
        for fq, e in zip(acts, ema):
            fq.activation_post_process.averaging_constant = e
        q.train(was_training)


# ---- conversion -------------------------------------------------------------------------


def _arg(n: Node, i: int, name: str, default=None):
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def _attr(gm: GraphModule, n):
    """The tensor a ``get_attr`` node names (a parameter, buffer or constant of `gm`), else None."""
    if not isinstance(n, Node) or n.op != "get_attr":
        return None
    obj = gm
    for part in n.target.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, Tensor) else None


def fold_bn(gm: GraphModule) -> int:
    """Rewrite every eval-mode conv-BN subgraph of a prepared (QAT) graph into one conv
    with the folded bias (see the module docstring); returns how many were folded.

    The graph must be in eval mode (BN on running statistics, ``training=False``)."""
    graph, count = gm.graph, 0
    for bn in list(graph.nodes):
        if bn.op != "call_function" or bn.target != _ATEN.batch_norm.default:
            continue
        if _arg(bn, 5, "training"):
            raise CompressError("fold_bn: the graph is in training mode; move it to eval first")
        x, gamma, beta, mean, var = bn.args[:5]
        eps = _arg(bn, 7, "eps", 1e-5)
        # bn input: [add(conv_bias)] <- div(conv, f)
        y, conv_bias = x, None
        if y.target in _ADDS:
            y, conv_bias = y.args[0], y.args[1]
            conv_bias = conv_bias.args[0] if conv_bias.target in (_ATEN.reshape.default, _ATEN.view.default) else conv_bias
        if y.target != _ATEN.div.Tensor or y.args[0].target not in _CONVS:
            continue  # a BN that is not the second half of a QAT conv-BN pair stays as it is
        conv = y.args[0]
        stats = [_attr(gm, a) for a in (gamma, beta, mean, var)]
        cb = _attr(gm, conv_bias) if conv_bias is not None else None
        if any(t is None for t in stats) or (conv_bias is not None and cb is None):
            raise CompressError(f"fold_bn: BatchNorm node '{bn.name}' reads a computed value, not a stored "
                                "parameter or statistic; it cannot be folded into its conv")
        # Computed once and held as a constant: no 5 ops per conv for the ONNX exporter to
        # trace, decompose and fold again.
        g_, b_, m_, v_ = stats
        with torch.no_grad():
            folded = b_ + ((cb if cb is not None else torch.zeros_like(m_)) - m_) * (g_ / torch.sqrt(v_ + eps))
        name = f"_folded_bias_{count}"
        gm.register_buffer(name, folded.detach().clone())
        with graph.inserting_before(conv):
            bias = graph.get_attr(name)
        conv.args = (conv.args[0], conv.args[1], bias, *conv.args[3:])
        out = bn
        if bn.target != _ATEN.batch_norm.default:  # tuple-returning variants
            out = next(iter(bn.users))
        out.replace_all_uses_with(conv)
        count += 1
    for n in list(graph.nodes):  # BN's step counter: meaningless once folded
        if (n.op == "call_function" and n.target == _ATEN.add_.Tensor and not n.users
                and n.args[0].op == "get_attr" and n.args[0].target.endswith("num_batches_tracked")):
            graph.erase_node(n)
    graph.eliminate_dead_code()
    gm.recompile()
    return count


class Int8Graph(nn.Module):
    """The converted (Q/DQ) graph of a ``PT2EModel``: eval-only, float logits. Its ONNX
    export is a standard QDQ graph (int8 weight initializers, uint8 activations)."""

    def __init__(self, gm: GraphModule):
        super().__init__()
        self.gm = gm
        self.training = False

    def train(self, mode: bool = True):
        if mode:
            raise CompressError("an INT8 graph is for inference only")
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.gm(x)


def is_quantized(model: nn.Module) -> bool:
    """True for models this backend's ``quantize_model`` returned."""
    return isinstance(model, PT2EModel)


def set_qat_phase(q: PT2EModel, *, observers: bool, bn_stats: bool) -> None:
    q.set_phase(observers=observers, bn_stats=bn_stats)


def to_int8_module(q: PT2EModel, float_first_conv: bool = False) -> Int8Graph:
    """Fold BN (``fold_bn``) in an eval-mode copy of `q` and convert it with torchao's
    ``convert_pt2e`` into a graph of int8 weights and quantize/dequantize ops. Every conv is
    integer here: `float_first_conv` is the eager backend's option, accepted for one signature."""
    pt2e, qpt2e, _ = _torchao()
    if not isinstance(q, PT2EModel):
        raise CompressError(f"to_int8_module needs a model made by quantize_model, got {type(q).__name__}")
    for fq in q.fake_quants():
        if not _weight_fq(fq) and not torch.isfinite(fq.activation_post_process.min_val).all():
            raise CompressError("an activation quantizer never observed data: run QAT or "
                                "calibrate() before converting to INT8")
    gm = copy.deepcopy(q.gm)
    pt2e.move_exported_model_to_eval(gm)
    conv_bn_scaling(gm, product=False)
    fqs = [m for m in gm.modules() if isinstance(m, pt2e.FakeQuantize)]
    for m in fqs:
        m.enable_observer(_weight_fq(m))
    # Weight scales are those of the last forward, which may predate an optimizer step;
    # one forward refreshes them to the current weights, as the eval fake-quant model uses.
    device = next(itertools.chain(gm.parameters(), gm.buffers())).device
    with torch.no_grad():
        gm(torch.zeros(2, *q.input_shape, device=device))
    for m in fqs:
        m.disable_observer()
    fold_bn(gm)
    converted = qpt2e.convert_pt2e(gm)
    _out_of_place(converted)
    return Int8Graph(converted).requires_grad_(False)


def _out_of_place(gm: GraphModule) -> int:
    """Rewrite each in-place aten op (``hardtanh_`` of a ReLU6, ``relu_``) whose input
    nothing else reads, and is no view of another tensor, into its out-of-place twin: the
    same values. The ONNX exporter then need not functionalize it; in training, autograd
    then need not copy the input of an in-place ``hardtanh_`` (its backward reads the
    input): on a 64x144x28x28 map, forward and backward, 16.4 -> 14.0 ms (one thread, the
    AVX2-only EPYC). Returns how many were rewritten."""
    count = 0
    for n in gm.graph.nodes:
        target = n.target
        if n.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
            continue
        name = target._schema.name.split("::")[-1]
        src = n.args[0] if n.args else None
        if (not name.endswith("_") or name.startswith("_") or not isinstance(src, Node)
                or src.op != "call_function" or len(src.users) != 1
                or (isinstance(src.target, torch._ops.OpOverload) and src.target.is_view)):
            continue
        twin = getattr(getattr(torch.ops.aten, name[:-1], None), target._overloadname, None)
        if twin is not None:
            n.target = twin
            count += 1
    if count:
        gm.recompile()
    return count
