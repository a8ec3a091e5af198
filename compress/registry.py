"""One plain dict per extension point, filled by a decorator that refuses duplicates."""

from .errors import CompressError, unknown


class Registry(dict):
    """A name -> object dict. The key is the name a user writes in YAML.

    >>> MODELS = Registry("model")
    >>> @MODELS.register("vgg11")
    ... def vgg11(**kw): ...
    """

    def __init__(self, what):
        super().__init__()
        self.what = what

    def register(self, name):
        def deco(obj):
            if name in self:
                raise ValueError(f"{self.what} '{name}' is registered twice")
            self[name] = obj
            return obj

        return deco

    def get_or_fail(self, name, path=None):
        if name not in self:
            msg = unknown(self.what, name, self.keys())
            raise CompressError(f"{path}: {msg}" if path else msg)
        return self[name]
