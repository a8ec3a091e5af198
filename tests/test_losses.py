"""Loss terms against hand-computed values, gradients, and the objective's teacher handling."""

import math

import pytest
import torch
from torch import nn

from compress.data import Batch
from compress.engine import Frozen
from compress.losses import LOSSES, Objective
from compress.losses.ce import CESpec
from compress.losses.fitnet import FitNetSpec, hint_loss
from compress.losses.kd import KDSpec, kd_loss
from compress.models import VGG


def _softmax(v):
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def test_kd_matches_hand_computed_value():
    s, t, T = [1.0, 2.0, 3.0], [3.0, 2.0, 1.0], 2.0
    ps, pt = _softmax([x / T for x in s]), _softmax([x / T for x in t])
    kl = sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
    got = kd_loss(torch.tensor([s]), torch.tensor([t]), T=T)
    assert got.item() == pytest.approx(T * T * kl, rel=1e-5)
    # alpha mixes in hard-label CE: alpha * T^2 * KL + (1 - alpha) * CE
    ce = -math.log(_softmax(s)[2])
    got = kd_loss(torch.tensor([s]), torch.tensor([t]), T=T, alpha=0.25, target=torch.tensor([2]))
    assert got.item() == pytest.approx(0.25 * T * T * kl + 0.75 * ce, rel=1e-5)


def test_kd_is_zero_for_identical_student_and_teacher():
    x = torch.randn(5, 7)
    assert kd_loss(x, x.clone(), T=3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_gradient_is_T_times_probability_gap():
    # d/ds [T^2 KL(p_t^T || p_s^T)] = T * (p_s^T - p_t^T) / batch
    torch.manual_seed(0)
    s = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 5, dtype=torch.float64)
    T = 3.0
    kd_loss(s, t, T=T).backward()
    expected = T * (torch.softmax(s.detach() / T, 1) - torch.softmax(t / T, 1)) / 4
    assert torch.allclose(s.grad, expected, atol=1e-10)
    assert torch.autograd.gradcheck(lambda a: kd_loss(a, t, T=T, alpha=0.5, target=torch.tensor([0, 1, 2, 3])),
                                    (s.detach().requires_grad_(),))


def test_hint_loss_is_mse_and_zero_on_identity():
    a = torch.randn(2, 3, 4, 4)
    assert hint_loss(a, a).item() == 0.0
    assert hint_loss(a, torch.zeros_like(a)).item() == pytest.approx((a ** 2).mean().item(), rel=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_registered_term_has_a_spec_and_documented_module(name):
    cls = LOSSES[name]
    assert cls.spec_cls.model_fields["term"].default == name
    assert cls.__doc__ and cls.__doc__.strip()


def _pair():
    torch.manual_seed(0)
    student = VGG([4, "M", 8], in_channels=1, num_classes=3)
    teacher = VGG([8, "M", 16], in_channels=1, num_classes=3)
    return student, Frozen(teacher)


def test_teacher_is_frozen_by_construction():
    _, teacher = _pair()
    teacher.train()
    assert not teacher.training and not teacher.module.training
    assert all(not p.requires_grad for p in teacher.parameters())
    out = teacher(torch.randn(2, 1, 8, 8))
    assert not out.requires_grad


def test_fitnet_regressor_built_from_measured_shapes_and_trains():
    student, teacher = _pair()
    x = torch.randn(6, 1, 8, 8)
    spec = FitNetSpec(student_layer="features.2", teacher_layer="features.5")
    obj = Objective([spec, KDSpec(T=2.0)], student, teacher, sample=x[:2])
    reg = obj.terms["fitnet"].regressor
    assert (reg.in_channels, reg.out_channels) == (4, 16)   # student conv1 width -> teacher conv2 width
    batch = Batch(x, torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6))
    loss, parts, logits = obj(student, batch)
    assert set(parts) == {"fitnet", "kd"} and logits.shape == (6, 3)
    loss.backward()
    assert reg.weight.grad is not None and reg.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_cached_teacher_logits_replace_the_teacher_forward():
    student, teacher = _pair()
    calls = []
    teacher.module.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(4, 1, 8, 8)
    cache = torch.randn(2, 10, 3)   # [views (as stored, flipped), images, classes]
    obj = Objective([KDSpec(T=1.0)], student, teacher, teacher_logits=cache)
    idx, view = torch.tensor([7, 1, 3, 9]), torch.tensor([0, 1, 1, 0])
    loss, parts, logits = obj(student, Batch(x, torch.zeros(4, dtype=torch.long), idx, view))
    assert calls == []
    expected = kd_loss(logits, torch.stack([cache[0, 7], cache[1, 1], cache[1, 3], cache[0, 9]]), T=1.0)
    assert parts["kd"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_weights_scale_terms():
    student, _ = _pair()
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    obj = Objective([CESpec(weight=0.5)], student)
    loss, parts, logits = obj(student, Batch(x, y, torch.arange(4)))
    assert loss.item() == pytest.approx(0.5 * nn.functional.cross_entropy(logits, y).item(), rel=1e-6)


def test_online_teacher_runs_with_batchnorm_folded():
    """A logits-only teacher pass runs a folded copy: same logits (to rounding), fewer BatchNorms,
    the teacher's own modules untouched and no teacher parameter trained."""
    from compress.engine import fold_batchnorm

    torch.manual_seed(0)
    student, teacher = _pair()
    for m in teacher.modules():   # non-trivial running statistics, so folding changes the weights
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 2)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    obj = Objective([KDSpec(T=2.0)], student, teacher)
    calls = []
    hook = teacher.module.register_forward_hook(lambda *a: calls.append(1))
    loss, parts, logits = obj(student, Batch(x, y, torch.arange(4)))
    hook.remove()
    assert calls == []   # the unfolded teacher did not run
    folded = teacher.folded
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())
    expected = kd_loss(logits, teacher(x), T=2.0)
    assert parts["kd"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert not any(p.requires_grad for p in folded.parameters())
    assert all(p is not q for p in obj.parameters() for q in folded.parameters())
    assert fold_batchnorm(teacher.module) is not teacher.module


def test_fold_batchnorm_keeps_the_function_or_the_model():
    from compress.engine import fold_batchnorm

    torch.manual_seed(0)
    net = VGG([8, "M", 16], in_channels=1, num_classes=3)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    net.eval()
    x = torch.randn(5, 1, 8, 8)
    folded = fold_batchnorm(net)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 0
    assert torch.allclose(folded(x), net(x), atol=1e-5)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 2   # the original is kept

    class Branchy(nn.Module):   # data-dependent control flow: not symbolically traceable
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    branchy = Branchy()
    assert fold_batchnorm(branchy) is branchy
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    assert fold_batchnorm(plain) is plain


def test_frozen_teacher_refolds_after_a_move():
    _, teacher = _pair()
    first = teacher.folded
    assert teacher.folded is first   # built once
    teacher.to(torch.float64)
    assert teacher.folded is not first and next(teacher.folded.parameters()).dtype == torch.float64
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    assert torch.allclose(teacher.logits(x), teacher(x), atol=1e-8)
