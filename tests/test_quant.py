"""Fake-quant QAT modules and the INT8 module (compress/quant.py)."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import CompressError
from compress.models import VGG, build_model
from compress.quant import (ActQuant, Int8Conv2d, Int8Linear, QConv2d, QLinear, QuantSpec,
                            calibrate, is_quantized, quantize_model, set_qat_phase,
                            to_int8_module)
from compress.quant.eager import Int8Act

CFG = [8, "M", 16]


def tiny_vgg(seed=0):
    torch.manual_seed(seed)
    model = VGG(CFG, in_channels=1, num_classes=10)
    # Non-trivial BN statistics and affine params, so folding is actually exercised.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


def images(n=32, seed=1):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def qat_steps(qmodel, steps=3, seed=2):
    """A few SGD steps on random labels: moves weights, BN stats and observers."""
    opt = torch.optim.SGD(qmodel.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    qmodel.train()
    for _ in range(steps):
        x = torch.randn(32, 1, 16, 16, generator=g)
        y = torch.randint(0, 10, (32,), generator=g)
        opt.zero_grad()
        F.cross_entropy(qmodel(x), y).backward()
        opt.step()


def calibrated(spec=QuantSpec(), seed=0):
    q = quantize_model(tiny_vgg(seed), spec)
    qat_steps(q)
    set_qat_phase(q, observers=False, bn_stats=False)
    return q.eval()


def qconvs(q):
    return [m for m in q.modules() if isinstance(m, QConv2d)]


# ---- structure ---------------------------------------------------------------------------


def test_structure_fuses_and_keeps_names():
    model = tiny_vgg()
    q = quantize_model(model, QuantSpec())
    assert is_quantized(q) and not is_quantized(model)
    assert list(dict(q.named_children())) == ["input_quant", "features", "pool", "flatten",
                                              "classifier"]
    # conv+bn+relu groups keep the name of their conv; max-pool passes through
    assert [(n, type(m).__name__) for n, m in q.features.named_children()] == [
        ("0", "QConv2d"), ("3", "MaxPool2d"), ("4", "QConv2d")]
    assert all(c.relu and c.bn is not None for c in qconvs(q))
    assert isinstance(q.classifier, QLinear) and not q.classifier.relu
    assert isinstance(q.pool.output_quant, ActQuant)  # averaging leaves the grid
    # the conv's bias scale comes from the quantizer that feeds it
    assert q.features[0]._input[0] is q.input_quant
    assert q.get_submodule("features.4")._input[0] is q.features[0].output_quant
    assert q.classifier._input[0] is q.pool.output_quant


def test_input_model_untouched():
    model = tiny_vgg()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_model(model, QuantSpec())
    qat_steps(q)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.features[0]) is nn.Conv2d


def test_linear_relu_fused_and_dropout_passes():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(8, 3))
    q = quantize_model(model, QuantSpec())
    assert [type(m).__name__ for m in q] == ["ActQuant", "Flatten", "QLinear", "Dropout",
                                              "QLinear"]
    assert q[2].relu and not q[4].relu
    assert q[4]._input[0] is q[2].output_quant
    calibrate(q, [torch.rand(8, 4, 4)])
    q.eval()
    assert to_int8_module(q)(torch.rand(5, 4, 4)).shape == (5, 3)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


def test_unsupported_block_names_its_path():
    model = tiny_vgg()
    model.features.insert(3, Residual())
    with pytest.raises(CompressError, match=r"'features\.3' \(Residual\).*supported are"):
        quantize_model(model, QuantSpec())


@pytest.mark.parametrize("model, where", [
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sigmoid()), r"'1' \(Sigmoid\)"),
    (nn.Sequential(nn.BatchNorm2d(1)), r"'0' \(BatchNorm2d\)"),  # no conv to fold into
    (nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3, padding_mode="reflect"))), r"'0\.0'"),
])
def test_unsupported_layers(model, where):
    with pytest.raises(CompressError, match=where):
        quantize_model(model, QuantSpec())


def test_non_sequential_root_refused():
    class Net(nn.Sequential):
        def forward(self, x):  # overridden: the children may not run in order
            return super().forward(x) * 2

    with pytest.raises(CompressError, match=r"cannot quantize the model \(Net\)"):
        quantize_model(Net(nn.Linear(2, 2)), QuantSpec())
    with pytest.raises(CompressError, match="already quantized"):
        quantize_model(quantize_model(tiny_vgg(), QuantSpec()), QuantSpec())


@pytest.mark.parametrize("kw", [{"weight_bits": 9}, {"act_bits": 1}, {"ema": 0.0}])
def test_spec_validated(kw):
    with pytest.raises(CompressError):
        QuantSpec(**kw)


# ---- fake quantization ---------------------------------------------------------------------


@pytest.mark.parametrize("bits", [3, 7, 8])
def test_weights_on_per_channel_grid(bits):
    q = calibrated(QuantSpec(weight_bits=bits))
    qmax = 2 ** (bits - 1) - 1
    for conv in qconvs(q) + [q.classifier]:
        w, b = (conv.folded_weight_bias() if isinstance(conv, QConv2d)
                else (conv.linear.weight, conv.linear.bias))
        wq, bq, w_scale, b_scale = conv.quantized_weight_bias(w, b)
        k = wq.detach() / w_scale.reshape(-1, *[1] * (w.dim() - 1))
        torch.testing.assert_close(k, k.round(), atol=1e-4, rtol=0)
        assert k.abs().max() <= qmax + 1e-4
        for c in range(len(k)):  # per channel: at most 2*qmax+1 levels, the extreme used
            assert len(k[c].round().unique()) <= 2 * qmax + 1
            assert k[c].abs().max().round() == qmax
        # int32 bias on the grid input_scale * weight_scale[c]
        torch.testing.assert_close(b_scale, conv._input[0].qparams()[0] * w_scale)
        kb = bq.detach() / b_scale
        torch.testing.assert_close(kb, kb.round(), atol=1e-3, rtol=0)


def test_act_quant_observer():
    aq = ActQuant(bits=8, ema=0.25).train()
    x = torch.tensor([0.5, 1.0, 2.0])  # all positive: the range still includes 0
    y = aq(x)  # the first batch initializes the range, then quantizes with it
    assert aq.calibrated and aq.min_val == 0.5 and aq.max_val == 2.0
    scale, zp = aq.qparams()
    assert zp == 0 and torch.isclose(scale, torch.tensor(2.0 / 255))
    assert (y - x).abs().max() <= scale / 2
    aq(torch.tensor([-1.0, 4.0]))
    assert torch.isclose(aq.min_val, torch.tensor(0.75 * 0.5 - 0.25))  # EMA
    assert torch.isclose(aq.max_val, torch.tensor(0.75 * 2.0 + 0.25 * 4.0))
    lo, hi = aq.min_val.clone(), aq.max_val.clone()
    y = aq.eval()(torch.linspace(-2, 5, 101))  # eval: no observing
    assert torch.equal(aq.min_val, lo) and torch.equal(aq.max_val, hi)
    scale, zp = aq.qparams()
    levels = torch.round(y / scale) + zp
    torch.testing.assert_close(levels, levels.round(), atol=1e-3, rtol=0)
    assert levels.min() >= 0 and levels.max() <= 255
    aq.train().set_observing(False)
    aq(torch.tensor([-100.0, 100.0]))
    assert torch.equal(aq.min_val, lo)


def test_uncalibrated_act_quant_is_identity():
    x = torch.randn(10)
    assert torch.equal(ActQuant().eval()(x), x)


def test_ste_gradients_finite_and_nonzero():
    q = quantize_model(tiny_vgg(), QuantSpec()).train()
    x = images().requires_grad_(True)
    F.cross_entropy(q(x), torch.arange(32) % 10).backward()
    grads = {n: p.grad for n, p in q.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    for n in ["features.0.conv.weight", "features.4.conv.weight", "features.0.bn.weight",
              "features.0.bn.bias", "classifier.linear.weight", "classifier.linear.bias"]:
        assert grads[n].abs().sum() > 0, n
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0  # through the input quant


def test_ste_clamps_gradient_outside_range():
    aq = ActQuant().train()
    aq(torch.tensor([0.0, 1.0]))
    aq.set_observing(False)
    x = torch.tensor([-0.5, 0.5, 2.0], requires_grad=True)
    aq(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("scale,zero_point", [(0.05, 10), (0.013, 0), (0.05, 255), (1e-3, 128),
                                              (7.3e-7, 3)])
def test_fake_quant_per_tensor_is_atens_bit_for_bit(channels_last, scale, zero_point):
    """The vectorized fake quantization gives ATen's values, gradients and memory layout
    exactly, on the grid, between levels, at ties, outside the range, at +-inf and NaN."""
    from compress.quant.eager import fake_quant_per_tensor
    torch.manual_seed(0)
    x = torch.randn(8, 5, 6, 7) * 3
    ties = (torch.arange(12, dtype=torch.float32) - 6 + 0.5) * scale   # half steps: round to even
    x.view(-1)[:17] = torch.cat([torch.tensor([float("inf"), -float("inf"), 1e30, -1e30, float("nan")]),
                                 ties])
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    s, z = torch.tensor(scale), torch.tensor(zero_point, dtype=torch.int32)
    ref = torch.fake_quantize_per_tensor_affine(x, s, z, 0, 255)
    ours = fake_quant_per_tensor(x, s, z, 0, 255)
    assert torch.equal(ours, ref) and ours.stride() == ref.stride()   # NaN -> the lowest level, as ATen
    g = torch.randn_like(ref)
    assert torch.equal(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_folded_conv_bn_matches_conv_then_bn():
    model = tiny_vgg().eval()
    q = quantize_model(model, QuantSpec()).eval()
    x = images()
    conv, bn = model.features[0], model.features[1]
    w, b = q.features[0].folded_weight_bias()
    torch.testing.assert_close(F.conv2d(x, w, b, padding=1), bn(conv(x)), atol=1e-5, rtol=0)


def test_live_bn_training_close_to_float():
    """With BN live, QAT's forward is the float conv-bn-relu up to quantization noise."""
    model = tiny_vgg()
    q = quantize_model(model, QuantSpec()).train()
    x = images(64)
    with torch.no_grad():
        ref = model.features[:3].train()(x)
        got = q.features[0](q.input_quant(x))
    step = q.features[0].output_quant.qparams()[0]
    # input (8 bits) and weight (7 bits) rounding add a little more than one output step
    assert (got - ref).abs().max() < 4 * step
    assert (got - ref).abs().mean() < 0.5 * step


def test_frozen_bn_keeps_running_stats():
    q = quantize_model(tiny_vgg(), QuantSpec())
    bn = q.features[0].bn
    stats = [bn.running_mean.clone(), bn.running_var.clone()]
    set_qat_phase(q, observers=True, bn_stats=False)
    qat_steps(q, steps=2)
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert not torch.equal(q.features[0].conv.weight, tiny_vgg().features[0].weight)  # trained
    # ...and the frozen training forward is the eval (folded) forward
    x = images()
    set_qat_phase(q, observers=False, bn_stats=False)
    with torch.no_grad():
        torch.testing.assert_close(q.train()(x), q.eval()(x), atol=0, rtol=0)
    set_qat_phase(q, observers=True, bn_stats=True)
    qat_steps(q, steps=1)
    assert not torch.equal(bn.running_mean, stats[0])


def test_frozen_observers_keep_scales():
    q = quantize_model(tiny_vgg(), QuantSpec())
    qat_steps(q, steps=1)
    set_qat_phase(q, observers=False, bn_stats=True)
    ranges = {n: b.clone() for n, b in q.named_buffers() if n.endswith(("min_val", "max_val"))}
    qat_steps(q, steps=2)
    assert all(torch.equal(ranges[n], b) for n, b in q.named_buffers() if n in ranges)


def test_state_dict_roundtrip_through_build_model():
    spec = QuantSpec()
    arch = {"arch": "vgg_small", "args": {"in_channels": 1, "num_classes": 10, "width": 0.25}}
    q = quantize_model(build_model(arch), spec)
    qat_steps(q, steps=2)
    set_qat_phase(q, observers=False, bn_stats=False)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    fresh = quantize_model(build_model(arch), spec)
    fresh.load_state_dict(state)  # strict: same keys, nothing missing
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), q.eval()(x), atol=0, rtol=0)
    # the phase flags came along: a training forward changes neither BN stats nor scales
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with torch.no_grad():
        fresh.train()(x)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_calibrate_observes_in_eval_and_restores_modes():
    q = quantize_model(tiny_vgg(), QuantSpec()).train()
    set_qat_phase(q, observers=False, bn_stats=True)
    bn = q.features[0].bn
    stats = bn.running_mean.clone()
    batches = [images(16, seed=s) for s in range(3)]
    calibrate(q, batches)
    assert all(m.calibrated for m in q.modules() if isinstance(m, ActQuant))
    assert torch.equal(bn.running_mean, stats)  # BN ran in eval
    # the input range is the mean of the batches' min/max, not an EMA
    mins, maxs = torch.stack([b.min() for b in batches]), torch.stack([b.max() for b in batches])
    torch.testing.assert_close(q.input_quant.min_val, mins.mean())
    torch.testing.assert_close(q.input_quant.max_val, maxs.mean())
    assert q.input_quant.ema == QuantSpec().ema
    assert all(m.training for m in q.modules())
    assert not any(m._observing or m.observing for m in q.modules() if isinstance(m, ActQuant))


# ---- INT8 module ---------------------------------------------------------------------------


@pytest.mark.parametrize("float_first", [False, True])
def test_int8_module_matches_fake_quant(float_first):
    q = calibrated()
    int8 = to_int8_module(q, float_first_conv=float_first)
    assert not any(p.requires_grad for p in int8.parameters())
    layers = [m for m in int8.modules() if isinstance(m, (Int8Conv2d, Int8Linear))]
    assert len(layers) == 3 - float_first
    for m in layers:
        assert m.weight_int8.dtype == torch.int8 and m.weight_int8.abs().max() <= 63
        assert m.bias_int32.dtype == torch.int32
    x = images(128, seed=5)
    if float_first:
        # the first conv is a float Conv2d holding the dequantized weights, behind the input
        # quantizer; the max-pool after it re-quantizes with the conv's output parameters
        mods = [m for m in int8.modules() if isinstance(m, (Int8Act, nn.Conv2d, Int8Conv2d, Int8Linear))]
        assert isinstance(mods[0], Int8Act) and type(mods[1]) is nn.Conv2d
    with torch.no_grad():
        ref, got = q(x), int8(x)
    step = q.classifier.output_quant.qparams()[0]
    assert torch.equal(ref.argmax(1), got.argmax(1))
    assert (ref - got).abs().max() <= 2 * step


def test_int8_needs_calibration():
    q = quantize_model(tiny_vgg(), QuantSpec()).eval()
    with pytest.raises(CompressError, match="'input_quant' never observed data"):
        to_int8_module(q)
    with pytest.raises(CompressError, match="made by quantize_model"):
        to_int8_module(tiny_vgg())
