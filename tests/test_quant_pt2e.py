"""Graph-mode QAT (compress/quant/pt2e.py): residual and depthwise networks, pruned with
torch-pruning, trained, converted, exported and run in onnxruntime; dispatch between the
backends; checkpoints; validate refusing what torch.export cannot capture."""

import copy
import time

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
import torchvision
from torch import nn

from compress import engine
from compress.checkpoint import load_checkpoint, save_checkpoint
from compress.config import parse_recipe
from compress.errors import CompressError
from compress.models import MODELS, VGG, layer_shapes
from compress.models.resnet import CifarResNet
from compress.onnx_io import check_int8_agreement, export_onnx
from compress.ort_runtime import check_int8_kernels, integer_conv_slow, slow_integer_convs
from compress.pipeline import run_recipe, validate_recipe
from compress.quant import (QuantSpec, backend_of, calibrate, is_quantized, quantize_model,
                            set_qat_phase, to_int8_module)
from compress.quant.pt2e import PT2EModel


class BasicBlock(nn.Module):
    """He et al. 2016's CIFAR block: two 3x3 conv-BN, identity or 1x1 shortcut, add, ReLU."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self, in_channels=1, num_classes=10, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny_mobilenet(num_classes=10):
    """torchvision's MobileNetV2 (inverted residuals, depthwise convs, ReLU6) at width
    0.25 with three short stages."""
    return torchvision.models.mobilenet_v2(
        num_classes=num_classes, width_mult=0.25,
        inverted_residual_setting=[[1, 8, 1, 1], [6, 8, 2, 2], [6, 16, 1, 1]])


class Branchy(nn.Module):
    """Data-dependent control flow: torch.export cannot capture it."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        y = self.conv(x)
        if y.mean() > 0:
            y = y * 2
        return self.fc(y.mean((2, 3)))


def prune(model, shape, ignore):
    torch.manual_seed(0)
    pruner = tp.pruner.BasePruner(model, torch.rand(1, *shape),
                                  importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=0.5, ignored_layers=[ignore(model)])
    pruner.step()
    return model


def perturb_bn(model):
    """Non-trivial BN statistics and affine parameters, so folding is exercised."""
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return model


CASES = {
    # name: (factory, input shape, the layer pruning must keep whole, residual adds)
    "resnet": (lambda: TinyResNet(), (1, 16, 16), lambda m: m.fc,
               lambda m: sum(isinstance(b, BasicBlock) for b in m.modules())),
    "mobilenetv2": (tiny_mobilenet, (3, 16, 16), lambda m: m.classifier[1],
                    lambda m: sum(getattr(b, "use_res_connect", False) for b in m.modules())),
}


def as_fit_trains(q):
    """A backward pass as `fit` runs it: without oneDNN where its AVX2 kernel for a strided
    1x1 conv's weight gradient corrupts memory (a pruned shortcut with 2-7 input channels;
    it hung this module's tests on an AVX2-only EPYC, in the fixture's training and later
    in a test's own backward pass)."""
    return torch.backends.mkldnn.flags(enabled=not engine.onednn_1x1_hazards(q, torch.device("cpu")))


def images(shape, n, seed):
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """A pruned model taken through QAT (a few steps, channels_last) to an INT8 ONNX file."""
    name = request.param
    factory, shape, ignore, adds = CASES[name]
    torch.manual_seed(0)
    float_model = perturb_bn(prune(factory(), shape, ignore))
    timings = {}
    t0 = time.perf_counter()
    # every conv integer here (these tiny widths would otherwise start with a float lead,
    # tested below): the fusion of each kind of op into onnxruntime's integer kernels
    q = quantize_model(float_model, QuantSpec(float_convs="none"), shape)
    timings["prepare"] = time.perf_counter() - t0
    calibrate(q, [images(shape, 32, 1)])
    q = q.to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    opt = torch.optim.SGD(q.parameters(), lr=0.02, momentum=0.9)
    g = torch.Generator().manual_seed(2)
    with as_fit_trains(q):
        for step in range(4):
            if step == 2:  # the last steps train on the frozen integer grid, as the qat stage does
                set_qat_phase(q, observers=False, bn_stats=False)
            q.train()
            x = torch.rand(16, *shape, generator=g).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(q(x), torch.randint(0, 10, (16,), generator=g))
            opt.zero_grad()
            loss.backward()
            opt.step()
    q.eval()
    t0 = time.perf_counter()
    int8 = to_int8_module(q)
    timings["convert"] = time.perf_counter() - t0
    path = tmp_path_factory.mktemp(name) / f"{name}-int8.onnx"
    export_onnx(int8, path, input_shape=shape, mean=[0.5] * shape[0], std=[0.25] * shape[0],
                metadata={"recipe": "test"})
    return {"name": name, "float": float_model, "q": q, "int8": int8, "path": path, "shape": shape,
            "before": before, "adds": adds, "timings": timings}


def test_pt2e_chosen_for_graphs_eager_for_vgg(case):
    assert isinstance(case["q"], PT2EModel) and backend_of(case["q"]) == "pt2e"
    assert is_quantized(case["q"]) and not is_quantized(case["float"])
    vgg = quantize_model(VGG([8, "M", 16], in_channels=1), QuantSpec(), (1, 16, 16))
    assert backend_of(vgg) == "eager"
    with pytest.raises(CompressError, match="cannot quantize"):
        quantize_model(case["float"], QuantSpec(backend="eager"), case["shape"])
    with pytest.raises(CompressError, match="already quantized"):
        quantize_model(case["q"], QuantSpec(), case["shape"])


def test_training_moved_weights_and_froze_phases(case):
    q, before = case["q"], case["before"]
    after = q.state_dict()
    weights = [k for k in before if k.endswith("weight") and "activation_post_process" not in k]
    assert weights and any(not torch.equal(before[k], after[k]) for k in weights)
    assert not bool(q.observing) and bool(q.bn_frozen)
    # Frozen phases: a training step moves neither BN statistics nor activation ranges.
    stats = {k: v.clone() for k, v in after.items() if "running_" in k or k.endswith(("min_val", "max_val"))}
    acts = [k for k in stats if k.endswith("min_val") and after[k].numel() == 1]
    assert acts
    q.train()
    with as_fit_trains(q):
        q(images(case["shape"], 8, 5)).sum().backward()
    q.zero_grad()
    q.eval()
    now = q.state_dict()
    assert all(torch.equal(v, now[k]) for k, v in stats.items() if k in acts or "running_" in k)


def test_eval_does_not_observe_even_while_observing(case):
    q = case["q"]
    set_qat_phase(q, observers=True, bn_stats=False)
    try:
        q.eval()
        # activation ranges (per tensor); weight scales follow the weights, as in eager QAT
        ranges = {k: v.clone() for k, v in q.state_dict().items()
                  if k.endswith(("min_val", "max_val")) and v.numel() == 1}
        assert ranges
        with torch.no_grad():
            q(images(case["shape"], 8, 6) * 5)  # far outside the calibrated range
        assert all(torch.equal(v, q.state_dict()[k]) for k, v in ranges.items())
    finally:
        set_qat_phase(q, observers=False, bn_stats=False)
        q.eval()


def test_weight_scales_hold_the_current_weights_exactly_after_a_blow_up():
    """A QAT step that blows the weights up (1e9, an undertrained MobileNetV2 on an AVX2 CPU)
    and the next that brings them back: the weight observer must hold the current range
    exactly. torchao's moving average at constant 1 computes old + (new - old), which left
    min > max there (-3460900352 + (-123.39 + 3460900352) = 0 > -32), and torchao asserted."""
    q = quantize_model(TinyResNet(width=4), QuantSpec(backend="pt2e", float_convs="none"), (1, 8, 8))
    obs = [fq.activation_post_process for fq in q.fake_quants() if fq.qscheme == torch.per_channel_symmetric]
    assert obs
    o = obs[0]
    o(torch.tensor([-3460900352.0, -491805440.0]).reshape(1, 2, 1, 1))   # one output channel
    w = torch.tensor([-123.38883209228516, -17.53396224975586]).reshape(1, 2, 1, 1)
    o(w)
    assert o.min_val.tolist() == [w.min().item()] and o.max_val.tolist() == [w.max().item()]
    o.calculate_qparams()   # asserts min <= max


def test_convert_is_cheap_and_matches_fake_quant(case):
    # convert_pt2e's own BN folding took 38-123 s; folding first leaves it nothing to match.
    assert case["timings"]["convert"] < 15
    x = images(case["shape"], 64, 7)
    with torch.no_grad():
        ref = case["q"].eval()(x)
        got = case["int8"](x)
    # Folding reorders float operations, so a value lying on a rounding boundary of some
    # activation grid may land one step apart; anything systematic (e.g. stale weight
    # scales: 45% of the logits one step off) fails this.
    diff = (got - ref).abs()
    assert diff.gt(1e-4).float().mean() < 0.05 and diff.max() < 0.05, diff.max()
    assert torch.equal(got.argmax(1), ref.argmax(1))


def test_int8_graph_holds_folded_biases_as_constants_and_no_in_place_ops(case):
    """What the ONNX exporter would otherwise trace, decompose and fold again: the BN-folded
    biases are constants (no sqrt/div per conv) and ReLU6's hardtanh_ / relu_ are out of place."""
    aten = torch.ops.aten
    targets = [n.target for n in case["int8"].gm.graph.nodes if n.op == "call_function"]
    assert aten.conv2d.default in targets
    assert not {aten.sqrt.default, aten.div.Tensor, aten.zeros_like.default} & set(targets)
    assert not [t for t in targets if isinstance(t, torch._ops.OpOverload) and t._schema.name.endswith("_")]
    assert {aten.hardtanh.default if case["name"] == "mobilenetv2" else aten.relu.default} & set(targets)

def test_ort_runs_integer_kernels_for_every_conv_and_add(case):
    ops = check_int8_kernels(case["path"])
    convs = sum(isinstance(m, nn.Conv2d) for m in case["float"].modules())
    assert ops["QLinearConv"] + ops.get("ConvInteger", 0) == convs
    adds = case["adds"](case["float"])
    assert adds >= 2 and ops.get("QLinearAdd", 0) == adds and ops["Add"] == 0
    assert ops.get("QGemm", 0) == 1


def test_int8_file_agrees_with_fake_quant(case):
    agreement = check_int8_agreement(case["path"], case["q"], images(case["shape"], 256, 8))
    assert agreement >= 0.99


@pytest.mark.parametrize("out_ch, in_ch, groups, kernel, slow", [
    (8, 1, 1, (3, 3), True),      # a stem on one channel: 7.5x slower as INT8 (README)
    (32, 3, 1, (3, 3), True),     # RGB stem: input channels not a multiple of 4
    (8, 8, 1, (3, 3), True),      # < 16 output channels: no ConvSym kernel
    (16, 4, 1, (3, 3), True),     # too short a dot product (K = 36)
    (16, 8, 1, (3, 3), False),
    (8, 16, 1, (3, 3), False),    # the generic kernel pays on 16 inputs (0.82x)
    (8, 32, 1, (3, 3), False),
    (16, 4, 1, (1, 1), False),
    (8, 32, 1, (1, 1), True),
    (32, 18, 1, (3, 3), False),   # odd inputs: the generic kernel pays from 16 (0.36x; as AVX2 0.54x)
    (38, 19, 1, (3, 3), False),
    (19, 9, 1, (3, 3), True),     # ... but not below (2.1x; as AVX2 1.45x)
    (32, 18, 1, (1, 1), True),    # 1x1 on odd inputs: 1.2x (as AVX2 2.1x)
    (24, 24, 24, (3, 3), True),   # depthwise below 96 channels: 4.3-6x slower as INT8
    (64, 64, 64, (3, 3), True),
    (144, 144, 144, (3, 3), False),   # wide depthwise: no consistent verdict, left integer
    (32, 64, 2, (3, 3), False),   # grouped (not depthwise): not measured, left integer
])
def test_integer_conv_slow_follows_the_measured_table(out_ch, in_ch, groups, kernel, slow):
    assert integer_conv_slow(out_ch, in_ch, groups, kernel) is slow


class NarrowThenWide(nn.Module):
    """A stem and a block at 8 channels (slower as INT8), then 16- and 32-channel blocks."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = BasicBlock(8, 8, 1)
        self.layer2 = BasicBlock(8, 16, 2)
        self.layer3 = BasicBlock(16, 32, 2)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


def test_float_lead_stays_float_through_qat_export_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = perturb_bn(NarrowThenWide())
    shape = (1, 16, 16)
    assert quantize_model(model, QuantSpec(float_convs="none"), shape).float_layers == []
    q = quantize_model(model, QuantSpec(), shape)
    # the lead: stem and layer1 (8 channels); layer2 takes an 8-channel input with 16 outputs
    # (integer pays), and so does its 1x1 shortcut; nothing after the lead is float
    assert q.float_layers == ["conv1", "layer1.conv1", "layer1.conv2"]
    fq_inputs = {n.args[0].name for n in q.gm.graph.nodes
                 if n.op == "call_module" and "activation_post_process" in n.target}
    assert "x" not in fq_inputs   # the float lead takes the float input: no input quantizer
    calibrate(q, [images(shape, 32, 1)])
    q.train()
    with as_fit_trains(q):
        F.cross_entropy(q(images(shape, 16, 2)), torch.arange(16) % 10).backward()
    set_qat_phase(q, observers=False, bn_stats=False)
    q.eval()
    path = tmp_path / "lead-int8.onnx"
    export_onnx(to_int8_module(q), path, input_shape=shape, mean=[0.5], std=[0.25], metadata={})
    ops = check_int8_kernels(path, float_convs=len(q.float_layers))
    from compress.ort_runtime import ort_op_counts

    counts = ort_op_counts(path)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert ops["QLinearConv"] == convs - 3
    assert sum(n for op, n in counts.items() if "Conv" in op and not op.startswith("QLinear")) == 3
    assert ops["QLinearAdd"] == 2 and counts.get("Add", 0) + counts.get("Sum", 0) <= 1   # layer1's add is float
    assert check_int8_agreement(path, q, images(shape, 256, 8)) >= 0.99
    assert slow_integer_convs(path) == 0
    q0 = quantize_model(model, QuantSpec(float_convs="none"), shape)
    calibrate(q0, [images(shape, 32, 1)])
    export_onnx(to_int8_module(q0.eval()), tmp_path / "all.onnx", input_shape=shape, mean=[0.5], std=[0.25],
                metadata={})
    assert slow_integer_convs(tmp_path / "all.onnx") == 3   # the stem (1 -> 8) and layer1's 8 -> 8
    # rebuilt from its spec, the checkpoint has the same graph and loads strictly
    spec = {"arch": "t", "quant": {"weight_bits": 7, "act_bits": 8, "backend": "pt2e", "float_convs": "auto",
                                   "float_layers": q.float_layers}}
    save_checkpoint(tmp_path / "q.pt", spec, q)
    again = quantize_model(model, QuantSpec(float_convs="auto", float_layers=q.float_layers), shape)
    again.load_state_dict(torch.load(tmp_path / "q.pt", weights_only=True)["state_dict"])
    assert again.float_layers == q.float_layers


def _calibrated_resnet8(widths, shape=(3, 16, 16)):
    """A ResNet-8 at `widths` (BN perturbed), prepared for QAT by the rule and calibrated."""
    torch.manual_seed(0)
    q = quantize_model(perturb_bn(CifarResNet(8, widths)), QuantSpec(), shape)
    calibrate(q, [images(shape, 32, 1)])
    return q.eval()


def test_float_lead_stops_at_the_stem_of_a_resnet_pruned_to_odd_widths(tmp_path):
    # widths as pruning leaves them without round_to: 3x3 convs on 18 and 38 inputs pay as
    # INT8 (generic kernel), so only the RGB stem stays float; a ResNet-20 at [18, 18, 38, 76]
    # measured 0.42x its FP32 twin natively and 0.67x as AVX2 (batch 64) with this lead,
    # 0.90x / 0.95x with the 15-conv lead of a rule that called every odd-input conv slow
    shape = (3, 16, 16)
    q = _calibrated_resnet8([18, 18, 38, 76], shape)
    assert q.float_layers == ["conv1"]
    path = tmp_path / "odd-int8.onnx"
    export_onnx(to_int8_module(q), path, input_shape=shape, mean=[0.5] * 3, std=[0.25] * 3, metadata={})
    check_int8_kernels(path, float_convs=1)
    # left integer and counted slow: the 1x1 shortcuts on 18 and 38 inputs
    assert slow_integer_convs(path) == 2


def test_a_resnets_float_stem_hands_its_output_to_the_integer_body_in_nhwc(tmp_path, monkeypatch):
    # the stem's ReLU'd output quantized in NCHW kept the first stage's identity-shortcut
    # adds in NCHW in onnxruntime, with a uint8 Transpose into and out of every block (8 in a
    # ResNet-20 at [16, 16, 32, 64]; 0.72x -> 0.68x its FP32 twin at batch 64 as AVX2, 0.61x
    # -> 0.54x natively)
    import numpy as np

    import compress.onnx_io as oio
    import compress.ort_runtime as ort_rt

    shape = (3, 16, 16)
    q = _calibrated_resnet8([16, 16, 32, 64], shape)
    assert q.float_layers == ["conv1"]
    kw = dict(input_shape=shape, mean=[0.5] * 3, std=[0.25] * 3, metadata={})
    export_onnx(to_int8_module(q), tmp_path / "int8.onnx", **kw)
    monkeypatch.setattr(oio, "_nhwc_handoff", lambda proto: 0)
    export_onnx(to_int8_module(q), tmp_path / "before.onnx", **kw)
    after, before = (ort_rt.ort_op_counts(tmp_path / f) for f in ("int8.onnx", "before.onnx"))
    assert after["Transpose"] == 1 and after["ReorderOutput"] == 1, after
    assert before["Transpose"] > 2, before
    check_int8_kernels(tmp_path / "int8.onnx", float_convs=1)
    x = np.random.default_rng(0).random((8, *shape), dtype=np.float32)
    np.testing.assert_array_equal(ort_rt.ort_logits(tmp_path / "int8.onnx", x),
                                  ort_rt.ort_logits(tmp_path / "before.onnx", x))


class NarrowInverted(nn.Module):
    """A MobileNetV2-like narrow start: stem, 8-channel depthwise, projection to 4, expansion
    to 24 (integer-worthy alone), 24-channel depthwise, projection to 8; then wide 3x3 convs."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()

        def cbr(i, o, k, groups=1):
            return [nn.Conv2d(i, o, k, 1, k // 2, groups=groups, bias=False), nn.BatchNorm2d(o), nn.ReLU6()]

        self.lead = nn.Sequential(*cbr(in_channels, 8, 3), *cbr(8, 8, 3, 8), *cbr(8, 4, 1),
                                  *cbr(4, 24, 1), *cbr(24, 24, 3, 24), *cbr(24, 8, 1))
        self.body = nn.Sequential(*cbr(8, 32, 3), *cbr(32, 32, 3))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.body(self.lead(x)).mean((2, 3)))


def test_float_lead_passes_an_integer_worthy_conv_to_reach_slow_ones_behind_it(tmp_path):
    torch.manual_seed(0)
    model = perturb_bn(NarrowInverted())
    shape = (1, 12, 12)
    q = quantize_model(model, QuantSpec(), shape)
    # the 4 -> 24 expansion alone would pay as INT8, but keeping it float also keeps the two
    # slow convs behind it float (one conv on the wrong side instead of two)
    assert q.float_layers == [f"lead.{i}" for i in (0, 3, 6, 9, 12, 15)]
    calibrate(q, [images(shape, 32, 1)])
    path = tmp_path / "lead-int8.onnx"
    export_onnx(to_int8_module(q.eval()), path, input_shape=shape, mean=[0.5], std=[0.25], metadata={})
    ops = check_int8_kernels(path, float_convs=6)
    assert ops["QLinearConv"] == 2 and slow_integer_convs(path) == 0
    assert check_int8_agreement(path, q, images(shape, 256, 8)) >= 0.99
    q0 = quantize_model(model, QuantSpec(float_convs="none"), shape)
    calibrate(q0, [images(shape, 32, 1)])
    export_onnx(to_int8_module(q0.eval()), tmp_path / "all.onnx", input_shape=shape, mean=[0.5], std=[0.25],
                metadata={})
    assert slow_integer_convs(tmp_path / "all.onnx") == 5   # all but the expansion
    # a checkpoint rebuilds the lead it was trained with, whatever the rule says now
    stored = QuantSpec(float_layers=["lead.0"])
    again = quantize_model(model, stored, shape)
    assert again.float_layers == ["lead.0"] and again.spec.float_layers == ("lead.0",)
    with pytest.raises(CompressError, match=r"^float_layers: body\.0 cannot stay float"):
        quantize_model(model, QuantSpec(float_layers=["lead.0", "body.0"]), shape)


@pytest.mark.parametrize("width, pool, lead", [(32, nn.MaxPool2d(3, 2, 1), ["0"]), (24, nn.MaxPool2d(3, 2, 1), []),
                                               (24, nn.MaxPool2d(2, 2), ["0"])])
def test_float_lead_ends_at_a_padded_max_pool_only_where_the_export_hands_it_over(width, pool, lead):
    """onnxruntime would move the lead's quantization above a ResNet's 3x3/2 padded pool and run
    it as a slow uint8 NCHW MaxPool, unless the export hands the pool's output over in NHWC,
    which it does over 16k channels: a 24-channel stem before such a pool stays integer; a
    VGG's 2x2/2 pool is fine at any width."""
    model = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1), nn.ReLU(), pool, nn.Conv2d(width, 32, 3, 1, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    assert quantize_model(model, QuantSpec(backend="pt2e"), (3, 16, 16)).float_layers == lead


def test_a_float_stem_before_a_padded_pool_hands_over_in_nhwc(tmp_path, monkeypatch):
    """A ResNet stem (1 input channel: slow as INT8) stays float; the export runs its ReLU after
    the padded max-pool (the same values) so that the pool stays a float NCHWc op and the
    integer part starts in NHWC: no uint8 MaxPool, no uint8 Transpose, the same logits."""
    import numpy as np

    import compress.onnx_io as oio
    import compress.ort_runtime as ort_rt

    torch.manual_seed(0)
    # down to a 1x1 map at the end, where the export also cuts the last conv's kernel: the
    # hand-off must still see the graph's shapes after that rewrite
    model = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                          nn.Conv2d(32, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),     # 4x4
                          nn.Conv2d(32, 32, 3, 4, 1), nn.BatchNorm2d(32), nn.ReLU(),     # 1x1, cut to 2x2
                          nn.Conv2d(32, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(),     # 1x1, cut to 1x1
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    model.train()
    with torch.no_grad():
        model(torch.rand(64, 1, 16, 16))
    q = quantize_model(model.eval(), QuantSpec(backend="pt2e"), (1, 16, 16))
    assert q.float_layers == ["0"]
    x = torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    calibrate(q, [(x - 0.5) / 0.25])
    kw = dict(input_shape=(1, 16, 16), mean=[0.5], std=[0.25], metadata={})
    export_onnx(to_int8_module(q), tmp_path / "int8.onnx", **kw)
    monkeypatch.setattr(oio, "_relu_after_pool", lambda g: 0)
    export_onnx(to_int8_module(q), tmp_path / "before.onnx", **kw)
    import onnx

    kernels = [[a.ints for a in n.attribute if a.name == "kernel_shape"][0]
               for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node if n.op_type == "Conv"]
    assert kernels[1:] == [[3, 3], [2, 2], [1, 1]], kernels    # 4x4 -> 1x1 at stride 4 reads 2x2 of it
    ops = ort_rt._optimized_op_types(str(tmp_path / "int8.onnx"))
    first, last = ops.index("QuantizeLinear"), len(ops) - 1 - ops[::-1].index("QLinearConv")
    # float stem and pool, NHWC from the reorder on, to the last integer conv
    assert "MaxPool" in ops[:first] and "MaxPool" not in ops[first:] and "Transpose" not in ops[:last], ops
    before = ort_rt._optimized_op_types(str(tmp_path / "before.onnx"))
    assert before.index("MaxPool") > before.index("QuantizeLinear") and "Transpose" in before[:before.index("QLinearConv")]
    images = x.numpy()
    np.testing.assert_array_equal(ort_rt.ort_logits(tmp_path / "int8.onnx", images),
                                  ort_rt.ort_logits(tmp_path / "before.onnx", images))
    assert oio.check_int8_agreement(tmp_path / "int8.onnx", q, x, min_agreement=1.0) == 1.0


def test_check_int8_kernels_refuses_a_float_graph(tmp_path):
    path = tmp_path / "fp32.onnx"
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    model(torch.zeros(1, 1, 8, 8))
    export_onnx(model, path, input_shape=(1, 8, 8), mean=[0.5], std=[0.25], metadata={})
    with pytest.raises(CompressError, match="convolution.*in float"):
        check_int8_kernels(path)


@pytest.fixture
def registered():
    """Registers test architectures under temporary names; removed afterwards."""
    added = []

    def add(name, factory):
        MODELS.register(name)(factory)
        added.append(name)

    yield add
    for name in added:
        MODELS.pop(name, None)


def test_checkpoint_rebuilds_bit_exactly(case, registered, tmp_path):
    factory = CASES[case["name"]][0]
    registered(f"_test_{case['name']}", lambda **kw: factory())
    q = case["q"]
    spec = {"arch": f"_test_{case['name']}", "args": {}, "shapes": layer_shapes(case["float"]),
            "quant": {"weight_bits": 7, "act_bits": 8, "backend": "pt2e", "input_shape": list(case["shape"])}}
    save_checkpoint(tmp_path / "model.pt", spec, q)
    _, rebuilt = load_checkpoint(tmp_path / "model.pt")   # torch.load(weights_only=True), strict
    assert isinstance(rebuilt, PT2EModel)
    assert bool(rebuilt.bn_frozen) and not bool(rebuilt.observing)
    x = images(case["shape"], 16, 9)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), q.eval()(x))
        assert torch.equal(to_int8_module(rebuilt)(x), case["int8"](x))


# ---- validate ------------------------------------------------------------------------------


def _recipe(tiny_recipe_dict, fmnist_root, stages):
    d = dict(tiny_recipe_dict)
    d["data"] = {**d["data"], "root": str(fmnist_root)}
    d["models"] = {"teacher": {"arch": "_test_arch"}}
    d["stages"] = [{"name": "teacher", "kind": "train", "model": "teacher", "epochs": 1}, *stages]
    return parse_recipe(d)


@pytest.mark.parametrize("stages, match", [
    ([{"name": "qat", "kind": "qat", "from": "teacher", "epochs": 1}],
     r"^stages\.qat: cannot quantize the model \(Branchy\): torch\.export cannot capture it"),
    ([{"name": "export", "kind": "export", "models": [{"model": "teacher", "format": "onnx-int8"}]}],
     r"^stages\.export\.models\[0\]: onnx-int8 of stage 'teacher': cannot quantize the model \(Branchy\)"),
])
def test_validate_refuses_uncapturable_model_in_seconds(tiny_recipe_dict, fmnist_root, registered,
                                                         stages, match, capfd):
    registered("_test_arch", Branchy)
    recipe = _recipe(tiny_recipe_dict, fmnist_root, stages)
    t0 = time.perf_counter()
    with pytest.raises(CompressError, match=match) as e:
        validate_recipe(recipe)
    assert time.perf_counter() - t0 < 30
    assert "\n" not in str(e.value)
    out = capfd.readouterr()
    assert "def forward" not in out.err + out.out   # the exporter's graph dump stays quiet


def test_validate_refuses_feature_taps_on_a_pt2e_qat_stage(tiny_recipe_dict, fmnist_root, registered):
    registered("_test_arch", TinyResNet)
    recipe = _recipe(tiny_recipe_dict, fmnist_root, [
        {"name": "qat", "kind": "qat", "from": "teacher", "teacher": "teacher", "epochs": 1,
         "loss": [{"term": "fitnet", "student_layer": "layer2", "teacher_layer": "layer2"}]}])
    with pytest.raises(CompressError, match=r"stages\.qat\.loss\[0\]: term 'fitnet' taps the student's layers"):
        validate_recipe(recipe)


def test_validate_refuses_progressive_resize_on_a_pt2e_qat_stage(tiny_recipe_dict, fmnist_root, registered):
    registered("_test_arch", TinyResNet)
    qat = {"name": "qat", "kind": "qat", "from": "teacher", "epochs": 2, "progressive_resize": [20]}
    with pytest.raises(CompressError, match=r"^stages\[1\]\.progressive_resize: this stage's model is a graph "
                                            r"captured for 28x28 images \(qat, pt2e backend\)"):
        validate_recipe(_recipe(tiny_recipe_dict, fmnist_root, [qat]))
    # the float model the same recipe trains first takes the smaller images
    teacher = {"name": "t2", "kind": "train", "from": "teacher", "epochs": 2, "progressive_resize": [20]}
    assert validate_recipe(_recipe(tiny_recipe_dict, fmnist_root, [teacher]))


def test_cached_pattern_graphs_prepare_the_same_graph():
    from compress.quant import pt2e

    model = TinyResNet()
    pt2e._PATTERNS.clear()
    fresh = quantize_model(model, QuantSpec(), (1, 16, 16))      # captures every pattern
    assert pt2e._PATTERNS
    pt2e._PREPARED.clear()                                       # the graph itself is captured again
    t0 = time.perf_counter()
    cached = quantize_model(model, QuantSpec(), (1, 16, 16))     # copies of the stored captures
    assert time.perf_counter() - t0 < 10
    assert cached.gm.code == fresh.gm.code
    x = images((1, 16, 16), 8, 10)
    for mode in (True, False):
        assert torch.equal(fresh.train(mode)(x), cached.train(mode)(x))


def test_an_architecture_prepared_before_takes_new_weights_without_a_capture(monkeypatch):
    """A second model of an architecture prepared before in this process (validation's
    skeleton, then the trained model, then its checkpoint) is not captured again: a copy of
    that preparation takes its weights, and computes what a fresh preparation computes, bit
    for bit, through calibration and a training step. Anything capture reads that differs
    (widths, input shape, scheme, a non-persistent buffer's values, a hook) prepares anew."""
    from compress.quant import pt2e

    captures = []
    real_capture = pt2e.capture
    monkeypatch.setattr(pt2e, "capture", lambda m, s: captures.append(type(m).__name__) or real_capture(m, s))
    shape, spec = (1, 16, 16), QuantSpec(float_convs="none")
    torch.manual_seed(0)
    a, b = TinyResNet(), perturb_bn(TinyResNet())            # other weights and BN statistics
    pt2e._PREPARED.clear()
    fresh = quantize_model(b, spec, shape)
    pt2e._PREPARED.clear()
    quantize_model(a, spec, shape)
    assert len(captures) == 2
    reused = quantize_model(b, spec, shape)
    assert len(captures) == 2                                 # no capture, no preparation
    assert reused.gm.code == fresh.gm.code
    x, y = images(shape, 16, 4), torch.arange(16) % 10
    for q in (fresh, reused):
        calibrate(q, [x])
        opt = torch.optim.SGD(q.parameters(), lr=0.1)
        F.cross_entropy(q.train()(x), y).backward()
        opt.step()
    sf, sr = fresh.state_dict(), reused.state_dict()
    assert sf.keys() == sr.keys() and all(torch.equal(sf[k], sr[k]) for k in sf)
    with torch.no_grad():
        for mode in (True, False):
            assert torch.equal(fresh.train(mode)(x), reused.train(mode)(x))

    hooked = TinyResNet()
    hooked.fc.register_forward_hook(lambda m, i, o: None)
    buffered = TinyResNet()
    buffered.register_buffer("offset", torch.ones(1), persistent=False)
    buffered_too = TinyResNet()
    buffered_too.register_buffer("offset", torch.zeros(1), persistent=False)
    n = len(captures)
    for model, s, sh in [(TinyResNet(width=4), spec, shape), (TinyResNet(), spec, (1, 20, 20)),
                         (TinyResNet(), QuantSpec(float_convs="none", weight_bits=8), shape),
                         (buffered, spec, shape), (buffered_too, spec, shape), (hooked, spec, shape)]:
        quantize_model(model, s, sh)
        n += 1
        assert len(captures) == n
    assert pt2e._prepared_key(hooked, spec, shape) == (None, None)     # never stored either


@pytest.mark.slow
@pytest.mark.parametrize("float_convs, arch, convs, adds", [("none", TinyResNet, 6, 2),
                                                            ("auto", NarrowThenWide, 9, 3)])
def test_resnet_recipe_through_qat_and_int8_export(float_convs, arch, convs, adds, tiny_recipe_dict,
                                                   registered, tmp_path):
    """train -> prune -> distill -> qat -> export on a residual net, then the export again
    from the stored (rebuilt) qat checkpoint; with `float_convs: auto` the pruned net's
    narrow lead (the stem and layer1 at 4 channels, ...) stays float through all of it."""
    registered("_test_arch", arch)
    d = dict(tiny_recipe_dict)
    d["models"] = {"teacher": {"arch": "_test_arch"}}
    d["stages"][3]["float_convs"] = float_convs
    d["stages"][-1] = {"name": "export", "kind": "export", "latency_runs": 2, "models": [
        {"model": "teacher", "format": "onnx-fp32"}, {"model": "qat", "format": "onnx-int8"}]}
    rep = run_recipe(parse_recipe(d), workdir=tmp_path, device="cpu")
    st = {s["name"]: s for s in rep["stages"]}
    assert st["prune"]["macs"] < 0.5 * st["teacher"]["macs"]
    ex = {e["model"]: e for e in rep["exports"]}
    assert ex["qat"]["check"]["top1_agreement"] >= 0.99
    ops = ex["qat"]["check"]["ort_int8_ops"]
    lead = ex["qat"]["check"].get("float_convs", [])
    if float_convs == "none":
        assert lead == [] and ops["QLinearAdd"] == adds
    else:   # a lead from the input; layer3 (16 -> 32 channels once pruned) is integer
        assert lead[0] == "conv1" and not any(name.startswith("layer3") for name in lead)
        assert 0 < ops["QLinearAdd"] < adds
    assert ops["QLinearConv"] + len(lead) == convs and ops["Add"] == 0
    d["stages"][-1]["latency_runs"] = 3      # the export runs again, qat is loaded from disk
    again = run_recipe(parse_recipe(d), workdir=tmp_path, device="cpu")
    assert {s["name"]: s["reused"] for s in again["stages"]} == {
        "teacher": True, "prune": True, "distill": True, "qat": True, "export": False}
    assert {e["model"]: e["top1"] for e in again["exports"]} == {e["model"]: e["top1"] for e in rep["exports"]}


def test_unfreezing_bn_restores_batch_statistics_and_int8_needs_calibration():
    q = quantize_model(TinyResNet(), QuantSpec(), (1, 16, 16))
    with pytest.raises(CompressError, match="never observed data"):
        to_int8_module(q)
    bn_training = lambda: [n.args[5] for n in q.gm.graph.nodes if n.target == torch.ops.aten.batch_norm.default]
    q.train()
    assert all(bn_training())
    set_qat_phase(q, observers=True, bn_stats=False)
    assert not any(bn_training())
    q.eval()
    q.train()          # moving to train re-enables batch statistics; the wrapper re-freezes
    assert not any(bn_training())
    set_qat_phase(q, observers=True, bn_stats=True)
    assert all(bn_training())


class _Noisy(nn.Module):
    """A residual block with stochastic depth (torchvision's, or a noise layer of its own)."""

    def __init__(self, own_noise=False):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(8)
        self.drop = torchvision.ops.StochasticDepth(0.5, "row")
        self.own_noise = own_noise
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = x + self.drop(F.relu(self.bn2(self.conv2(x))))
        if self.own_noise and self.training:
            x = x + 0.1 * torch.randn_like(x)
        return self.fc(x.mean((2, 3)))


def test_stochastic_depth_is_off_for_qat_and_never_reaches_eval_or_the_int8_file(tmp_path):
    """A training-mode capture fixed torchvision's StochasticDepth into the graph, where no
    mode switch removes it: evaluation and the exported INT8 file dropped residual branches at
    random (torchvision's efficientnet_b0: 9 random masks in its file). It is switched off
    for QAT; a noise layer compress does not know is refused in one line."""
    import onnx

    from compress.quant.pt2e import random_nodes

    torch.manual_seed(0)
    model = _Noisy()
    q = quantize_model(model, QuantSpec(backend="pt2e"), (1, 8, 8))
    assert model.drop.p == 0.5                                  # the user's model is left alone
    assert random_nodes(q.gm) == []
    x = torch.rand(16, 1, 8, 8)
    q.train()
    calibrate(q, [x])
    q.eval()
    with torch.no_grad():
        assert torch.equal(q(x), q(x))                          # evaluation is deterministic
    export_onnx(to_int8_module(q), tmp_path / "int8.onnx", input_shape=(1, 8, 8), mean=[0.5], std=[0.25],
                metadata={})
    ops = {n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert not ops & {"RandomUniformLike", "RandomUniform", "Bernoulli", "RandomNormalLike"}, ops
    # without the switch the graph would hold the random mask
    gm = torch.export.export(copy.deepcopy(model).train(), (torch.rand(2, 1, 8, 8),)).module()
    assert random_nodes(gm)
    with pytest.raises(CompressError, match=r"^cannot quantize the model \(_Noisy\): in training mode it draws "
                                            r"random numbers \(randn_like"):
        quantize_model(_Noisy(own_noise=True), QuantSpec(backend="pt2e"), (1, 8, 8))


class _SiLUNet(nn.Module):
    """SiLU convs and a squeeze-excitation gate (torchvision's, sigmoid-gated), as in
    EfficientNet."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 16, 3, 1, 1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32)
        self.se = torchvision.ops.SqueezeExcitation(32, 8, activation=nn.SiLU)
        self.c3, self.b3 = nn.Conv2d(32, 32, 3, 1, 1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.silu(self.b1(self.c1(x)))
        x = self.se(F.silu(self.b2(self.c2(x))))
        x = F.silu(self.b3(self.c3(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_silu_and_sigmoid_gates_run_as_integer_kernels(tmp_path, registered):
    """SiLU split into x * sigmoid(x) and quantized apart (and the squeeze-excitation gate's
    product): onnxruntime runs QLinearSigmoid and QLinearMul, with no float op left inside
    the integer part, where before each ran in float between a DequantizeLinear and a
    QuantizeLinear; the INT8 file agrees with the fake-quant model. Checkpoints from before
    the option rebuild as they were trained (float sigmoid)."""
    from compress.ort_runtime import float_islands, ort_op_counts
    from compress.quant.pt2e import capture, split_silu

    torch.manual_seed(0)
    model = _SiLUNet().eval()
    gm = capture(model, (1, 16, 16))
    x = torch.rand(8, 1, 16, 16)
    before = gm(x)
    assert split_silu(gm) == 4                              # 3 in the body, 1 in the gate's MLP
    assert torch.allclose(gm(x), before, atol=1e-6)        # the split computes the same values
    ops, files = {}, {}
    for flag in (False, True):
        q = quantize_model(model, QuantSpec(backend="pt2e", float_convs="none", integer_sigmoid=flag), (1, 16, 16))
        calibrate(q, [torch.rand(32, 1, 16, 16) for _ in range(4)])
        q.eval()
        files[flag] = tmp_path / f"int8_{flag}.onnx"
        export_onnx(to_int8_module(q), files[flag], input_shape=(1, 16, 16), mean=[0.5], std=[0.25], metadata={})
        ops[flag] = ort_op_counts(files[flag])
        assert check_int8_agreement(files[flag], q, torch.rand(64, 1, 16, 16), min_agreement=0.98) >= 0.98
    assert ops[True].get("QLinearSigmoid") == 5 and ops[True].get("QLinearMul") == 5    # 4 SiLU + the gate
    assert "Sigmoid" not in ops[True] and "Mul" not in ops[True] and float_islands(files[True]) == {}
    assert float_islands(files[False]) == {"Sigmoid": 5, "Mul": 5}
    assert ops[True]["QuantizeLinear"] < ops[False]["QuantizeLinear"]
    # a qat stage turns it off with `integer_sigmoid: false`
    from compress.stages.qat import QATStage

    assert QATStage(name="q", **{"from": "d"}).quant.integer_sigmoid
    assert not QATStage(name="q", **{"from": "d"}, integer_sigmoid=False).quant.integer_sigmoid
    # a checkpoint whose spec predates integer_sigmoid rebuilds with float sigmoids
    registered("_test_silu", _SiLUNet)
    q = quantize_model(model, QuantSpec(backend="pt2e", float_convs="none", integer_sigmoid=False), (1, 16, 16))
    spec = {"arch": "_test_silu", "args": {}, "shapes": layer_shapes(model),
            "quant": {"weight_bits": 7, "act_bits": 8, "backend": "pt2e", "input_shape": [1, 16, 16]}}
    save_checkpoint(tmp_path / "old.pt", spec, q)
    _, rebuilt = load_checkpoint(tmp_path / "old.pt")
    assert not rebuilt.spec.integer_sigmoid
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), q.eval()(x))


def test_activation_fake_quantization_is_torchaos_bit_for_bit():
    """The activation quantizers run our vectorized per-tensor fake quantization on the CPU;
    a training step gives the outputs, input gradients, observer ranges and BN statistics
    that torchao's own FakeQuantize.forward gives."""
    import types

    from torchao.quantization.pt2e import FakeQuantize

    torch.manual_seed(0)
    shape = (1, 16, 16)
    q = quantize_model(perturb_bn(NarrowThenWide()), QuantSpec(float_convs="none"), shape)
    calibrate(q, [images(shape, 32, 1)])
    acts = [m for m in q.fake_quants() if not m.is_per_channel]
    assert acts and all(type(m) is not FakeQuantize and isinstance(m, FakeQuantize) for m in acts)
    runs = []
    for ours in (True, False):
        qq = copy.deepcopy(q).train()
        if not ours:
            for m in qq.fake_quants():
                m.forward = types.MethodType(FakeQuantize.forward, m)
        x = images(shape, 16, 2).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        with as_fit_trains(qq):
            y = qq(x)
            F.cross_entropy(y, torch.arange(16) % 10).backward()
        runs.append((y.detach(), x.grad, qq.state_dict()))
    (y1, g1, s1), (y2, g2, s2) = runs
    assert torch.equal(y1, y2) and torch.equal(g1, g2) and g1.abs().sum() > 0
    assert all(torch.equal(s1[k], s2[k]) for k in s1 if isinstance(s1[k], torch.Tensor))


def test_an_activation_observer_reads_a_channels_last_map_without_copying_it():
    """``torch.aminmax`` copies a channels_last tensor to NCHW before reducing it (ten times the
    reduction's own time on a 64x144x28x28 map on a 2-core AVX2 CPU): the activation
    quantizers hand their observers the same elements as a contiguous view, and the range
    they record is the map's."""
    from torch.profiler import profile

    q = quantize_model(NarrowThenWide(), QuantSpec(float_convs="none"), (1, 16, 16))
    fq = next(m for m in q.fake_quants() if not m.is_per_channel)
    fq.enable_observer(True)
    x = torch.randn(4, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    with profile() as prof:
        y = fq(x)
    ops = {e.name for e in prof.events()}
    assert "aten::aminmax" in ops and not ops & {"aten::clone", "aten::contiguous"}, sorted(ops)
    obs = fq.activation_post_process
    assert obs.min_val == x.min() and obs.max_val == x.max()
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_training_multiplies_by_the_bn_factors_reciprocal_and_eval_divides_as_torchao(monkeypatch):
    """In training mode each simulated conv-BN pair multiplies the conv's output by the
    reciprocal of the BN factor (a cheaper backward), within float rounding of torchao's
    division; in eval mode, which the conversion and the INT8 file follow, the graph divides
    again and its logits are torchao's bit for bit."""
    from torchao.quantization import pt2e as ao

    from compress.quant import pt2e

    torch.manual_seed(0)
    shape = (1, 16, 16)
    q = quantize_model(perturb_bn(NarrowThenWide()), QuantSpec(float_convs="none"), shape)
    calibrate(q, [images(shape, 32, 1)])
    monkeypatch.setattr(pt2e, "conv_bn_scaling", lambda gm, product: 0)   # torchao's graph as prepared
    pt2e._PREPARED.clear()                                                 # prepared again, not reused
    ref = quantize_model(perturb_bn(NarrowThenWide()), QuantSpec(float_convs="none"), shape)
    monkeypatch.undo()
    ref.load_state_dict(q.state_dict())

    def scaling(m):
        nodes = [n for n in m.gm.graph.nodes if n.op == "call_function"]
        divs = sum(n.target == torch.ops.aten.div.Tensor and n.args[0].target in pt2e._CONVS for n in nodes)
        return divs, sum(n.target == torch.ops.aten.reciprocal.default for n in nodes)

    pairs = sum(isinstance(m, nn.BatchNorm2d) for m in NarrowThenWide().modules())
    x = images(shape, 16, 2)
    with torch.no_grad():
        for mode in (True, False):
            a, b = copy.deepcopy(q).train(mode), copy.deepcopy(ref)
            if mode != b._gm_training:   # the reference moves as torchao moves it, nothing more
                (ao.move_exported_model_to_train if mode else ao.move_exported_model_to_eval)(b.gm)
            b.training = mode
            b._apply_phase()             # observers as in `a`: off in eval mode
            assert scaling(a) == ((0, pairs) if mode else (pairs, 0)) and scaling(b) == (pairs, 0)
            ya, yb = a(x), b.gm(x)
            if mode:
                torch.testing.assert_close(ya, yb, atol=1e-4, rtol=0)
            else:
                assert torch.equal(ya, yb)

class _InPlace(nn.Module):
    def forward(self, x):
        y = (x * 2).relu_()            # nothing else reads x * 2: may become relu
        z = x + 1
        z[:, :1].clamp_(max=0.5)       # a view of z: must stay in place (z is read below)
        return nn.functional.hardtanh(y, 0.0, 6.0, inplace=True) + z


def test_in_place_ops_become_out_of_place_only_where_nothing_sees_the_difference():
    """A prepared graph runs ReLU6 as ``hardtanh`` (an in-place ``hardtanh_`` makes autograd copy
    its input); an in-place op on a view of a tensor read later stays in place."""
    from compress.quant.pt2e import _out_of_place, capture

    gm = capture(_InPlace(), (2, 3, 3))
    x = torch.randn(4, 2, 3, 3)
    before = gm(x.clone())
    def in_place(g):
        return sorted(n.target._schema.name for n in g.graph.nodes
                      if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.name.endswith("_"))

    assert in_place(gm) == ["aten::clamp_", "aten::hardtanh_", "aten::relu_"]
    assert _out_of_place(gm) == 2
    assert in_place(gm) == ["aten::clamp_"]
    assert torch.equal(gm(x.clone()), before)
    relu6 = nn.Sequential(nn.Conv2d(1, 16, 3), nn.BatchNorm2d(16), nn.ReLU6(inplace=True), nn.Flatten(), nn.LazyLinear(10))
    relu6(torch.zeros(1, 1, 8, 8))
    q = quantize_model(relu6, QuantSpec(float_convs="none"), (1, 8, 8))
    assert not any(name in ("aten::hardtanh_", "aten::relu_") for name in in_place(q.gm))
    assert any(n.target == torch.ops.aten.hardtanh.default for n in q.gm.graph.nodes)
