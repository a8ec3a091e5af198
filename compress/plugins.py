"""``--plugin``: the one way user code gets imported. A recipe only names registry entries
(models, loss terms, datasets, stage kinds); a plugin module adds entries with the same
``register`` decorators before the recipe is parsed.

>>> load_plugins(["my_models"])          # a module on sys.path
>>> load_plugins(["./extra_losses.py"])  # or a file
"""

import importlib
import importlib.util
import sys
from pathlib import Path

from .errors import CompressError


def _import_file(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None:
        raise CompressError(f"--plugin {path}: not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(path.stem, None)
        raise
    return module


def load_plugins(names):
    """Import each plugin (a module name, or a path ending in .py), in order; a failure is
    one CompressError naming the plugin (the traceback is chained for --debug)."""
    for name in names:
        try:
            if name.endswith(".py"):
                path = Path(name)
                if not path.is_file():
                    raise CompressError(f"--plugin {name}: file does not exist")
                _import_file(path)
            else:
                importlib.import_module(name)
        except CompressError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's code: any failure is one line
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise CompressError(f"--plugin {name}: import failed ({type(e).__name__}: {first})") from e
