"""Any architecture of an installed model library, by name: ``arch: torchvision:resnet18``
or ``arch: timm:resnet18``. Random initialisation only (nothing is downloaded), sized from
the data: the library's own `num_classes` / `in_chans` where the constructor has them,
otherwise the first 3-channel conv and the classifier are replaced by ones of the right
width. ``args`` go to the library's constructor (e.g. ``{width_mult: 0.5}``).

Feature points: ``penultimate`` (the classifier's input) always; ``stage1``..``stageN``
from timm's ``feature_info``, and for torchvision the last block at each resolution,
measured by one forward of a 32x32 image (none when the model does not accept it).
"""

import difflib
import inspect

import torch
from torch import nn

from ..errors import CompressError
from . import HUBS, PENULTIMATE, REFUSED_ARGS, classifier_path


def _unknown(hub, name, names, listing):
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"close: {', '.join(close)}" if close else f"all names: {listing}"
    return CompressError(f"unknown {hub} model '{name}' ({hint})")


def _signature(params, var_kwargs):
    """A factory signature: in_channels, num_classes, then the library's own keyword args."""
    kw = inspect.Parameter.KEYWORD_ONLY
    ps = [inspect.Parameter("in_channels", kw, default=3), inspect.Parameter("num_classes", kw, default=10)]
    ps += [inspect.Parameter(p, kw, default=None) for p in params if p not in ("in_channels", "num_classes")]
    if var_kwargs:
        ps.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
    return inspect.Signature(ps)


def _refuse(hub, name, kwargs):
    for k in REFUSED_ARGS:
        if k in kwargs:
            raise CompressError(f"{hub}:{name}: argument '{k}' is not allowed: models start from a random "
                                "initialisation (nothing is downloaded or loaded)")


def replace_first_conv(model, in_channels):
    """Swap the first conv that reads 3 channels for one reading `in_channels` (random init)."""
    for path, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.in_channels == 3:
            new = nn.Conv2d(in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                            1 if m.groups == 1 else in_channels, m.bias is not None, m.padding_mode)
            parent, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, new)
            return model
    raise CompressError(f"cannot adapt {type(model).__name__} to {in_channels} input channels: no 3-channel conv")


def replace_classifier(model, num_classes):
    path = classifier_path(model)
    if path is None:
        raise CompressError(f"cannot size {type(model).__name__} for {num_classes} classes: no Linear classifier")
    old = model.get_submodule(path)
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf,
            nn.Linear(old.in_features, num_classes, old.bias is not None))
    return model


_SKIP = (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._MaxPoolNd,
         nn.modules.pooling._AvgPoolNd, nn.Flatten, nn.Dropout, nn.Identity)


def measured_stages(model, in_channels, size=32, classifier=None):
    """{stageK: path}: the last top-level block (a child of the model, or of a child that
    spans several resolutions, e.g. ``features``) at each resolution of one forward of a
    `size` x `size` image, in order of decreasing resolution; pools and the classifier
    (or what holds it) are skipped."""
    shapes, order = {}, []
    mods = {p: m for p, m in model.named_modules() if p and p.count(".") <= 1}
    def record(p):
        def hook(_m, _i, out):
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                shapes[p] = tuple(out.shape[2:])
                order.append(p)
        return hook
    handles = [m.register_forward_hook(record(p)) for p, m in mods.items()]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, in_channels, size, size))
    except Exception:  # noqa: BLE001 - a model that needs another input size just gets no stages
        return {}
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    tops = [p for p in dict.fromkeys(order) if "." not in p]
    chosen = []
    for p in tops:
        kids = [k for k in dict.fromkeys(order) if k.startswith(p + ".")]
        chosen += kids if len({shapes[k] for k in kids}) > 1 else [p]
    stages = {}
    for p in chosen:
        holds_head = classifier is not None and (classifier + ".").startswith(p + ".")
        if not isinstance(mods[p], _SKIP) and not holds_head:
            stages[shapes[p]] = p      # the last one at each resolution wins
    ranked = sorted(stages.items(), key=lambda kv: -kv[0][0] * kv[0][1])
    return {f"stage{i + 1}": p for i, (_, p) in enumerate(ranked)}


@HUBS.register("torchvision")
def torchvision_factory(name):
    """A factory for torchvision's classification model `name` (random init)."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise _unknown("torchvision", name, names, "torchvision.models.list_models()")
    builder = torchvision.models.get_model_builder(name)
    cls = inspect.signature(builder).return_annotation
    if inspect.isclass(cls):
        own = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        params, var_kw = [p for p in own if p not in ("args", "kwargs")], "kwargs" in own
    else:
        params, var_kw = [], True
    has_classes = "num_classes" in params or var_kw

    def make(in_channels=3, num_classes=10, **kwargs):
        _refuse("torchvision", name, kwargs)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if "aux_logits" in params:   # googlenet, inception_v3: one logits tensor, not a tuple
            kwargs.setdefault("aux_logits", False)
        model = builder(weights=None, **({"num_classes": num_classes} if has_classes else {}), **kwargs)
        if not has_classes:
            replace_classifier(model, num_classes)
        if in_channels != 3:
            replace_first_conv(model, in_channels)
        c = classifier_path(model, num_classes)
        points = measured_stages(model, in_channels, classifier=c)
        if c is not None:
            points[PENULTIMATE] = c
        model.feature_points = points
        return model

    make.__name__ = make.__qualname__ = f"torchvision:{name}"
    make.__signature__ = _signature(params, var_kw)
    return make


@HUBS.register("timm")
def timm_factory(name):
    """A factory for timm's model `name` (random init, `pretrained=False`)."""
    try:
        import timm
    except ImportError:
        raise CompressError(f"timm:{name} needs the timm package, which is not installed: "
                            "pip install 'compress[timm]' (or pip install timm)") from None
    base = name.split(".")[0]      # a pretrained tag (resnet18.a1_in1k) names weights we never load
    if not timm.is_model(base):
        raise _unknown("timm", name, timm.list_models(), "timm.list_models()")

    def make(in_channels=3, num_classes=10, **kwargs):
        _refuse("timm", name, kwargs)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        model = timm.create_model(base, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
        paths = {p for p, _ in model.named_modules()}
        info = [f["module"] for f in getattr(model, "feature_info", None) or [] if isinstance(f, dict)]
        points = {f"stage{i + 1}": p for i, p in enumerate(p for p in info if p in paths)}
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        cpath = next((p for p, m in model.named_modules() if m is head and p), None) if head is not None else None
        if cpath is not None and not isinstance(head, nn.Identity):
            points[PENULTIMATE] = cpath
        model.feature_points = points
        return model

    make.__name__ = make.__qualname__ = f"timm:{name}"
    make.__signature__ = _signature([], True)
    return make
