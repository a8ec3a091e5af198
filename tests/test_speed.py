"""Evaluation every k epochs / on a subset, `bench --compare`, and the properties of the
INT8 graph that make it fast (no layout transposes, pools and flatten kept integer)."""

import importlib.util
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from compress.cli import main
from compress.config import load_recipe
from compress.errors import CompressError

from conftest import TINY_RECIPE, run_without_heavy_imports, write_fmnist

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


def test_steps_per_epoch_trains_a_partial_epoch_on_the_whole_schedule(tmp_path):
    wd, history, _ = _run(tmp_path, epochs=2, steps_per_epoch=3, schedule="onecycle")
    assert [h["steps"] for h in history] == [3, 3]         # of N_TRAIN // BATCH = 4 per pass
    # OneCycle spans the 6 steps taken: the last step runs at the schedule's floor, lr / 25e3
    assert history[-1]["lr"] == pytest.approx(0.1 / 25e3, rel=1e-3)
    acc = EventAccumulator(str(wd / "runs" / "tiny" / "tb" / "teacher"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("top1/test")] == [3, 6]
    # more than a pass is clipped to a pass
    (tmp_path / "more").mkdir()
    _, history, _ = _run(tmp_path / "more", epochs=1, steps_per_epoch=100)
    assert history[0]["steps"] == N_TRAIN // BATCH


def test_ema_result_is_the_average(tmp_path):
    import torch

    from compress.config import TrainingSpec
    from compress.data import Data, Split
    from compress.engine import RunContext, fit
    from compress.losses import Objective
    from compress.losses.ce import CESpec

    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (64, 1, 8, 8), generator=g, dtype=torch.uint8), torch.arange(64) % 2)
    data = Data("toy", ["a", "b"], split, split, [0.5], [0.25])
    recipe = load_recipe(_recipe(tmp_path))
    ctx = RunContext(recipe=recipe, data=data, device=torch.device("cpu"))
    runs = {}
    for ema in (None, 0.5):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
        start = [p.detach().clone() for p in model.parameters()]
        spec = TrainingSpec(epochs=2, batch_size=16, ema=ema, optimizer={"name": "sgd", "lr": 0.5})
        fit(model, Objective([CESpec()], model), spec, ctx, name="toy")
        runs[ema] = [p.detach().clone() for p in model.parameters()]
    # the same steps were taken, but the kept weights are the average, not the last step's
    assert all(not torch.equal(a, b) for a, b in zip(start, runs[0.5]))
    assert any(not torch.equal(x, y) for x, y in zip(runs[None], runs[0.5]))


def test_ema_refused_in_qat(tmp_path):
    path = _recipe(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["stages"] = json.loads(json.dumps(TINY_RECIPE["stages"][:4]))
    raw["stages"][3]["ema"] = 0.99
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(CompressError, match=r"^stages\[3\]\.ema: not available in a qat stage"):
        load_recipe(path)


# ---- the INT8 graph onnxruntime runs, and `bench --compare` ------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """FP32 and INT8 files of one small VGG (channels a multiple of 8, as `round_to: 8`
    prunes them), calibrated on random images: graph structure does not need training."""
    import torch

    from compress.models import VGG
    from compress.onnx_io import export_onnx
    from compress.quant import QuantSpec, calibrate, quantize_model
    from compress.quant.eager import to_int8_module

    torch.manual_seed(0)
    model = VGG([8, "M", 16, "M", 16, 16, "M", 24], in_channels=1).eval()
    q = quantize_model(model, QuantSpec())
    calibrate(q, [torch.rand(32, 1, 28, 28) for _ in range(2)])
    d = tmp_path_factory.mktemp("onnx")
    kw = dict(input_shape=(1, 28, 28), mean=[0.286], std=[0.353], metadata={"format": "x"})
    export_onnx(model, d / "fp32.onnx", **{**kw, "metadata": {"format": "onnx-fp32"}})
    export_onnx(to_int8_module(q), d / "int8.onnx", **{**kw, "metadata": {"format": "onnx-int8"}})
    export_onnx(model, d / "other.onnx", **{**kw, "metadata": {"format": "onnx-fp32"}})
    export_onnx(to_int8_module(q, float_first_conv=False), d / "int8-allint.onnx",
                **{**kw, "metadata": {"format": "onnx-int8"}})
    return d


def _optimized_ops(path, tmp_path):
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


def test_global_pool_exported_as_globalaveragepool(exported):
    import onnx

    for name in ("fp32.onnx", "int8.onnx"):
        graph = onnx.load(str(exported / name)).graph
        ops = [n.op_type for n in graph.node]
        assert "GlobalAveragePool" in ops and "ReduceMean" not in ops, name
        used = {i for n in graph.node for i in n.input}
        assert all(i.name in used for i in graph.initializer), "the ReduceMean axes are left behind"


def test_int8_graph_stays_integer_after_the_first_conv(exported, tmp_path):
    ops = _optimized_ops(exported / "int8.onnx", tmp_path)
    # the input's Q/DQ pair, the first conv (1 input channel) and its max-pool in float; one
    # quantize after that pool, one dequantize of the logits; nothing in between leaves int8
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 2, ops
    assert ops[-1] == "DequantizeLinear" and ops.index("DequantizeLinear") < ops.index("Conv")
    q = len(ops) - 1 - ops[::-1].index("QuantizeLinear")
    assert ops[:q].count("Conv") == 1 and "MaxPool" in ops[:q] and "QLinearConv" not in ops[:q], ops
    assert ops.count("QLinearConv") == 4 and "QLinearGlobalAveragePool" in ops and "QGemm" in ops, ops
    assert not {"Conv", "FusedConv", "Gemm", "ReduceMean", "GlobalAveragePool", "AveragePool"} & set(ops[q:]), ops
    # the other max-pools run on the quantized NHWC tensors of the integer convolutions
    assert ops.count("NhwcMaxPool") == 2, ops
    # one layout change into NHWC before the integer convs, one out after the pool
    first, last = ops.index("QLinearConv"), ops.index("QLinearGlobalAveragePool")
    assert "Transpose" not in ops[first:last] and ops.count("Transpose") <= 2, ops


def test_a_16_channel_float_stem_hands_its_output_to_the_integer_convs_in_nhwc(tmp_path, monkeypatch):
    # the default student's layout: its stem's max-pool output written straight to NHWC by
    # onnxruntime's NCHWc reorder, no uint8 Transpose image by image (0.83x -> 0.80x its FP32
    # twin at batch 64 as AVX2, 0.62x -> 0.55x natively); values unchanged
    import numpy as np
    import torch

    import compress.onnx_io as oio
    import compress.ort_runtime as ort_rt
    from compress.models import VGG
    from compress.quant import QuantSpec, calibrate, quantize_model
    from compress.quant.eager import to_int8_module

    torch.manual_seed(0)
    model = VGG([16, "M", 16, "M", 32, 32, "M", 32], in_channels=1).eval()
    q = quantize_model(model, QuantSpec())
    calibrate(q, [torch.rand(32, 1, 28, 28) for _ in range(2)])
    kw = dict(input_shape=(1, 28, 28), mean=[0.286], std=[0.353], metadata={})
    oio.export_onnx(to_int8_module(q), tmp_path / "int8.onnx", **kw)
    oio.export_onnx(model, tmp_path / "fp32.onnx", **kw)
    monkeypatch.setattr(oio, "_nhwc_handoff", lambda proto: 0)
    oio.export_onnx(to_int8_module(q), tmp_path / "before.onnx", **kw)

    ops = _optimized_ops(tmp_path / "int8.onnx", tmp_path)
    first = ops.index("QLinearConv")
    assert "ReorderOutput" in ops[:first] and "Transpose" not in ops[:first], ops
    assert ops.count("Transpose") == 1, ops   # out of NHWC after the global pool
    assert "Transpose" in _optimized_ops(tmp_path / "before.onnx", tmp_path)[:first]
    assert "Transpose" not in _optimized_ops(tmp_path / "fp32.onnx", tmp_path)
    images = np.random.default_rng(0).random((16, 1, 28, 28), dtype=np.float32)
    np.testing.assert_array_equal(ort_rt.ort_logits(tmp_path / "int8.onnx", images),
                                  ort_rt.ort_logits(tmp_path / "before.onnx", images))


def test_nhwc_handoff_dropped_where_onnxruntime_would_not_run_fewer_transposes(tmp_path, monkeypatch):
    # e.g. off x86, where onnxruntime has no NCHWc pass to fold the float Transpose into
    import onnx
    import torch

    import compress.onnx_io as oio
    from compress.models import VGG
    from compress.quant import QuantSpec, calibrate, quantize_model
    from compress.quant.eager import to_int8_module

    torch.manual_seed(0)
    model = VGG([16, "M", 32], in_channels=1).eval()
    q = quantize_model(model, QuantSpec())
    calibrate(q, [torch.rand(8, 1, 28, 28)])
    kw = dict(input_shape=(1, 28, 28), mean=[0.286], std=[0.353], metadata={})
    names = []
    for ops in (None, lambda model: ["Transpose"]):
        if ops:
            monkeypatch.setattr(oio, "_optimized_op_types", ops)
        oio.export_onnx(to_int8_module(q), tmp_path / "int8.onnx", **kw)
        names.append([n.name for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node
                      if n.name.startswith("nhwc_handoff")])
    assert len(names[0]) == 3 and names[1] == [], names


def test_no_nhwc_handoff_where_the_nchwc_pass_would_not_take_it(exported):
    # an 8-channel stem: onnxruntime's AVX-512 NCHWc block is 16, a float Transpose would stay
    import onnx

    for name in ("int8.onnx", "fp32.onnx"):
        assert not [n for n in onnx.load(str(exported / name)).graph.node if n.name.startswith("nhwc_handoff")]


def test_all_integer_graph_when_asked(exported, tmp_path):
    ops = _optimized_ops(exported / "int8-allint.onnx", tmp_path)
    assert ops.count("QLinearConv") == 5 and "Conv" not in ops and ops.count("NhwcMaxPool") == 3, ops
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1, ops


def test_bench_compare_several_files(exported, capsys):
    files = [str(exported / n) for n in ("int8.onnx", "fp32.onnx", "other.onnx")]
    assert main(["bench", files[0], "--compare", *files[1:], "--batch", "1", "4", "--runs", "5",
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "side by side (timed in turns; ratio = median / the first file's median)" in out
    for b in (1, 4):
        block = out.split(f"  batch {b}\n", 1)[1].splitlines()[:4]
        assert block[0].split() == ["file", "median", "(ms)", "p90", "(ms)", "images/s", "ratio"]
        rows = [r.split() for r in block[1:]]
        assert [r[0] for r in rows] == ["int8.onnx", "fp32.onnx", "other.onnx"]
        medians = [float(r[1]) for r in rows]
        assert all(float(r[2]) >= float(r[1]) for r in rows)             # p90 >= median
        assert rows[0][4] == "1.00×"
        assert [float(r[4].rstrip("×")) for r in rows[1:]] == pytest.approx(
            [m / medians[0] for m in medians[1:]], rel=0.05, abs=0.006)   # printed rounded
    assert re.search(r"^int8\.onnx is .* the FP32 file other\.onnx at batch 4 ", out, re.M)
    assert re.search(r"^int8\.onnx is .* the FP32 file fp32\.onnx at batch 4 ", out, re.M)


def test_bench_runs_without_importing_torch(exported):
    """`compress bench` needs onnx and onnxruntime only: importing torch (and, through
    torch-pruning, timm and torchvision) made it take 7.8 s where it now takes about 1.3."""
    out, heavy = run_without_heavy_imports(
        "from compress.cli import main; "
        f"assert main(['bench', {str(exported / 'int8.onnx')!r}, '--compare', {str(exported / 'fp32.onnx')!r}, "
        "'--batch', '1', '--runs', '2', '--threads', '1']) == 0")
    # it compared the two files (whatever the ratio: with two runs a busy machine gives any)
    assert re.search(r"^int8\.onnx is (\d+\.\d\d× faster|not faster) than its FP32 twin fp32\.onnx "
                     r"at batch 1 ", out, re.M), out
    assert heavy == "[]", heavy


def test_bench_calls_only_a_float_file_the_fp32_twin(exported, capsys):
    """One INT8 file compared with another INT8 file: no "FP32 twin" in the verdict."""
    assert main(["bench", str(exported / "int8.onnx"), "--compare", str(exported / "int8-allint.onnx"),
                 "--batch", "2", "--runs", "3", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^int8\.onnx is .* the INT8 file int8-allint\.onnx at batch 2 ", out, re.M), out
    assert "twin" not in out.split("side by side")[-1]


X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R)   Gold 6338 CPU @ 2.00GHz
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni amx_tile

processor\t: 1
model name\t: Intel(R) Xeon(R)   Gold 6338 CPU @ 2.00GHz
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni amx_tile
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes asimddp sha512 sve i8mm bf16
CPU implementer\t: 0x41
"""


@pytest.mark.parametrize("text, model, isa, vnni", [
    (X86_CPUINFO, "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz", ["avx2", "fma", "avx512f", "avx512_vnni"],
     ["avx512_vnni"]),
    (X86_CPUINFO.replace(" avx512f avx512bw avx512_vnni amx_tile", ""), "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz",
     ["avx2", "fma"], []),                                     # an AVX2-only CPU: no VNNI
    (ARM_CPUINFO, None, ["asimd", "asimddp", "i8mm", "bf16", "sve"], []),
    (None, None, None, None),                                  # no /proc/cpuinfo
])
def test_cpu_model_and_kernel_flags(tmp_path, text, model, isa, vnni):
    from compress.commands import cpu_info, cpu_line, cpu_vnni

    path = tmp_path / "cpuinfo"
    if text is not None:
        path.write_text(text)
    info = cpu_info(path)
    assert info == {"model": model, "isa": isa}
    assert cpu_vnni(path) == vnni
    line = cpu_line(info)
    if model:
        assert line == f"{model} ({' '.join(isa)})"
    else:   # the platform's own name stands in for a model /proc/cpuinfo does not give
        assert line.endswith("(asimd asimddp i8mm bf16 sve)" if isa else "(flags unknown)")


def _hard_swish_int8(path):
    """A one-conv QDQ graph whose integer conv is followed by hard-swish (x * HardSigmoid(x)),
    requantized: what torchvision's MobileNetV3 exports; returns `path`."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    c = lambda a, n: numpy_helper.from_array(np.asarray(a), n)   # noqa: E731
    inits = [c(np.float32(0.02), "s"), c(np.uint8(128), "z"), c(np.float32(1 / 255), "ps"), c(np.uint8(0), "pz"),
             c(rng.integers(-63, 64, (16, 16, 3, 3)).astype(np.int8), "wq"), c(np.full(16, 0.01, np.float32), "ws"),
             c(np.zeros(16, np.int8), "wz"), c(np.zeros(16, np.float32), "b")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "ps", "pz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "ps", "pz"], ["xf"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0),
             helper.make_node("Conv", ["xf", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["c", "s", "z"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["cf"]),
             helper.make_node("HardSigmoid", ["cf"], ["h"], alpha=1 / 6, beta=0.5),
             helper.make_node("Mul", ["cf", "h"], ["hs"]),
             helper.make_node("QuantizeLinear", ["hs", "s", "z"], ["hq"]),
             helper.make_node("DequantizeLinear", ["hq", "s", "z"], ["wq2f"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w2"], axis=0),
             helper.make_node("Conv", ["wq2f", "w2", "b"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["c2", "s", "z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "hs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 16, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    return path


def test_float_islands_counts_the_float_ops_inside_the_integer_part(tmp_path):
    # hard-swish between two integer convs has no integer kernel in onnxruntime: its HardSigmoid
    # and Mul run in float between a DequantizeLinear and a QuantizeLinear; the VGG student's
    # float stem (before the first integer op) and float tail are not such islands
    import torch

    from compress.ort_runtime import float_islands, ort_op_counts

    path = _hard_swish_int8(tmp_path / "hs.onnx")
    assert ort_op_counts(path).get("QLinearConv") == 2
    assert float_islands(path) == {"HardSigmoid": 1, "Mul": 1}
    pixels = torch.rand(1, 8, 1, 28, 28)
    _int8_of_vgg(tmp_path / "vgg.onnx", pixels, float_stem=True)
    assert "Conv" in ort_op_counts(tmp_path / "vgg.onnx")     # its float stem is there ...
    assert float_islands(tmp_path / "vgg.onnx") == {}          # ... and not counted


@pytest.mark.parametrize("vnni, batch, says", [
    ([], "b64", "onnxruntime has no integer kernel for 24 HardSigmoid and 24 Mul in it"),
    ([], "b64", "this CPU has no VNNI"),
    (["avx512_vnni"], "b1", "a call this short (0.050 ms) is dominated by fixed costs"),
    (["avx512_vnni"], "b64", "the model has only 1.6M multiply-adds per image"),
    ([], "b64", "because 19 of its 57 integer convolutions have shapes onnxruntime runs slower"),
])
def test_report_says_why_int8_is_not_faster(vnni, batch, says):
    from compress.report import _why_not_faster

    report = {"environment": {"vnni": vnni}, "stages": [{"name": "qat", "macs": 1_580_000}]}
    export = {"model": "qat"}
    if "integer convolutions" in says:   # the export counted them: the first reason given
        export["check"] = {"slow_int8_convs": 19, "ort_int8_ops": {"QLinearConv": 57}}
    if "HardSigmoid" in says:           # float ops inside the integer part come before them
        export["check"] = {"float_ops": {"HardSigmoid": 24, "Mul": 24}, "slow_int8_convs": 2}
        assert "(and 2 of its integer convolutions" in _why_not_faster(report, export, batch, 0.05)
    assert says in _why_not_faster(report, export, batch, 0.05)


# ---- precision: bf16 autocast where the CPU computes bf16 natively -------------------------------

def test_precision_resolution(monkeypatch):
    import torch

    from compress.engine import use_bf16

    cpu = torch.device("cpu")
    for cap in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):   # the machine's own caps do not apply here
        monkeypatch.delenv(cap, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert not use_bf16("auto", cpu)           # AVX2-only CPU: bf16 would be emulated, slower
    assert use_bf16("bf16", cpu) and not use_bf16("fp32", cpu)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert use_bf16("auto", cpu) and not use_bf16("fp32", cpu)
    # oneDNN capped below bf16 (how an AVX2-only CPU is emulated): auto is fp32 there too
    for cap, native in (("AVX2", False), ("avx512_core_vnni", False), ("AVX512_CORE_AMX", True)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert use_bf16("auto", cpu) is native, cap
    assert use_bf16("auto", torch.device("cuda")) and not use_bf16("fp32", torch.device("cuda"))


@pytest.mark.parametrize("bf16", [True, False])
def test_autocast_follows_the_resolved_precision(bf16):
    import torch

    from compress.engine import RunContext

    ctx = RunContext(recipe=None, data=None, device=torch.device("cpu"), bf16=bf16)
    conv = torch.nn.Conv2d(1, 4, 3)
    with ctx.autocast():
        y = conv(torch.randn(2, 1, 8, 8))
    assert y.dtype == (torch.bfloat16 if bf16 else torch.float32)


def test_precision_is_part_of_every_stage_key(tmp_path):
    a = load_recipe(_recipe(tmp_path))
    raw = yaml.safe_load(_recipe(tmp_path).read_text())
    raw["precision"] = "fp32"
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(raw))
    b = load_recipe(tmp_path / "b.yaml")
    assert a.precision == "auto" and b.precision == "fp32"
    assert a.stage_key(0, {}) != b.stage_key(0, {})


def test_run_reports_its_precision(tmp_path):
    _, history, report = _run(tmp_path)
    raw = yaml.safe_load(_recipe(tmp_path).read_text())
    raw["precision"] = "bf16"
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(raw))
    assert main(["run", str(tmp_path / "b.yaml"), "--workdir", str(tmp_path / "b"), "--device", "cpu"]) == 0
    bf = json.loads((tmp_path / "b" / "exports" / "tiny" / "report.json").read_text())
    assert bf["environment"]["precision"] == "bf16"
    assert "(bf16)" in (tmp_path / "b" / "exports" / "tiny" / "report.md").read_text()
    from compress.engine import use_bf16

    import torch
    assert report["environment"]["precision"] == ("bf16" if use_bf16("auto", torch.device("cpu")) else "fp32")


def test_precision_refused_with_its_path(tmp_path):
    raw = yaml.safe_load(_recipe(tmp_path).read_text())
    raw["precision"] = "fp16"
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(CompressError, match=r"precision: .*'auto', 'bf16' or 'fp32'"):
        load_recipe(tmp_path / "b.yaml")


# ---- benchmarks/cpu_as.py: a process run as on an older x86 CPU ------------------------------

CPU_AS = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_as.py"


def _load_cpu_as():
    spec = importlib.util.spec_from_file_location("cpu_as", CPU_AS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cpu_as = _load_cpu_as()
HOST_FLAGS = cpu_as.cpu_flags()


needs_cpuid_fault = pytest.mark.skipif(
    "cpuid_fault" not in HOST_FLAGS or not (shutil.which("cc") or shutil.which("gcc")),
    reason="needs a CPU with CPUID faulting (Linux x86_64) and a C compiler")


def _cpu_as(kind, code):
    return subprocess.run([sys.executable, str(CPU_AS), kind, "--", sys.executable, "-X", "faulthandler",
                           "-c", code], capture_output=True, text=True, timeout=300)


@needs_cpuid_fault
def test_cpu_as_avx2_hides_avx512_vnni_and_amx_from_every_library():
    r = _cpu_as("avx2", "import torch, subprocess; print(torch.backends.cpu.get_cpu_capability()); "
                        "print(torch.cpu._is_vnni_supported(), torch.cpu._is_amx_tile_supported()); "
                        "print(open('/proc/cpuinfo').read()); print(subprocess.run(['sh', '-c', "
                        "'grep ^flags /proc/cpuinfo'], capture_output=True, text=True).stdout)")
    assert r.returncode == 0, r.stderr
    cap, support, rest = r.stdout.split("\n", 2)
    assert (cap, support) == ("AVX2", "False False")
    flags = cpu_as.flags_of(rest)
    assert "avx2" in flags and "fma" in flags
    assert not flags & {"avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "avx512_bf16"}
    assert "avx512f" in HOST_FLAGS or "avx2" in HOST_FLAGS   # the host's own view is untouched


@needs_cpuid_fault
@pytest.mark.skipif("avx512_vnni" not in HOST_FLAGS, reason="the host has no AVX512-VNNI to keep")
def test_cpu_as_avx512_vnni_keeps_vnni_and_hides_amx():
    r = _cpu_as("avx512_vnni", "import torch; print(torch.backends.cpu.get_cpu_capability(), "
                               "torch.cpu._is_vnni_supported(), torch.cpu._is_amx_tile_supported(), "
                               "torch.cpu._is_avx512_bf16_supported())")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["AVX512", "True", "False", "False"]


@needs_cpuid_fault
def test_cpu_as_leaves_the_programs_own_segfault_handler_working():
    r = _cpu_as("avx2", "import ctypes; ctypes.string_at(0)")
    assert r.returncode == -signal.SIGSEGV
    assert "Fatal Python error: Segmentation fault" in r.stderr


def test_cpu_as_refuses_an_unknown_kind_and_a_missing_command():
    r = subprocess.run([sys.executable, str(CPU_AS), "avx1", "--", "true"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice: 'avx1'" in r.stderr and "avx2" in r.stderr
    r = subprocess.run([sys.executable, str(CPU_AS), "avx2"], capture_output=True, text=True)
    assert r.returncode == 2 and "no command given" in r.stderr


# ---- oneDNN's AVX2 1x1 weight-gradient kernel (uxlfoundation/oneDNN#6035) --------------------

def test_onednn_1x1_hazards_are_the_strided_1x1_convs_with_2_to_7_input_channels(monkeypatch):
    import torch
    from torch import nn

    from compress import engine

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 8, 1, stride=2), nn.Conv2d(8, 8, 1, stride=2),
                          nn.Conv2d(4, 8, 1), nn.Conv2d(1, 8, 1, stride=2), nn.Conv2d(4, 4, 1, stride=2, groups=4),
                          nn.Conv2d(7, 8, 1, stride=(1, 2)))
    cpu = torch.device("cpu")
    monkeypatch.setattr(engine, "onednn_avx2_or_lower", lambda: True)
    assert engine.onednn_1x1_hazards(model, cpu) == ["1", "6"]
    assert engine.onednn_1x1_hazards(model, torch.device("cuda")) == []
    model[1].requires_grad_(False)          # a frozen conv needs no weight gradient
    assert engine.onednn_1x1_hazards(model, cpu) == ["6"]
    monkeypatch.setattr(engine, "onednn_avx2_or_lower", lambda: False)
    assert engine.onednn_1x1_hazards(model, cpu) == []


def test_onednn_1x1_hazards_found_in_a_pt2e_qat_graph(monkeypatch):
    import torch

    from compress import engine
    from compress.quant import QuantSpec, quantize_model
    from test_quant_pt2e import TinyResNet

    monkeypatch.setattr(engine, "onednn_avx2_or_lower", lambda: True)
    narrow = quantize_model(TinyResNet(width=4), QuantSpec(backend="pt2e"), (1, 16, 16))
    found = engine.onednn_1x1_hazards(narrow, torch.device("cpu"))
    assert len(found) == 1 and found[0].startswith("gm.conv")      # the stride-2 shortcut, 4 -> 8
    wide = quantize_model(TinyResNet(width=8), QuantSpec(backend="pt2e"), (1, 16, 16))
    assert engine.onednn_1x1_hazards(wide, torch.device("cpu")) == []


def test_onednn_avx2_or_lower_follows_the_isa_cap(monkeypatch):
    from compress import engine

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert engine.onednn_avx2_or_lower()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    import torch
    assert engine.onednn_avx2_or_lower() == (not torch.cpu._is_avx512_supported())


def test_stages_with_such_a_conv_train_without_onednn_and_restore_it(tiny_recipe_dict, tmp_path, monkeypatch,
                                                                    capsys):
    import torch

    from compress import engine
    from compress.config import parse_recipe
    from compress.pipeline import run_recipe

    tiny_recipe_dict["models"] = {"teacher": {"arch": "resnet20", "args": {"width": 0.125}}}
    tiny_recipe_dict["stages"] = tiny_recipe_dict["stages"][:1]
    monkeypatch.setattr(engine, "onednn_avx2_or_lower", lambda: True)
    seen = []
    real = engine.train_one_epoch
    monkeypatch.setattr(engine, "train_one_epoch",
                        lambda *a, **kw: seen.append(torch.backends.mkldnn.enabled) or real(*a, **kw))
    assert torch.backends.mkldnn.enabled
    run_recipe(parse_recipe(tiny_recipe_dict), workdir=tmp_path, device="cpu")
    assert seen == [False] and torch.backends.mkldnn.enabled
    out = capsys.readouterr().out
    assert "teacher: oneDNN off for this stage" in out and "layer2.0.shortcut.0" in out


@needs_cpuid_fault
def test_a_narrow_resnet_trains_on_an_avx2_cpu(tmp_path):
    """End to end, run as an AVX2 CPU: a width-0.125 ResNet-20 (stride-2 1x1 shortcuts on 2
    and 4 channels) trains to the end (5 s); without the guard oneDNN#6035 hung it in 2 of 3
    runs here."""
    root = tmp_path / "fmnist"
    write_fmnist(root, n_train=128, n_test=32)
    raw = json.loads(json.dumps(TINY_RECIPE))
    raw["data"]["root"] = str(root)
    raw["models"] = {"teacher": {"arch": "resnet20", "args": {"width": 0.125}}}
    raw["stages"] = raw["stages"][:1]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    r = subprocess.run([sys.executable, str(CPU_AS), "avx2", "--", sys.executable, "-m", "compress", "run",
                        str(recipe), "--workdir", str(tmp_path / "wd"), "--device", "cpu"],
                       capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "teacher: oneDNN off for this stage" in r.stdout
    assert (tmp_path / "wd" / "runs" / "tiny" / "stages" / "teacher" / "result.json").exists()


def test_iterate_resizes_after_augmentation():
    import torch

    from compress.data import Data, Split, iterate

    x = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    x[:, :, :, :4] = 255                                  # left half white, right half black
    split = Split(x, torch.arange(4))
    data = Data("toy", ["a"], split, split, [0.0], [1.0])
    (b,) = iterate(split, data, 4, size=4)
    assert b.x.shape == (4, 1, 4, 4)
    # antialiased bilinear at scale 2: a triangle filter of radius 2 input pixels, so output
    # column 1 (centre 3.0) weighs input centres 1.5, 2.5, 3.5 (white) and 4.5 (black) by
    # 0.25, 0.75, 0.75, 0.25 (sum 2): 1.75 / 2 = 0.875
    expect = torch.tensor([1.0, 0.875, 0.125, 0.0]).expand(4, 1, 4, 4)
    assert torch.allclose(b.x, expect)
    # mirrored views are resized after the flip: the white half is now on the right
    (f,) = iterate(split, data, 4, size=4, flip_all=True)
    assert torch.allclose(f.x, expect.flip(3))
    (same,) = iterate(split, data, 4, size=8)             # the data's own size: untouched
    assert torch.equal(same.x, x.float() / 255)


def test_progressive_resize_trains_the_first_epochs_small_and_evaluates_whole(tmp_path):
    import torch

    from compress.config import TrainingSpec
    from compress.data import Data, Split
    from compress.engine import RunContext, fit
    from compress.losses import Objective
    from compress.losses.ce import CESpec

    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (64, 1, 12, 12), generator=g, dtype=torch.uint8), torch.arange(64) % 2)
    data = Data("toy", ["a", "b"], split, split, [0.5], [0.25])
    ctx = RunContext(recipe=load_recipe(_recipe(tmp_path)), data=data, device=torch.device("cpu"))
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append((m.training, a[0].shape[-1])))
    spec = TrainingSpec(epochs=4, batch_size=16, progressive_resize=[6, 8], eval_every=1)
    history = fit(model, Objective([CESpec()], model), spec, ctx, name="toy")
    train_sizes = [s for t, s in seen if t]
    assert train_sizes == [6] * 4 + [8] * 4 + [12] * 8     # 4 steps per epoch
    assert {s for t, s in seen if not t} == {12}           # every evaluation at the data's size
    assert len(history) == 4 and all("test_top1" in h for h in history)


@pytest.mark.parametrize("sizes, why", [
    ([16, 20], r"progressive_resize: 2 sizes for 2 epochs; give fewer sizes than epochs"),
    ([3], r"progressive_resize\[0\]: must be >= 4, got 3"),
])
def test_progressive_resize_refused_in_the_config(tmp_path, sizes, why):
    with pytest.raises(CompressError, match=rf"^stages\[0\]\.{why}"):
        load_recipe(_recipe(tmp_path, epochs=2, progressive_resize=sizes))


@pytest.mark.parametrize("sizes, why", [
    ([30], r"30 px is larger than the data's 28x28 images; give sizes from 4 to 28"),
    ([4], r"the model does not run on 4x4 images \(RuntimeError: .*\); give larger sizes"),
])
def test_progressive_resize_checked_against_data_and_model_before_training(tmp_path, capsys, sizes, why):
    # vgg_small's cfg [8, M, 16] with 3 more pools would not run on 4x4: a 4-pool model
    path = _recipe(tmp_path, epochs=2, progressive_resize=sizes)
    raw = yaml.safe_load(path.read_text())
    raw["models"]["teacher"]["args"]["cfg"] = [8, "M", 8, "M", 8, "M", 8]
    path.write_text(yaml.safe_dump(raw))
    wd = tmp_path / "wd"
    assert main(["run", str(path), "--workdir", str(wd), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(rf"^error: stages\[0\]\.progressive_resize: {why}$", err[0]), err
    assert not (wd / "runs" / "tiny" / "stages" / "teacher").exists()


_MALLINFO = """
import ctypes, json, sys
from compress.engine import tune_allocator
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype = Info, ctypes.c_void_p
what = tune_allocator() if sys.argv[1] == "tune" else None
mapped = []
for mb in (4, 16):                # blocks glibc maps by default (threshold 128 KB, at most 32 MB)
    before = libc.mallinfo2().hblks
    libc.malloc(mb << 20)
    mapped.append(libc.mallinfo2().hblks - before)
print(json.dumps([what, mapped]))
"""


def _mallinfo(mode, **env):
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}   # the test's own choices only
    out = subprocess.run([sys.executable, "-c", _MALLINFO, mode], capture_output=True, text=True,
                         env={**base, **env}, cwd=Path(__file__).resolve().parents[1], check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or __import__("platform").libc_ver()[0] != "glibc",
                    reason="glibc's allocator")
def test_tune_allocator_keeps_large_blocks_on_the_heap():
    env = {"COMPRESS_MALLOC": "", "GLIBC_TUNABLES": "", "LD_PRELOAD": ""}
    assert _mallinfo("plain", **env) == [None, [1, 1]]          # glibc maps 4 and 16 MB blocks
    assert _mallinfo("tune", **env) == ["glibc: mmap threshold 32 MB, no trimming", [0, 0]]
    # the environment's own choice is left alone
    assert _mallinfo("tune", **{**env, "COMPRESS_MALLOC": "default"}) == ["as the environment sets it", [1, 1]]
    assert _mallinfo("tune", **{**env, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})[0] == "as the environment sets it"


def test_bench_refuses_a_file_it_cannot_feed_in_one_line(tmp_path, capsys):
    """A float16 input (compress feeds float32 images) and a directory: exit 2, one line."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Flatten", ["x"], ["y"])], "f16",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [None, 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [None, 16])])
    path = tmp_path / "f16.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert main(["bench", str(path), "--runs", "2"]) == 2
    assert capsys.readouterr().err == f"error: {path}: its input 'x' is float16; compress feeds float32 images\n"
    assert main(["bench", str(tmp_path), "--runs", "2"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}: a directory, not an ONNX file\n"


def test_bench_says_when_one_image_is_over_the_input_limit(tmp_path, capsys):
    """An input of [N, 3, 100000, 100000] said "at most 0 for this model"; no batch size can
    help, so the message says what one image needs. A batch too large for a smaller image
    still gets the largest batch that fits. Nothing is run: only the declared shape is read."""
    import onnx
    from onnx import TensorProto, helper

    def model(name, hw):
        graph = helper.make_graph([helper.make_node("Flatten", ["x"], ["y"])], name,
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, hw, hw])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3 * hw * hw])])
        path = tmp_path / f"{name}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
        return path

    huge, big = model("huge", 100_000), model("big", 4096)
    for batch in ("1", "64"):
        assert main(["bench", str(huge), "--batch", batch, "--runs", "2"]) == 2
        assert capsys.readouterr().err == (f"error: {huge}: one image of [3, 100000, 100000] needs 111.8 GiB of "
                                           "float32 input; the limit is 1 GiB per batch\n")
    assert main(["bench", str(big), "--batch", "64", "--runs", "2"]) == 2
    assert capsys.readouterr().err == ("error: --batch 64: 64 images of [3, 4096, 4096] need 12.0 GiB of input; "
                                       "at most 5 for this model\n")


# ---- benchmarks/int8_convs.py: which conv shapes pay as INT8 -----------------------------------

def test_int8_convs_benchmark_prints_each_shape_with_the_rules_verdict():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "int8_convs.py"
    out = subprocess.run([sys.executable, str(script), "--threads", "1", "--runs", "6", "--batch", "2",
                          "--size", "8", "--kernel", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [ln.split() for ln in out.stdout.splitlines() if re.match(r"^\s*1\s+\d+\s+\d+\s", ln)]
    assert len(rows) == 18                                       # every (in, out) pair of the grid
    verdict = {(int(r[1]), int(r[2])): r[-1] for r in rows}
    assert verdict[(1, 16)] == "float" and verdict[(8, 16)] == "int8" and verdict[(32, 8)] == "float"
    assert all(r[3] == "1" and float(r[4]) > 0 and float(r[5]) > 0 for r in rows)   # both kernels timed
    assert out.stdout.startswith("cpu: ")
    dw = subprocess.run([sys.executable, str(script), "--threads", "1", "--runs", "4", "--batch", "2",
                         "--size", "8", "--kernel", "3", "--depthwise"], capture_output=True, text=True, timeout=300)
    assert dw.returncode == 0, dw.stderr
    rows = [ln.split() for ln in dw.stdout.splitlines() if re.match(r"^\s*3\s+\d+\s+\d+\s", ln)]
    assert [(int(r[1]), int(r[2]), int(r[3])) for r in rows] == [(c, c, c) for c in (8, 16, 24, 32, 48, 64, 96, 144, 240)]
    verdict = {int(r[1]): r[-1] for r in rows}
    assert verdict[24] == "float" and verdict[144] == "int8"



def _int8_of_vgg(path, images, float_stem=True, pixel_input=True):
    """A small eager-QAT VGG calibrated on `images` (in [0, 1], Fashion-MNIST's
    normalization), exported as INT8 to `path`; `pixel_input=False` without that rewrite.
    Returns the exported graph."""
    import onnx
    import torch

    import compress.onnx_io as oio
    from compress.models import VGG
    from compress.quant import QuantSpec, calibrate, quantize_model
    from compress.quant.eager import to_int8_module

    mean, std = 0.286, 0.353
    torch.manual_seed(0)
    q = quantize_model(VGG([16, "M", 32], in_channels=1).eval(), QuantSpec())
    calibrate(q, [(x - mean) / std for x in images])
    rewrite = oio._pixel_input
    try:
        if not pixel_input:
            oio._pixel_input = lambda proto: 0
        oio.export_onnx(to_int8_module(q, float_first_conv=float_stem), path, input_shape=(1, 28, 28),
                        mean=[mean], std=[std], metadata={})
    finally:
        oio._pixel_input = rewrite
    return onnx.load(str(path)).graph


@pytest.mark.parametrize("float_stem", [True, False])
def test_the_input_is_quantized_as_pixels_where_that_is_exact(tmp_path, float_stem):
    # an input observer that saw 8-bit images (pixel values 0 and 255 included) maps each
    # value k/255 to k: the export then quantizes the images themselves, without the
    # normalization's Sub and Div, and gives the same logits on 8-bit images; the integer
    # kernels are those of the file without the rewrite
    import numpy as np
    import torch

    from compress.ort_runtime import ort_logits

    pixels = torch.randint(0, 256, (2, 16, 1, 28, 28), generator=torch.Generator().manual_seed(1)) / 255.0
    pixels[:, :, 0, 0, 0], pixels[:, :, 0, 0, 1] = 0.0, 1.0
    graph = _int8_of_vgg(tmp_path / "int8.onnx", pixels, float_stem)
    before = _int8_of_vgg(tmp_path / "before.onnx", pixels, float_stem, pixel_input=False)

    ops = [n.op_type for n in graph.node]
    assert ops[:2] == ["QuantizeLinear", "DequantizeLinear"] and not {"Sub", "Div"} & set(ops), ops
    assert graph.node[0].input[0] == "images"
    assert not {"mean", "std"} & {i.name for i in graph.initializer}   # no unused constants left
    assert {"Sub", "Div"} <= {n.op_type for n in before.node}
    images = (torch.randint(0, 256, (64, 1, 28, 28)) / 255.0).numpy()
    np.testing.assert_array_equal(ort_logits(tmp_path / "int8.onnx", images),
                                  ort_logits(tmp_path / "before.onnx", images))
    assert _optimized_ops(tmp_path / "int8.onnx", tmp_path).count("QLinearConv") == \
        _optimized_ops(tmp_path / "before.onnx", tmp_path).count("QLinearConv") == 2 - float_stem


@pytest.mark.parametrize("lo, hi", [(0.1, 1.0), (0.0, 0.9), (0.02, 0.98)])
def test_the_input_keeps_its_normalization_where_pixels_would_quantize_otherwise(tmp_path, lo, hi):
    # an input range other than the whole pixel range: its levels are not the pixel values,
    # so quantizing the images as pixels would change the logits; the graph is left alone
    import torch

    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * (hi - lo) + lo
    x[:, 0, 0, 0], x[:, 0, 0, 1] = lo, hi
    ops = [n.op_type for n in _int8_of_vgg(tmp_path / "int8.onnx", [x]).node]
    assert ops[:3] == ["Sub", "Div", "QuantizeLinear"], ops


def _tiny_maps_net():
    """Strided convs down to a 2x2 and then a 1x1 map, a 3x3 conv on that 1x1 map, a global
    pool over it: what an ImageNet network's last stages do to a 28x28 image."""
    import torch
    from torch import nn

    def cbr(i, o, stride):
        return [nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    torch.manual_seed(0)
    net = nn.Sequential(*cbr(1, 16, 2), *cbr(16, 16, 2), *cbr(16, 32, 2), *cbr(32, 32, 2),   # 14, 7, 4, 2
                        *cbr(32, 64, 2), *cbr(64, 64, 1),                                     # 1, 1
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    net.train()
    with torch.no_grad():   # BatchNorm statistics of real activations, not the identity
        net(torch.rand(64, 1, 28, 28))
    return net.eval()


def test_kernel_taps_that_only_read_padding_are_cut_from_the_exported_convs(tmp_path, monkeypatch):
    import numpy as np
    import onnx
    import torch

    import compress.onnx_io as oio
    import compress.ort_runtime as ort_rt
    from compress.quant import QuantSpec, calibrate, quantize_model, to_int8_module

    net = _tiny_maps_net()
    images = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    q = quantize_model(net, QuantSpec(backend="pt2e"), (1, 28, 28))
    calibrate(q, [(images - 0.286) / 0.353])
    kw = dict(input_shape=(1, 28, 28), mean=[0.286], std=[0.353], metadata={})

    def export(name, crop):
        monkeypatch.setattr(oio, "_crop_kernels", oio._crop_kernels if crop else (lambda proto: 0))
        oio.export_onnx(net, tmp_path / f"{name}-fp32.onnx", **kw)
        oio.export_onnx(to_int8_module(q), tmp_path / f"{name}-int8.onnx", **kw)

    export("cut", True)
    export("whole", False)
    for fmt in ("fp32", "int8"):
        graph = onnx.load(str(tmp_path / f"cut-{fmt}.onnx")).graph
        convs = [{a.name: list(a.ints) for a in n.attribute} for n in graph.node if n.op_type == "Conv"]
        # 2x2 -> 1x1 at stride 2 reads only the kernel's lower right 2x2; on the 1x1 map only its centre
        assert [(c["kernel_shape"], c["pads"]) for c in convs[-2:]] == [([2, 2], [0, 0, 0, 0]), ([1, 1], [0, 0, 0, 0])]
        assert all(c["kernel_shape"] == [3, 3] for c in convs[:-2]), fmt   # 4x4 -> 2x2 reads every tap
        ops = [n.op_type for n in graph.node]
        assert "Identity" in ops and not {"GlobalAveragePool", "ReduceMean"} & set(ops), fmt   # mean of 1x1
    x = images.numpy()
    # float: the same sums without zero terms; integer: the same integers
    np.testing.assert_allclose(ort_rt.ort_logits(tmp_path / "cut-fp32.onnx", x),
                               ort_rt.ort_logits(tmp_path / "whole-fp32.onnx", x), rtol=0, atol=1e-5)
    oio.check_fp32_parity(tmp_path / "cut-fp32.onnx", net, images)
    cut, whole = ort_rt.ort_logits(tmp_path / "cut-int8.onnx", x), ort_rt.ort_logits(tmp_path / "whole-int8.onnx", x)
    assert np.abs(cut).max() > 0.1    # not a degenerate all-zero output
    np.testing.assert_array_equal(cut, whole)
    assert oio.check_int8_agreement(tmp_path / "cut-int8.onnx", q, images, min_agreement=1.0) == 1.0
    assert ort_rt.check_int8_kernels(tmp_path / "cut-int8.onnx", float_convs=1)["QLinearConv"] == 5   # stem float
