"""Evaluation every k epochs / on a subset, `bench --compare`, and the properties of the
INT8 graph that make it fast (no layout transposes, pools and flatten kept integer)."""

import json

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from compress.cli import main
from compress.config import load_recipe
from compress.errors import CompressError

from conftest import TINY_RECIPE, write_fmnist

N_TRAIN, N_TEST, BATCH = 128, 48, 32


def _recipe(tmp_path, **teacher):
    root = tmp_path / "fmnist"
    write_fmnist(root, n_train=N_TRAIN, n_test=N_TEST)
    raw = json.loads(json.dumps(TINY_RECIPE))
    raw["data"]["root"] = str(root)
    raw["stages"] = raw["stages"][:1]
    raw["stages"][0].update(teacher)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(tmp_path, **teacher):
    wd = tmp_path / "wd"
    assert main(["run", str(_recipe(tmp_path, **teacher)), "--workdir", str(wd), "--device", "cpu"]) == 0
    meta = json.loads((wd / "runs" / "tiny" / "stages" / "teacher" / "result.json").read_text())
    report = json.loads((wd / "exports" / "tiny" / "report.json").read_text())
    return wd, meta["info"]["history"], report


@pytest.mark.parametrize("bad, why", [({"eval_every": -1}, "eval_every: must be >= 0"),
                                      ({"eval_subset": 0}, "eval_subset: must be >= 1")])
def test_eval_fields_refused_with_their_path(tmp_path, bad, why):
    with pytest.raises(CompressError, match=rf"^stages\[0\]\.{why}"):
        load_recipe(_recipe(tmp_path, **bad))


def test_eval_every_k_keeps_the_final_evaluation_whole(tmp_path):
    wd, history, report = _run(tmp_path, epochs=5, eval_every=2, eval_subset=16)
    assert len(history) == 5
    measured = [i for i, h in enumerate(history) if "test_top1" in h]
    assert measured == [1, 3, 4]                           # every 2nd epoch, and always the last
    assert [history[i]["test_images"] for i in measured] == [16, 16, N_TEST]
    assert all("train_top1" in h and h["steps"] == N_TRAIN // BATCH for h in history)
    # the stage's top-1 is the last epoch's whole-test-set evaluation
    assert report["stages"][0]["top1"] == round(history[-1]["test_top1"], 2)
    # TensorBoard has one top1/test point per evaluation, at the steps where they ran
    acc = EventAccumulator(str(wd / "runs" / "tiny" / "tb" / "teacher"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("top1/test")] == [(i + 1) * N_TRAIN // BATCH for i in measured]
    assert len(acc.Scalars("top1/train")) == 5
    assert (wd / "exports" / "tiny" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_only_at_the_end(tmp_path):
    _, history, _ = _run(tmp_path, epochs=3, eval_every=0)
    assert ["test_top1" in h for h in history] == [False, False, True]
    assert history[-1]["test_images"] == N_TEST


def test_default_evaluates_every_epoch_on_the_whole_test_set(tmp_path):
    _, history, _ = _run(tmp_path, epochs=2)
    assert [h["test_images"] for h in history] == [N_TEST, N_TEST]
