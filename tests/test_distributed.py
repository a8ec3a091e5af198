"""torchrun: two CPU processes (gloo) against one process on the same recipe; a killed
two-process run resumes; the global batch is split exactly as DistributedSampler would."""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from compress.checkpoint import load_checkpoint
from compress.data import DEBIAN_FASHION_MNIST, Split, iterate
from conftest import TINY_RECIPE

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
STAGES = ["teacher", "prune", "distill", "qat", "export"]


def _recipe(tmp_path):
    """The tiny recipe on 2048/1000 real Fashion-MNIST images, trained long enough that
    top-1 is a stable number (a point is 10 test images)."""
    r = copy.deepcopy(TINY_RECIPE)
    r["data"] = {"name": "fashion_mnist", "download": False, "train_subset": 2048, "test_subset": 1000}
    r["models"]["teacher"]["args"]["cfg"] = [8, "M", 16, "M", 32]
    st = {s["name"]: s for s in r["stages"]}
    st["teacher"].update(epochs=3, batch_size=64)
    st["distill"].update(epochs=2, batch_size=64)
    # QAT with BN and observers frozen from the start and a small rate: no batch statistics, so
    # it keeps the distilled accuracy instead of amplifying the small BN-on-half-batch
    # differences of the earlier stages (measured: 65.3 vs 65.6 %; with live observers and
    # lr 0.01 the same inputs gave 52-63 %, run to run, in one process as in two).
    st["qat"].update(epochs=1, batch_size=64, freeze_bn_epoch=0, freeze_observers_epoch=0,
                     optimizer={"lr": 0.002})
    st["export"]["latency_runs"] = 3
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def _cmd(recipe, workdir, nproc):
    run = ["-m", "compress", "run", str(recipe), "--workdir", str(workdir), "--device", "cpu"]
    if nproc == 1:
        return [sys.executable, *run]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "--log-dir", str(workdir / "torchrun-logs"), "--redirects", "3", *run]


def _run(recipe, workdir, nproc):
    p = subprocess.run(_cmd(recipe, workdir, nproc), env=ENV, capture_output=True, text=True, timeout=600)
    logs = "".join(f.read_text() for f in sorted((workdir / "torchrun-logs").rglob("std*.log"))) \
        if nproc > 1 else ""
    assert p.returncode == 0, p.stdout + p.stderr + logs
    return p.stdout + logs


def _report(workdir):
    return json.loads((workdir / "exports" / "tiny" / "report.json").read_text())


@pytest.mark.slow
@pytest.mark.skipif(not Path(DEBIAN_FASHION_MNIST).is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_two_processes_match_one_and_resume_after_a_kill(tmp_path):
    recipe = _recipe(tmp_path)
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    _run(recipe, one, 1)
    out = _run(recipe, two, 2)
    assert "on cpu x 2 processes" in out
    # both ranks ran: torchrun kept one log folder per rank, and rank 1 printed nothing
    ranks = sorted(d.name for d in (two / "torchrun-logs").rglob("*") if d.is_dir() and d.name.isdigit())
    assert ranks == ["0", "1"]
    assert out.count("report: ") == 1
    assert len(list(two.rglob("report.json"))) == 1 and len(list(two.rglob("report.md"))) == 1
    r1, r2 = _report(one), _report(two)
    assert r2["environment"]["processes"] == 2 and r1["environment"]["processes"] == 1
    assert [s["name"] for s in r2["stages"]] == STAGES
    assert set(r1) == set(r2) and set(r1["stages"][0]) == set(r2["stages"][0])   # the same shape
    for a, b in zip(r1["stages"], r2["stages"]):
        if a["kind"] in ("train", "distill", "qat"):   # a freshly pruned model is at chance: no signal
            assert abs(a["top1"] - b["top1"]) <= 1.0, (a, b)
        assert a["params"] == b["params"]
    assert abs(r1["exports"][0]["top1"] - r2["exports"][0]["top1"]) <= 1.0
    assert r2["stages"][0]["top1"] > 50          # it learned: the comparison is not of two chance levels
    for name in STAGES[:-1]:
        model = load_checkpoint(two / "runs" / "tiny" / "stages" / name / "model.pt")[1]
        assert sum(p.numel() for p in model.parameters()) == r2["stages"][STAGES.index(name)]["params"]
    # one key per stage, whatever the number of processes
    keys = [json.loads((d / "runs/tiny/stages" / s / "result.json").read_text())["key"] for d in (one, two)
            for s in STAGES]
    assert keys[:5] == keys[5:]

    # Kill every process of a two-process run once the teacher is stored, then run again.
    p = subprocess.Popen(_cmd(recipe, killed, 2), env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    stored = killed / "runs" / "tiny" / "stages" / "teacher" / "result.json"
    deadline = time.time() + 300
    while not stored.is_file() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    # torchrun starts each rank in a session of its own: kill the ranks by pid (the launcher
    # then fails, as after a crash), not just the launcher's process group.
    ranks = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
    assert len(ranks) == 2
    for pid in ranks:
        os.kill(int(pid), signal.SIGKILL)
    assert p.wait(timeout=120) != 0
    assert stored.is_file() and not (killed / "exports" / "tiny" / "report.json").exists()
    _run(recipe, killed, 2)
    resumed = _report(killed)["stages"]
    assert resumed[0]["reused"] is True and resumed[-1]["reused"] is False
    assert [s["top1"] for s in _report(killed)["stages"]] == [s["top1"] for s in r2["stages"]]


def test_global_batch_split_over_ranks_is_the_one_process_batch():
    """Rank r takes rows r::world of each global batch: together the ranks see exactly the
    images (and flips) of one process, in DistributedSampler's order."""
    from compress.config import AugmentSpec

    class D:
        mean, std = [0.5], [0.25]

    split = Split(torch.randint(0, 256, (50, 1, 4, 4), dtype=torch.uint8), torch.arange(50))
    aug = AugmentSpec(flip=True)

    def batches(shard):
        g = torch.Generator().manual_seed(3)
        return list(iterate(split, D, 8, shuffle=True, augment=aug, generator=g, drop_last=True, shard=shard))

    whole = batches((0, 1))
    parts = [batches((r, 2)) for r in range(2)]
    assert len(whole) == len(parts[0]) == len(parts[1]) == 6     # 50 // 8 global batches on every rank
    for b, p0, p1 in zip(whole, *parts):
        assert len(p0.y) == len(p1.y) == 4
        assert torch.equal(torch.stack([p0.index, p1.index], 1).reshape(-1), b.index)
        assert torch.equal(torch.stack([p0.x, p1.x], 1).reshape(b.x.shape), b.x)
        assert torch.equal(torch.stack([p0.view, p1.view], 1).reshape(-1), b.view)


class Left(BaseException):
    """Raised by the stand-in for os._exit, so that the test process goes on."""


@pytest.fixture
def exits(monkeypatch):
    """os._exit replaced: the statuses it was called with, and it raises Left."""
    import compress.cli as cli
    import compress.distributed  # noqa: F401  (imported by every run)

    called = []

    def fake_exit(code):
        called.append(code)
        raise Left

    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    return called


@pytest.mark.parametrize("world", ["1", "2"])
def test_a_torchrun_rank_leaves_without_finalization(tmp_path, monkeypatch, capsys, exits, world):
    """Under torchrun (WORLD_SIZE > 1) `compress` leaves through os._exit with its exit
    status, after its output is flushed: gloo's worker threads outlive the process group and
    one freeing the last collective's tensors during Python's finalization aborted complete
    runs. A single process returns its status as before."""
    from compress.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages: 3\n")
    monkeypatch.setenv("WORLD_SIZE", world)
    if world == "1":
        assert main(["run", str(bad), "--workdir", str(tmp_path)]) == 2 and exits == []
    else:
        with pytest.raises(Left):
            main(["run", str(bad), "--workdir", str(tmp_path)])
        assert exits == [2]
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.parametrize("world", ["1", "2"])
def test_a_torchrun_rank_leaves_after_a_bug_with_its_traceback_and_status_1(monkeypatch, capsys, exits, world):
    """An unexpected exception (a bug, not a recipe error) in a torchrun rank prints its
    traceback and leaves through os._exit(1), as Python's own exit would, without the
    finalization that may abort; in one process it propagates unchanged."""
    import compress.cli as cli

    def bug(argv):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "_main", bug)
    monkeypatch.setenv("WORLD_SIZE", world)
    if world == "1":
        with pytest.raises(ZeroDivisionError):
            cli.main(["run", "r.yaml"])
        assert exits == []
    else:
        with pytest.raises(Left):
            cli.main(["run", "r.yaml"])
        assert exits == [1]
        err = capsys.readouterr().err
        assert err.startswith("Traceback (most recent call last):") and "ZeroDivisionError: a bug" in err
