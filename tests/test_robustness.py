"""Nothing lost, nothing confusing: malformed recipes (property-based), interrupted runs,
corrupt or tampered stored results, safe loading and plugins, reproducible numbers, disk
trouble."""

import contextlib
import copy
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import compress.data
from compress.checkpoint import load_checkpoint, sha256
from compress.cli import main
from compress.config import AugmentSpec, DataSpec, ModelDef, OptimizerSpec, Recipe
from compress.data import DATASETS
from compress.errors import CompressError
from compress.losses import LOSSES
from compress.models import MODELS
from compress.stages import STAGES
from compress.stages.export import ExportItem

from conftest import TINY_RECIPE, idx_bytes, write_fmnist

ROOT = Path(__file__).resolve().parents[1]
NAME = "robust"


@contextlib.contextmanager
def no_fallback_data(tmp):
    """Only data.root supplies Fashion-MNIST: no $COMPRESS_DATA, no Debian copy."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("COMPRESS_DATA", raising=False)
        mp.setattr(compress.data, "DEBIAN_FASHION_MNIST", str(tmp / "no-debian"))
        yield


def cli(argv):
    """(exit status, stdout, stderr) of the CLI run in-process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def assert_user_error(code, err, expect=()):
    """Exit 2, at most three lines, starting 'error: ', no traceback, naming `expect`."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert 1 <= len(lines) <= 3 and lines[0].startswith("error: "), err
    assert "Traceback" not in err, err
    if expect:
        assert any(e in err for e in expect), f"none of {expect} in: {err}"


# ---- 1. malformed recipes: a property-based test over >= 200 mutations ----------------------

class Text(str):
    """A recipe file's raw text (as opposed to a value to dump as YAML)."""


def keys_of(cls):
    """The keys a config class accepts: field names and their aliases."""
    return {n for n in cls.model_fields} | {f.alias for f in cls.model_fields.values() if f.alias}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(valid recipe dict, folder for mutated files) on a 64/32-image Fashion-MNIST. The
    recipe has every stage kind, a fitnet term (layer paths) and optimizer/augment objects."""
    tmp = tmp_path_factory.mktemp("mutations")
    root = tmp / "fmnist"
    write_fmnist(root)
    raw = copy.deepcopy(TINY_RECIPE)
    raw["data"].update(root=str(root), train_subset=64)
    raw["stages"][0].update(optimizer={"name": "sgd", "lr": 0.1}, augment={"flip": True},
                            schedule="onecycle")
    raw["stages"][2]["loss"].append({"term": "fitnet", "student_layer": "features.0",
                                     "teacher_layer": "features.0", "weight": 0.5})
    raw["stages"][4]["latency_runs"] = 2
    with no_fallback_data(tmp):
        path = tmp / "valid.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        code, out, err = cli(["validate", str(path)])
        assert code == 0, err
        yield raw, tmp


def spec_class(raw, path):
    """The config class of the mapping at `path` of the base recipe."""
    if path == ():
        return Recipe
    if path == ("data",):
        return DataSpec
    if path[0] == "models":
        return ModelDef
    if path[0] == "stages":
        stage = raw["stages"][path[1]]
        if len(path) == 2:
            return STAGES[stage["kind"]].spec
        if path[2] == "optimizer":
            return OptimizerSpec
        if path[2] == "augment":
            return AugmentSpec
        if path[2] == "loss":
            return LOSSES[stage["loss"][path[3]]["term"]].spec_cls
        if path[2] == "models":
            return ExportItem
    raise AssertionError(path)


def get(raw, path):
    for k in path:
        raw = raw[k]
    return raw


def mappings(raw):
    """Paths of every config object in the base recipe (each refuses unknown keys)."""
    paths = [(), ("data",), ("models", "teacher")]
    for i, s in enumerate(raw["stages"]):
        paths.append(("stages", i))
        for k in ("optimizer", "augment"):
            if k in s:
                paths.append(("stages", i, k))
        for j in range(len(s.get("loss", []))):
            paths.append(("stages", i, "loss", j))
        if s["kind"] == "export":
            paths += [("stages", i, "models", j) for j in range(len(s["models"]))]
    return paths


# Keys whose removal makes the recipe invalid, and what the message then names.
REQUIRED = [
    (("name",), "name"), (("stages",), "stages"), (("models",), "model"),
    (("models", "teacher", "arch"), "arch"),
    *[(("stages", i, "name"), "name") for i in range(5)],
    *[(("stages", i, "kind"), "kind") for i in range(5)],
    (("stages", 0, "model"), "model"), (("stages", 1, "from"), "from"), (("stages", 1, "ratio"), "ratio"),
    (("stages", 2, "from"), "from"), (("stages", 2, "teacher"), "teacher"), (("stages", 3, "from"), "from"),
    (("stages", 3, "teacher"), "teacher"), (("stages", 4, "models"), "models"),
    (("stages", 2, "loss", 0, "term"), "term"), (("stages", 2, "loss", 1, "student_layer"), "student_layer"),
    (("stages", 2, "loss", 1, "teacher_layer"), "teacher_layer"), (("stages", 4, "models", 0, "model"), "model"),
]

# Leaves by type: a value of another type is refused (strict parsing, no coercion).
LEAVES = {
    "str": [("name",), ("data", "name"), ("data", "root"), ("models", "teacher", "arch"),
            *[("stages", i, "name") for i in range(5)], *[("stages", i, "kind") for i in range(5)],
            ("stages", 0, "model"), ("stages", 1, "from"),
            ("stages", 2, "from"), ("stages", 3, "from"), ("stages", 4, "models", 0, "model"),
            ("stages", 2, "loss", 1, "student_layer"), ("stages", 1, "importance")],
    "str_or_list": [("stages", 2, "teacher"), ("stages", 3, "teacher")],
    "int": [("seed",), ("data", "train_subset"), ("stages", 0, "epochs"), ("stages", 0, "batch_size"),
            ("stages", 2, "epochs"), ("stages", 3, "epochs"), ("stages", 4, "latency_runs")],
    "float": [("stages", 0, "optimizer", "lr"), ("stages", 1, "ratio"), ("stages", 2, "loss", 0, "T"),
              ("stages", 2, "loss", 0, "alpha"), ("stages", 2, "loss", 1, "weight")],
    "bool": [("data", "download"), ("stages", 0, "augment", "flip")],
    "list": [("stages",), ("stages", 2, "loss"), ("stages", 4, "models"), ("models", "teacher", "args", "cfg")],
    "mapping": [("data",), ("models",), ("models", "teacher"), ("stages", 0, "optimizer"),
                ("stages", 0, "augment"), ("stages", 2, "loss", 0), ("stages", 4, "models", 0)],
}

words = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,11}", fullmatch=True)
texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zl", "Zp")), max_size=12)
ints = st.integers(-10**6, 10**6)
nonint_floats = st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f != int(f))
lists = st.lists(st.integers(-5, 5), min_size=1, max_size=3)
dicts = st.dictionaries(words, st.integers(), min_size=1, max_size=2)
WRONG = {
    "str": st.one_of(ints, nonint_floats, st.booleans(), lists, dicts),
    "str_or_list": st.one_of(ints, nonint_floats, st.booleans(), dicts, st.lists(ints, min_size=1, max_size=2)),
    "int": st.one_of(texts, nonint_floats, lists, dicts),
    "float": st.one_of(texts, lists, dicts),
    "bool": st.one_of(texts, ints, lists, dicts),
    "list": st.one_of(texts, ints, dicts),
    "mapping": st.one_of(texts, ints, lists),
}

# Out-of-range values, per field.
RANGES = [
    (("stages", 0, "epochs"), st.integers(-100, 0)), (("stages", 0, "batch_size"), st.integers(-100, 0)),
    (("stages", 0, "optimizer", "lr"), st.floats(-10, 0)),
    (("stages", 0, "optimizer", "momentum"), st.one_of(st.floats(1, 10), st.floats(-10, -1e-3))),
    (("stages", 0, "warmup"), st.one_of(st.floats(1, 10), st.floats(-10, -1e-3))),
    (("stages", 0, "label_smoothing"), st.floats(1, 10)),
    (("stages", 1, "ratio"), st.one_of(st.floats(1, 100), st.floats(-10, 0))),
    (("stages", 2, "loss", 0, "T"), st.floats(-10, 0)),
    (("stages", 2, "loss", 0, "alpha"), st.one_of(st.floats(1.001, 10), st.floats(-10, -1e-3))),
    (("stages", 2, "loss", 1, "weight"), st.floats(-10, -1e-3)),
    (("stages", 3, "weight_bits"), st.one_of(st.integers(9, 64), st.integers(-5, 1))),
    (("stages", 3, "freeze_bn_epoch"), st.integers(2, 50)),
    (("stages", 4, "latency_runs"), st.integers(-5, 0)),
    (("stages", 4, "int8_min_agreement"), st.one_of(st.floats(1.001, 5), st.floats(-5, 0))),
    (("data", "train_subset"), st.integers(-5, 0)), (("data", "eval_batch_size"), st.integers(-5, 0)),
    (("name",), st.sampled_from(["", "a b", "../up", "x/y", "tab\there"])),
    (("stages", 1, "name"), st.sampled_from(["", "two words", "a/b", "é"])),
    (("models", "teacher", "args", "cfg"), st.sampled_from([[], [0], [-8, "M"], [8, "N"], ["M", 3.5], "8,M"])),
    (("models", "teacher", "args", "width"), st.floats(-5, 0)),
]

# Names looked up in a registry or among the stages, and the valid set to avoid.
NAMED = [
    (("stages", 1, "kind"), lambda r: STAGES), (("models", "teacher", "arch"), lambda r: MODELS),
    (("stages", 2, "loss", 0, "term"), lambda r: LOSSES), (("data", "name"), lambda r: DATASETS),
    (("stages", 0, "optimizer", "name"), lambda r: ["sgd", "adamw"]),
    (("stages", 0, "schedule"), lambda r: ["onecycle", "cosine", "constant"]),
    (("stages", 4, "models", 0, "format"), lambda r: ["onnx-fp32", "onnx-int8"]),
    (("stages", 1, "importance"), lambda r: ["l1", "l2", "group_l1", "bn_scale", "random"]),
    (("stages", 0, "model"), lambda r: r["models"]),
    *[(("stages", i, f), lambda r: [s["name"] for s in r["stages"]])
      for i, f in ((1, "from"), (2, "from"), (2, "teacher"), (3, "from"), (3, "teacher"))],
    (("stages", 4, "models", 0, "model"), lambda r: [s["name"] for s in r["stages"]]),
    (("stages", 2, "loss", 1, "student_layer"), lambda r: []),  # any word is no module path
    (("stages", 2, "loss", 1, "teacher_layer"), lambda r: []),
]


def set_at(raw, path, value):
    get(raw, path[:-1])[path[-1]] = value


@st.composite
def mutations(draw, raw):
    """(kind, recipe dict or file text or bytes, extra CLI args, substrings the message must
    contain one of). Every mutation is invalid by construction."""
    raw = copy.deepcopy(raw)
    kind = draw(st.sampled_from(KINDS))
    if kind == "delete":
        path, key = draw(st.sampled_from(REQUIRED))
        del get(raw, path[:-1])[path[-1]]
        return kind, raw, [], [key]
    if kind in ("unknown_key", "typo"):
        path = draw(st.sampled_from(mappings(raw)))
        node, valid = get(raw, path), keys_of(spec_class(raw, path))
        if kind == "unknown_key":
            key = draw(st.one_of(words, st.integers(-3, 3)))
            assume(key not in valid)
            node[key] = draw(st.one_of(ints, words, lists))
        else:  # rename an existing key with one letter added: the message suggests the original
            old = draw(st.sampled_from(sorted(node)))
            pos = draw(st.integers(0, len(old)))
            key = old[:pos] + draw(st.sampled_from("abcdefghijklmnopqrstuvwxyz")) + old[pos:]
            assume(key not in valid)
            node[key] = node.pop(old)
            return kind, raw, [], ["did you mean", key]
        return kind, raw, [], [str(key)]
    if kind == "wrong_type":
        cls = draw(st.sampled_from(sorted(LEAVES)))
        path = draw(st.sampled_from(LEAVES[cls]))
        set_at(raw, path, draw(WRONG[cls]))
        return kind, raw, [], [str(path[-1]) if isinstance(path[-1], str) else "stages"]
    if kind == "range":
        path, values = draw(st.sampled_from(RANGES))
        set_at(raw, path, draw(values))
        return kind, raw, [], [path[-1]]
    if kind == "name":
        path, valid = draw(st.sampled_from(NAMED))
        name = draw(words)
        assume(name not in valid(raw))
        set_at(raw, path, name)
        return kind, raw, [], [path[-1]]
    if kind == "reorder":  # a stage moved before one it reads from
        j = draw(st.sampled_from([1, 2, 3, 4]))
        refs = {1: [0], 2: [0, 1], 3: [0, 2], 4: [3]}[j]
        i = draw(st.sampled_from(refs))
        stage = raw["stages"].pop(j)
        raw["stages"].insert(draw(st.integers(0, i)), stage)
        return kind, raw, [], ["comes later"]
    if kind == "duplicate":  # a stage copied, or renamed, after a stage of the same name
        j = draw(st.integers(0, 4))
        if draw(st.booleans()):
            raw["stages"].insert(draw(st.integers(j + 1, 5)), copy.deepcopy(raw["stages"][j]))
        else:
            assume(j > 0)
            raw["stages"][j]["name"] = raw["stages"][draw(st.integers(0, j - 1))]["name"]
        return kind, raw, [], ["duplicate stage name"]
    if kind == "not_mapping":
        where = draw(st.sampled_from(["doc", "stages", "stage"]))
        value = draw(st.one_of(ints, texts.filter(lambda t: t.strip()), lists, st.none()))
        if where == "doc":
            return kind, value, [], ["mapping"]
        if where == "stages":
            raw["stages"] = draw(st.one_of(st.just([]), ints, dicts, texts))
            return kind, raw, [], ["stages"]
        raw["stages"][draw(st.integers(0, 4))] = value
        return kind, raw, [], ["stages["]
    if kind == "yaml":
        lines = yaml.safe_dump(raw, sort_keys=False).splitlines()
        at = draw(st.integers(0, len(lines)))
        junk = draw(st.sampled_from(["key: [unclosed", "key: {a: 1", "\tkey: 1", "a: b: c", "- [",
                                     "key: 'unterminated", "*undefined", "!!python/object/apply:os.system [x]",
                                     "  - {", "@at", "`tick", "key: ]", "{{", "? [a"]))
        indent = " " * draw(st.integers(0, 6))
        text = "\n".join(lines[:at] + [indent + junk] + lines[at:]) + "\n"
        try:
            yaml.safe_load(text)
            assume(False)          # still valid YAML (the junk landed somewhere harmless)
        except yaml.YAMLError:
            pass
        return kind, Text(text), [], ["line"]
    if kind == "override":
        choice = draw(st.sampled_from(["no_eq", "no_stage", "value_not_mapping", "range"]))
        if choice == "no_eq":
            return kind, raw, ["--set", draw(words)], ["--set"]
        if choice == "no_stage":
            name = draw(words)
            assume(name not in [s["name"] for s in raw["stages"]] and not name.isdigit())
            return kind, raw, ["--set", f"stages.{name}.epochs=1"], ["--set"]
        if choice == "value_not_mapping":
            return kind, raw, ["--set", f"name.{draw(words)}=1"], ["--set"]
        return kind, raw, ["--set", f"stages.teacher.epochs={draw(st.integers(-9, 0))}"], ["epochs"]
    if kind == "number":   # YAML 1.2 numbers that parse as numbers and are then refused
        path, text, expect = draw(st.sampled_from(BAD_NUMBERS))
        dumped = yaml.safe_dump(raw, sort_keys=False)
        set_at(raw, path, "@@HERE@@")
        text_out = yaml.safe_dump(raw, sort_keys=False).replace("'@@HERE@@'", text)
        assert text_out != dumped
        if draw(st.booleans()):
            return kind, Text(text_out), [], [expect]
        over = ".".join(str(raw["stages"][k]["name"]) if i == 1 and path[0] == "stages" else str(k)
                        for i, k in enumerate(path))
        return kind, Text(dumped), ["--set", f"{over}={text}"], [expect]
    if kind == "bounded":  # inputs past the size, alias, depth and duplicate-key limits
        choice = draw(st.sampled_from(["bomb", "recursive", "deep", "big", "dup", "dup_set", "long"]))
        if choice == "bomb":
            width, levels = draw(st.integers(8, 30)), draw(st.integers(6, 9))
            text = f"name: x\na0: &a0 [{', '.join(['1'] * width)}]\n" + "".join(
                f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]\n" for i in range(1, levels))
            assume(width ** levels > 200_000)
            return kind, Text(text + "stages: []\n"), [], ["alias bomb"]
        if choice == "recursive":
            return kind, Text(draw(st.sampled_from(["a: &a [*a]\n", "a: &a {b: *a}\n", "name: &n [1, [*n]]\n"]))), [], ["recursive"]
        if choice == "deep":
            n = draw(st.integers(65, 5000))
            return kind, Text("name: " + "[" * n + "]" * n + "\n"), [], ["nested more than"]
        if choice == "big":
            pad = "#" * 100 + "\n"
            return kind, Text(yaml.safe_dump(raw) + pad * draw(st.integers(1320, 3000))), [], ["at most 131072"]
        if choice == "dup":
            path = draw(st.sampled_from(mappings(raw)))
            node = get(raw, path)
            key = draw(st.sampled_from(sorted(node)))
            lines = yaml.safe_dump(raw, sort_keys=False).splitlines()
            token = f"@@{uuid.uuid4().hex}@@"
            node[token] = node[key]
            lines = yaml.safe_dump(raw, sort_keys=False).splitlines()
            at = next(i for i, line in enumerate(lines) if token in line)
            lines[at] = lines[at].replace(token, key)
            text = "\n".join(lines) + "\n"
            try:
                yaml.safe_load(text)
            except yaml.YAMLError:
                assume(False)
            return kind, Text(text), [], ["duplicate key"]
        if choice == "dup_set":
            return kind, raw, ["--set", "stages.teacher.optimizer={lr: 0.1, lr: 0.2}"], ["duplicate key"]
        raw["stages"][draw(st.integers(0, 4))]["kind"] = (draw(words) * 60000)[:60000]   # a huge name
        return kind, raw, [], ["unknown stage kind"]
    if kind == "plan":     # valid alone, impossible together: validate refuses what run would fail on
        plan, expect = draw(st.sampled_from(PLANS))
        plan(raw, draw)
        return kind, raw, [], [expect]
    if kind == "safe_name":
        where = draw(st.sampled_from([("name",), ("stages", 0, "name"), ("stages", 4, "name")]))
        set_at(raw, where, draw(st.sampled_from(["..", ".", "../x", "/etc", "a/../..", ".hidden", "x" * 101])))
        return kind, raw, [], ["cannot name a folder or file"]
    # data_root: a folder that does not exist, or lacks files (no fallback copy is used)
    if draw(st.booleans()):
        raw["data"]["root"] = f"/nonexistent-{draw(words)}"
        return kind, raw, [], ["fashion_mnist"]
    partial = Path(raw["data"]["root"]).parent / "partial"
    return kind, {**raw, "data": {**raw["data"], "root": str(partial)}}, [], ["lacks t10k-images-idx3-ubyte"]


KINDS = ["delete", "unknown_key", "typo", "wrong_type", "range", "name", "reorder", "duplicate",
         "not_mapping", "yaml", "override", "data_root", "number", "bounded", "plan", "safe_name"]

# (path, YAML 1.2 text of a number, what the message names): read as numbers, refused by range.
BAD_NUMBERS = [
    (("stages", 0, "optimizer", "lr"), ".inf", "finite"), (("stages", 0, "optimizer", "lr"), ".nan", "finite"),
    (("stages", 0, "optimizer", "lr"), "-1e-3", "lr"), (("stages", 1, "ratio"), "1e308", "ratio"),
    (("stages", 1, "ratio"), "-.inf", "ratio"), (("stages", 2, "loss", 0, "T"), ".NaN", "finite"),
    (("stages", 0, "epochs"), "1e23", "epochs"), (("stages", 0, "epochs"), "100000", "epochs"),
    (("stages", 0, "batch_size"), "99999999999", "batch_size"), (("seed",), "99999999999999999999999", "seed"),
    (("seed",), "-1", "seed"), (("stages", 0, "optimizer", "weight_decay"), ".inf", "finite"),
    (("stages", 3, "weight_bits"), "0x10", "weight_bits"), (("stages", 0, "epochs"), "0o0", "epochs"),
]


def _plan_set(path, value):
    def apply(raw, draw):
        set_at(raw, path, value)
    return apply


PLANS = [
    (lambda r, d: r["stages"].insert(4, {"name": "p2", "kind": "prune", "from": "qat", "ratio": 0.5}),
     "quantized model"),
    (lambda r, d: r["stages"].insert(4, {"name": "q2", "kind": "qat", "from": "qat"}), "quantized model"),
    (lambda r, d: r["stages"][4]["models"].append({"model": "qat", "format": "onnx-fp32"}), "quantized model"),
    (lambda r, d: r["stages"][1].update(ignore=[f"{d(words)}.layer"]), "ignore[0]"),
    (lambda r, d: r["stages"][1].update(ratio=d(st.floats(0.876, 0.9999))), "would leave layer"),
    (lambda r, d: r["stages"][2].update(batch_size=1, loss=[{"term": "rkd"}]), "needs at least 2 images"),
    (lambda r, d: r["stages"][3].update(batch_size=1, loss=[{"term": "kd"}, {"term": "rkd", "weight": 0.5}]),
     "needs at least 2 images"),
]


def test_malformed_recipes_exit_2_with_a_short_message(base):
    raw, tmp = base
    seen = {}

    @settings(max_examples=400, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(st.data())
    def check(data):
        kind, recipe, extra, expect = data.draw(mutations(raw))
        path = tmp / "mutated.yaml"
        if isinstance(recipe, Text):
            path.write_text(recipe)
        else:
            path.write_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
        for command in (["validate"], ["run", "--device", "cpu", "--workdir", str(tmp / "w")]):
            code, _, err = cli([*command, str(path), *extra])
            assert_user_error(code, err, expect)
            # refused before anything ran; a file the tool never wrote is untouched
            assert sorted(p.name for p in (tmp / "w").iterdir()) == ["keep.txt"]
            assert (tmp / "w" / "keep.txt").read_text() == "mine"
        seen[kind] = seen.get(kind, 0) + 1

    (tmp / "w").mkdir(exist_ok=True)
    (tmp / "w" / "keep.txt").write_text("mine")
    partial = tmp / "partial"
    write_fmnist(partial)
    (partial / "t10k-images-idx3-ubyte.gz").unlink()
    with no_fallback_data(tmp):
        check()
    assert sum(seen.values()) >= 380, seen
    assert set(seen) == set(KINDS), seen     # every kind of mutation was exercised


@pytest.mark.parametrize("damage, expect", [
    ("missing", "lacks t10k-labels-idx1-ubyte"),
    ("truncated", "truncated"),
    ("truncated_gz", "cannot read IDX"),
    ("bad_labels", "labels must be in 0..9"),
    ("dir", "no such folder"),
])
def test_broken_data_root_is_one_line(tmp_path, damage, expect):
    root = tmp_path / "fmnist"
    write_fmnist(root, gz=damage == "truncated_gz")
    if damage == "missing":
        (root / "t10k-labels-idx1-ubyte").unlink()
    elif damage == "truncated":
        f = root / "train-images-idx3-ubyte"
        f.write_bytes(f.read_bytes()[:5000])
    elif damage == "truncated_gz":
        f = root / "train-images-idx3-ubyte.gz"
        f.write_bytes(f.read_bytes()[:300])
    elif damage == "bad_labels":
        f = root / "train-labels-idx1-ubyte"
        b = bytearray(f.read_bytes())
        b[-1] = 200
        f.write_bytes(bytes(b))
    elif damage == "dir":
        root = tmp_path / "nowhere"
    raw = copy.deepcopy(TINY_RECIPE)
    raw["data"]["root"] = str(root)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    with no_fallback_data(tmp_path):
        for command in (["validate"], ["run", "--device", "cpu", "--workdir", str(tmp_path)]):
            code, _, err = cli([*command, str(path)])
            assert_user_error(code, err, [expect])


def test_damaged_gzip_stream_is_one_line(tmp_path):
    """A bit flip inside the deflate stream raises zlib.error (not OSError) in gzip."""
    raw = write_fmnist(tmp_path / "src", gz=True)
    blob = (tmp_path / "src" / "train-images-idx3-ubyte.gz").read_bytes()
    failures = set()
    for pos in range(20, len(blob) - 8, 97):
        b = bytearray(blob)
        b[pos] ^= 0x55
        f = tmp_path / "x.gz"
        f.write_bytes(bytes(b))
        try:
            compress.data._read_idx(f, 3)
        except CompressError:
            failures.add("CompressError")
    assert failures == {"CompressError"} and raw  # every damaged stream: one user error


def test_unreadable_recipe_files(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00name: x\n")
    (tmp_path / "dir.yaml").mkdir()
    deep = "a: " + "[" * 5000 + "]" * 5000 + "\n"
    (tmp_path / "deep.yaml").write_text(deep)
    for name, expect in (("bin.yaml", "cannot read recipe"), ("dir.yaml", "is a directory"),
                         ("missing.yaml", "does not exist"), ("deep.yaml", "deep.yaml")):
        for command in (["validate"], ["run", "--workdir", str(tmp_path)]):
            code, _, err = cli([*command, str(tmp_path / name)])
            assert_user_error(code, err, [expect])


def test_huge_model_is_a_user_error(base, tmp_path):
    raw, _ = base
    raw = copy.deepcopy(raw)
    raw["models"]["teacher"]["args"] = {"cfg": [200000, 200000, 200000]}  # ~2.9 TB of weights
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    code, _, err = cli(["validate", str(path)])
    assert_user_error(code, err, ["models.teacher: cannot build"])


@pytest.mark.parametrize("warmup", [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.9])
def test_onecycle_schedule_survives_any_step_count(warmup):
    """OneCycleLR divided 0 by 0 when warm-up was exactly one step (e.g. 4 steps, warmup
    0.25: 1024 images in batches of 256, one epoch) and the run died with a traceback."""
    from types import SimpleNamespace

    from compress.config import TrainingSpec
    from compress.engine import build_scheduler

    spec = TrainingSpec(warmup=warmup)
    for total in range(1, 41):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        sched = build_scheduler(spec, opt, total)
        for step in range(total):
            assert 0 < opt.param_groups[0]["lr"] <= spec.optimizer.lr, SimpleNamespace(total=total, step=step)
            opt.step()
            sched.step()


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nstages: [{name: a, kind: nope}]\n")
    with pytest.raises(CompressError, match="unknown stage kind"):
        main(["validate", str(path), "--debug"])


# ---- 2. safe loading and plugins ------------------------------------------------------------

def test_names_in_a_recipe_are_never_imported(base, tmp_path, monkeypatch):
    """A recipe names registry entries only; a module with that name is not imported."""
    raw, _ = base
    mod = f"evil_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "imported"
    (tmp_path / f"{mod}.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for path in [("models", "teacher", "arch"), ("stages", 1, "kind"), ("data", "name"),
                 ("stages", 2, "loss", 0, "term"), ("stages", 1, "importance")]:
        r = copy.deepcopy(raw)
        set_at(r, path, mod)
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
        code, _, err = cli(["validate", str(tmp_path / "r.yaml")])
        assert_user_error(code, err, [mod])
    (tmp_path / "r.yaml").write_text(f"!!python/object/apply:{mod}.x []\n")
    code, _, err = cli(["validate", str(tmp_path / "r.yaml")])
    assert_user_error(code, err, ["YAML syntax error at line 1"])
    assert not marker.exists() and mod not in sys.modules


def test_plugin_registers_a_model(base, tmp_path):
    raw, _ = base
    tag = uuid.uuid4().hex[:8]
    arch = f"plugin_vgg_{tag}"
    plugin = tmp_path / f"plugin_{tag}.py"
    plugin.write_text(
        "from compress.models import MODELS, VGG\n"
        f"@MODELS.register({arch!r})\n"
        "def make(in_channels=3, num_classes=10, cfg=(8, 'M', 16)):\n"
        "    return VGG(list(cfg), in_channels=in_channels, num_classes=num_classes)\n")
    r = copy.deepcopy(raw)
    r["models"]["teacher"] = {"arch": arch}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(r))
    try:
        code, _, err = cli(["validate", str(path)])
        assert_user_error(code, err, [f"unknown model '{arch}'"])
        code, out, err = cli(["validate", str(path), "--plugin", str(plugin)])
        assert code == 0, err
        assert "valid" in out
    finally:
        MODELS.pop(arch, None)
        sys.modules.pop(plugin.stem, None)
    for bad, expect in ((f"no_such_module_{tag}", "No module named"), (str(tmp_path / "nope.py"), "does not exist")):
        code, _, err = cli(["validate", str(path), "--plugin", bad])
        assert_user_error(code, err, [f"--plugin {bad}", expect])


def test_checkpoint_with_code_is_refused_unexecuted(tmp_path):
    """torch.load(weights_only=True): a pickle that would run code is refused, not run."""
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "model.pt"
    torch.save({"spec": {"arch": "vgg_small"}, "state_dict": {}, "x": Evil()}, path)
    with pytest.raises(CompressError, match="not a readable compress checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


# ---- 3. runs: reproducible, interruptible, self-checking -------------------------------------

def write_learnable_fmnist(root, n_train=512, n_test=128):
    """Fashion-MNIST-format files a tiny CNN learns something of in a few dozen steps: noise
    whose brightness grows with the class."""
    rng = np.random.default_rng(0)

    def split(n):
        y = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        x = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8) + (y * 20)[:, None, None].astype(np.uint8)
        return x, y

    root.mkdir(parents=True, exist_ok=True)
    for (x, y), stem in ((split(n_train), "train"), (split(n_test), "t10k")):
        (root / f"{stem}-images-idx3-ubyte").write_bytes(idx_bytes(x))
        (root / f"{stem}-labels-idx1-ubyte").write_bytes(idx_bytes(y))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A five-stage recipe (train, prune, distill, qat, export of the INT8 file) that runs in
    a few seconds on two CPU cores."""
    tmp = tmp_path_factory.mktemp("tiny")
    write_learnable_fmnist(tmp / "data")
    raw = {
        "name": NAME, "seed": 0,
        "data": {"name": "fashion_mnist", "root": str(tmp / "data"), "download": False},
        "models": {"teacher": {"arch": "vgg_small", "args": {"cfg": [8, "M", 16]}}},
        "stages": [
            {"name": "teacher", "kind": "train", "model": "teacher", "epochs": 2, "batch_size": 32},
            {"name": "prune", "kind": "prune", "from": "teacher", "ratio": 0.5},
            {"name": "distill", "kind": "distill", "from": "prune", "teacher": "teacher", "epochs": 1,
             "batch_size": 32, "loss": [{"term": "kd", "T": 4, "alpha": 0.9}]},
            {"name": "qat", "kind": "qat", "from": "distill", "teacher": "teacher", "epochs": 1,
             "batch_size": 32, "loss": [{"term": "kd", "T": 4, "alpha": 0.9}]},
            {"name": "export", "kind": "export", "latency_runs": 2,
             "models": [{"model": "qat", "format": "onnx-int8"}]},
        ],
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# The runs compared byte for byte compute on two threads, in-process and in the processes the
# tests start, whatever the test runner's own setting (its workers compute on one): the same
# numbers must come out of a multi-threaded run, as users run it.
THREADS = 2


def run_cli(recipe, workdir, *extra):
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        code, out, err = cli(["run", str(recipe), "--workdir", str(workdir), "--device", "cpu", *extra])
    finally:
        torch.set_num_threads(before)
    assert code == 0, err
    return out


def report(workdir):
    return json.loads((Path(workdir) / "exports" / NAME / "report.json").read_text())


def numbers(rep):
    """Everything in a report that is measured on the models and files, not on the clock."""
    stages = [{k: s[k] for k in ("name", "kind", "top1", "params", "macs")} for s in rep["stages"]]
    exports = [{k: e[k] for k in ("model", "format", "path", "bytes", "top1", "check")} for e in rep["exports"]]
    return stages, exports


def stored_files(workdir):
    """{relative path: sha256} of every stage file and export a run keeps."""
    w = Path(workdir)
    files = [*w.glob(f"runs/{NAME}/stages/*/model.pt"), *w.glob(f"exports/{NAME}/*.onnx")]
    return {str(f.relative_to(w)): sha256(f) for f in sorted(files)}


def assert_results_verify(workdir):
    """Every result.json is whole and every file it names has the hash it records."""
    done = []
    for meta_path in sorted(Path(workdir).glob(f"runs/{NAME}/stages/*/result.json")):
        meta = json.loads(meta_path.read_text())
        for rel, digest in meta["hashes"].items():
            assert sha256(Path(workdir) / rel) == digest, rel
        done.append(meta_path.parent.name)
    return done


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    work = tmp_path_factory.mktemp("reference")
    run_cli(tiny, work)
    return work, report(work)


def test_same_seed_same_numbers_twice(tiny, reference, tmp_path):
    """Same seed, same machine, CPU: identical report numbers and identical files."""
    work, rep = reference
    run_cli(tiny, tmp_path)
    again = report(tmp_path)
    assert numbers(again) == numbers(rep)
    assert stored_files(tmp_path) == stored_files(work)          # byte-identical checkpoints and ONNX
    assert rep["environment"]["threads"] == again["environment"]["threads"] == THREADS
    st = {s["name"]: s for s in rep["stages"]}
    assert st["teacher"]["top1"] > 25                              # it learned (chance: 10%)
    assert [s["name"] for s in rep["stages"]] == ["teacher", "prune", "distill", "qat", "export"]


def _start(recipe, workdir, log):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(THREADS)}
    return subprocess.Popen([sys.executable, "-m", "compress", "run", str(recipe), "--workdir", str(workdir),
                             "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=str(workdir))


def _kill_when(proc, ready, timeout=120):
    """SIGKILL `proc` as soon as `ready()` holds (polled every 10 ms); False if it exited first."""
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.01)
    proc.wait()
    return False


def test_killed_runs_resume_from_the_last_completed_stage(tiny, reference, tmp_path):
    """SIGKILL a real `compress run` while the teacher trains, right after a stage completes,
    and mid-export; then leave what a kill mid-write leaves. Every restart reuses exactly
    the completed stages, and the last one ends with an uninterrupted run's numbers and bytes."""
    work = tmp_path
    order = ["teacher", "prune", "distill", "qat", "export"]
    stages_dir = work / "runs" / NAME / "stages"
    log_path = work / "log.txt"

    def completed():
        return [n for n in order if (stages_dir / n / "result.json").is_file()]

    def log_text():
        return log_path.read_text() if log_path.exists() else ""

    def after_header(delay):
        seen = []

        def ready():
            if not seen and "stages on cpu" in log_text():   # data loaded: the teacher starts
                seen.append(time.monotonic())
            return bool(seen) and time.monotonic() - seen[0] >= delay
        return ready

    kill_points = [
        ("while the teacher trains", after_header(0.5)),
        ("just after a stage completes", lambda: len(completed()) > len(before)),
        ("mid-export", lambda: any((work / "exports" / NAME).glob("*.onnx"))),
    ]
    killed = []
    for label, ready in kill_points:
        before = completed()
        with open(log_path, "w") as log:
            proc = _start(tiny, work, log)
            if _kill_when(proc, ready):
                killed.append(label)
        assert "Traceback" not in log_text()
        for line in log_text().splitlines():       # stages completed earlier were reused
            if any(line.startswith(f"[{order.index(n) + 1}/5] {n} (") for n in before):
                assert line.endswith("[reused]"), line
        assert set(assert_results_verify(work)) == set(completed())   # never a half-written result
        assert set(before) <= set(completed())                         # nothing completed is lost
    assert len(killed) >= 2, killed
    print("killed:", killed, "completed then:", completed())

    # What a kill in the middle of a write leaves: temp files beside a checkpoint and an export
    # (never read; cleaned up), and a stage whose model.pt was replaced but whose result.json
    # was not (its hash no longer matches: recomputed, never loaded).
    done = completed()
    (stages_dir / "teacher").mkdir(parents=True, exist_ok=True)
    (stages_dir / "teacher" / ".model.pt.deadbeef.tmp").write_bytes(b"PK\x03\x04half")
    (work / "exports" / NAME).mkdir(parents=True, exist_ok=True)
    (work / "exports" / NAME / ".qat-int8.onnx.cafe.tmp").write_bytes(b"\x08\x01half")
    with_model = [n for n in done if (stages_dir / n / "model.pt").is_file()]
    last = stages_dir / with_model[-1] / "model.pt" if with_model else None
    if last is not None:
        last.write_bytes(last.read_bytes()[:100])

    with open(log_path, "w") as log:
        proc = _start(tiny, work, log)
        assert proc.wait(timeout=600) == 0, log_text()
    out = log_text()
    assert "Traceback" not in out
    rep = report(work)
    assert [s["name"] for s in rep["stages"]] == order
    reused = {s["name"]: s["reused"] for s in rep["stages"]}
    recomputed = last.parent.name if last is not None else None
    assert reused == {n: n in done and n != recomputed for n in order}, (done, out)
    if last is not None:
        assert f"stored file {last} of stage '{recomputed}' is missing or corrupt; recomputing" in out
    assert not [*work.glob("**/.*.tmp")]
    assert sorted(assert_results_verify(work)) == sorted(order)
    assert numbers(rep) == numbers(reference[1]) and rep["environment"]["threads"] == THREADS
    assert stored_files(work) == stored_files(reference[0])


def test_damaged_results_are_detected_in_one_line_and_recomputed(tiny, reference, tmp_path):
    """A corrupt checkpoint, a truncated one, an edited result.json, an unreadable one and a
    corrupt export: each is reported in one line and recomputed to the same bytes."""
    src, rep = reference
    work = tmp_path / "w"
    shutil.copytree(src, work)
    sd = work / "runs" / NAME / "stages"
    ckpt = sd / "distill" / "model.pt"
    b = bytearray(ckpt.read_bytes())
    b[len(b) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(b))                                        # bit flip
    (sd / "qat" / "model.pt").write_bytes((sd / "qat" / "model.pt").read_bytes()[:200])   # truncated
    meta = json.loads((sd / "prune" / "result.json").read_text())
    meta["metrics"]["top1"] = 99.9                                    # tampered number, hashes intact
    (sd / "prune" / "result.json").write_text(json.dumps(meta))
    (sd / "teacher" / "result.json").write_text('["not", "a", "result"]')   # unreadable
    onnx = work / "exports" / NAME / "qat-int8.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-10] + b"0123456789")        # corrupt export

    out = run_cli(tiny, work)
    lines = [ln for ln in out.splitlines() if "recomputing" in ln]
    assert len(lines) == 5, out
    for stage, what in (("teacher", "unreadable"), ("prune", "content hash"), ("distill", "corrupt"),
                        ("qat", "corrupt"), ("export", "corrupt")):
        assert any(f"'{stage}'" in ln and what in ln for ln in lines), (stage, out)
    again = report(work)
    assert not any(s["reused"] for s in again["stages"])
    assert numbers(again) == numbers(rep)
    assert stored_files(work) == stored_files(src)                   # recomputed to the same bytes
    assert_results_verify(work)
    # and once repaired, everything is reused
    run_cli(tiny, work)
    assert all(s["reused"] for s in report(work)["stages"])


# ---- 4. disk trouble -----------------------------------------------------------------------

def test_unwritable_export_dir_is_one_line_and_keeps_results(tiny, reference, tmp_path):
    src, _ = reference
    work = tmp_path / "w"
    shutil.copytree(src, work)
    shutil.rmtree(work / "exports")
    (work / "exports").write_text("a file where the export folder should be\n")
    before = stored_files(work)
    code, _, err = cli(["run", str(tiny), "--workdir", str(work), "--device", "cpu",
                        "--set", "stages.export.latency_runs=3"])
    assert_user_error(code, err, [str(work / "exports")])
    assert "Not a directory" in err
    assert stored_files(work) == before


@pytest.mark.parametrize("target", ["qat-int8.onnx", "report.json"])
def test_full_disk_is_one_line_and_keeps_results(tiny, reference, tmp_path, monkeypatch, target):
    """ENOSPC when the export stage writes its ONNX file, or when the report is written:
    exit 2, one line naming the file, and every earlier file (checkpoints, the previous
    export and report) untouched."""
    src, _ = reference
    work = tmp_path / "w"
    shutil.copytree(src, work)
    old_report = (work / "exports" / NAME / "report.json").read_bytes()
    before = stored_files(work)
    real_replace = os.replace

    def full(a, b, *args, **kw):
        if Path(b).name == target:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(b))
        return real_replace(a, b, *args, **kw)

    monkeypatch.setattr(os, "replace", full)
    code, _, err = cli(["run", str(tiny), "--workdir", str(work), "--device", "cpu",
                        "--set", "stages.export.latency_runs=3"])
    assert_user_error(code, err, ["No space left on device"])
    assert str(work / "exports" / NAME / target) in err
    assert (work / "exports" / NAME / "report.json").read_bytes() == old_report
    assert stored_files(work) == before
    assert not [*work.glob("**/.*.tmp")]


@pytest.mark.skipif(not hasattr(__import__("resource"), "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
def test_real_write_failure_in_a_real_process_is_one_line(tiny, reference, tmp_path):
    """Writes past 1 KB fail for real (RLIMIT_FSIZE: EFBIG, as ENOSPC would), in a real
    `compress run` whose export must be redone: exit 2, one line, no traceback from any
    thread (TensorBoard writes in the background), earlier files untouched."""
    import resource

    src, _ = reference
    work = tmp_path / "w"
    shutil.copytree(src, work)
    before = stored_files(work)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    proc = subprocess.run([sys.executable, "-m", "compress", "run", str(tiny), "--workdir", str(work),
                           "--device", "cpu", "--set", "stages.export.latency_runs=3"],
                          capture_output=True, text=True, preexec_fn=limit, timeout=600)
    assert_user_error(proc.returncode, proc.stderr, [os.strerror(errno.EFBIG)])
    assert str(work) in proc.stderr
    assert stored_files(work) == before
    assert not [*work.glob("**/.*.tmp")]


# ---- 1b. every sub-command's arguments: a property-based test --------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """ONNX files (a good 10-class Fashion-MNIST model, a 7-class one, one frozen to batch 1,
    an RGB 32x32 one), a valid report.json, a tiny dataset and junk files."""
    import onnx

    from compress.models import VGG
    from compress.onnx_io import export_onnx

    tmp = tmp_path_factory.mktemp("commands")
    write_fmnist(tmp / "fmnist")
    meta = {"dataset": "fashion_mnist", "recipe": "x", "format": "onnx-fp32"}
    torch.manual_seed(0)
    for name, ch, ncls, hw in (("good", 1, 10, 28), ("seven", 1, 7, 28), ("rgb", 3, 10, 32)):
        export_onnx(VGG([4, "M", 8], in_channels=ch, num_classes=ncls).eval(), tmp / f"{name}.onnx",
                    input_shape=(ch, hw, hw), mean=[0.5] * ch, std=[0.5] * ch,
                    metadata={**meta, "dataset": "fashion_mnist" if ch == 1 else "cifar10"})
    proto = onnx.load(str(tmp / "good.onnx"))
    for v in (proto.graph.input[0], proto.graph.output[0]):
        v.type.tensor_type.shape.dim[0].dim_value = 1          # batch axis frozen to 1
    onnx.save(proto, str(tmp / "fixed.onnx"))
    (tmp / "junk.onnx").write_bytes(b"\x08\x01junk" * 10)
    (tmp / "text.json").write_text("not json {")
    (tmp / "list.json").write_text("[1, 2]")
    (tmp / "adir").mkdir()
    good = {"recipe": "x", "data": {"name": "fashion_mnist", "num_classes": 10, "input_shape": [1, 28, 28]},
            "stages": [{"name": "t", "kind": "train", "top1": 50.0, "params": 10, "macs": 20, "seconds": 1.0}],
            "exports": [{"model": "t", "format": "onnx-fp32", "path": "good.onnx", "bytes": 100, "top1": 50.0,
                         "latency_ms": {"b1": 0.1, "b64": 1.0}}],
            "total_seconds": 1.0, "wall_seconds": 1.0, "environment": {"device": "cpu", "threads": 1}}
    (tmp / "valid").mkdir()
    (tmp / "valid" / "report.json").write_text(json.dumps(good))
    code, out, err = cli(["report", str(tmp / "valid")])     # a genuine report copied elsewhere
    assert code == 0 and "no stored stage results" in out, err
    return tmp, good


# (path in the report, wrong value) for the report-field mutations
REPORT_DAMAGE = [
    (("recipe",), 3), (("recipe",), "../.."), (("stages",), {"a": 1}), (("stages", 0, "top1"), "92%"),
    (("stages", 0, "params"), 1.5), (("stages", 0, "seconds"), None), (("exports", 0, "bytes"), "1KB"),
    (("exports", 0, "latency_ms"), [1, 2]), (("exports", 0, "latency_ms", "b1"), 0), (("data", "num_classes"), "10"),
    (("environment",), None), (("exports",), "none"), (("stages", 0), "t"), (("data", "input_shape"), [1.5]),
]


@st.composite
def command_args(draw, tmp, good):
    """(argv, substrings the message must contain one of, report to write or None)."""
    f = {n: str(tmp / n) for n in ("good.onnx", "seven.onnx", "rgb.onnx", "fixed.onnx", "junk.onnx",
                                    "text.json", "list.json", "adir", "fmnist")}
    missing = str(tmp / f"missing-{draw(words)}.onnx")
    cmd = draw(st.sampled_from(["eval", "bench", "compare", "report"]))
    if cmd == "eval":
        case = draw(st.sampled_from(["missing", "junk", "dir", "classes", "data", "subset", "root", "rgb"]))
        root = ["--root", f["fmnist"]]
        return {"missing": (["eval", missing, *root], ["no such file"]),
                "junk": (["eval", f["junk.onnx"], *root], ["not a readable ONNX"]),
                "dir": (["eval", f["adir"], *root], ["a directory, not an ONNX file"]),
                "classes": (["eval", f["seven.onnx"], *root], ["7 outputs"]),
                "data": (["eval", f["good.onnx"], "--data", draw(words), *root], ["unknown dataset"]),
                "subset": (["eval", f["good.onnx"], "--test-subset", str(draw(st.integers(-10**6, 0))), *root],
                           ["--test-subset"]),
                "root": (["eval", f["good.onnx"], "--root", str(tmp / f"nowhere-{draw(words)}")], ["no such folder"]),
                "rgb": (["eval", f["rgb.onnx"], "--data", "fashion_mnist", *root], ["does not fit"]),
                }[case] + (None,)
    if cmd == "bench":
        case = draw(st.sampled_from(["missing", "junk", "batch", "huge", "runs", "threads", "fixed", "twin",
                                     "twin_missing", "twin_fixed"]))
        quick = ["--runs", "1"]
        return {"missing": (["bench", missing], ["no such file"]),
                "junk": (["bench", f["junk.onnx"]], ["not a readable ONNX"]),
                "batch": (["bench", f["good.onnx"], "--batch", str(draw(st.integers(-10**9, 0)))], ["--batch"]),
                "huge": (["bench", f["good.onnx"], "--batch", str(draw(st.integers(65537, 10**12)))], ["--batch"]),
                "runs": (["bench", f["good.onnx"], "--runs", str(draw(st.one_of(st.integers(-99, 0),
                                                                           st.integers(100_001, 10**9))))], ["--runs"]),
                "threads": (["bench", f["good.onnx"], "--threads", str(draw(st.one_of(st.integers(-99, 0),
                                                                                 st.integers(1025, 10**6)))), *quick],
                            ["--threads"]),
                "fixed": (["bench", f["fixed.onnx"], "--batch", str(draw(st.integers(2, 65536))), *quick],
                          ["batches of exactly 1"]),
                "twin": (["bench", f["good.onnx"], "--compare", draw(st.sampled_from([f["seven.onnx"], f["rgb.onnx"]])),
                          "--batch", "1", *quick], ["same task"]),
                "twin_missing": (["bench", f["good.onnx"], "--compare", missing, *quick], ["no such file"]),
                "twin_fixed": (["bench", f["good.onnx"], "--compare", f["fixed.onnx"], "--batch", "1", "64", *quick],
                               ["batches of exactly 1"]),
                }[case] + (None,)
    damaged = copy.deepcopy(good)
    path, value = draw(st.sampled_from(REPORT_DAMAGE))
    set_at(damaged, path, value)
    bad_files = [(f["text.json"], "not readable JSON"), (f["list.json"], "not a compress report.json"),
                 (missing, "no such file"), (f["good.onnx"], "not readable JSON")]
    if cmd == "compare":
        if draw(st.booleans()):
            arg, expect = draw(st.sampled_from(bad_files))
            return ["compare", str(tmp / "valid"), arg, "--out", str(tmp / "out")], [expect], None
        return ["compare", str(tmp / "valid"), str(tmp / "damaged"), "--out", str(tmp / "out")], \
            ["report.json"], damaged
    if draw(st.booleans()):
        arg, expect = draw(st.sampled_from(bad_files[1:3] + [(f["adir"], "no report.json")]))
        return ["report", arg], [expect, "no report.json"], None
    return ["report", str(tmp / "damaged")], ["report.json"], damaged


def snapshot(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(Path(folder).rglob("*"))}


def test_bad_command_arguments_exit_2_with_a_short_message(files):
    tmp, good = files
    seen = {}

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(st.data())
    def check(data):
        argv, expect, damaged = data.draw(command_args(tmp, good))
        if damaged is not None:
            (tmp / "damaged").mkdir(exist_ok=True)
            (tmp / "damaged" / "report.json").write_text(json.dumps(damaged))
        before = snapshot(tmp)
        code, _, err = cli(argv)
        assert_user_error(code, err, expect)
        assert snapshot(tmp) == before         # nothing written, nothing removed
        seen[argv[0]] = seen.get(argv[0], 0) + 1

    with no_fallback_data(tmp):
        check()
    assert sum(seen.values()) >= 120 and set(seen) == {"eval", "bench", "compare", "report"}, seen


def test_ctrl_c_swallowed_by_a_library_import_still_stops_the_command(base, monkeypatch):
    """torch-pruning imports timm under a bare `except:`; a Ctrl-C landing there is swallowed
    and leaves timm half imported. The command must stop anyway: exit 130, one line."""
    import compress.plugins

    def swallowing_import(_plugins):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)   # the handler runs here
        except:  # noqa: E722 - what the library does
            pass

    monkeypatch.setattr(compress.plugins, "load_plugins", swallowing_import)
    before = signal.getsignal(signal.SIGINT)
    code, out, err = cli(["validate", str(base[1] / "valid.yaml")])
    assert (code, out) == (130, "")
    assert err == "interrupted; completed stages are stored and will be reused\n"
    assert signal.getsignal(signal.SIGINT) is before   # the handler is put back


def test_a_file_where_the_exports_folder_goes_fails_before_training(base, tmp_path):
    raw, tmp = base
    work = tmp_path / "w"
    (work / "exports").mkdir(parents=True)
    blocker = work / "exports" / raw["name"]
    blocker.write_text("the user's")
    code, out, err = cli(["run", str(tmp / "valid.yaml"), "--device", "cpu", "--workdir", str(work)])
    assert_user_error(code, err, [f"{blocker}: File exists"])
    assert blocker.read_text() == "the user's"
    assert not list((work / "runs").rglob("model.pt"))   # nothing trained first
