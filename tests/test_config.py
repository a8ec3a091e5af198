"""Recipe parsing, overrides and the one-line errors of `compress validate` / `compress run`."""

import copy
import os
from pathlib import Path

import pydantic
import pytest
import torch
import yaml

import compress.data
from compress.cli import main
from compress.config import apply_override, load_recipe, parse_recipe
from compress.errors import CompressError
from compress.losses import LOSSES
from compress.stages import STAGES

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def write_recipe(tmp_path, raw, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def cli_error(capsys, argv):
    """Run the CLI expecting a user error: exit 2 and exactly one `error: ` line, no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0].removeprefix("error: ")


@pytest.fixture
def no_fallback_data(monkeypatch, tmp_path):
    """Only data.root can supply Fashion-MNIST: no $COMPRESS_DATA, no Debian copy."""
    monkeypatch.delenv("COMPRESS_DATA", raising=False)
    monkeypatch.setattr(compress.data, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-debian"))


# ---- shipped recipes ---------------------------------------------------------------------

def test_recipes_exist():
    assert REPO / "recipes" / "vgg_prune_kd.yaml" in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_parses(path):
    recipe = load_recipe(path)
    raw = yaml.safe_load(path.read_text())
    assert [s.name for s in recipe.stages] == [s["name"] for s in raw["stages"]]
    assert all(s.kind in STAGES for s in recipe.stages)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_validates(path, fmnist_root, tmp_path, no_fallback_data, capsys):
    recipe = load_recipe(path)
    # data.root points at a tiny copy so the check needs neither the real data nor a download
    if recipe.data.name == "fashion_mnist":
        root = fmnist_root
    elif recipe.data.name in ("cifar10", "cifar100"):
        root = tmp_path / "cifar"
        compress.data.write_cifar_like(root, recipe.data.name, n_train=10, n_test=5)
    else:
        pytest.skip(f"no tiny stand-in for dataset {recipe.data.name}")
    code = main(["validate", str(path), "--set", f"data.root={root}"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.splitlines()[0].startswith(f"{recipe.name}: valid")
    assert len(out.out.strip().splitlines()) == 1 + len(recipe.stages)


def test_vgg_prune_kd_contents():
    recipe = load_recipe(REPO / "recipes" / "vgg_prune_kd.yaml")
    assert [s.kind for s in recipe.stages] == ["train", "prune", "distill", "qat", "export"]
    prune = recipe.stage("prune")
    assert prune.from_ == "teacher" and prune.ratio == 0.68 and prune.target_macs is None
    assert prune.layers == {"features.0": 0.5, "features.4": 0.5, "features.15": 0.78125}
    assert prune.round_to == 8   # widths that suit vectorised BatchNorm and blocked conv kernels
    for name in ("distill", "qat"):   # DIST + CE on cached teacher logits (README: How the recipe was chosen)
        assert [t.term for t in recipe.stage(name).loss] == ["ce", "dist"]


def test_tiny_recipe_validates(tiny_recipe_dict, tmp_path, no_fallback_data, capsys):
    code = main(["validate", str(write_recipe(tmp_path, tiny_recipe_dict))])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "64/32 images (1, 28, 28), 10 classes" in out.out


# ---- parsed objects ------------------------------------------------------------------------

def test_parsed_objects_are_frozen(tiny_recipe_dict):
    recipe = parse_recipe(tiny_recipe_dict)
    with pytest.raises(pydantic.ValidationError):
        recipe.seed = 1
    with pytest.raises(pydantic.ValidationError):
        recipe.stages[1].ratio = 0.9
    with pytest.raises(pydantic.ValidationError):
        recipe.data.root = "/elsewhere"
    with pytest.raises(pydantic.ValidationError):
        recipe.stages[0].optimizer.lr = 1.0
    assert recipe.stages[1].ratio == 0.5


def test_defaults_filled_in_code(tiny_recipe_dict):
    recipe = parse_recipe(tiny_recipe_dict)
    prune, distill, qat = recipe.stage("prune"), recipe.stage("distill"), recipe.stage("qat")
    assert prune.importance == "l1"
    assert prune.global_ is False and prune.steps == 1 and prune.ignore == [] and prune.round_to is None
    assert distill.optimizer.name == "sgd" and distill.schedule == "onecycle"
    assert distill.augment.deterministic
    assert (qat.weight_bits, qat.act_bits) == (7, 8)
    assert recipe.data.eval_batch_size == 128 and recipe.data.train_subset is None


def test_parse_does_not_mutate_input(tiny_recipe_dict):
    before = copy.deepcopy(tiny_recipe_dict)
    parse_recipe(tiny_recipe_dict)
    assert tiny_recipe_dict == before


def test_stage_key_depends_on_config(tiny_recipe_dict):
    a = parse_recipe(tiny_recipe_dict)
    tiny_recipe_dict["stages"][1]["ratio"] = 0.4
    b = parse_recipe(tiny_recipe_dict)
    assert a.stage_key(0, {}) == b.stage_key(0, {})
    assert a.stage_key(1, {"teacher": "k"}) != b.stage_key(1, {"teacher": "k"})
    assert a.stage_key(1, {"teacher": "k"}) != a.stage_key(1, {"teacher": "other"})


def test_the_quantization_code_is_part_of_the_qat_and_export_keys_only(tiny_recipe_dict, monkeypatch):
    """The quantizer (e.g. which convs stay float) and the ONNX export compute the qat and
    export stages' results: an edit there recomputes those two stages, not the float ones."""
    import compress.config as config

    recipe = parse_recipe(tiny_recipe_dict)
    files = {s.kind: {Path(f).as_posix().split("compress/")[-1] for f in config.code_files(recipe, s)}
             for s in recipe.stages}
    backend = {"quant/__init__.py", "quant/eager.py", "quant/pt2e.py", "quant/spec.py", "onnx_io.py",
               "ort_runtime.py"}
    assert backend <= files["qat"] and backend <= files["export"]
    assert not backend & (files["train"] | files["prune"] | files["distill"])
    keys = [recipe.stage_key(i, {}) for i in range(len(recipe.stages))]
    real = config.code_fingerprint

    def edited(r, stage):   # as if compress/quant/pt2e.py had been edited
        fp = real(r, stage)
        if "compress/quant/pt2e.py" in fp["files"]:
            fp["files"]["compress/quant/pt2e.py"] = "edited"
        return fp

    monkeypatch.setattr(config, "code_fingerprint", edited)
    changed = [s.kind for s, k in zip(recipe.stages, keys) if recipe.stage_key(recipe.stages.index(s), {}) != k]
    assert changed == ["qat", "export"]


# ---- errors: one line that names the field -------------------------------------------------

def _set(path, value):
    def mutate(raw):
        *parents, leaf = path
        node = raw
        for k in parents:
            node = node[k] if isinstance(node, list) else node.setdefault(k, {})
        node[leaf] = value
    return mutate


def _drop(path):
    def mutate(raw):
        *parents, leaf = path
        node = raw
        for k in parents:
            node = node[k]
        del node[leaf]
    return mutate


ERROR_CASES = {
    "ratio-out-of-range": (_set(["stages", 1, "ratio"], 1.5), ["stages[1].ratio: must be < 1.0, got 1.5"]),
    "ratio-zero": (_set(["stages", 1, "ratio"], 0), ["stages[1].ratio: must be > 0"]),
    "wrong-type": (_set(["stages", 0, "epochs"], "many"), ["stages[0].epochs:", "integer", "'many'"]),
    "fractional-int": (_set(["stages", 0, "epochs"], 2.5), ["stages[0].epochs:", "2.5"]),
    "epochs-zero": (_set(["stages", 0, "epochs"], 0), ["stages[0].epochs: must be >= 1, got 0"]),
    "unknown-key": (_set(["stages", 0, "epoch"], 3),
                    ["stages[0].epoch: unknown key (did you mean 'epochs'?); valid:", "batch_size"]),
    "unknown-nested-key": (_set(["stages", 0, "optimizer", "lrr"], 0.1),
                           ["stages[0].optimizer.lrr: unknown key (did you mean 'lr'?)"]),
    "unknown-top-key": (_set(["epochs"], 1), ["epochs: unknown key; valid: compare, data, models, name, precision, seed, stages"]),
    "unknown-data-key": (_set(["data", "rot"], "/x"), ["data.rot: unknown key (did you mean 'root'?)"]),
    "bad-literal": (_set(["stages", 0, "optimizer", "name"], "adam"),
                    ["stages[0].optimizer.name: must be one of", "'sgd'", "'adamw'", "got 'adam'"]),
    "unknown-kind": (_set(["stages", 0, "kind"], "trian"),
                     ["stages[0].kind: unknown stage kind 'trian' (did you mean 'train'?); "
                      "valid: " + ", ".join(sorted(STAGES))]),
    "missing-kind": (_drop(["stages", 0, "kind"]), ["stages[0].kind: required key is missing; valid:"]),
    "missing-name": (_drop(["stages", 0, "name"]), ["stages[0].name: required key is missing"]),
    "unknown-loss-term": (_set(["stages", 2, "loss", 0, "term"], "kdd"),
                          ["stages[2].loss[0].term:", "'kdd'", "(did you mean 'kd'?)", "ce", "fitnet"]),
    "unknown-models-entry": (_set(["stages", 0, "model"], "studnt"),
                             ["stages[0].model: unknown models entry 'studnt'; valid: teacher"]),
    "dangling-from": (_set(["stages", 1, "from"], "nope"),
                      ["stages[1].from: stage 'nope' does not exist; earlier stages: teacher"]),
    "forward-teacher": (_set(["stages", 2, "teacher"], "qat"),
                        ["stages[2].teacher: stage 'qat' comes later; earlier stages: teacher, prune"]),
    "self-reference": (_set(["stages", 1, "from"], "prune"), ["stages[1].from: stage 'prune' comes later"]),
    "duplicate-name": (_set(["stages", 3, "name"], "distill"),
                       ["stages[3].name: duplicate stage name 'distill' (also stages[2])"]),
    "export-same-file-twice": (_set(["stages", 4, "models"], [{"model": "qat", "format": "onnx-int8"},
                                                               {"model": "qat", "format": "onnx-int8",
                                                                "float_stem": False}]),
                               ["stages[4].models[1]: writes qat-int8.onnx, as stages[4].models[0] does; "
                                "each stage and format can be exported once per recipe"]),
    "export-ref-missing": (_set(["stages", 4, "models", 0, "model"], "nope"),
                           ["stages[4].models[0].model: stage 'nope' does not exist"]),
    "both-model-and-from": (_set(["stages", 2, "model"], "teacher"),
                            ["stages[2]: give exactly one of `model`", "or `from`"]),
    "neither-model-nor-from": (_drop(["stages", 2, "from"]), ["stages[2]: give exactly one of `model`"]),
    "ratio-and-target-macs": (_set(["stages", 1, "target_macs"], 0.5),
                              ["stages[1]", "give exactly one of `ratio` or `target_macs`"]),
    "neither-ratio-nor-target": (_drop(["stages", 1, "ratio"]),
                                 ["stages[1]", "give exactly one of `ratio` or `target_macs`"]),
    "unknown-importance": (_set(["stages", 1, "importance"], "l3"),
                           ["stages[1]", "unknown importance criterion 'l3'", "l1", "bn_scale"]),
    "stage-not-mapping": (_set(["stages", 1], "prune"), ["stages[1]: must be a mapping"]),
    "empty-stages": (_set(["stages"], []), ["stages: must be a non-empty list"]),
    "bad-stage-name": (_set(["stages", 0, "name"], "my teacher"), ["stages[0].name:"]),
    "freeze-after-epochs": (_set(["stages", 3, "freeze_bn_epoch"], 5),
                            ["stages[3]", "freeze_bn_epoch: must be <= epochs (1), got 5"]),
}


@pytest.mark.parametrize("mutate,expected", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_parse_errors(tiny_recipe_dict, mutate, expected):
    mutate(tiny_recipe_dict)
    with pytest.raises(CompressError) as e:
        parse_recipe(tiny_recipe_dict)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(expected[0]), msg
    for part in expected[1:]:
        assert part in msg, msg


def test_ratio_message_exact(tiny_recipe_dict):
    tiny_recipe_dict["stages"][1]["ratio"] = 1.5
    with pytest.raises(CompressError, match=r"^stages\[1\]\.ratio: must be < 1\.0, got 1\.5$"):
        parse_recipe(tiny_recipe_dict)


def test_reference_to_export_stage_produces_no_model(tiny_recipe_dict):
    tiny_recipe_dict["stages"].append({"name": "again", "kind": "distill", "from": "export",
                                       "teacher": "teacher"})
    with pytest.raises(CompressError) as e:
        parse_recipe(tiny_recipe_dict)
    assert str(e.value) == "stages[5].from: stage 'export' (export) produces no model"


def test_unknown_key_in_loss_term_lists_valid_keys(tiny_recipe_dict):
    tiny_recipe_dict["stages"][2]["loss"][0]["TT"] = 3
    with pytest.raises(CompressError) as e:
        parse_recipe(tiny_recipe_dict)
    assert str(e.value).startswith("stages[2].loss[0].TT: unknown key (did you mean 'T'?); valid:"), str(e.value)


def test_unknown_key_in_models_entry_lists_valid_keys(tiny_recipe_dict):
    tiny_recipe_dict["models"]["teacher"]["arg"] = {}
    with pytest.raises(CompressError) as e:
        parse_recipe(tiny_recipe_dict)
    assert "(did you mean 'args'?)" in str(e.value) and "valid: arch, args" in str(e.value)


# ---- CLI: exit 2, one `error: ` line ----------------------------------------------------------

def test_cli_out_of_range(tiny_recipe_dict, tmp_path, capsys):
    tiny_recipe_dict["stages"][1]["ratio"] = 1.5
    msg = cli_error(capsys, ["validate", str(write_recipe(tmp_path, tiny_recipe_dict))])
    assert msg == "stages[1].ratio: must be < 1.0, got 1.5"


def test_cli_did_you_mean(tiny_recipe_dict, tmp_path, capsys):
    tiny_recipe_dict["stages"][0]["epoch"] = 3
    msg = cli_error(capsys, ["validate", str(write_recipe(tmp_path, tiny_recipe_dict))])
    assert msg.startswith("stages[0].epoch: unknown key (did you mean 'epochs'?)")


def test_cli_unknown_arch(tiny_recipe_dict, tmp_path, no_fallback_data, capsys):
    tiny_recipe_dict["models"]["teacher"]["arch"] = "resnet18"
    msg = cli_error(capsys, ["validate", str(write_recipe(tmp_path, tiny_recipe_dict))])
    assert msg.startswith("models.teacher.arch: unknown model 'resnet18'")
    assert "vgg_small" in msg and "vgg16" in msg


def test_cli_unknown_model_arg(tiny_recipe_dict, tmp_path, no_fallback_data, capsys):
    tiny_recipe_dict["models"]["teacher"]["args"]["depth"] = 3
    msg = cli_error(capsys, ["validate", str(write_recipe(tmp_path, tiny_recipe_dict))])
    assert msg.startswith("models.teacher.args.depth: unknown argument of vgg_small; valid: cfg, width")


def test_cli_bad_vgg_cfg(tiny_recipe_dict, tmp_path, no_fallback_data, capsys):
    tiny_recipe_dict["models"]["teacher"]["args"]["cfg"] = [8, "X"]
    msg = cli_error(capsys, ["validate", str(write_recipe(tmp_path, tiny_recipe_dict))])
    assert msg.startswith("models.teacher.args.cfg:") and "'X'" in msg


def test_cli_yaml_syntax_error_names_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\nseed: 0\nstages: a: b\n")
    msg = cli_error(capsys, ["validate", str(path)])
    assert msg.startswith(f"{path}: YAML syntax error at line 3")


def test_cli_recipe_not_mapping(tmp_path, capsys):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    assert "a recipe must be a mapping" in cli_error(capsys, ["validate", str(path)])


def test_cli_missing_recipe_file(tmp_path, capsys):
    path = tmp_path / "nope.yaml"
    assert cli_error(capsys, ["validate", str(path)]) == f"recipe file '{path}' does not exist"


def test_cli_fitnet_unknown_layer(tiny_recipe_dict, tmp_path, no_fallback_data, capsys):
    tiny_recipe_dict["stages"][2]["loss"].append(
        {"term": "fitnet", "student_layer": "features.99", "teacher_layer": "features.0"})
    msg = cli_error(capsys, ["validate", str(write_recipe(tmp_path, tiny_recipe_dict))])
    assert msg.startswith("stages[2].loss[1].student_layer: no layer 'features.99'")
    valid = msg.split("valid: ", 1)[1].split(", ")
    # the feature points, then the module paths. cfg [8, M, 16]: conv-bn-relu, pool,
    # conv-bn-relu = features.0..6, then the head
    assert valid == ["stage1", "stage2", "penultimate", "features"] + [f"features.{i}" for i in range(7)] + [
        "pool", "flatten", "classifier"]


def test_cli_fitnet_valid_layers_pass(tiny_recipe_dict, tmp_path, no_fallback_data, capsys):
    tiny_recipe_dict["stages"][2]["loss"].append(
        {"term": "fitnet", "student_layer": "features.5", "teacher_layer": "features.5"})
    assert main(["validate", str(write_recipe(tmp_path, tiny_recipe_dict))]) == 0, capsys.readouterr().err


def test_cli_data_not_found_lists_tried(tiny_recipe_dict, tmp_path, no_fallback_data, capsys):
    tiny_recipe_dict["data"] = {"name": "fashion_mnist", "download": False}
    msg = cli_error(capsys, ["validate", str(write_recipe(tmp_path, tiny_recipe_dict))])
    assert msg.startswith("fashion_mnist: dataset not found; tried ")
    assert f"Debian dataset-fashion-mnist {tmp_path / 'no-debian'}" in msg
    assert "no download (data.download: false)" in msg


def test_cli_empty_explicit_root_is_the_only_place_looked(tiny_recipe_dict, tmp_path, no_fallback_data, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    tiny_recipe_dict["data"] = {"name": "fashion_mnist", "root": str(empty), "download": False}
    msg = cli_error(capsys, ["validate", str(write_recipe(tmp_path, tiny_recipe_dict))])
    assert msg.startswith(f"fashion_mnist: data.root {empty} (lacks the four IDX files)")
    assert "Debian" not in msg


def test_cli_unknown_dataset(tiny_recipe_dict, tmp_path, capsys):
    tiny_recipe_dict["data"]["name"] = "fashion-mnist"
    msg = cli_error(capsys, ["validate", str(write_recipe(tmp_path, tiny_recipe_dict))])
    assert msg.startswith("data.name: unknown dataset 'fashion-mnist' (did you mean 'fashion_mnist'?)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cli_device_cuda_without_cuda(tiny_recipe_dict, tmp_path, capsys):
    path = write_recipe(tmp_path, tiny_recipe_dict)
    msg = cli_error(capsys, ["run", str(path), "--device", "cuda", "--workdir", str(tmp_path / "w")])
    assert msg.startswith("--device cuda: CUDA is not available")
    assert not (tmp_path / "w" / "runs").exists()


def test_cli_bad_override(tiny_recipe_dict, tmp_path, capsys):
    path = write_recipe(tmp_path, tiny_recipe_dict)
    msg = cli_error(capsys, ["validate", str(path), "--set", "stages.teachr.epochs=1"])
    assert msg == ("--set stages.teachr.epochs: stages has no element 'teachr'; "
                   "valid: teacher, prune, distill, qat, export")


def test_cli_override_applies(tiny_recipe_dict, tmp_path, capsys):
    path = write_recipe(tmp_path, tiny_recipe_dict)
    msg = cli_error(capsys, ["validate", str(path), "--set", "stages.prune.ratio=1.5"])
    assert msg == "stages[1].ratio: must be < 1.0, got 1.5"


# ---- --set overrides ------------------------------------------------------------------------

@pytest.mark.parametrize("assignment,get,expected", [
    ("stages.teacher.epochs=3", lambda r: r.stage("teacher").epochs, 3),
    ("stages.1.ratio=0.25", lambda r: r.stage("prune").ratio, 0.25),
    ("stages.distill.loss.0.T=2", lambda r: r.stage("distill").loss[0].T, 2.0),
    ("stages.distill.optimizer.lr=0.01", lambda r: r.stage("distill").optimizer.lr, 0.01),
    ("models.teacher.args.cfg=[4, M, 8]", lambda r: r.models["teacher"].args["cfg"], [4, "M", 8]),
    ("seed=7", lambda r: r.seed, 7),
    ("data.train_subset=10", lambda r: r.data.train_subset, 10),
    ("stages.distill.augment.flip=true", lambda r: r.stage("distill").augment.flip, True),
])
def test_override(tiny_recipe_dict, tmp_path, assignment, get, expected):
    recipe = load_recipe(write_recipe(tmp_path, tiny_recipe_dict), [assignment])
    value = get(recipe)
    assert value == expected and type(value) is type(expected)


def test_override_value_is_yaml():
    raw = {"a": {"b": 1}}
    apply_override(raw, "a.b=12")
    apply_override(raw, "a.c=[1, 2]")
    apply_override(raw, "a.d=x: 1")   # not valid YAML for a scalar: kept as the string
    apply_override(raw, "a.e=hello")
    apply_override(raw, "a.f=1=2")    # only the first '=' splits
    assert raw == {"a": {"b": 12, "c": [1, 2], "d": {"x": 1}, "e": "hello", "f": "1=2"}}


def test_override_creates_missing_mapping():
    raw = {"stages": [{"name": "s", "kind": "train"}]}
    apply_override(raw, "stages.s.optimizer.lr=0.5")
    assert raw["stages"][0]["optimizer"] == {"lr": 0.5}


def test_override_list_element_by_index_and_name_agree(tiny_recipe_dict):
    a, b = copy.deepcopy(tiny_recipe_dict), copy.deepcopy(tiny_recipe_dict)
    apply_override(a, "stages.2.epochs=4")
    apply_override(b, "stages.distill.epochs=4")
    assert a == b and a["stages"][2]["epochs"] == 4


def test_override_brackets_are_indices(tiny_recipe_dict):
    # the spelling that errors print (stages[2].loss[0].T) addresses the same field
    a, b, c = (copy.deepcopy(tiny_recipe_dict) for _ in range(3))
    apply_override(a, "stages.distill.loss.0.T=2")
    apply_override(b, "stages[2].loss[0].T=2")
    apply_override(c, "stages[distill].loss[0].T=2")
    assert a == b == c and a["stages"][2]["loss"][0]["T"] == 2
    assert a != tiny_recipe_dict


def test_override_does_not_touch_file(tiny_recipe_dict, tmp_path):
    path = write_recipe(tmp_path, tiny_recipe_dict)
    text = path.read_text()
    load_recipe(path, ["stages.teacher.epochs=9"])
    assert path.read_text() == text
    assert load_recipe(path).stage("teacher").epochs == 1


@pytest.mark.parametrize("assignment,message", [
    ("stages.teacher.epochs", "expected PATH=VALUE"),
    ("stages..epochs=1", "empty path element"),
    ("stages.nope.epochs=1", "stages has no element 'nope'; valid: teacher, prune, distill, qat, export"),
    ("stages.9.epochs=1", "stages has no element '9'"),
    ("stages.distill.loss.3.T=2", "stages.distill.loss has no element '3'"),
    ("seed.x=1", "seed is a value, not a mapping or list"),
    ("stages[2.epochs=1", "malformed index in 'stages[2'"),
    ("stages]2[.epochs=1", "malformed index"),
    ("stages[].epochs=1", "empty path element"),
    ("stages[9].epochs=1", "stages has no element '9'"),
    ("stages[0]epochs=1", "malformed index in 'stages[0]epochs'"),
    ("stages.teacher.=1", "empty path element"),
])
def test_bad_override(tiny_recipe_dict, assignment, message):
    with pytest.raises(CompressError) as e:
        apply_override(tiny_recipe_dict, assignment)
    assert str(e.value).startswith("--set ") and message in str(e.value), str(e.value)


def test_override_a_key_that_holds_dots_in_brackets(tiny_recipe_dict):
    """`layers` keys are module paths (`features.0`): written in brackets they are one key;
    written with dots the error says how to write them."""
    tiny_recipe_dict["stages"][1]["layers"] = {"features.0": 0.5}
    apply_override(tiny_recipe_dict, "stages.prune.layers[features.0]=0.25")
    apply_override(tiny_recipe_dict, "stages[prune].layers[features.4]=0.5")
    assert tiny_recipe_dict["stages"][1]["layers"] == {"features.0": 0.25, "features.4": 0.5}
    with pytest.raises(CompressError) as e:
        apply_override(tiny_recipe_dict, "stages.prune.layers.features.0=0.3")
    assert str(e.value) == ("--set stages.prune.layers.features.0: stages.prune.layers has the key 'features.0'; "
                            "write it in brackets: stages.prune.layers[features.0]=...")


def test_bad_override_in_unnamed_list_lists_indices(tiny_recipe_dict):
    with pytest.raises(CompressError) as e:
        apply_override(tiny_recipe_dict, "stages.distill.loss.3.T=2")
    assert str(e.value).endswith("has no element '3'; valid: indices 0..0"), str(e.value)


def test_wildcard_override_sets_every_stage_that_has_the_key():
    root = Path(__file__).resolve().parents[1]
    r = load_recipe(root / "recipes/kd_zoo.yaml", ["stages.*.epochs=7"])
    trained = [s for s in r.stages if hasattr(s, "epochs")]
    assert len(trained) == len(r.stages) and all(s.epochs == 7 for s in trained)
    r = load_recipe(root / "recipes/vgg_prune_kd.yaml", ["stages.*.epochs=3"])
    assert [getattr(s, "epochs", None) for s in r.stages] == [3, None, 3, 3, None]
    with pytest.raises(CompressError, match=r"no element of stages has 'epochz'"):
        load_recipe(root / "recipes/vgg_prune_kd.yaml", ["stages.*.epochz=3"])


def test_two_export_stages_writing_one_file_are_refused(tiny_recipe_dict):
    """They would overwrite each other's file, and each would find its stored file changed and
    recompute on every run."""
    tiny_recipe_dict["stages"].append({"name": "export2", "kind": "export",
                                       "models": [{"model": "qat", "format": "onnx-int8", "float_stem": False}]})
    with pytest.raises(CompressError) as e:
        parse_recipe(tiny_recipe_dict)
    assert str(e.value) == ("stages[5].models[0]: writes qat-int8.onnx, as stages[4].models[0] does; each stage "
                            "and format can be exported once per recipe")
    tiny_recipe_dict["stages"][5]["models"][0]["model"] = "distill"
    assert len(parse_recipe(tiny_recipe_dict).stages) == 6


@pytest.mark.parametrize("assignment, message", [
    # sizes that crashed with a traceback or exhausted memory mid-run
    ("seed=" + "9" * 5000, "--set seed: line 1: an integer of 5000 characters; at most 100"),
    ("stages.teacher.epochs=0x" + "f" * 5000,
     "--set stages.teacher.epochs: line 1: an integer of 5002 characters; at most 100"),
    ("stages.teacher.augment={crop: 100000000}",
     "stages[0].augment.crop: 100000000 px of padding on the data's 28x28 images; give 0 (off) to 27 "
     "(CIFAR recipes pad 4)"),
    ("stages.distill.loss=[{term: crd, feat_dim: 1000000000}]",
     "stages[2].loss[0].feat_dim: must be <= 1024, got 1000000000"),
    # messages that named the wrong fix
    ("stages.prune.round_to=1000", "stages.prune.round_to: 1000 is wider than layer 'features.0' (8 channels); "
                                   "give round_to <= 8"),
    ("models={}", "stages[0].model: unknown models entry 'teacher'; valid: (none defined)"),
])
def test_validate_refuses_in_one_line_naming_the_fix(tiny_recipe_dict, assignment, message):
    from compress.pipeline import validate_recipe

    with pytest.raises(CompressError) as e:
        apply_override(tiny_recipe_dict, assignment)
        validate_recipe(parse_recipe(tiny_recipe_dict))
    assert str(e.value) == message


def test_a_recipe_path_that_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(CompressError, match=r"^recipe file '.*fifo' is not a regular file$"):
        load_recipe(fifo)


@pytest.mark.parametrize("value, message", [
    ("5", "stages[2].teacher: input should be a valid string or a valid list, got 5"),
    ("[teacher, 5]", "stages[2].teacher[1]: input should be a valid string, got 5"),
    ("[]", "stages[2].teacher: list should have at least 1 item after validation, not 0, got []"),
])
def test_a_field_that_takes_a_name_or_a_list_of_names(tiny_recipe_dict, value, message):
    """No pydantic member tag ('.str') in the path; the member that fits most says what is wrong."""
    with pytest.raises(CompressError) as e:
        apply_override(tiny_recipe_dict, f"stages.distill.teacher={value}")
        parse_recipe(tiny_recipe_dict)
    assert str(e.value) == message


def _terms(cohort=None, teacher=None):
    """The registered terms that read a cohort's peers (a `peers` field the mutual stage fills
    in) and that need a teacher as asked (None: either)."""
    return ", ".join(sorted(n for n, t in LOSSES.items()
                            if cohort in (None, "peers" in t.spec_cls.model_fields)
                            and teacher in (None, t.uses_teacher)))


MUTUAL = {"name": "peers", "kind": "mutual", "models": ["teacher", "teacher"], "epochs": 1, "batch_size": 32}


@pytest.mark.parametrize("stage, loss, message", [
    (2, [{"term": "dml"}],
     "stages[2].loss[0].term: 'dml' trains a cohort of peers and is only valid in a mutual stage; valid in a "
     "distill stage: " + _terms(cohort=False)),
    (3, [{"term": "kd"}, {"term": "online_kd"}],
     "stages[3].loss[1].term: 'online_kd' trains a cohort of peers and is only valid in a mutual stage; valid in "
     "a qat stage: " + _terms(cohort=False)),
    (5, [{"term": "kd", "T": 4}],
     "stages[5].loss[0].term: 'kd' needs a teacher, and a mutual stage has none; valid in a mutual stage: "
     + _terms(teacher=False)),
    (None, [{"term": "mbd"}],   # a qat stage without `teacher`
     "stages[3].loss[0].term: 'mbd' needs a teacher; set stages[3].teacher to an earlier stage, or use a term "
     "that needs none: " + _terms(cohort=False, teacher=False)),
])
def test_a_loss_term_the_stage_kind_cannot_run_is_refused_when_parsed(tiny_recipe_dict, stage, loss, message):
    """A cohort term (dml) outside a mutual stage used to fail in validate on a layer path
    ('no layer members.0'); a teacher term in a mutual stage passed validate and crashed in run."""
    tiny_recipe_dict["stages"].append(copy.deepcopy(MUTUAL))
    if stage is None:
        stage = 3
        del tiny_recipe_dict["stages"][stage]["teacher"]
    tiny_recipe_dict["stages"][stage]["loss"] = loss
    with pytest.raises(CompressError) as e:
        parse_recipe(tiny_recipe_dict)
    assert str(e.value) == message


def test_cohort_terms_parse_in_a_mutual_stage_and_validate_names_the_term(tiny_recipe_dict, tmp_path, capsys):
    tiny_recipe_dict["stages"].append({**MUTUAL, "loss": [{"term": "dml"}, {"term": "online_kd"}, {"term": "ce"}]})
    assert [t.term for t in parse_recipe(tiny_recipe_dict).stages[5].loss] == ["dml", "online_kd", "ce"]
    for name in LOSSES:   # the mutual stage fills in `peers`: every cohort term has it
        assert LOSSES[name].uses_cohort == ("peers" in LOSSES[name].spec_cls.model_fields), name
    tiny_recipe_dict["stages"][2]["loss"] = [{"term": "dml"}]
    msg = cli_error(capsys, ["validate", str(write_recipe(tmp_path, tiny_recipe_dict))])
    assert msg.startswith("stages[2].loss[0].term: 'dml' trains a cohort of peers and is only valid in a mutual "
                          "stage; valid in a distill stage: at, ce,"), msg
