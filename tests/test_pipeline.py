"""End to end: a shortened recipe through every stage, reuse, partial re-runs, corruption."""

import json
import os
import shutil
from pathlib import Path

import pytest

from compress.cli import main
from compress.data import write_cifar_like

ROOT = Path(__file__).resolve().parents[1]

# The default recipe, shrunk: a tiny VGG on 2048 training / 512 test images, a few epochs.
SHORT = [
    "data.train_subset=2048", "data.test_subset=512",
    "models.teacher.args={cfg: [8, M, 16, M, 32]}",
    "stages.teacher.epochs=3", "stages.teacher.batch_size=64",
    "stages.prune.ratio=0.5", "stages.prune.round_to=2",   # the tiny VGG has 8-channel layers
    "stages.prune.layers={}",
    "stages.distill.epochs=2", "stages.distill.batch_size=64",
    "stages.qat.epochs=1", "stages.qat.batch_size=64", "stages.qat.freeze_bn_epoch=0",
    "stages.qat.freeze_observers_epoch=1",
    "stages.export.latency_runs=3",
]


def _run(workdir, *extra, recipe="recipes/vgg_prune_kd.yaml"):
    args = ["run", str(ROOT / recipe), "--workdir", str(workdir), "--device", "cpu"]
    for s in [*SHORT, *extra] if recipe.endswith("vgg_prune_kd.yaml") else extra:
        args += ["--set", s]
    assert main(args) == 0
    return json.loads((workdir / "exports" / "vgg_prune_kd" / "report.json").read_text()) \
        if recipe.endswith("vgg_prune_kd.yaml") else None


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    return work, _run(work)


def test_report_has_every_stage_and_verified_exports(first_run):
    work, rep = first_run
    assert rep["recipe"] == "vgg_prune_kd"
    assert rep["data"] == {**rep["data"], "name": "fashion_mnist", "num_classes": 10, "input_shape": [1, 28, 28]}
    assert [s["name"] for s in rep["stages"]] == ["teacher", "prune", "distill", "qat", "export"]
    for s in rep["stages"]:
        assert {"name", "kind", "top1", "params", "macs", "seconds"} <= set(s)
    st = {s["name"]: s for s in rep["stages"]}
    assert st["teacher"]["top1"] > 50                      # it learned something in 3 short epochs
    assert st["prune"]["params"] < 0.5 * st["teacher"]["params"]
    assert st["prune"]["macs"] < 0.5 * st["teacher"]["macs"]
    assert st["qat"]["params"] == st["distill"]["params"] == st["prune"]["params"]
    ex = {(e["model"], e["format"]): e for e in rep["exports"]}
    assert set(ex) == {("teacher", "onnx-fp32"), ("distill", "onnx-fp32"), ("qat", "onnx-int8")}
    out = work / "exports" / "vgg_prune_kd"
    umask = os.umask(0)
    os.umask(umask)
    for e in rep["exports"]:
        assert (out / e["path"]).stat().st_size == e["bytes"]
        assert (out / e["path"]).stat().st_mode & 0o777 == 0o666 & ~umask   # not owner-only
        assert e["latency_ms"]["b1"] > 0 and e["latency_ms"]["b64"] > 0
    # onnxruntime's top-1 on the FP32 file is the PyTorch model's (logits within 1e-4) ...
    assert ex[("teacher", "onnx-fp32")]["top1"] == pytest.approx(st["teacher"]["top1"], abs=0.2)
    assert ex[("teacher", "onnx-fp32")]["check"]["max_abs_diff"] <= 1e-4
    # ... and the INT8 file agrees with the fake-quant model on >= 99% of test images.
    assert ex[("qat", "onnx-int8")]["check"]["top1_agreement"] >= 0.99
    assert abs(ex[("qat", "onnx-int8")]["top1"] - st["qat"]["top1"]) <= 1.0
    assert ex[("qat", "onnx-int8")]["bytes"] < ex[("distill", "onnx-fp32")]["bytes"]  # tiny model: graph overhead dominates
    md = (out / "report.md").read_text()
    assert "| qat | onnx-int8 |" in md and "FP32 twin" in md
    # the latencies are quoted with the CPU that measured them: its model and kernel flags
    from compress.commands import cpu_info

    cpu = cpu_info()
    env = rep["environment"]
    assert env["isa"] == cpu["isa"] and env["cpu"] == (cpu["model"] or env["cpu"])
    if cpu["model"]:
        assert f"by onnxruntime on {cpu['model']} (" + " ".join(cpu["isa"]) in md


def test_rerun_reuses_every_stage(first_run):
    work, rep = first_run
    again = _run(work)
    assert all(s["reused"] for s in again["stages"])
    assert [s["top1"] for s in again["stages"]] == [s["top1"] for s in rep["stages"]]
    assert again["wall_seconds"] < 20


def test_changing_qat_reruns_only_qat_and_export_reading_the_stored_teacher_logits(first_run, tmp_path,
                                                                                    monkeypatch, capsys):
    """Changing the QAT stage reruns it and the export, nothing before. The distill stage
    stored the teacher's logits over both views of the training set; the rerun QAT stage
    (another process) reads them instead of running the teacher over the training set again
    (only its first batch, to check them), and ends with the numbers of a rerun that computes
    them. A damaged or foreign table is computed and stored again."""
    import torch

    from compress import engine

    work, _ = first_run
    cache = Path("runs") / "vgg_prune_kd" / "cache"
    (stored,) = (work / cache).glob("teacher-logits-*.pt")
    table = torch.load(stored, weights_only=True)
    assert table.shape == (2, 2048, 10) and table.dtype == torch.float32     # flip: two views
    images = []
    real = engine.Frozen.logits
    monkeypatch.setattr(engine.Frozen, "logits", lambda self, x: images.append(len(x)) or real(self, x))
    runs = {}
    for name, damage in [("read", None), ("damaged", "bytes"), ("foreign", "values")]:
        w = tmp_path / name
        shutil.copytree(work, w)
        f = w / cache / stored.name
        if damage == "bytes":
            f.write_bytes(f.read_bytes()[:200])
        elif damage == "values":
            torch.save(table * 1.01, f)
        images.clear()
        capsys.readouterr()
        runs[name] = _run(w, "stages.qat.epochs=2")
        reused = {s["name"]: s["reused"] for s in runs[name]["stages"]}
        assert reused == {"teacher": True, "prune": True, "distill": True, "qat": False, "export": False}
        out = capsys.readouterr().out
        assert ("read from" in out) == (damage is None), out
        # 2 views x the first batch (data.eval_batch_size 128) to check a readable table, then
        # all 2 x 2048 unless it passed
        probe = 0 if damage == "bytes" else 2 * 128
        assert sum(images) == probe + (0 if damage is None else 2 * 2048), images
        assert torch.equal(torch.load(w / cache / stored.name, weights_only=True), table)
    tops = {n: [s["top1"] for s in r["stages"]] for n, r in runs.items()}
    assert tops["read"] == tops["damaged"] == tops["foreign"]


def test_corrupt_checkpoint_is_detected_and_recomputed(first_run, tmp_path, capsys):
    work, rep = first_run
    copy = tmp_path / "w"
    shutil.copytree(work, copy)
    ckpt = copy / "runs" / "vgg_prune_kd" / "stages" / "distill" / "model.pt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    again = _run(copy)
    assert "corrupt" in capsys.readouterr().out
    reused = {s["name"]: s["reused"] for s in again["stages"]}
    assert reused["teacher"] and reused["prune"] and not reused["distill"]
    # same seed, same machine: the recomputed stage gives the same numbers
    before = {s["name"]: s["top1"] for s in rep["stages"]}
    assert {s["name"]: s["top1"] for s in again["stages"]} == before


def test_cifar_recipe_runs_on_small_files_in_cifar_format(tmp_path):
    root = tmp_path / "data"
    write_cifar_like(root, "cifar10", n_train=200, n_test=64)
    sets = [f"data.root={root}", "models.teacher.args={width: 0.0625}", "data.eval_batch_size=64",
            "stages.export.latency_runs=2"]
    for st in ("teacher", "distill", "qat"):
        sets += [f"stages.{st}.epochs=1", f"stages.{st}.batch_size=32"]
    sets += ["stages.qat.freeze_bn_epoch=1", "stages.qat.freeze_observers_epoch=1"]
    assert main(["validate", str(ROOT / "recipes/vgg16_cifar10_prune_kd.yaml"), *sum((["--set", s] for s in sets), [])]) == 0
    _run(tmp_path, *sets, recipe="recipes/vgg16_cifar10_prune_kd.yaml")
    rep = json.loads((tmp_path / "exports" / "vgg16_cifar10_prune_kd" / "report.json").read_text())
    assert rep["data"]["input_shape"] == [3, 32, 32] and rep["data"]["train_images"] == 200
    assert len(rep["exports"]) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_cuda_path_runs_every_stage(tmp_path):
    args = ["run", str(ROOT / "recipes/vgg_prune_kd.yaml"), "--workdir", str(tmp_path), "--device", "cuda"]
    for s in SHORT:
        args += ["--set", s]
    assert main(args) == 0
    rep = json.loads((tmp_path / "exports" / "vgg_prune_kd" / "report.json").read_text())
    assert rep["environment"]["device"].startswith("cuda")
    ex = {(e["model"], e["format"]): e for e in rep["exports"]}
    assert ex[("qat", "onnx-int8")]["check"]["top1_agreement"] >= 0.99
