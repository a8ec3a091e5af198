"""A recipe can never make a run delete or overwrite files it did not write: names that
become paths are safe path components, and every delete is confined to runs/<recipe>/ and
exports/<recipe>/."""

import copy
import os

import pytest
import yaml

from compress.errors import CompressError
from compress.storage import Storage, check_name

from test_robustness import assert_user_error, cli

UNSAFE = ["..", ".", ".hidden", "a/b", "../x", "a\\b", "", "x" * 101, "a b", "/abs", "~"]


def _plant(workdir):
    """An unrelated file in the workdir and one next to where a run's folders go."""
    (workdir / "runs").mkdir(parents=True, exist_ok=True)
    keep = [workdir / "precious.txt", workdir / "runs" / "other.txt"]
    for p in keep:
        p.write_text("not the tool's")
    return keep


@pytest.mark.parametrize("where", ["recipe", "stage", "both"])
@pytest.mark.parametrize("command", ["run", "validate"])
def test_dotdot_names_delete_nothing(tmp_path, tiny_recipe_dict, where, command):
    raw = copy.deepcopy(tiny_recipe_dict)
    if where in ("recipe", "both"):
        raw["name"] = ".."
    if where in ("stage", "both"):
        raw["stages"][0]["name"] = ".."
        raw["stages"][1]["from"] = ".."
        raw["stages"][2]["teacher"] = raw["stages"][3]["teacher"] = ".."
    workdir = tmp_path / "work"
    keep = _plant(workdir)
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    path = tmp_path / "dotdot.yaml"
    path.write_text(yaml.safe_dump(raw))
    argv = [command, str(path)] + (["--workdir", str(workdir), "--device", "cpu"] if command == "run" else [])
    code, out, err = cli(argv)
    assert_user_error(code, err, expect=["'..' cannot name a folder or file"])
    assert len(err.strip().splitlines()) == 1, err
    assert "name" in err
    for p in keep:
        assert p.read_text() == "not the tool's"
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before   # nothing written either


@pytest.mark.parametrize("bad", UNSAFE)
def test_unsafe_names_refused(bad):
    with pytest.raises(CompressError, match="cannot name a folder or file"):
        check_name(bad, "name")


@pytest.mark.parametrize("good", ["vgg_prune_kd", "a.b", "x-1", "A_9.yaml", "_", "x" * 100])
def test_safe_names_accepted(good):
    assert check_name(good, "name") == good


def test_storage_removes_only_inside_its_folders(tmp_path):
    s = Storage(tmp_path, "r")
    inside = s.run_dir / "tb" / "teacher"
    inside.mkdir(parents=True)
    (inside / "f").write_text("x")
    s.remove(inside)
    assert not inside.exists()
    outside = tmp_path / "mine.txt"
    outside.write_text("keep")
    for target in [outside, s.run_dir, s.export_dir, s.run_dir / "..", s.run_dir / "tb" / ".." / "..",
                   tmp_path / "runs" / "other" / "x"]:
        with pytest.raises(CompressError, match="refusing to delete"):
            s.remove(target)
    # a symlink inside the run folder that points out is followed by the check, not by rmtree
    (s.run_dir / "tb").mkdir(parents=True, exist_ok=True)
    link = s.run_dir / "tb" / "stage"
    os.symlink(tmp_path, link)
    with pytest.raises(CompressError, match="refusing to delete"):
        s.remove(link)
    assert outside.read_text() == "keep"


def test_a_derived_folder_takes_any_recipe_name_plus_its_suffix(tmp_path):
    """`compress sweep` stores under runs/<recipe>-sweep/: a recipe name of 100 characters
    (the most a recipe may have) makes a 106-character folder, which is fine; the suffix is a
    constant of the code and may not carry a separator."""
    name = "x" * 100
    s = Storage(tmp_path, name, suffix="-sweep")
    assert s.run_dir == tmp_path / "runs" / f"{name}-sweep" and s.export_dir == tmp_path / "exports" / f"{name}-sweep"
    (s.export_dir / "sub").mkdir(parents=True)
    s.remove(s.export_dir / "sub")
    with pytest.raises(CompressError, match="refusing to delete"):
        s.remove(tmp_path / "runs" / name)         # the recipe's own folder is not the sweep's
    with pytest.raises(CompressError, match="cannot name a folder or file"):
        Storage(tmp_path, "x" * 101, suffix="-sweep")
    for bad in ("/x", "-sweep/..", "-" * 21):
        with pytest.raises(ValueError, match="storage suffix"):
            Storage(tmp_path, name, suffix=bad)
