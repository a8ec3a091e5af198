"""Honest checks and extension contracts: finite training, YAML 1.2 and bounded recipes,
prune ratios, loss-term batch sizes, the run lock, authoritative data roots, plugins in any
import order, and a cache key that follows the code."""

import contextlib
import copy
import io
import json
import os
import subprocess
import sys
import time
import tracemalloc
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import compress.data
from compress.cli import main
from compress.config import load_recipe
from compress.data import Batch
from compress.errors import CompressError
from compress.losses import LOSSES, Objective, TermInfo
from compress.models import MODELS, build_model
from compress.stages import STAGES, model_cost
from compress.stages.prune import check_ratio, max_ratio, prune_model
from compress.storage import Storage
from compress.yamlio import load_yaml

from conftest import TINY_RECIPE, write_fmnist

ROOT = Path(__file__).resolve().parents[1]


def cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code, err, *expect):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for e in expect:
        assert e in err, f"{e!r} not in {err}"


@pytest.fixture
def recipe_file(tmp_path, fmnist_root):
    """write(raw dict or text) -> path of a recipe file under tmp_path."""
    def write(raw, name="r.yaml"):
        p = tmp_path / name
        p.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False))
        return p
    return write


def one_stage(fmnist_root, **train):
    raw = copy.deepcopy(TINY_RECIPE)
    raw["data"]["root"] = str(fmnist_root)
    raw["stages"] = [{"name": "teacher", "kind": "train", "model": "teacher", "epochs": 1, "batch_size": 16, **train}]
    return raw


# ---- non-finite training -----------------------------------------------------------------

def test_lr_inf_is_refused_and_nothing_is_stored(tmp_path, fmnist_root, recipe_file):
    text = yaml.safe_dump(one_stage(fmnist_root), sort_keys=False).replace("batch_size: 16",
                                                                           "batch_size: 16\n  optimizer: {lr: .inf}")
    assert ".inf" in text
    path = recipe_file(text)
    for command in (["validate"], ["run", "--device", "cpu", "--workdir", str(tmp_path / "w")]):
        code, _, err = cli([*command, str(path)])
        assert_one_line_error(code, err, "stages[0].optimizer.lr", "finite")
    assert not (tmp_path / "w" / "runs" / "tiny" / "stages" / "teacher").exists()


@pytest.mark.parametrize("optimizer, names", [({"lr": 1e30}, "optimizer.lr (1e+30)"),
                                              ({"lr": 0.1, "weight_decay": 1e30}, "weight_decay (1e+30)")])
def test_diverging_training_stops_the_stage_in_one_line(tmp_path, fmnist_root, recipe_file, optimizer, names):
    path = recipe_file(one_stage(fmnist_root, optimizer=optimizer, schedule="constant"))
    code, _, err = cli(["run", "--device", "cpu", "--workdir", str(tmp_path), str(path)])
    assert_one_line_error(code, err, "stages.teacher (train)", "epoch 1 of 1", names, "Nothing was stored")
    stage_dir = tmp_path / "runs" / "tiny" / "stages" / "teacher"
    assert not (stage_dir / "result.json").exists() and not (stage_dir / "model.pt").exists()
    assert not (tmp_path / "exports" / "tiny" / "report.json").exists()


def _one_epoch(model, objective, lr, steps):
    """`train_one_epoch` of `model` (2 inputs) over `steps` batches of 4 ones, SGD at `lr`."""
    from compress.engine import RunContext, train_one_epoch

    objective.train = lambda: None
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    batches = (Batch(torch.ones(4, 2), torch.zeros(4, dtype=torch.long), torch.arange(4)) for _ in range(steps))
    ctx = RunContext(recipe=None, data=None, device=torch.device("cpu"))
    return train_one_epoch(model, objective, opt, sched, batches, ctx, steps=steps, desc="s 1/1")


def test_non_finite_flag_stops_within_fifty_steps():
    """The loop checks finiteness where it already syncs: a NaN at step 3 of 200 stops it at
    step 50, not after the epoch."""
    from compress.engine import NonFiniteLoss

    model = torch.nn.Linear(2, 2)
    seen = []

    def objective(m, b):
        seen.append(1)
        out = m(b.x)
        loss = out.sum() * (float("nan") if len(seen) == 3 else 1.0)
        return loss, {"x": loss}, out

    with pytest.raises(NonFiniteLoss):
        _one_epoch(model, objective, 0.0, 200)
    assert len(seen) == 50


@pytest.mark.parametrize("how", ["nan loss", "nan buffer", "own bug"])
def test_a_forward_that_fails_on_diverged_state_is_the_divergence(how):
    """A forward that fails on a diverged model (pt2e's observers `assert min_val <= max_val`
    once an overflow made NaN) is reported as the divergence, not as its traceback: after a
    NaN loss (the next step's weights are NaN), or where the loss stayed finite but a buffer
    went NaN in the failing forward itself (weights blown up to 1e20 overflow BatchNorm's
    statistics). A forward that fails on a finite model keeps its own error."""
    from compress.engine import NonFiniteLoss

    model = torch.nn.Linear(2, 2)
    model.register_buffer("running", torch.zeros(2))
    seen = []

    def objective(m, b):
        seen.append(1)
        out = m(b.x)
        if len(seen) == 5:
            if how == "nan buffer":
                m.running.fill_(float("nan"))
            assert how != "own bug", "a bug of the model's own"
        assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(m.running).all()), "min nan > max nan"
        loss = out.sum() * (float("nan") if how == "nan loss" and len(seen) == 3 else 1.0)
        return loss, {"x": loss}, out

    expected = (pytest.raises(AssertionError, match="a bug of the model's own") if how == "own bug" else
                pytest.raises(NonFiniteLoss, match=f"within the first {3 if how == 'nan loss' else 4} steps"))
    with expected:
        _one_epoch(model, objective, 0.1, 20)


# ---- YAML 1.2 and bounded input ---------------------------------------------------------

def test_yaml_12_numbers_in_files_and_overrides(fmnist_root, recipe_file):
    raw = one_stage(fmnist_root)
    text = yaml.safe_dump(raw, sort_keys=False).replace("batch_size: 16",
                                                        "batch_size: 16\n  optimizer: {lr: 1e-3, weight_decay: 5E-4}")
    r = load_recipe(recipe_file(text), ["stages.teacher.label_smoothing=1e-1"])
    s = r.stage("teacher")
    assert s.optimizer.lr == 1e-3 and s.optimizer.weight_decay == 5e-4 and s.label_smoothing == 0.1
    r = load_recipe(recipe_file(raw), ["stages.teacher.optimizer.lr=1e308"])
    assert r.stage("teacher").optimizer.lr == 1e308
    assert load_yaml("[1e3, .5, -2., 0x10, 0o17, 012, yes, on, ~, true]", "x") == \
        [1000.0, 0.5, -2.0, 16, 15, 12, "yes", "on", None, True]


@pytest.mark.parametrize("text, says", [
    ("name: a\nname: b\n", "line 2: duplicate key 'name' (first at line 1)"),
    ("name: a\nstages:\n- {name: t, kind: train, kind: prune}\n", "duplicate key 'kind'"),
    ("a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefghi", "bcdefghij")), "alias bomb"),
    ("a: &a [*a]\n", "recursive"),
    ("a: " + "[" * 30000 + "]" * 30000 + "\n", "nested more than"),
    ("a:\n" + "".join(" " * (2 * i) + f"k{i}:\n" for i in range(1, 90)), "nested more than"),
    ("x: [" + "1, " * 45000 + "]\n", "a recipe may have at most 131072"),
])
def test_bounded_recipe_input(tmp_path, text, says):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    tracemalloc.start()
    t0 = time.perf_counter()
    code, _, err = cli(["validate", str(path)])
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert_one_line_error(code, err, says)
    assert seconds < 3 and peak < 8 * 2**20, (seconds, peak)   # shared CPU, tracing: generous
    assert len(err) < 600


def test_huge_values_give_short_messages(tmp_path, fmnist_root, recipe_file):
    raw = one_stage(fmnist_root)
    raw["stages"][0]["kind"] = "x" * 100_000
    code, _, err = cli(["validate", str(recipe_file(raw))])
    assert_one_line_error(code, err, "unknown stage kind")
    assert len(err) <= 510


# ---- validate checks what run needs ----------------------------------------------------------

def tiny_with(fmnist_root, **changes):
    raw = copy.deepcopy(TINY_RECIPE)
    raw["data"]["root"] = str(fmnist_root)
    for path, value in changes.items():
        node = raw
        keys = path.split(".")
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node[k]
        node[keys[-1]] = value
    return raw


@pytest.mark.parametrize("mutate, says", [
    (lambda r: r["stages"].append({"name": "p2", "kind": "prune", "from": "qat", "ratio": 0.5}),
     "stages[5].from: stage 'qat' (qat) holds a quantized model"),
    (lambda r: r["stages"].append({"name": "q2", "kind": "qat", "from": "qat"}), "holds a quantized model"),
    (lambda r: r["stages"][4]["models"].append({"model": "qat", "format": "onnx-fp32"}),
     "stages.export.models[1]: stage 'qat' holds a quantized model"),
    (lambda r: r["stages"][1].update(ignore=["nosuch.layer"]), "stages.prune.ignore[0]"),
    (lambda r: r["stages"][1].update(ratio=0.999), "stages.prune.ratio: 0.999 would leave layer"),
    (lambda r: r["stages"][1].update(ratio=None, target_macs=1e-6), "stages.prune.target_macs"),
    (lambda r: r["stages"][0].update(epochs=10**23), "stages[0].epochs: must be <= 10000"),
    (lambda r: r["stages"][0].update(epochs=1e23), "stages[0].epochs"),
    (lambda r: r.update(seed=99999999999999999999999), "seed: must be <= 4294967295"),
    (lambda r: r.update(seed=-1), "seed: must be >= 0"),
    (lambda r: r["stages"][2].update(batch_size=1, loss=[{"term": "rkd"}]),
     "stages[2].batch_size: loss term 'rkd' needs at least 2 images per batch, got 1"),
])
def test_validate_refuses_what_run_would_fail_on(tmp_path, fmnist_root, recipe_file, mutate, says):
    raw = tiny_with(fmnist_root)
    mutate(raw)
    raw["stages"][1] = {k: v for k, v in raw["stages"][1].items() if v is not None}
    path = recipe_file(raw)
    for command in (["validate"], ["run", "--device", "cpu", "--workdir", str(tmp_path / "w")]):
        code, _, err = cli([*command, str(path)])
        assert_one_line_error(code, err, says)
    assert not (tmp_path / "w" / "runs").exists()


@pytest.mark.parametrize("round_to", [None, 4])
def test_params_and_macs_are_monotone_in_the_prune_ratio(round_to):
    """Up to the largest ratio that leaves every layer a channel, more ratio never means more
    params or MACs; above it the ratio is refused (torch-pruning would skip whole layers)."""
    cfg = SimpleNamespace(name="prune", ignore=[], importance="l1", global_=False, steps=1, round_to=round_to, layers={})
    base = build_model({"arch": "vgg_small", "args": {"in_channels": 1, "num_classes": 10}})
    top, layer = max_ratio(base, cfg, 10)
    assert (0.96 if round_to is None else 0.87) < top < 1 and layer
    ratios = [r for r in (0.5, 0.7, 0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96) if r < top] + [top]
    costs = [model_cost(prune_model(copy.deepcopy(base), cfg, (1, 28, 28), 10, r), (1, 28, 28)) for r in ratios]
    for (p0, m0), (p1, m1) in zip(costs, costs[1:]):
        assert p1 <= p0 and m1 <= m0, costs
    assert costs[-1][0] < costs[0][0] / 10
    # the message names the layer and the ways out: a lower ratio, that layer left whole or
    # given its own ratio, finer rounding
    says = (r"would leave layer '(\S+)' \(\d+ channels\) no channel; at most [\d.]+ for this model .*"
            r"or leave it whole \(ignore: \['\1'\]\) or give it its own ratio \(layers: \{'\1': R\}\)"
            + (", or lower round_to$" if round_to else "$"))
    for r in (top + 1e-4, 0.99, 0.999):
        with pytest.raises(CompressError, match=says):
            check_ratio(base, cfg, 10, r, "ratio")


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_term_refuses_a_batch_it_cannot_compute(name):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_loss_terms import _models, _spec

    cls = LOSSES[name]
    spec = _spec(name)
    if cls.min_batch > 1:
        student, teacher = _models(cls(spec))
        with pytest.raises(CompressError, match=f"loss term '{name}' needs at least {cls.min_batch}"):
            Objective([spec], student, teacher, sample=torch.randn(2, 1, 8, 8),
                      info=TermInfo(num_samples=20, num_classes=3, batch_size=cls.min_batch - 1))
    b = cls.min_batch   # the smallest batch it accepts gives a finite loss and finite gradients
    student, teacher = _models(cls(spec))
    obj = Objective([spec], student, teacher, sample=torch.randn(2, 1, 8, 8),
                    info=TermInfo(num_samples=20, num_classes=3, batch_size=b))
    obj.train()
    loss, _, _ = obj(student, Batch(torch.randn(b, 1, 8, 8), torch.arange(b) % 3, torch.arange(b),
                                    torch.zeros(b, dtype=torch.long)))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


# ---- data root ---------------------------------------------------------------------------------

def test_explicit_data_root_is_authoritative(tmp_path, monkeypatch):
    good = tmp_path / "elsewhere"
    write_fmnist(good)
    monkeypatch.setenv("COMPRESS_DATA", str(good))
    monkeypatch.setattr(compress.data, "DEBIAN_FASHION_MNIST", str(good))
    partial = tmp_path / "partial"
    write_fmnist(partial)
    (partial / "t10k-images-idx3-ubyte.gz").unlink()
    raw = copy.deepcopy(TINY_RECIPE)
    raw["data"]["root"] = str(partial)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    code, _, err = cli(["validate", str(path)])
    assert_one_line_error(code, err, str(partial), "lacks t10k-images-idx3-ubyte")
    del raw["data"]["root"]                      # no root: the other copies are found
    path.write_text(yaml.safe_dump(raw))
    code, out, err = cli(["validate", str(path)])
    assert code == 0 and str(good) in out, err


# ---- the run lock ----------------------------------------------------------------------------

def test_a_second_run_of_a_recipe_refuses_and_a_dead_holder_blocks_nothing(tmp_path, fmnist_root):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom compress.storage import Storage\n"
         f"with Storage({str(tmp_path)!r}, 'tiny').lock():\n    print('locked', flush=True)\n    time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        path = tmp_path / "r.yaml"
        raw = copy.deepcopy(TINY_RECIPE)
        raw["data"]["root"] = str(fmnist_root)
        path.write_text(yaml.safe_dump(raw))
        code, _, err = cli(["run", "--device", "cpu", "--workdir", str(tmp_path), str(path)])
        assert_one_line_error(code, err, "another run of this recipe is in progress",
                              f"process {holder.pid}")
        assert not (tmp_path / "runs" / "tiny" / "stages").exists()   # the loser wrote nothing
    finally:
        holder.kill()      # SIGKILL: no clean-up code runs in the holder
        holder.wait()
    lock = tmp_path / "runs" / "tiny" / ".lock"
    assert lock.read_text().strip() == str(holder.pid)    # the stale file is still there ...
    with Storage(tmp_path, "tiny").lock():                 # ... and blocks nothing
        pass


# ---- plugins: any import order; StageRef inputs; the code in the cache key ----------------

# Two plugin files: a loss term, and a model with a stage kind whose input field is `source`.
PLUGIN_TERM = '''
import compress.stages            # the stage modules first: the order that used to break
from typing import Literal
from compress.losses import LossTerm, TermSpec, register as register_term

SCALE = 1.0


class GapSpec(TermSpec):
    term: Literal["gap_TAG"] = "gap_TAG"


@register_term("gap_TAG")
class Gap(LossTerm):
    """L1 distance between student and teacher logits."""
    spec_cls = GapSpec
    uses_teacher = True

    def forward(self, student, teacher, batch):
        return SCALE * (student.logits - teacher.logits).abs().mean()
'''

PLUGIN_REST = '''
import copy
import compress.stages
from typing import Literal
from pydantic import Field
from compress.config import StageSpec, stage_ref
from compress.models import MODELS, VGG
from compress.stages import StageResult, describe, prepare, register as register_stage


@MODELS.register("net_TAG")
def net(in_channels=1, num_classes=10):
    return VGG([4, "M", 8], in_channels=in_channels, num_classes=num_classes)


class CopySpec(StageSpec):
    kind: Literal["copy_TAG"] = "copy_TAG"
    source: stage_ref() = Field(description="the stage whose model is copied")


@register_stage("copy_TAG", CopySpec, lambda cfg, inputs, build: copy.deepcopy(inputs[cfg.source]))
def run(cfg, ctx):
    src = ctx.results[cfg.source]
    model = prepare(copy.deepcopy(src.get_model()), ctx)
    return StageResult(spec=copy.deepcopy(src.spec), model=model, metrics=describe(model, ctx))
'''


@pytest.fixture
def plugin(tmp_path):
    """(term plugin file, --plugin arguments, tag, forget); forget() empties the registries
    and sys.modules of the plugins (so the next in-process run imports them afresh)."""
    tag = uuid.uuid4().hex[:8]
    term = tmp_path / f"terms_{tag}.py"
    term.write_text(PLUGIN_TERM.replace("TAG", tag))
    rest = tmp_path / f"parts_{tag}.py"
    rest.write_text(PLUGIN_REST.replace("TAG", tag))

    def forget():
        LOSSES.pop(f"gap_{tag}", None)
        MODELS.pop(f"net_{tag}", None)
        STAGES.pop(f"copy_{tag}", None)
        sys.modules.pop(term.stem, None)
        sys.modules.pop(rest.stem, None)

    yield term, ["--plugin", str(term), "--plugin", str(rest)], tag, forget
    forget()


def plugin_recipe(fmnist_root, tag):
    return {"name": "plug", "data": {"name": "fashion_mnist", "root": str(fmnist_root), "download": False},
            "models": {"net": {"arch": f"net_{tag}"}},
            "stages": [{"name": "teacher", "kind": "train", "model": "net", "epochs": 1, "batch_size": 32},
                       {"name": "copy", "kind": f"copy_{tag}", "source": "teacher"},
                       {"name": "student", "kind": "distill", "from": "copy", "teacher": "teacher", "epochs": 1,
                        "batch_size": 32, "loss": [{"term": f"gap_{tag}"}]}]}


def reused(out):
    """{stage: reused?} from the summary lines of a run."""
    return {line.split()[1]: line.rstrip().endswith("[reused]") for line in out.splitlines()
            if line.startswith("[")}


def test_plugin_term_stage_and_model_in_any_import_order(tmp_path, fmnist_root, plugin):
    term, plugins, tag, forget = plugin
    recipe = tmp_path / "plug.yaml"
    raw = plugin_recipe(fmnist_root, tag)
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    code, out, err = cli(["validate", str(recipe), *plugins])
    assert code == 0, err
    assert "source=teacher" in out
    work = tmp_path / "w"
    forget()
    code, out, err = cli(["run", str(recipe), *plugins, "--device", "cpu", "--workdir", str(work)])
    assert code == 0, err
    rep = json.loads((work / "exports" / "plug" / "report.json").read_text())
    assert [s["name"] for s in rep["stages"]] == ["teacher", "copy", "student"]
    assert rep["lineage"]["copy"] == "teacher" and rep["lineage"]["student"] == "copy"
    # the differently named input field is a checked reference ...
    forget()
    bad = copy.deepcopy(raw)
    bad["stages"][1]["source"] = "student"
    recipe.write_text(yaml.safe_dump(bad, sort_keys=False))
    code, _, err = cli(["validate", str(recipe), *plugins])
    assert_one_line_error(code, err, "stages[1].source: stage 'student' comes later")
    # ... and its upstream is part of its cache key: a changed teacher recomputes the copy
    forget()
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    code, out, err = cli(["run", str(recipe), *plugins, "--device", "cpu", "--workdir", str(work),
                          "--set", "stages.teacher.optimizer.lr=0.05"])
    assert code == 0, err
    assert reused(out) == {"teacher": False, "copy": False, "student": False}, out


def test_editing_a_loss_term_recomputes_the_stage_using_it_and_reuses_the_rest(tmp_path, fmnist_root, plugin):
    term, plugins, tag, forget = plugin
    recipe = tmp_path / "plug.yaml"
    recipe.write_text(yaml.safe_dump(plugin_recipe(fmnist_root, tag), sort_keys=False))
    work = tmp_path / "w"

    def run():
        forget()
        code, out, err = cli(["run", str(recipe), *plugins, "--device", "cpu", "--workdir", str(work)])
        assert code == 0, err
        return reused(out)

    assert run() == {"teacher": False, "copy": False, "student": False}
    assert run() == {"teacher": True, "copy": True, "student": True}
    term.write_text(term.read_text().replace("SCALE = 1.0", "SCALE = 2.0"))   # the term's code changes
    assert run() == {"teacher": True, "copy": True, "student": False}
    assert run() == {"teacher": True, "copy": True, "student": True}


def test_editing_a_file_a_plugin_imports_recomputes_the_model_it_builds(tmp_path, fmnist_root):
    """The model's class lives in a file beside the plugin (imported by it, not given as
    --plugin): editing that file recomputes the stage; stored weights of the old class are
    never loaded into the new one."""
    tag = uuid.uuid4().hex[:8]
    blocks = tmp_path / f"blocks_{tag}.py"
    blocks.write_text("from compress.models import VGG\n\n"
                      "def body(in_channels, num_classes):\n"
                      "    return VGG([4, 'M', 8], in_channels=in_channels, num_classes=num_classes)\n")
    plug = tmp_path / f"reg_{tag}.py"
    plug.write_text(f"import sys, os\nsys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))\n"
                    f"from blocks_{tag} import body\nfrom compress.models import MODELS\n\n"
                    f"@MODELS.register('helped_{tag}')\n"
                    f"def helped(in_channels=1, num_classes=10):\n    return body(in_channels, num_classes)\n")
    recipe = tmp_path / "helped.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "helped", "data": {"name": "fashion_mnist", "root": str(fmnist_root), "download": False},
        "models": {"net": {"arch": f"helped_{tag}"}},
        "stages": [{"name": "teacher", "kind": "train", "model": "net", "epochs": 1, "batch_size": 32}]},
        sort_keys=False))

    def run():
        from compress.models import MODELS

        MODELS.pop(f"helped_{tag}", None)
        for m in (plug.stem, blocks.stem):
            sys.modules.pop(m, None)
        code, out, err = cli(["run", str(recipe), "--plugin", str(plug), "--device", "cpu",
                              "--workdir", str(tmp_path / "w")])
        assert code == 0, err
        return reused(out)

    try:
        assert run() == {"teacher": False}
        assert run() == {"teacher": True}
        blocks.write_text(blocks.read_text().replace("[4, 'M', 8]", "[4, 'M', 6]"))
        assert run() == {"teacher": False}
    finally:
        sys.path[:] = [p for p in sys.path if p != str(tmp_path)]
