"""Where a run may write, overwrite and delete: ``runs/<recipe>/`` and ``exports/<recipe>/``
under the workdir, and nowhere else. Every delete the tool performs goes through
:meth:`Storage.remove`, which refuses any path that does not resolve strictly inside one of
those two folders, so no recipe, name or symlink can make a run delete files it never wrote.

One run at a time per recipe and workdir: :meth:`Storage.lock` holds an exclusive
``flock`` on ``runs/<recipe>/.lock`` for the whole run. The kernel drops the lock when the
process ends, however it ends, so a killed run never leaves a stale lock behind.

Results, checkpoints, reports and exported files are written whole or not at all
(:func:`atomic_write`: a temporary file beside the target, synced, then renamed over it).
"""

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

from .errors import CompressError

# mkstemp creates files readable by their owner alone; results get the usual mode instead.
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


def atomic_write(path, write):
    """Call ``write(tmp_path)`` then rename over `path`: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path, obj):
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n"))


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


def _safe(name):
    if why := name_problem(name):
        raise ValueError(why)
    return name


# A config/report field holding a name that becomes a path component.
SafeName = Annotated[str, AfterValidator(_safe)]


class Storage:
    """The two folders one recipe owns under `workdir`.

    >>> s = Storage(".", "vgg_prune_kd")
    >>> s.remove(s.run_dir / "tb" / "teacher")   # fine; s.remove(Path("..")) raises
    """

    def __init__(self, workdir, recipe_name, suffix=""):
        """`suffix` (a constant of the code, e.g. ``-sweep``) names the folders a command derives
        from the recipe's: ``runs/<recipe><suffix>/``. The recipe name is checked as the user
        gave it, so any name a recipe may have works with every suffix (100 + at most 20
        characters, well within the file systems' 255 bytes)."""
        check_name(recipe_name, "name")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{0,20}", suffix):
            raise ValueError(f"storage suffix {suffix!r}: at most 20 of letters, digits, '_', '-', '.'")
        self.workdir = Path(workdir)
        self.run_dir = self.workdir / "runs" / f"{recipe_name}{suffix}"
        self.export_dir = self.workdir / "exports" / f"{recipe_name}{suffix}"

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

    @contextlib.contextmanager
    def lock(self):
        """Hold ``runs/<recipe>/.lock`` exclusively while the block runs; a second run of the
        recipe in this workdir gets a CompressError naming the holder's process id.

        >>> with Storage(".", "vgg_prune_kd").lock():
        ...     pass
        """
        import fcntl

        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise CompressError(f"{self.run_dir}: another run of this recipe is in progress "
                                    f"(process {holder} holds {path}); wait for it to finish, "
                                    "or use another --workdir") from None
            # the holder's id, for the message above; the lock itself is the flock
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield path
        finally:
            os.close(fd)   # releases the flock
