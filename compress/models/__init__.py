"""Model registry and rebuildable architecture specs.

A model is a plain ``nn.Module`` with ``forward(x) -> logits``. A stored model is
an *architecture spec* -- registry name, args, and the (possibly pruned) shape of
every Conv2d/Linear/BatchNorm2d -- plus a ``state_dict``; rebuilding never unpickles
code.
"""

import torch
from torch import nn

from ..errors import CompressError
from ..registry import Registry

MODELS = Registry("model")   # filled by one file per architecture family in this folder

# ---- architecture specs ------------------------------------------------------------

_SHAPE_ATTRS = {
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.Linear: ("in_features", "out_features"),
    nn.BatchNorm2d: ("num_features",),
}


def layer_shapes(model):
    """{module path: {attr: int}} for every Conv2d/Linear/BatchNorm2d: the pruned widths."""
    shapes = {}
    for path, m in model.named_modules():
        for cls, attrs in _SHAPE_ATTRS.items():
            if type(m) is cls:
                shapes[path] = {a: int(getattr(m, a)) for a in attrs}
    return shapes


def _resized(m, s):
    if type(m) is nn.Conv2d:
        return nn.Conv2d(s["in_channels"], s["out_channels"], m.kernel_size, m.stride, m.padding,
                         m.dilation, s["groups"], m.bias is not None, m.padding_mode)
    if type(m) is nn.Linear:
        return nn.Linear(s["in_features"], s["out_features"], m.bias is not None)
    return nn.BatchNorm2d(s["num_features"], m.eps, m.momentum, m.affine, m.track_running_stats)


def apply_layer_shapes(model, shapes):
    """Replace layers whose recorded shape differs (a pruned model) with resized ones."""
    current = layer_shapes(model)
    for path, s in shapes.items():
        if path not in current:
            raise CompressError(f"checkpoint names layer '{path}' that model lacks")
        if current[path] == s:
            continue
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, leaf, _resized(getattr(parent, leaf), s))
    return model


def build_model(spec):
    """Rebuild a model from an architecture spec ``{"arch", "args", "shapes"}``.

    >>> m = build_model({"arch": "vgg_small", "args": {"in_channels": 1, "num_classes": 10}})
    """
    model = MODELS.get_or_fail(spec["arch"])(**spec.get("args", {}))
    if spec.get("shapes"):
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
