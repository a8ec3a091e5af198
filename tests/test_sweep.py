"""`compress sweep`: a 4-trial grid on Ray Tune sharing the teacher, its Pareto front, and
the one-line message without Ray."""

import json
import sys

import pytest
import yaml

from compress.cli import main


def _front_rows(md, title):
    part = md.split(f"## Pareto front: {title}")[1].split("##")[0]
    return [ln.split("|")[1].strip() for ln in part.splitlines() if ln.startswith("| ") and
            not ln.startswith("| trial")]


def _dominated(p, others, cost):
    return any(q[cost] <= p[cost] and q["top1"] >= p["top1"] and (q[cost] < p[cost] or q["top1"] > p["top1"])
               for q in others)


@pytest.mark.slow
def test_grid_sweep_shares_the_teacher_and_marks_a_non_dominated_front(tmp_path, tiny_recipe_dict, capsys):
    """A 2x2 grid: the teacher trained once and reused by every trial, the parameters reaching
    their stages, a Pareto front that is exactly the non-dominated trials. The recipe's name
    has 100 characters, the most validate accepts: the sweep's folders (runs/<recipe>-sweep/,
    exports/<recipe>-sweep/) have 106, which the sweep once refused after validate accepted
    the recipe. (One sweep, so Ray starts once in this suite.)"""
    pytest.importorskip("ray.tune", reason="pip install -e '.[sweep]'")
    name = "n" * 100
    tiny_recipe_dict["name"] = name
    tiny_recipe_dict["stages"][-1]["latency_runs"] = 3
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict))
    assert main(["validate", str(recipe)]) == 0
    args = ["sweep", str(recipe), "--param", "stages.prune.ratio=0.3,0.5", "--param",
            "stages.distill.loss.0.T=2,4", "--max-concurrent", "2", "--workdir", str(tmp_path)]
    assert main(args) == 0, capsys.readouterr().err
    out = tmp_path / "exports" / f"{name}-sweep"
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["recipe"] == name and (tmp_path / "runs" / f"{name}-sweep" / "trials").is_dir()
    trials = sweep["trials"]
    assert len(trials) == 4
    assert sorted(tuple(t["overrides"].values()) for t in trials) == [(0.3, 2), (0.3, 4), (0.5, 2), (0.5, 4)]
    assert sweep["shared_stages"] == ["teacher"]
    # the teacher was trained once, in the shared workdir; every trial reused that result
    shared = json.loads((tmp_path / f"runs/{name}-sweep/shared/exports/{name}/report.json").read_text())
    assert [(s["name"], s["reused"]) for s in shared["stages"]] == [("teacher", False)]
    for t in trials:
        st = {s["name"]: s for s in t["stages"]}
        assert st["teacher"]["reused"] is True and st["qat"]["reused"] is False
        assert st["teacher"]["top1"] == shared["stages"][0]["top1"]
    # the teacher's logits: computed by the first trials (two run at once), read by the others
    (table,) = (tmp_path / f"runs/{name}-sweep/shared/runs/{name}/cache").glob("teacher-logits-*.pt")
    assert table.stat().st_nlink >= 3
    params = {t["overrides"]["stages.prune.ratio"]: t["stages"][1]["params"] for t in trials}
    assert params[0.5] < params[0.3]                      # the parameter reached the stage
    # the front in sweep.md: non-dominated, and every other trial is dominated by some trial
    md = (out / "sweep.md").read_text()
    pts = {t["trial"]: t["point"] for t in trials}
    for cost, title in (("kb", "top-1 vs file size"), ("b1", "top-1 vs latency (batch 1)")):
        front = _front_rows(md, title)
        assert front and set(front) <= set(pts)
        for trial, p in pts.items():
            others = [q for n, q in pts.items() if n != trial]
            assert (trial in front) == (not _dominated(p, others, cost)), (cost, trial)
    assert (out / "pareto.png").stat().st_size > 10_000


def test_sweep_without_ray_says_how_to_install(tmp_path, tiny_recipe_dict, monkeypatch, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict))
    monkeypatch.setitem(sys.modules, "ray", None)          # `import ray` raises ImportError
    assert main(["sweep", str(recipe), "--param", "stages.prune.ratio=0.3,0.5", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install -e '.[sweep]'" in err
    assert not (tmp_path / "runs").exists()


def test_sweep_refuses_a_bad_param_before_starting(tmp_path, tiny_recipe_dict, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict))
    assert main(["sweep", str(recipe), "--param", "stages.prune.ratio=0.3,1.5"]) == 2
    assert "stages[1].ratio" in capsys.readouterr().err
    assert main(["sweep", str(recipe), "--param", "stages.prune.ratio"]) == 2
    assert "PATH=V1,V2" in capsys.readouterr().err


def test_sweep_refuses_one_path_spelled_twice(tmp_path, tiny_recipe_dict, capsys):
    # loss.0.T and loss[0].T are one field: two --param for it would silently keep the last
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict))
    assert main(["sweep", str(recipe), "--param", "stages.distill.loss.0.T=2,4",
                 "--param", "stages[distill].loss[0].T=1", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "given twice" in err, err
    assert not (tmp_path / "runs").exists()
