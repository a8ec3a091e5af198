"""Intermediate features captured by forward hooks keyed by module path (``features.10``),
so models stay plain and pruned/quantized/exported models keep working."""

from contextlib import contextmanager

from .errors import CompressError, did_you_mean


def module_paths(model):
    return [p for p, _ in model.named_modules() if p]


def resolve(model, path, where="layer"):
    """The submodule at `path`, or a CompressError listing what is valid."""
    valid = module_paths(model)
    if path not in valid:
        shown = ", ".join(valid[:40]) + (" ..." if len(valid) > 40 else "")
        raise CompressError(f"{where}: no layer '{path}'{did_you_mean(path, valid)}; valid: {shown}")
    return model.get_submodule(path)


class FeatureTaps:
    """Records the outputs of named submodules on every forward.

    >>> taps = FeatureTaps(model, ["features.10"])
    >>> with taps.attached():
    ...     logits = model(x)
    >>> taps.features["features.10"].shape
    """

    def __init__(self, model, paths, where="layer"):
        self.model = model
        self.paths = list(dict.fromkeys(paths))
        self.where = where
        self.features = {}
        for p in self.paths:
            resolve(model, p, where)

    @contextmanager
    def attached(self):
        handles = []
        for p in self.paths:
            def hook(_m, _inp, out, p=p):
                self.features[p] = out
            handles.append(self.model.get_submodule(p).register_forward_hook(hook))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
