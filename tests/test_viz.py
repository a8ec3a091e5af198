"""TensorBoard events, charts, and the eval / bench / compare / report commands, on one tiny
run (and a second that differs only in its prune ratio)."""

import copy
import json
import re
import shutil
import time

import onnx
import pytest
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from compress.cli import main
from compress.commands import compare_table, cpu_line, cpu_vnni
from compress.plots import comparison_rows, pareto_front, plot_method_bars, render_run

from conftest import TINY_RECIPE, run_without_heavy_imports, write_fmnist

N_TRAIN, N_TEST, BATCH = 256, 128, 32
TEACHER_EPOCHS = 2
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _recipe(root, ratio):
    raw = copy.deepcopy(TINY_RECIPE)
    raw["data"]["root"] = str(root)
    raw["models"]["teacher"]["args"] = {"cfg": [8, "M", 16, "M", 16]}
    st = {s["name"]: s for s in raw["stages"]}
    st["teacher"]["epochs"] = TEACHER_EPOCHS
    st["distill"]["epochs"] = 2
    st["prune"]["ratio"] = ratio
    st["export"]["models"] = [{"model": "teacher", "format": "onnx-fp32"},
                              {"model": "distill", "format": "onnx-fp32"},
                              {"model": "qat", "format": "onnx-int8"}]
    st["export"]["latency_runs"] = 3
    return raw


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of one recipe differing only in prune ratio; the second (another workdir,
    a copy of the first) reuses the stored teacher."""
    base = tmp_path_factory.mktemp("viz")
    root = base / "fmnist"
    write_fmnist(root, n_train=N_TRAIN, n_test=N_TEST)
    out = {"root": root}
    for key, ratio in (("a", 0.5), ("b", 0.25)):
        raw = _recipe(root, ratio)
        recipe = base / f"recipe_{key}.yaml"
        recipe.write_text(yaml.safe_dump(raw))
        wd = base / key
        if key == "b":
            shutil.copytree(base / "a" / "runs", wd / "runs")
        assert main(["run", str(recipe), "--workdir", str(wd), "--device", "cpu"]) == 0
        exp = wd / "exports" / raw["name"]
        out[key] = {"wd": wd, "exp": exp, "raw": raw, "run": wd / "runs" / raw["name"],
                    "report": json.loads((exp / "report.json").read_text())}
    return out


def _png(path, min_bytes=10_000):
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > min_bytes
    w, h = Image.open(path).size
    assert w >= 600 and h >= 400


def _scalars(d):
    acc = EventAccumulator(str(d), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _tables(md):
    """Every markdown table in `md` as a list of {header: cell} rows."""
    tables, cur, header = [], None, None
    for line in md.splitlines():
        if not line.startswith("|"):
            cur = header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header, cur = cells, []
            tables.append(cur)
        elif not set("".join(cells)) <= set("-:"):
            cur.append(dict(zip(header, cells)))
    return tables


def _count(text):
    """'6.27 K' -> (6270, 5): the value and half a unit of its last digit."""
    m = re.fullmatch(r"([\d.]+)(?: ([KMG]))?", text)
    mult = {"K": 1e3, "M": 1e6, "G": 1e9}.get(m.group(2), 1)
    decimals = len(m.group(1).split(".")[1]) if "." in m.group(1) else 0
    return float(m.group(1)) * mult, 0.5 * 10 ** -decimals * mult + 1e-9


def _size_kb(text):
    v, unit = text.split()
    return float(v) * (1024 if unit == "MB" else 1)


# ---- charts and TensorBoard -----------------------------------------------------------------

def test_plots_exist(runs):
    for key in ("a", "b"):
        for name in ("curves.png", "pareto.png"):
            _png(runs[key]["exp"] / name)


def test_history_has_what_the_curves_draw(runs):
    for s in ("teacher", "distill", "qat"):
        meta = json.loads((runs["a"]["run"] / "stages" / s / "result.json").read_text())
        for h in meta["info"]["history"]:
            assert {"test_top1", "train_top1", "lr", "steps", "loss"} <= set(h)
            assert h["lr"] > 0 and h["steps"] == N_TRAIN // BATCH


def test_tensorboard_tags_and_global_step(runs):
    raw, tb = runs["a"]["raw"], runs["a"]["run"] / "tb"
    last, seen = -1, []
    for s in raw["stages"]:
        d = tb / s["name"]
        if s["kind"] == "export":
            assert not d.exists()
            continue
        acc = _scalars(d)
        tags = set(acc.Tags()["scalars"])
        assert "top1/test" in tags
        if s["kind"] == "prune":
            continue
        terms = [t["term"] for t in s.get("loss", [{"term": "ce"}])]
        assert {f"loss/{t}" for t in terms} | {"loss/total", "lr", "top1/train", "top1/test"} <= tags
        steps = [e.step for e in acc.Scalars("top1/test")]
        assert len(steps) == s["epochs"] and steps == sorted(steps)
        assert steps[0] > last, f"{s['name']} starts before the previous stage ended"
        assert all(b - a == N_TRAIN // BATCH for a, b in zip([last if last >= 0 else 0, *steps], steps))
        last = steps[-1]
        seen.append(s["name"])
    assert seen == ["teacher", "distill", "qat"]
    # prune logs its top-1 where the teacher ended
    assert _scalars(tb / "prune").Scalars("top1/test")[0].step == TEACHER_EPOCHS * N_TRAIN // BATCH


def test_tensorboard_recipe_text_and_hparams(runs):
    acc = _scalars(runs["a"]["run"] / "tb" / "recipe")
    text = acc.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "name: tiny" in text and "ratio: 0.5" in text and "term: kd" in text
    assert "_hparams_/experiment" in acc.PluginTagToContent("hparams")


def test_reused_stage_keeps_its_events_and_the_axis(runs):
    a, b = runs["a"]["run"] / "tb", runs["b"]["run"] / "tb"
    assert [p.name for p in (b / "teacher").iterdir()] == [p.name for p in (a / "teacher").iterdir()]
    assert len(list((b / "distill").iterdir())) == 1
    first = _scalars(b / "distill").Scalars("top1/test")[0].step
    assert first == (TEACHER_EPOCHS + 1) * N_TRAIN // BATCH   # after the reused teacher's stored epochs


# ---- report.md and `compress report` ---------------------------------------------------------

def test_report_tables_equal_report_json(runs):
    rep = runs["a"]["report"]
    stages_t, exports_t = _tables((runs["a"]["exp"] / "report.md").read_text())[:2]
    assert [r["stage"] for r in stages_t] == [s["name"] for s in rep["stages"]]
    for row, s in zip(stages_t, rep["stages"]):
        assert row["kind"] == s["kind"]
        assert row["top-1 (%)"] == ("–" if s["top1"] is None else f"{s['top1']:.2f}")
        for col, key in (("params", "params"), ("MACs", "macs")):
            if s[key] is None:
                assert row[col] == "–"
            else:
                v, tol = _count(row[col])
                assert abs(v - s[key]) <= tol, (col, row[col], s[key])
        assert row["seconds"] == f"{s['seconds']:.1f}" + (" (reused)" if s["reused"] else "")
    ref = next(e for e in rep["exports"] if e["model"] == rep["reference"] and e["format"] == "onnx-fp32")
    params = {s["name"]: s["params"] for s in rep["stages"]}
    assert len(exports_t) == len(rep["exports"])
    for row, e in zip(exports_t, rep["exports"]):
        assert (row["model"], row["format"], row["file"]) == (e["model"], e["format"], f"`{e['path']}`")
        assert abs(_size_kb(row["size"]) - e["bytes"] / 1024) <= 0.05
        assert row["top-1 (%)"] == f"{e['top1']:.2f}"
        assert float(row["latency b1 (ms)"]) == e["latency_ms"]["b1"]
        assert float(row["latency b64 (ms)"]) == e["latency_ms"]["b64"]
        assert row["params vs teacher"] == f"{100 * params[e['model']] / params[ref['model']]:.1f}%"
        assert row["size vs teacher"] == f"{100 * e['bytes'] / ref['bytes']:.1f}%"
        assert row["speed-up b1"] == f"{ref['latency_ms']['b1'] / e['latency_ms']['b1']:.2f}×"
        assert row["speed-up b64"] == f"{ref['latency_ms']['b64'] / e['latency_ms']['b64']:.2f}×"


def test_report_command_rerenders_without_training(runs, monkeypatch, capsys):
    import compress.engine
    import compress.pipeline

    def boom(*a, **k):
        raise AssertionError("compress report trained or ran a recipe")

    monkeypatch.setattr(compress.pipeline, "run_recipe", boom)
    monkeypatch.setattr(compress.engine, "fit", boom)
    exp, wd = runs["a"]["exp"], runs["a"]["wd"]
    md = (exp / "report.md").read_bytes()
    stored = {p: p.stat().st_mtime_ns for p in (wd / "runs").rglob("*") if p.is_file()}
    for name in ("report.md", "curves.png", "pareto.png"):
        (exp / name).unlink()
    t0 = time.perf_counter()
    for target in (wd, exp, exp / "report.json"):
        assert main(["report", str(target)]) == 0
    assert time.perf_counter() - t0 < 30
    assert (exp / "report.md").read_bytes() == md
    _png(exp / "curves.png")
    _png(exp / "pareto.png")
    assert {p: p.stat().st_mtime_ns for p in (wd / "runs").rglob("*") if p.is_file()} == stored
    assert "re-rendered report.md, curves.png, pareto.png" in capsys.readouterr().out


def test_method_bars_and_comparison_schema(runs, tmp_path):
    plot_method_bars([("ce", 90.1), ("kd", 91.3), ("fitnet", 90.8)], "ce", tmp_path / "m.png")
    _png(tmp_path / "m.png")
    rows = [{"method": "ce", "top1": 90.1}, {"method": "kd", "top1": 91.3}]
    assert comparison_rows({"comparison": {"baseline": "ce", "rows": rows}}) == \
        ([("ce", 90.1), ("kd", 91.3)], "ce", 90.1)
    assert comparison_rows({"comparison": rows, "baseline": "ce"})[1:] == ("ce", 90.1)
    # the baseline's top-1 from the stage rows when it is not itself a compared method
    assert comparison_rows({"comparison": {"baseline": "teacher", "rows": rows[1:]},
                            "stages": [{"name": "teacher", "top1": 93.0}]})[2] == 93.0
    assert comparison_rows({"comparison": None}) is None
    report = {**runs["a"]["report"], "comparison": {"baseline": "distill", "rows": [
        {"method": "distill", "top1": 11.0}, {"method": "qat", "top1": 12.5}]}}
    paths = render_run(report, runs["a"]["run"], tmp_path)
    assert [p.name for p in paths] == ["curves.png", "pareto.png", "methods.png"]
    _png(tmp_path / "methods.png")


# ---- compare ---------------------------------------------------------------------------------

def test_pareto_front_hand_made():
    pts = [{"kb": 10, "top1": 90.0},   # optimal: smallest
           {"kb": 20, "top1": 89.0},   # dominated by the first
           {"kb": 30, "top1": 95.0},   # optimal: most accurate
           {"kb": 30, "top1": 95.0},   # equal to the previous: both optimal
           {"kb": 25, "top1": 92.0},   # optimal: between
           {"kb": 40, "top1": 95.0}]   # dominated (as accurate, larger)
    assert pareto_front(pts, "kb") == [True, False, True, True, True, False]
    full = [{**p, "run": "r", "model": f"m{i}", "format": "onnx-fp32", "b1": 1.0, "b64": 1.0}
            for i, p in enumerate(pts)]
    lines, flags = compare_table(full)
    assert flags["kb"] == pareto_front(pts, "kb")
    assert [ln.split("|")[-2].strip().startswith("size") for ln in lines[2:]] == flags["kb"]


def test_compare_two_prune_ratios(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(runs["a"]["exp"] / "report.json"), str(runs["b"]["exp"]),
                 "--out", str(out)]) == 0
    _png(out / "compare.png")
    md = (out / "compare.md").read_text()
    assert md in capsys.readouterr().out
    run_rows, rows = _tables(md)
    labels = [r["run"] for r in run_rows]
    assert labels == ["a/tiny", "b/tiny"] and [r["prune ratio"] for r in run_rows] == ["0.5", "0.25"]
    points = []
    for lab, key in zip(labels, "ab"):
        mine = [r for r in rows if r["run"] == lab]
        exps = runs[key]["report"]["exports"]
        assert len(mine) == len(exps) == 3
        for r, e in zip(mine, exps):
            assert (r["model"], r["format"]) == (e["model"], e["format"])
            assert r["size (KB)"] == f"{e['bytes'] / 1024:.1f}"
            assert r["top-1 (%)"] == f"{e['top1']:.2f}"
            assert float(r["latency b1 (ms)"]) == e["latency_ms"]["b1"]
            assert float(r["latency b64 (ms)"]) == e["latency_ms"]["b64"]
            points.append({"kb": e["bytes"] / 1024, "top1": e["top1"], "b1": e["latency_ms"]["b1"],
                           "b64": e["latency_ms"]["b64"]})
    for cost, name in (("kb", "size"), ("b1", "b1"), ("b64", "b64")):
        want = pareto_front(points, cost)
        got = [name in [x.strip() for x in r["Pareto-optimal on"].split(",")] for r in rows]
        assert got == want, cost


# ---- eval and bench --------------------------------------------------------------------------

def test_compare_and_report_run_without_importing_torch(runs, tmp_path):
    """`compare` and `report` read report.json files and draw charts: importing torch for
    that made `compress compare` take 5.0 s where it now takes about 1.3."""
    wd = tmp_path / "wd"
    shutil.copytree(runs["a"]["wd"], wd)   # `report` rewrites its folder's files
    exp = wd / "exports" / runs["a"]["raw"]["name"]
    out, heavy = run_without_heavy_imports(
        "from compress.cli import main; "
        f"assert main(['compare', {str(exp)!r}, {str(runs['b']['exp'])!r}, '--out', {str(tmp_path / 'c')!r}]) == 0; "
        f"assert main(['report', {str(exp)!r}]) == 0")
    assert (tmp_path / "c" / "compare.md").is_file() and "re-rendered report.md" in out
    assert heavy == "[]", heavy


def test_eval_matches_report(runs, capsys, tmp_path):
    e = next(x for x in runs["a"]["report"]["exports"] if x["format"] == "onnx-int8")
    model = runs["a"]["exp"] / e["path"]
    assert main(["eval", str(model), "--data", "fashion_mnist", "--root", str(runs["root"]),
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^top1: (\d+\.\d\d)%", out, re.M).group(1) == f"{e['top1']:.2f}"
    _png(tmp_path / f"{model.stem}-confusion.png")
    r = json.loads((tmp_path / f"{model.stem}-eval.json").read_text())
    assert r["images"] == N_TEST == sum(c["images"] for c in r["per_class"])
    assert round(100 * sum(c["correct"] for c in r["per_class"]) / r["images"], 2) == e["top1"]
    printed = re.findall(r"^  (\S.*?)\s+(\d+)\s+(\d+\.\d\d|–)$", out, re.M)
    meta = {m.key: m.value for m in onnx.load(str(model)).metadata_props}
    assert [p[0] for p in printed] == r["classes"] == json.loads(meta["class_names"])
    weighted = sum(int(n) * float(a) for _, n, a in printed if a != "–") / N_TEST
    assert abs(weighted - e["top1"]) <= 0.01


def test_bench_int8(runs, capsys):
    model = runs["a"]["exp"] / "qat-int8.onnx"
    assert main(["bench", str(model), "--batch", "1", "8", "--threads", "1", "--runs", "3"]) == 0
    out = capsys.readouterr().out
    assert "median (ms)" in out and "p90 (ms)" in out and "images/s" in out
    assert re.search(r"^\s+1\s+[\d.]+\s+[\d.]+\s+\d+$", out, re.M)
    assert re.search(r"^\s+8\s+[\d.]+\s+[\d.]+\s+\d+$", out, re.M)
    assert "integer kernels after graph optimisation: yes (QLinearConv" in out
    vnni = cpu_vnni()
    assert ("CPU VNNI: yes" in out) == bool(vnni)
    assert f"CPU: {cpu_line()}\n" in out    # the latencies come with the CPU's model and kernel flags
    assert re.search(r"than its FP32 twin distill-fp32\.onnx at batch 1 ", out)


@pytest.mark.parametrize("argv, says", [
    (["eval", "missing.onnx"], "no such file"),
    (["eval", "{int8}", "--data", "mnistt"], "unknown dataset 'mnistt'"),
    (["eval", "{int8}", "--data", "fashion_mnist", "--root", "{root}", "--test-subset", "0"], "--test-subset"),
    (["bench", "missing.onnx"], "no such file"),
    (["bench", "{int8}", "--batch", "0"], "--batch: must be >= 1"),
    (["bench", "{int8}", "--compare", "missing.onnx"], "no such file"),
    (["compare", "{int8}"], "not readable JSON"),
    (["compare", "missing.json"], "no such file"),
    (["compare", "{json}"], "not a compress report.json"),
    (["report", "{empty}"], "no report.json"),
])
def test_cli_errors_exit_2(runs, tmp_path, capsys, argv, says):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    (tmp_path / "empty").mkdir()
    subst = {"int8": str(runs["a"]["exp"] / "qat-int8.onnx"), "root": str(runs["root"]),
             "json": str(bad), "empty": str(tmp_path / "empty")}
    assert main([a.format(**subst) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and says in err, err
