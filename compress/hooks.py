"""Intermediate features captured by forward hooks, named by feature point (``stage2``,
``penultimate``: declared by each architecture) or by module path (``features.10``), so
models stay plain and pruned/quantized/exported models keep working."""

from contextlib import contextmanager

from .errors import CompressError, did_you_mean


def module_paths(model):
    return [p for p, _ in model.named_modules() if p]


def resolve_tap(model, name, where="layer"):
    """(module path, "input" | "output") that `name` taps on `model`, or a CompressError
    listing the valid feature points and module paths."""
    from .models import feature_points, resolve_point

    found = resolve_point(model, name)
    if found is None:
        valid = list(feature_points(model)) + module_paths(model)
        shown = ", ".join(valid[:40]) + (" ..." if len(valid) > 40 else "")
        raise CompressError(f"{where}: no layer '{name}'{did_you_mean(name, valid)}; valid: {shown}")
    return found


def resolve(model, name, where="layer"):
    """The submodule that feature point or module path `name` names, or a CompressError
    listing what is valid."""
    return model.get_submodule(resolve_tap(model, name, where)[0])


class FeatureTaps:
    """Records, on every forward, the outputs of named submodules (the input of the
    classifier for ``penultimate``), keyed by the name asked for.

    >>> taps = FeatureTaps(model, ["stage2", "features.10", "penultimate"])
    >>> with taps.attached():
    ...     logits = model(x)
    >>> taps.features["penultimate"].shape
    """

    def __init__(self, model, paths, where="layer"):
        self.model = model
        self.paths = list(dict.fromkeys(paths))
        self.where = where
        self.features = {}
        self.targets = {p: resolve_tap(model, p, where) for p in self.paths}

    @contextmanager
    def attached(self):
        handles = []
        for p, (path, side) in self.targets.items():
            module = self.model.get_submodule(path)
            if side == "input":
                def pre_hook(_m, args, p=p):
                    self.features[p] = args[0]
                handles.append(module.register_forward_pre_hook(pre_hook))
            else:
                def hook(_m, _inp, out, p=p):
                    self.features[p] = out
                handles.append(module.register_forward_hook(hook))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
