"""Structured pruning (torch-pruning under the `prune` stage), rebuildable architecture specs
and checkpoints."""

import copy

import pytest
import torch
from torch import nn

from compress.checkpoint import load_checkpoint, save_checkpoint
from compress.config import parse_recipe
from compress.data import fashion_mnist
from compress.engine import RunContext
from compress.errors import CompressError
from compress.models import VGG_CFGS, build_model, count_params, layer_shapes, make_spec
from compress.stages import STAGES, StageResult, model_cost
from compress.stages.prune import IMPORTANCES, PruneStage, prune_model, ratio_for_macs

CFG = [16, "M", 32, 32]     # conv-dominated: 14.3K of 14.7K params are conv weights
SHAPE = (3, 16, 16)
NCLS = 10


def tiny_vgg(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    args = {"cfg": cfg, "in_channels": SHAPE[0], "num_classes": NCLS}
    return build_model({"arch": "vgg_small", "args": args}), args


def prune_cfg(**kw):
    if "target_macs" not in kw:
        kw.setdefault("ratio", 0.5)
    return PruneStage(name="prune", **{"from": "teacher"}, **kw)


def convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


# ---- prune_model -----------------------------------------------------------------------------

def test_prune_half_shrinks_params_and_macs_quadratically():
    model, _ = tiny_vgg()
    params0, macs0 = model_cost(model, SHAPE)
    assert params0 == count_params(model)
    pruned = prune_model(copy.deepcopy(model), prune_cfg(), SHAPE, NCLS, 0.5)
    params1, macs1 = model_cost(pruned, SHAPE)
    # A conv between two pruned layers keeps (1-r) of its inputs and (1-r) of its outputs:
    # (1-r)^2 = 0.25 of its weights and MACs. The first conv (RGB input not pruned), the BNs
    # and the classifier (outputs = classes, kept) shrink only by (1-r), so the whole model
    # lands a little above 0.25: here 0.266 of params and 0.285 of MACs.
    assert 0.2 <= params1 / params0 <= 0.35
    assert 0.2 <= macs1 / macs0 <= 0.35
    assert [c.out_channels for c in convs(pruned)] == [8, 16, 16]
    assert [c.in_channels for c in convs(pruned)] == [3, 8, 16]
    assert pruned.classifier.out_features == NCLS and pruned.classifier.in_features == 16
    assert pruned(torch.zeros(2, *SHAPE)).shape == (2, NCLS)


@pytest.mark.parametrize("importance", sorted(IMPORTANCES))
def test_every_importance_prunes_each_layer_by_ratio(importance):
    model, _ = tiny_vgg()
    pruned = prune_model(model, prune_cfg(importance=importance), SHAPE, NCLS, 0.5)
    assert [c.out_channels for c in convs(pruned)] == [8, 16, 16]
    assert pruned.classifier.out_features == NCLS
    assert torch.isfinite(pruned(torch.randn(2, *SHAPE))).all()


def test_prune_ignore_and_round_to():
    model, _ = tiny_vgg()
    pruned = prune_model(model, prune_cfg(ignore=["features.0"], round_to=8), SHAPE, NCLS, 0.4)
    widths = [c.out_channels for c in convs(pruned)]
    assert widths[0] == 16                       # ignored: left whole
    assert widths[1:] != [32, 32] and all(w % 8 == 0 for w in widths[1:])


def test_prune_per_layer_ratios_replace_the_default():
    model, _ = tiny_vgg()
    # features.0 keeps 16 * 0.25 = 4, the other convs the default ratio's 32 * 0.5 = 16
    pruned = prune_model(model, prune_cfg(layers={"features.0": 0.75}), SHAPE, NCLS, 0.5)
    assert [c.out_channels for c in convs(pruned)] == [4, 16, 16]
    assert [c.in_channels for c in convs(pruned)] == [3, 4, 16]


@pytest.mark.parametrize("layers,message", [
    ({"features.99": 0.5}, r"layers: no layer 'features\.99'"),
    ({"features.1": 0.5}, r"layers: 'features\.1' is not a prunable Conv2d/Linear"),
    ({"classifier": 0.5}, r"layers: 'classifier' is not a prunable"),
    ({"features.0": 0.95}, r"layers\.features\.0: 0\.95 would leave it no channel; at most 0\.9375"),
])
def test_prune_per_layer_ratio_errors(layers, message):
    from compress.stages.prune import check_layers

    model, _ = tiny_vgg()
    with pytest.raises(CompressError, match=message):
        check_layers(model, prune_cfg(layers=layers), NCLS)


def test_prune_per_layer_ratio_out_of_range():
    with pytest.raises(ValueError, match=r"'features\.0': 1\.0 is not a fraction"):
        prune_cfg(layers={"features.0": 1.0})


def test_prune_ignore_unknown_layer():
    model, _ = tiny_vgg()
    with pytest.raises(CompressError, match=r"^ignore: no layer 'features\.99'"):
        prune_model(model, prune_cfg(ignore=["features.99"]), SHAPE, NCLS, 0.5)


# ---- layers torch-pruning prunes together -----------------------------------------------------

def cbr(i, o, k=3, g=1):
    return nn.Sequential(nn.Conv2d(i, o, k, 1, k // 2, groups=g, bias=False), nn.BatchNorm2d(o), nn.ReLU())


class Branchy(nn.Module):
    """A residual add, then two branches concatenated and read by a depthwise conv."""

    def __init__(self, w=16):
        super().__init__()
        self.stem, self.res = cbr(SHAPE[0], w), cbr(w, w)
        self.br_a, self.br_b = cbr(w, w, 1), cbr(w, w)
        self.dw, self.pw = cbr(2 * w, 2 * w, g=2 * w), cbr(2 * w, 2 * w, 1)
        self.fc = nn.Linear(2 * w, NCLS)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.res(x)
        x = torch.cat([self.br_a(x), self.br_b(x)], 1)
        return self.fc(self.pw(self.dw(x)).mean((2, 3)))


def test_dependency_groups_name_coupled_and_concatenated_layers():
    from compress.stages.prune import dependency_groups

    def listed(model):
        return {tuple(p for p, _ in members): (channels, n) for channels, members, n in dependency_groups(model, SHAPE)}

    groups = listed(Branchy())
    assert groups[("stem.0", "res.0")] == (16, 1)             # residual add: equal widths, one set of channels
    assert groups[("br_a.0", "br_b.0", "dw.0")] == (32, 1)     # concatenated: one group as wide as both
    assert groups[("pw.0",)] == (32, 1) and groups[("fc",)] == (NCLS, 1)   # depthwise: not channel groups
    groups = listed(Grouped())
    assert groups[("a.0",)] == groups[("b.0",)] == (64, 16)   # the grouped conv's input, its output channels
    assert groups[("c.0",)] == (32, 8)                         # GroupNorm(8)


class Grouped(nn.Module):
    """A ResNeXt-style grouped conv (16 groups of 4 channels) and a GroupNorm(8) layer."""

    def __init__(self, groups=16, width=64):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Sequential(nn.Conv2d(SHAPE[0], width, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=groups), nn.BatchNorm2d(width), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(width, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU())
        self.fc = nn.Linear(32, NCLS)

    def forward(self, x):
        return self.fc(self.c(self.b(self.a(x))).mean((2, 3)))


@pytest.mark.parametrize("ratio, widths", [(0.5, (32, 32, 16)), (0.6, (16, 16, 8)), (0.3, (32, 32, 16))])
def test_round_to_holds_for_grouped_convs_and_group_norm(ratio, widths):
    """torch-pruning 1.6 left such layers whole under round_to (it rounds the per-group count
    against the whole width); here every group is narrowed to a multiple of round_to that
    splits evenly into its groups: 16 groups keep 2 of 4 each at 0.5, 1 at 0.6, and at 0.3
    (int(4 * 0.7) = 2) 2; GroupNorm(8)'s 32 channels keep 16, 8, 16 (8 x 2, 8 x 1: 16 and 8
    are multiples of 8, where 0.3's 22 would not be)."""
    from compress.stages.prune import check_coupling, check_outcome

    model, cfg = Grouped(), prune_cfg(ratio=ratio, round_to=8)
    groups = check_coupling(model, cfg, SHAPE, NCLS)
    prune_model(model, cfg, SHAPE, NCLS, ratio)
    check_outcome(groups, model, cfg, NCLS, ratio)
    assert (model.a[0].out_channels, model.b[0].out_channels, model.c[0].out_channels) == widths
    assert model.b[0].groups == 16 and model.c[1].num_groups == 8 and model.c[1].num_channels == widths[2]
    assert model(torch.zeros(2, *SHAPE)).shape == (2, NCLS)


def test_round_to_that_no_grouped_width_can_meet_is_refused_with_one_that_can():
    """13 groups of 8 channels keep as many each: at ratio 0.5 (4 each) only all 104 are a
    multiple of 8, so the layer cannot be narrowed; round_to 4 can (52)."""
    from compress.stages.prune import check_coupling, check_outcome

    model, cfg = Grouped(groups=13, width=104), prune_cfg(round_to=8)
    groups = check_coupling(model, cfg, SHAPE, NCLS)
    prune_model(model, cfg, SHAPE, NCLS, 0.5)
    assert model.b[0].out_channels == 104 and model.c[0].out_channels == 16
    with pytest.raises(CompressError, match=r"^stages\.prune\.round_to: 8 cannot hold for 'a\.0' \(and 1 more "
                                            r"such groups\): a grouped conv or GroupNorm splits the channels into 13 "
                                            r"groups of 8, which keep as many each, and at ratio 0\.5 no count under 8 "
                                            r"makes a multiple of 8; round_to 4 lets all be narrowed, or leave them whole "
                                            r"\(ignore: \['a\.0'\]\)$"):
        check_outcome(groups, model, cfg, NCLS, 0.5)
    model, cfg = Grouped(groups=13, width=104), prune_cfg(round_to=4)
    groups = check_coupling(model, cfg, SHAPE, NCLS)
    prune_model(model, cfg, SHAPE, NCLS, 0.5)
    check_outcome(groups, model, cfg, NCLS, 0.5)
    assert model.b[0].out_channels == 52 and model.b[0].groups == 13


def test_round_to_with_global_ranking_of_grouped_convs_is_refused():
    from compress.stages.prune import check_coupling

    with pytest.raises(CompressError, match=r"^stages\.prune\.round_to: 8 cannot hold with global: true for 'a\.0' "
                                            r"\(a grouped conv or GroupNorm\).*; drop round_to or global$"):
        check_coupling(Grouped(), prune_cfg(round_to=8, **{"global": True}), SHAPE, NCLS)


@pytest.mark.parametrize("kw, message", [
    ({"layers": {"stem.0": 0.75, "res.0": 0.25}},
     r"^stages\.prune\.layers: 'stem\.0' \(0\.75\) and 'res\.0' \(0\.25\) are coupled: torch-pruning removes "
     r"the same channels from 'stem\.0', 'res\.0'; give them one ratio$"),
    ({"layers": {"res.0": 0.5}, "ignore": ["stem"]},
     r"^stages\.prune\.layers\.res\.0: coupled with 'stem\.0', which is left whole .* prunes none of"),
    ({"round_to": 8},
     r"^stages\.prune\.round_to: 8 cannot hold for 'br_a\.0', 'br_b\.0', 'dw\.0': their outputs are "
     r"concatenated into one group of 32 channels"),
])
def test_coupled_layers_refuse_what_torch_pruning_would_silently_change(kw, message):
    from compress.stages.prune import check_coupling

    with pytest.raises(CompressError, match=message):
        check_coupling(Branchy(), prune_cfg(**kw), SHAPE, NCLS)


def test_coupled_layers_given_one_ratio_are_pruned_together():
    from compress.stages.prune import check_coupling, spread_ratios

    model = Branchy()
    cfg = prune_cfg(layers={"stem.0": 0.75, "res.0": 0.75}, ignore=["br_a", "br_b"])
    groups = check_coupling(model, cfg, SHAPE, NCLS)
    assert spread_ratios(groups, model, cfg, NCLS) == []
    prune_model(model, cfg, SHAPE, NCLS, 0.5)
    assert (model.stem[0].out_channels, model.res[0].out_channels) == (4, 4)
    assert (model.br_a[0].out_channels, model.br_b[0].out_channels, model.pw[0].out_channels) == (16, 16, 16)
    one = prune_cfg(layers={"stem.0": 0.75})
    assert spread_ratios(check_coupling(Branchy(), one, SHAPE, NCLS), Branchy(), one, NCLS) == [
        "note: stages.prune.layers.stem.0: ratio 0.75 also applies to 'res.0' (coupled: pruned together)"]


def test_a_group_torch_pruning_skips_is_an_error_not_silence():
    """Freshly initialised, torch-pruning ranks the concatenated group's channels alike and
    skips the group: the branches would stay whole under a ratio that asks for half."""
    from compress.stages.prune import check_coupling, check_outcome

    model = Branchy()
    cfg = prune_cfg(ratio=0.5)
    groups = check_coupling(model, cfg, SHAPE, NCLS)
    prune_model(model, cfg, SHAPE, NCLS, 0.5)
    assert model.stem[0].out_channels == 8 and model.br_a[0].out_channels == 16   # the skip itself
    with pytest.raises(CompressError, match=r"^stages\.prune: torch-pruning left 'br_a\.0', 'br_b\.0', 'dw\.0' "
                                            r"\(concatenated\) whole, though ratio 0\.5 asks to remove 16 of 32"):
        check_outcome(groups, model, cfg, NCLS, 0.5)
    pruned, _ = tiny_vgg()
    cfg = prune_cfg()
    groups = check_coupling(pruned, cfg, SHAPE, NCLS)
    prune_model(pruned, cfg, SHAPE, NCLS, 0.5)
    check_outcome(groups, pruned, cfg, NCLS, 0.5)   # every layer narrowed: no error


@pytest.mark.parametrize("ignore, message", [
    (["stem.2"], r"^stages\.prune\.ignore\[0\]: 'stem\.2' is a ReLU, with no Conv2d/Linear to leave whole"),
    (["stem.0", "res.1"], r"^stages\.prune\.ignore\[1\]: 'res\.1' is a BatchNorm2d"),
    (["stem.9"], r"^stages\.prune\.ignore\[0\]: no layer 'stem\.9' \(did you mean 'stem\.0'\?\); prunable layers: "
                 r"stem\.0, res\.0, br_a\.0, br_b\.0, dw\.0, pw\.0$"),
    (["stem", "br_*.9"], r"^stages\.prune\.ignore\[1\]: pattern 'br_\*\.9' matches no Conv2d/Linear path; "
                         r"prunable layers: stem\.0, res\.0, br_a\.0, br_b\.0, dw\.0, pw\.0$"),
    (["br_?"], r"^stages\.prune\.ignore\[0\]: pattern 'br_\?' matches no Conv2d/Linear path"),   # blocks: by path
])
def test_ignore_names_something_pruning_narrows(ignore, message):
    from compress.stages.prune import check_ignore

    with pytest.raises(CompressError, match=message):
        check_ignore(Branchy(), prune_cfg(ignore=ignore), NCLS)
    check_ignore(Branchy(), prune_cfg(ignore=["stem", "br_a.0"]), NCLS)   # a block, a conv: fine
    check_ignore(Branchy(), prune_cfg(ignore=["br_?.0", "*w.*"]), NCLS)   # patterns that match convs


def test_an_ignore_pattern_leaves_whole_exactly_the_layers_it_matches():
    from compress.stages.prune import ignore_hint, left_whole, matching_layers

    model = Branchy()
    whole = {id(m) for m in left_whole(model, prune_cfg(ignore=["br_?.0", "[dp]w.*"]), NCLS)}
    assert whole == {id(m) for m in (model.br_a[0], model.br_b[0], model.dw[0], model.pw[0], model.fc)}
    widths = {}
    for ignore in (["br_?.0"], ["br_a.0", "br_b.0"]):
        m = Branchy()
        prune_model(m, prune_cfg(ignore=ignore, layers={"stem.0": 0.5, "res.0": 0.5}), SHAPE, NCLS, 0.5)
        widths[ignore[0]] = [c.out_channels for c in convs(m)]
    assert widths["br_?.0"] == widths["br_a.0"] == [8, 8, 16, 16, 32, 16]
    # the hint names the pattern only where more layers end alike, and never '*.0'
    assert ignore_hint(model, "br_a.0") == "ignore: ['br_a.0']"
    vgg, _ = tiny_vgg()
    assert ignore_hint(vgg, "features.0") == "ignore: ['features.0']"
    mnv3 = build_model({"arch": "torchvision:mobilenet_v3_small", "args": {"in_channels": 1, "num_classes": NCLS}})
    assert ignore_hint(mnv3, "features.1.block.1.fc1") == (     # its squeeze-excitation convs
        "ignore: ['features.1.block.1.fc1'], or ['*.fc1'] for all 9 alike")
    # not a pattern that would leave most layers whole: every timm conv-norm-act block's '.conv'
    regnet = build_model({"arch": "timm:regnetx_002", "args": {"in_channels": 1, "num_classes": NCLS}})
    assert len(matching_layers(regnet, "*.conv")) == 44
    assert ignore_hint(regnet, "s1.b1.conv1.conv") == "ignore: ['s1.b1.conv1.conv']"


def test_l1_keeps_largest_filters():
    model, _ = tiny_vgg(cfg=[8, "M", 16])
    c1, bn1, c2 = model.features[0], model.features[1], model.features[4]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # filter o of each conv: +-scale[o] in every entry, so its L1 norm is scale[o] * size.
        # conv2's input channel i is scaled by 10 * (9 - scale1[i]): large where conv1's filter
        # is small, so criteria that sum over the dependency group (group_l1) rank conv1's
        # channels the other way round and this test tells them apart.
        scale1 = torch.randperm(8, generator=g).float() + 1
        scale2 = torch.randperm(16, generator=g).float() + 1
        in2 = 10 * (9 - scale1)
        for conv, scale, inscale in ((c1, scale1, torch.ones(3)), (c2, scale2, in2)):
            signs = torch.randint(0, 2, conv.weight.shape, generator=g).float() * 2 - 1
            conv.weight.copy_(signs * scale.view(-1, 1, 1, 1) * inscale.view(1, -1, 1, 1))
        bn1.weight.copy_(torch.arange(8.0) + 1)
        bn1.bias.copy_(torch.arange(8.0) / 10)
    l1 = {conv: conv.weight.abs().sum((1, 2, 3)) for conv in (c1, c2)}
    keep1 = l1[c1].topk(4).indices.sort().values
    keep2 = l1[c2].topk(8).indices.sort().values
    w1, w2 = c1.weight.detach().clone(), c2.weight.detach().clone()
    bw, bb = bn1.weight.detach().clone(), bn1.bias.detach().clone()
    wc = model.classifier.weight.detach().clone()

    pruned = prune_model(model, prune_cfg(importance="l1"), SHAPE, NCLS, 0.5)
    p1, pbn1, p2 = pruned.features[0], pruned.features[1], pruned.features[4]
    assert torch.equal(p1.weight, w1[keep1])
    assert torch.equal(pbn1.weight, bw[keep1]) and torch.equal(pbn1.bias, bb[keep1])
    assert torch.equal(p2.weight, w2[keep2][:, keep1])
    assert torch.equal(pruned.classifier.weight, wc[:, keep2])


# ---- target_macs -----------------------------------------------------------------------------

@pytest.mark.parametrize("target", [0.5, 0.3])
def test_ratio_for_macs_hits_target(target):
    model, _ = tiny_vgg()
    cfg = prune_cfg(target_macs=target)
    _, macs0 = model_cost(model, SHAPE)
    ratio = ratio_for_macs(model, cfg, SHAPE, NCLS, target)
    assert 0 < ratio < 1
    assert [c.out_channels for c in convs(model)] == [16, 32, 32]  # the input is left untouched
    kept = model_cost(prune_model(copy.deepcopy(model), cfg, SHAPE, NCLS, ratio), SHAPE)[1] / macs0
    assert 0.8 * target <= kept <= target
    # the smallest such ratio: a slightly smaller one keeps more than the target
    less = model_cost(prune_model(copy.deepcopy(model), cfg, SHAPE, NCLS, ratio - 1e-3), SHAPE)[1] / macs0
    assert less > target


def test_prune_stage_config_exclusive():
    with pytest.raises(Exception, match="exactly one of `ratio` or `target_macs`"):
        PruneStage(name="p", **{"from": "t"})
    assert prune_cfg().importance == "l1" and prune_cfg().global_ is False


# ---- the prune stage's run() -----------------------------------------------------------------

def test_prune_stage_run(tiny_recipe_dict, fmnist_root):
    recipe = parse_recipe(tiny_recipe_dict)
    data = fashion_mnist(root=str(fmnist_root), download=False)
    torch.manual_seed(0)
    args = {"cfg": [8, "M", 16], "in_channels": 1, "num_classes": 10}
    teacher = build_model({"arch": "vgg_small", "args": args})
    ctx = RunContext(recipe=recipe, data=data, device=torch.device("cpu"))
    ctx.results["teacher"] = StageResult(spec=make_spec("vgg_small", args), model=teacher)
    before = layer_shapes(teacher)

    result = STAGES["prune"].run(recipe.stage("prune"), ctx)
    assert layer_shapes(teacher) == before            # the teacher's model is not touched
    m = result.metrics
    assert m["params"] < m["params_before"] and m["macs"] < m["macs_before"]
    assert m["params_ratio"] == round(m["params"] / m["params_before"], 4)
    assert 0 <= m["top1"] <= 100
    assert result.info["ratio"] == 0.5
    assert result.info["widths"] == {"features.0": [8, 4], "features.4": [16, 8]}
    rebuilt = build_model(result.spec)
    assert layer_shapes(rebuilt) == layer_shapes(result.model)
    rebuilt.load_state_dict(result.model.state_dict())


# ---- architecture specs and checkpoints ------------------------------------------------------

@pytest.fixture
def pruned():
    model, args = tiny_vgg()
    with torch.no_grad():  # non-trivial BN statistics, so buffers are checked too
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
    model = prune_model(model, prune_cfg(), SHAPE, NCLS, 0.5).eval()
    return make_spec("vgg_small", args, model), model


def test_spec_round_trip(pruned):
    spec, model = pruned
    rebuilt = build_model(spec)
    assert layer_shapes(rebuilt) == layer_shapes(model) == spec["shapes"]
    rebuilt.load_state_dict(model.state_dict())  # strict: every tensor fits
    unpruned = build_model({k: v for k, v in spec.items() if k != "shapes"})
    assert layer_shapes(unpruned) != spec["shapes"]


def test_build_model_unknown_layer_in_spec(pruned):
    spec, _ = pruned
    spec["shapes"]["features.42"] = {"num_features": 3}
    with pytest.raises(CompressError, match="checkpoint names layer 'features.42' that model lacks"):
        build_model(spec)


def test_checkpoint_round_trip(pruned, tmp_path):
    spec, model = pruned
    path = tmp_path / "ck" / "model.pt"
    save_checkpoint(path, spec, model)
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp file left behind
    spec2, model2 = load_checkpoint(path)
    assert spec2 == spec
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), model2.eval()(x))
    # rebuildable without unpickling code
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"spec", "state_dict"} and raw["spec"]["arch"] == "vgg_small"
    assert all(isinstance(v, torch.Tensor) for v in raw["state_dict"].values())


def test_checkpoint_overwrite(pruned, tmp_path):
    spec, model = pruned
    path = tmp_path / "model.pt"
    other, other_args = tiny_vgg(seed=1)
    save_checkpoint(path, make_spec("vgg_small", other_args, other), other)
    save_checkpoint(path, spec, model)
    assert load_checkpoint(path)[0] == spec


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not-a-checkpoint"])
def test_corrupt_checkpoint(pruned, tmp_path, damage):
    spec, model = pruned
    path = tmp_path / "model.pt"
    save_checkpoint(path, spec, model)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save(model.state_dict(), path)  # weights only, no spec
    with pytest.raises(CompressError) as e:
        load_checkpoint(path)
    assert str(e.value).startswith(f"{path}: not a readable compress checkpoint")


def test_checkpoint_weights_do_not_fit(pruned, tmp_path):
    spec, _ = pruned
    whole, _ = tiny_vgg()
    path = tmp_path / "model.pt"
    save_checkpoint(path, spec, whole)  # spec says pruned, weights are unpruned
    with pytest.raises(CompressError, match=r"weights do not fit the stored architecture \(size mismatch for "
                                            r"features\.0\.weight: .*\); if the model's code changed since it "
                                            r"was saved, `compress run --fresh` recomputes$"):
        load_checkpoint(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CompressError, match="not a readable compress checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("spec,state", [
    ({"args": {}}, None),                                               # no arch
    ({"arch": "vgg_small", "args": {"bogus": 1}}, None),                # unknown factory arg
    ({"arch": "vgg_small", "args": {}, "shapes": {"features.0": {"num_features": 3}}}, None),
    (None, torch.zeros(3)),                                             # state_dict not a dict
], ids=["no-arch", "bad-arg", "bad-shape-kind", "state-not-dict"])
def test_checkpoint_malformed_contents(pruned, tmp_path, spec, state):
    good_spec, model = pruned
    path = tmp_path / "model.pt"
    torch.save({"spec": spec or good_spec, "state_dict": model.state_dict() if state is None else state}, path)
    with pytest.raises(CompressError):
        load_checkpoint(path)


# ---- the model registry ----------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(VGG_CFGS))
def test_model_forward_shape(arch):
    torch.manual_seed(0)
    model = build_model({"arch": arch, "args": {"in_channels": 3, "num_classes": 7, "width": 0.125}})
    widths = [c.out_channels for c in convs(model)]
    assert widths == [max(1, round(v * 0.125)) for v in VGG_CFGS[arch] if v != "M"]
    assert model.classifier.out_features == 7
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 7) and torch.isfinite(out).all()
    rebuilt = build_model(make_spec(arch, {"in_channels": 3, "num_classes": 7, "width": 0.125}, model))
    assert layer_shapes(rebuilt) == layer_shapes(model)


def test_model_cfg_overrides_default():
    model = build_model({"arch": "vgg16", "args": {"cfg": [4, "M", 8], "in_channels": 1}})
    assert [c.out_channels for c in convs(model)] == [4, 8]
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_unknown_arch():
    with pytest.raises(CompressError, match=r"unknown model 'resnet' \(did you mean 'resnet\d+'\?\); valid: .*vgg_small"):
        build_model({"arch": "resnet"})
