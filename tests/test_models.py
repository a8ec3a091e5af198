"""Every architecture of the registry and the torchvision:/timm: hub names: sized from the
data, named feature points, pruning on the dependency graph, bit-exact rebuilds, and the
pipeline's train -> prune -> distill (a feature term on a named point) on each family."""

import copy
import sys

import numpy as np
import pytest
import torch
from torch import nn

from compress.checkpoint import load_checkpoint, save_checkpoint
from compress.config import parse_recipe
from compress.errors import CompressError
from compress.hooks import FeatureTaps, resolve_tap
from compress.models import (MODELS, Ensemble, build_model, factory_params, feature_points, layer_shapes,
                             make_spec, model_factory)
from compress.models.mobilenetv2 import InvertedResidual
from compress.models.resnet import BasicBlock
from compress.onnx_io import _normalization, _torch_logits
from compress.ort_runtime import ort_logits
from compress.pipeline import run_recipe, validate_recipe
from compress.stages import model_cost
from compress.stages.prune import PruneStage, prune_model

HUB = ["torchvision:resnet18", "torchvision:mobilenet_v2", "timm:test_resnet", "timm:test_efficientnet"]


def tiny_args(arch):
    """Args that make `arch` tiny: a small width / scale where the factory has one."""
    named, _ = factory_params(model_factory(arch))
    return ({"width": 0.125} if "width" in named else {"scale": 4} if "scale" in named
            else {"width_mult": 0.25} if "width_mult" in named else {})


def build(arch, shape, ncls=10, seed=0):
    if arch.startswith("timm:"):
        pytest.importorskip("timm")
    torch.manual_seed(seed)
    args = {**tiny_args(arch), "in_channels": shape[0], "num_classes": ncls}
    return build_model({"arch": arch, "args": args}), args


def prune_cfg(**kw):
    return PruneStage(name="prune", **{"from": "teacher"}, **{"ratio": 0.5, **kw})


ALL = sorted(MODELS) + HUB


# ---- built from the data; feature points -------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)], ids=["fmnist", "cifar"])
@pytest.mark.parametrize("arch", ALL)
def test_builds_from_data_shape_and_feature_points_capture(arch, shape):
    model, _ = build(arch, shape, ncls=7)
    model.eval()
    points = feature_points(model)
    assert "penultimate" in points
    head = model.get_submodule(points["penultimate"])
    taps = FeatureTaps(model, list(points))
    x = torch.randn(3, *shape)
    with torch.no_grad(), taps.attached():
        out = model(x)
    assert out.shape == (3, 7) and torch.isfinite(out).all()
    # penultimate: the pooled, flattened vector the classifier reads
    assert taps.features["penultimate"].shape == (3, head.in_features)
    with torch.no_grad():
        assert torch.equal(head(taps.features["penultimate"]), out)
    stages = [n for n in points if n.startswith("stage")]
    if not arch.startswith("torchvision:") and not arch.startswith("timm:"):
        assert len(stages) >= 2, points           # every own architecture declares its stages
    sizes = [taps.features[n].shape for n in stages]
    assert all(len(s) == 4 and s[0] == 3 for s in sizes)
    # stages in order of decreasing resolution
    assert [s[-1] for s in sizes] == sorted((s[-1] for s in sizes), reverse=True)


def test_resnet_and_mobilenet_shapes_follow_the_papers():
    r20, _ = build_model({"arch": "resnet20", "args": {"in_channels": 3, "num_classes": 10}}), None
    assert sum(p.numel() for p in r20.parameters()) == 272_474   # He et al. 2016: 0.27M
    assert sum(isinstance(m, BasicBlock) for m in r20.modules()) == 9
    r110 = build_model({"arch": "resnet110", "args": {"in_channels": 3, "num_classes": 10, "width": 0.125}})
    assert sum(isinstance(m, BasicBlock) for m in r110.modules()) == 54
    wide = build_model({"arch": "resnet8x4", "args": {"in_channels": 3, "num_classes": 100}})
    assert [wide.conv1.out_channels, wide.layer1[0].conv2.out_channels, wide.layer3[0].conv2.out_channels] == [32, 64, 256]
    mb = build_model({"arch": "mobilenetv2", "args": {"in_channels": 3, "num_classes": 10}})
    dw = [m for m in mb.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(dw) == 17 and all(m.groups == m.in_channels == m.out_channels for m in dw)
    taps = FeatureTaps(mb, ["stage4", "head"])
    with torch.no_grad(), taps.attached():
        mb.eval()(torch.zeros(1, 3, 32, 32))
    assert taps.features["stage4"].shape[-2:] == (4, 4)   # CIFAR strides: 32 -> 4, not 1
    assert taps.features["head"].shape[1] == 1280


def test_ensemble_points_and_raw_paths_resolve():
    a, _ = build("resnet20", (1, 28, 28))
    b, _ = build("mobilenetv2", (1, 28, 28), seed=1)
    ens = Ensemble([a, b])
    assert resolve_tap(ens, "members.0.stage2") == ("members.0.layer2", "output")
    assert resolve_tap(ens, "members.1.penultimate") == ("members.1.classifier", "input")
    assert resolve_tap(ens, "members.0.layer1.0.conv1") == ("members.0.layer1.0.conv1", "output")
    taps = FeatureTaps(ens, ["members.0.penultimate", "members.1.stage3"])
    with torch.no_grad(), taps.attached():
        ens.eval()(torch.zeros(2, 1, 28, 28))
    assert taps.features["members.0.penultimate"].shape == (2, a.fc.in_features)
    with pytest.raises(CompressError, match=r"^student_layer: no layer 'members\.0\.stage9'.*valid: .*members\.0\.stage1"):
        FeatureTaps(ens, ["members.0.stage9"], "student_layer")


# ---- pruning on the dependency graph; rebuilds -----------------------------------------------

@pytest.mark.parametrize("arch", ALL)
def test_prune_shrinks_keeps_graph_valid_and_rebuilds_bit_exactly(arch, tmp_path):
    shape = (1, 28, 28)
    model, args = build(arch, shape)
    params0, macs0 = model_cost(model, shape)
    head = feature_points(model)["penultimate"]
    pruned = prune_model(copy.deepcopy(model), prune_cfg(), shape, 10, 0.5)
    params1, macs1 = model_cost(pruned, shape)
    assert params1 < 0.6 * params0 and macs1 < 0.75 * macs0
    assert pruned.get_submodule(head).out_features == 10          # the classifier stays whole
    for m in pruned.modules():
        if isinstance(m, BasicBlock):           # channels coupled through the residual add
            short = m.shortcut[0].out_channels if isinstance(m.shortcut, nn.Sequential) else m.conv1.in_channels
            assert m.conv2.out_channels == short == m.bn2.num_features
        if isinstance(m, nn.Conv2d) and m.groups > 1:           # depthwise stays depthwise
            assert m.groups == m.in_channels == m.out_channels
        if isinstance(m, InvertedResidual) and m.residual:
            assert m.conv[0][0].in_channels == m.conv[-1][0].out_channels
    spec = make_spec(arch, args, pruned)
    save_checkpoint(tmp_path / "m.pt", spec, pruned)
    spec2, rebuilt = load_checkpoint(tmp_path / "m.pt")      # torch.load(weights_only=True)
    assert spec2 == spec and layer_shapes(rebuilt) == layer_shapes(pruned)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), pruned.eval()(x))
    assert feature_points(rebuilt) == feature_points(pruned)


def test_round_to_on_resnet_and_mobilenet():
    for arch in ("resnet20", "mobilenetv2"):
        model = build_model({"arch": arch, "args": {"in_channels": 1, "num_classes": 10, "width": 0.5}})
        pruned = prune_model(model, prune_cfg(round_to=8), (1, 28, 28), 10, 0.4)
        widths = [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)]
        assert all(w % 8 == 0 for w in widths), (arch, widths)


# ---- hub names ----------------------------------------------------------------------------

def test_torchvision_resnet18_with_one_input_channel():
    model, _ = build("torchvision:resnet18", (1, 28, 28))
    assert model.conv1.in_channels == 1 and model.fc.out_features == 10
    assert feature_points(model)["stage5"] == "layer4"


@pytest.mark.parametrize("arch, msg", [
    ("torchvision:resnet19", r"^models\.t\.arch: unknown torchvision model 'resnet19' \(close: resnet18"),
    ("timm:resnet_18", r"^models\.t\.arch: unknown timm model 'resnet_18' \(close: resnet18"),
    ("resnet21", r"^models\.t\.arch: unknown model 'resnet21' \(did you mean"),
])
def test_bad_names_give_one_line(arch, msg, tiny_recipe_dict):
    if arch.startswith("timm:"):
        pytest.importorskip("timm")
    tiny_recipe_dict["models"] = {"t": {"arch": arch}}
    tiny_recipe_dict["stages"] = [{"name": "teacher", "kind": "train", "model": "t", "epochs": 1}]
    with pytest.raises(CompressError, match=msg) as e:
        validate_recipe(parse_recipe(tiny_recipe_dict))
    assert "\n" not in str(e.value)


def test_timm_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)          # import timm -> ImportError
    with pytest.raises(CompressError, match=r"timm:resnet18 needs the timm package.*pip install 'compress\[timm\]'"):
        model_factory("timm:resnet18")


@pytest.mark.parametrize("args, msg", [
    ({"weights": "DEFAULT"}, r"^models\.t\.args\.weights: not allowed: models start from a random"),
    ({"depth": 3}, r"^models\.t\.args\.depth: unknown argument of torchvision:resnet18; valid: .*zero_init_residual"),
])
def test_hub_args_checked_against_the_constructor(args, msg, tiny_recipe_dict):
    tiny_recipe_dict["models"] = {"t": {"arch": "torchvision:resnet18", "args": args}}
    tiny_recipe_dict["stages"] = [{"name": "teacher", "kind": "train", "model": "t", "epochs": 1}]
    with pytest.raises(CompressError, match=msg):
        validate_recipe(parse_recipe(tiny_recipe_dict))


class TupleOut(nn.Module):
    """Returns (logits, aux) in training mode, as torchvision's GoogLeNet does with aux heads."""

    def __init__(self, in_channels=3, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        y = self.fc(self.conv(x).mean((2, 3)))
        return (y, y) if self.training else y


class Shrinks(nn.Module):
    """Five 2x2 pools: 28x28 becomes 0x0 (as DenseNet's do at 28x28)."""

    def __init__(self, in_channels=3, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.pools = nn.Sequential(*[nn.MaxPool2d(2) for _ in range(5)])
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.pools(self.conv(x)).flatten(1))


@pytest.mark.parametrize("cls, msg", [
    (TupleOut, r"^models\.t\.arch_probe returns tuple in training mode, not a logits tensor"),
    (Shrinks, r"^models\.t\.arch_probe cannot run on \(1, 28, 28\) images in training mode \(RuntimeError: .*too small"),
])
def test_validate_runs_each_model_once_in_both_modes(cls, msg, tiny_recipe_dict):
    """A model that cannot map the data's images to logits is refused by validate, in one line,
    before anything trains (not with a traceback in the middle of the teacher stage)."""
    tiny_recipe_dict["models"] = {"t": {"arch": "arch_probe"}}
    tiny_recipe_dict["stages"] = [{"name": "teacher", "kind": "train", "model": "t", "epochs": 1}]
    MODELS.register("arch_probe")(cls)
    try:
        with pytest.raises(CompressError, match=msg.replace("models\\.t\\.arch_probe", "models\\.t: arch_probe")) as e:
            validate_recipe(parse_recipe(tiny_recipe_dict))
    finally:
        del MODELS["arch_probe"]
    assert "\n" not in str(e.value)


class Noisy(nn.Module):
    """BatchNorm (buffers a training-mode forward would move) and Dropout (random draws)."""

    def __init__(self, in_channels=3, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.drop(self.bn(self.conv(x) + 1).mean((2, 3))))


def test_the_probe_leaves_the_model_and_random_draws_alone(tiny_recipe_dict):
    """The forward check runs on a copy with the random state kept: the model a stage trains,
    and every draw after it, are what they would be without the check."""
    from compress.stages import PlanBuilder

    tiny_recipe_dict["models"] = {"t": {"arch": "noisy"}}
    tiny_recipe_dict["stages"] = [{"name": "teacher", "kind": "train", "model": "t", "epochs": 1}]
    MODELS.register("noisy")(Noisy)
    try:
        recipe = parse_recipe(tiny_recipe_dict)
        torch.manual_seed(3)
        model = PlanBuilder(recipe, (1, 8, 8), 10)("t")
        after = torch.rand(4)
    finally:
        del MODELS["noisy"]
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(4))
    assert torch.equal(model.bn.running_mean, torch.zeros(8)) and model.bn.num_batches_tracked.item() == 0
    assert model.training


def test_torchvision_googlenet_builds_without_aux_heads():
    model, _ = build("torchvision:googlenet", (1, 32, 32))
    assert model.aux1 is None and model.aux2 is None
    assert model.train()(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


# ---- validate proves the prune on the skeleton ----------------------------------------------

class HardWired(nn.Module):
    """Reads its conv's output with a hard-coded channel count: cannot be pruned."""

    def __init__(self, in_channels=3, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.mid(self.conv(x)).mean((2, 3)).reshape(-1, 16))


@pytest.fixture
def hardwired():
    MODELS.register("hardwired")(HardWired)
    yield "hardwired"
    del MODELS["hardwired"]


def test_validate_refuses_an_unprunable_model_in_one_line(tiny_recipe_dict, hardwired):
    tiny_recipe_dict["models"] = {"teacher": {"arch": hardwired}}
    tiny_recipe_dict["stages"] = tiny_recipe_dict["stages"][:3]
    with pytest.raises(CompressError, match=r"^stages\.prune: torch-pruning cannot prune this model: ") as e:
        validate_recipe(parse_recipe(tiny_recipe_dict))
    assert "\n" not in str(e.value)


def test_validate_checks_feature_points_on_the_pruned_skeleton(tiny_recipe_dict):
    tiny_recipe_dict["models"] = {"teacher": {"arch": "resnet20", "args": {"width": 0.25}}}
    stages = tiny_recipe_dict["stages"][:3]
    stages[2]["loss"] = [{"term": "fitnet", "student_layer": "stage2", "teacher_layer": "stage4"}]
    tiny_recipe_dict["stages"] = stages
    with pytest.raises(CompressError, match=r"^stages\[2\]\.loss\[0\]\.teacher_layer: no layer 'stage4' "
                                            r"\(did you mean 'stage\d'\?\); valid: stem, stage1"):
        validate_recipe(parse_recipe(tiny_recipe_dict))
    stages[2]["loss"][0]["teacher_layer"] = "stage2"
    assert validate_recipe(parse_recipe(tiny_recipe_dict))[0].startswith("tiny: valid")


# ---- the pipeline on each family -----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet20", "mobilenetv2", "cnn8", "torchvision:resnet18", "timm:test_resnet"])
def test_every_stage_with_a_feature_term_on_a_named_point(arch, tiny_recipe_dict, tmp_path):
    """train -> prune -> distill (a hint on `stage2`, rkd on `penultimate`) -> qat -> onnx-int8:
    the export stage itself refuses a float conv in onnxruntime's optimised graph, and the INT8
    file's logits match the fake-quant model's."""
    if arch.startswith("timm:"):
        pytest.importorskip("timm")
    tiny_recipe_dict["models"] = {"teacher": {"arch": arch, "args": tiny_args(arch)}}
    stages = tiny_recipe_dict["stages"]
    stages[2]["loss"] = [{"term": "kd", "T": 4, "alpha": 0.9},
                         {"term": "fitnet", "student_layer": "stage2", "teacher_layer": "stage2"},
                         {"term": "rkd", "weight": 0.1}]          # on `penultimate` by default
    stages[3]["float_convs"] = "none"   # every conv integer: these tiny widths would start with a float lead
    # Two steps on random labels leave near-tied logits, which either runtime's rounding can
    # flip (an AVX512-BF16 CPU trained a ResNet-18 whose INT8 file differed on 2 of 32 images,
    # by at most 0.0064 logit): the top-1 check here tolerates that, the logits below do not.
    stages[4]["int8_min_agreement"] = 0.9
    report = run_recipe(parse_recipe(tiny_recipe_dict), workdir=tmp_path, device="cpu")
    teacher, prune, distill, qat, _ = report["stages"]
    assert prune["params"] < teacher["params"] and prune["macs"] < teacher["macs"]
    assert distill["params"] == prune["params"] == qat["params"]
    (int8,) = report["exports"]
    ops = int8["check"]["ort_int8_ops"]
    assert ops.get("QLinearConv", 0) + ops.get("ConvInteger", 0) > 0
    assert int8["check"]["top1_agreement"] >= 0.9
    if arch in ("resnet20", "mobilenetv2"):
        assert ops.get("QLinearAdd", 0) > 0 and ops["Add"] == 0     # residual adds in integer
    run_dir = tmp_path / "runs" / "tiny" / "stages"
    # the INT8 file computes the fake-quant model's function, up to rounding
    path = tmp_path / "exports" / "tiny" / "qat-int8.onnx"
    _, qmodel = load_checkpoint(run_dir / "qat" / "model.pt")
    images = np.random.default_rng(0).random((32, 1, 28, 28), dtype=np.float32)
    got, ref = ort_logits(path, images), _torch_logits(qmodel, images, *_normalization(path))
    assert np.abs(got - ref).max() <= 0.1 * ref.std()   # 0.010-0.027x measured; logits 1.2x off fail
    _, pruned = load_checkpoint(run_dir / "prune" / "model.pt")
    _, distilled = load_checkpoint(run_dir / "distill" / "model.pt")
    assert layer_shapes(pruned) == layer_shapes(distilled)
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert not torch.equal(pruned.eval()(x), distilled.eval()(x))     # distillation trained it


def test_penultimate_on_a_fake_quant_model_taps_the_wrapper_that_runs():
    from compress.quant import QuantSpec, quantize_model

    model, _ = build("vgg_small", (1, 28, 28))
    q = quantize_model(model, QuantSpec())
    taps = FeatureTaps(q, ["penultimate"])
    with torch.no_grad(), taps.attached():
        q.eval()(torch.rand(2, 1, 28, 28))
    assert taps.features["penultimate"].shape == (2, model.classifier.in_features)


def test_zero_init_residual_starts_every_block_as_the_identity():
    model = build_model({"arch": "resnet20", "args": {"in_channels": 1, "num_classes": 10,
                                                      "zero_init_residual": True}})
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert blocks and all(not b.bn2.weight.detach().any() for b in blocks)
    x = torch.rand(2, 16, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.layer1[1].eval()(x), torch.relu(x))   # identity shortcut + relu
