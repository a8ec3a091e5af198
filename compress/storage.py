"""Where a run may write, overwrite and delete: ``runs/<recipe>/`` and ``exports/<recipe>/``
under the workdir, and nowhere else. Every delete the tool performs goes through
:meth:`Storage.remove`, which refuses any path that does not resolve strictly inside one of
those two folders, so no recipe, name or symlink can make a run delete files it never wrote.
"""

import re
import shutil
from pathlib import Path

from .errors import CompressError

# A name that becomes a path component: letters, digits, '_', '-' and '.', not starting with
# '.' (so never '.', '..' or a hidden file), no separators; 100 characters at most.
SAFE_NAME = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}$"
_SAFE = re.compile(SAFE_NAME)


def check_name(name, where):
    """Raise a CompressError unless `name` is a safe path component."""
    if not isinstance(name, str) or not _SAFE.match(name):
        raise CompressError(f"{where}: {name!r} cannot name a folder or file; use letters, digits, "
                            "'_', '-' and '.' (not first), at most 100 characters")
    return name


def name_problem(name):
    """None, or why `name` is not a safe path component (for pydantic validators)."""
    if isinstance(name, str) and _SAFE.match(name):
        return None
    return (f"{name!r} cannot name a folder or file; use letters, digits, '_', '-' and '.' "
            "(not first), at most 100 characters")


class Storage:
    """The two folders one recipe owns under `workdir`.

    >>> s = Storage(".", "vgg_prune_kd")
    >>> s.remove(s.run_dir / "tb" / "teacher")   # fine; s.remove(Path("..")) raises
    """

    def __init__(self, workdir, recipe_name):
        check_name(recipe_name, "name")
        self.workdir = Path(workdir)
        self.run_dir = self.workdir / "runs" / recipe_name
        self.export_dir = self.workdir / "exports" / recipe_name

    def owned(self, path):
        """`path` if it resolves strictly inside runs/<recipe>/ or exports/<recipe>/, else a
        CompressError (the one check every delete and overwrite passes)."""
        p = Path(path)
        real = p.resolve()
        for root in (self.run_dir, self.export_dir):
            r = root.resolve()
            if real != r and r in real.parents:
                return p
        raise CompressError(f"refusing to delete or overwrite {p}: outside {self.run_dir}/ and "
                            f"{self.export_dir}/, the only folders this run owns")

    def remove(self, path):
        """Delete a file or folder tree the run owns; a missing path is fine."""
        p = self.owned(path)
        if p.is_symlink() or p.is_file():
            p.unlink(missing_ok=True)
        elif p.is_dir():
            shutil.rmtree(p)
