"""Model registry, named feature points and rebuildable architecture specs.

A model is a plain ``nn.Module`` with ``forward(x) -> logits``. A stored model is
an *architecture spec* -- registry name, args, and the (possibly pruned) shape of
every conv, linear and batch-norm layer -- plus a ``state_dict``; rebuilding never
unpickles code.

Architectures declare named **feature points** (``model.feature_points``: name -> module
path), e.g. ``stage1``..``stage3`` and ``penultimate``, so loss terms tap a point that
means the same on every architecture. ``penultimate`` names the classifier: its tap is the
classifier's *input*, the pooled, flattened vector the logits are computed from.
"""

import inspect

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import CompressError
from ..registry import Registry

MODELS = Registry("model")   # filled by one file per architecture family in this folder
# "torchvision" / "timm" -> resolver(name) returning a factory; `arch: torchvision:resnet18`.
HUBS = Registry("model hub")

PENULTIMATE = "penultimate"
# Arguments that would load or download weights: a recipe never does either.
REFUSED_ARGS = ("weights", "pretrained", "progress", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay")


def model_factory(arch, path=None):
    """The factory that builds `arch`: a registry entry, or ``hub:name`` (torchvision, timm).
    Its signature lists the accepted args (``**kwargs`` where the library does not say)."""
    hub, sep, name = str(arch).partition(":")
    if sep and hub in HUBS:
        try:
            return HUBS[hub](name)
        except CompressError as e:
            raise CompressError(f"{path}: {e}" if path else str(e)) from None
    return MODELS.get_or_fail(arch, path)


def factory_params(factory):
    """(named args, accepts any **kwargs) of a model factory."""
    params = inspect.signature(factory).parameters
    named = {k for k, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return named, any(p.kind is p.VAR_KEYWORD for p in params.values())


# ---- feature points --------------------------------------------------------------------

def classifier_path(model, num_classes=None):
    """Module path of the layer that computes the logits: the declared `penultimate`
    point, else the last Linear (with `num_classes`: the last Linear or Conv2d with that
    many outputs), else None."""
    declared = getattr(model, "feature_points", None) or {}
    if PENULTIMATE in declared:
        return declared[PENULTIMATE]
    last = None
    for p, m in model.named_modules():
        outs = m.out_features if isinstance(m, nn.Linear) else m.out_channels if isinstance(m, nn.Conv2d) else None
        if outs is not None and (outs == num_classes if num_classes is not None else isinstance(m, nn.Linear)):
            last = p
    # A layer wrapped by a module of its own (a fake-quant QLinear holding `linear`) may
    # never be called: the wrapper is the classifier.
    while last and "." in last:
        parent = last.rpartition(".")[0]
        if isinstance(model.get_submodule(parent), (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            break
        last = parent
    return last


def feature_points(model):
    """{name: module path} of `model`'s named feature points. An Ensemble's are its
    members' prefixed by ``members.<i>.``; a model that declares none gets `penultimate`
    when it has a Linear classifier."""
    if isinstance(model, Ensemble):
        return {f"members.{i}.{n}": f"members.{i}.{p}"
                for i, m in enumerate(model.members) for n, p in feature_points(m).items()}
    points = dict(getattr(model, "feature_points", None) or {})
    if PENULTIMATE not in points and (c := classifier_path(model)):
        points[PENULTIMATE] = c
    return points


def resolve_point(model, name):
    """(module path, "input" | "output") that feature point or module path `name` taps, or
    None. A module path wins over a point of the same name; ``members.0.stage2`` resolves
    the point ``stage2`` of the submodule ``members.0``."""
    paths = dict(model.named_modules(remove_duplicate=False))
    if name in paths and name:
        return name, "output"
    prefix, _, point = name.rpartition(".")
    if prefix and prefix not in paths:
        return None
    sub = paths[prefix] if prefix else model
    target = feature_points(sub).get(point)
    if target is None:
        return None
    full = f"{prefix}.{target}" if prefix else target
    return full, "input" if point == PENULTIMATE else "output"


# ---- architecture specs ------------------------------------------------------------

def _shape(m):
    """The recorded widths of a prunable layer (subclasses included: timm's BatchNormAct2d,
    Conv2dSame, LayerNorm2d), or None for other modules."""
    if isinstance(m, nn.Conv2d):
        return {"in_channels": int(m.in_channels), "out_channels": int(m.out_channels), "groups": int(m.groups)}
    if isinstance(m, nn.Linear):
        return {"in_features": int(m.in_features), "out_features": int(m.out_features)}
    if isinstance(m, _BatchNorm):
        return {"num_features": int(m.num_features)}
    if isinstance(m, nn.GroupNorm):
        return {"num_groups": int(m.num_groups), "num_channels": int(m.num_channels)}
    if isinstance(m, nn.LayerNorm):
        return {"normalized_shape": [int(d) for d in m.normalized_shape]}
    return None


def layer_shapes(model):
    """{module path: {attr: int}} for every Conv2d/Linear/BatchNorm/GroupNorm/LayerNorm:
    the pruned widths; and {parameter path: {"shape": [...]}} for the parameters of other
    modules (e.g. a ConvNeXt block's layer-scale `gamma`, pruned with its channels)."""
    shapes = {}
    for p, m in model.named_modules():
        if (s := _shape(m)) is not None:
            shapes[p] = s
        else:
            for n, t in m.named_parameters(recurse=False):
                shapes[f"{p}.{n}" if p else n] = {"shape": list(t.shape)}
    return shapes


def _drop(n_now, n_want):
    return list(range(n_want, n_now))   # the trailing channels: values come from the state_dict


def _resize(m, s):
    """Shrink layer `m` in place to the recorded shape `s` with torch-pruning's per-layer
    pruning functions (they keep depthwise groups and subclass attributes consistent)."""
    import torch_pruning as tp   # here, not at the top: with the timm and torchvision it imports,
    # 2.5-3 s that commands which only read ONNX files or results (bench, compare) never need

    cur = _shape(m)
    if isinstance(m, nn.Conv2d):
        dw = cur["groups"] == cur["in_channels"] == cur["out_channels"] > 1
        if dw and s["groups"] == s["in_channels"] == s["out_channels"]:
            tp.prune_depthwise_conv_out_channels(m, _drop(cur["out_channels"], s["out_channels"]))
        else:
            if s["out_channels"] < cur["out_channels"]:
                tp.prune_conv_out_channels(m, _drop(cur["out_channels"], s["out_channels"]))
            if s["in_channels"] < cur["in_channels"]:
                tp.prune_conv_in_channels(m, _drop(cur["in_channels"], s["in_channels"]))
    elif isinstance(m, nn.Linear):
        if s["out_features"] < cur["out_features"]:
            tp.prune_linear_out_channels(m, _drop(cur["out_features"], s["out_features"]))
        if s["in_features"] < cur["in_features"]:
            tp.prune_linear_in_channels(m, _drop(cur["in_features"], s["in_features"]))
    elif isinstance(m, _BatchNorm):
        tp.prune_batchnorm_out_channels(m, _drop(cur["num_features"], s["num_features"]))
    elif isinstance(m, nn.GroupNorm):
        tp.prune_groupnorm_out_channels(m, _drop(cur["num_channels"], s["num_channels"]))
    elif len(s["normalized_shape"]) == len(cur["normalized_shape"]):   # LayerNorm: channels last
        tp.prune_layernorm_out_channels(m, _drop(cur["normalized_shape"][-1], s["normalized_shape"][-1]))
    return _shape(m)


def apply_layer_shapes(model, shapes):
    """Shrink the layers whose recorded shape differs (a pruned model) to that shape."""
    current = layer_shapes(model)
    for path, s in shapes.items():
        if path not in current:
            raise CompressError(f"checkpoint names layer '{path}' that model lacks")
        if current[path] == s:
            continue
        if "shape" in s:   # a bare parameter: its values come from the state_dict
            parent, _, leaf = path.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            old = getattr(owner, leaf)
            setattr(owner, leaf, nn.Parameter(old.new_empty(s["shape"]), old.requires_grad))
            continue
        got = _resize(model.get_submodule(path), s)
        if got != s:
            raise CompressError(f"checkpoint layer '{path}': cannot rebuild shape {s} from {current[path]}")
    return model


def build_model(spec):
    """Rebuild a model from an architecture spec ``{"arch", "args", "shapes"}``.

    >>> m = build_model({"arch": "vgg_small", "args": {"in_channels": 1, "num_classes": 10}})
    """
    model = model_factory(spec["arch"])(**spec.get("args", {}))
    if spec.get("shapes"):
        with torch.no_grad():
            apply_layer_shapes(model, spec["shapes"])
    return model


def make_spec(arch, args, model=None):
    """The spec that rebuilds `model` (records its current, possibly pruned, shapes)."""
    spec = {"arch": arch, "args": dict(args)}
    if model is not None:
        spec["shapes"] = layer_shapes(model)
    return spec


def count_params(model):
    return sum(p.numel() for p in model.parameters())


class Ensemble(nn.Module):
    """Weighted mean of its members' logits. Members stay addressable by path
    (``members.0.features.3``), so feature hooks reach inside any one of them.

    >>> Ensemble([VGG([4], 1, 3), VGG([4], 1, 3)])(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 3])
    """

    def __init__(self, members, weights=None):
        super().__init__()
        self.members = nn.ModuleList(members)
        w = torch.tensor(weights if weights is not None else [1.0] * len(members), dtype=torch.float32)
        self.register_buffer("weights", w / w.sum())

    def forward(self, x):
        out = self.weights[0] * self.members[0](x)
        for w, m in zip(self.weights[1:], self.members[1:]):
            out = out + w * m(x)
        return out


def ensemble_spec(member_specs, weights=None):
    """Architecture spec of an Ensemble: rebuilt member by member."""
    return {"arch": "ensemble", "members": list(member_specs), "weights": weights}


# Import every architecture file so its @MODELS.register runs (after the helpers above exist).
import importlib as _importlib  # noqa: E402
import pkgutil as _pkgutil  # noqa: E402

for _m in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f"{__name__}.{_m.name}")

from .vgg import VGG, VGG_CFGS, validate_cfg  # noqa: E402,F401  (the names other modules import)
