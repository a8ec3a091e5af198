"""ONNX export and onnxruntime checks (compress/onnx_io.py), float and INT8."""

import json
import os

import re

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto
from torch import nn

from compress.errors import CompressError
from compress.models import VGG
from compress.onnx_io import NORMALIZATION_KEY, check_fp32_parity, check_int8_agreement, export_onnx
from compress.ort_runtime import int8_kernels, ort_latency_ms, ort_latency_side_by_side, ort_logits, ort_session
from compress.quant import QuantSpec, calibrate, quantize_model, set_qat_phase, to_int8_module

SHAPE = (1, 16, 16)
MEAN, STD = [0.3], [0.35]
META = {"class_names": json.dumps([str(i) for i in range(10)]), "recipe": "test"}


def class_data(n, seed):
    """Images in [0, 1]: one fixed random template per class plus noise, so a tiny
    model learns clear margins within a few dozen steps."""
    templates = torch.rand(10, *SHAPE, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = (0.7 * templates[y] + 0.3 * torch.rand(n, *SHAPE, generator=g)).clamp(0, 1)
    return x, y


def fit(model, steps, seed=0, lr=1e-2):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        x, y = class_data(64, seed=1000 * seed + step)
        opt.zero_grad()
        F.cross_entropy(model((x - MEAN[0]) / STD[0]), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A trained float VGG, its QAT copy, and both exported."""
    d = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    model = fit(VGG([16, "M", 32], in_channels=1, num_classes=10), steps=80)
    qmodel = quantize_model(model, QuantSpec())
    fit(qmodel, steps=10, seed=1, lr=1e-3)  # short QAT: observers and BN live
    set_qat_phase(qmodel, observers=False, bn_stats=False)
    fit(qmodel, steps=5, seed=2, lr=1e-3)
    fp32, int8 = d / "fp32.onnx", d / "int8.onnx"
    export_onnx(model, fp32, input_shape=SHAPE, mean=MEAN, std=STD, metadata=META)
    # every layer integer (the default keeps a 1-channel first conv float: tests/test_speed.py)
    export_onnx(to_int8_module(qmodel, float_first_conv=False), int8, input_shape=SHAPE, mean=MEAN,
                std=STD, metadata=META)
    return {"model": model, "qmodel": qmodel.eval(), "fp32": fp32, "int8": int8, "dir": d}


def test_fp32_parity_with_dynamic_batch(models):
    sess = ort_session(models["fp32"], threads=1)
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert inp.name == "images" and out.name == "logits"
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == list(SHAPE)
    for n in (1, 7):
        x, _ = class_data(n, seed=50 + n)
        with torch.no_grad():
            ref = models["model"]((x - MEAN[0]) / STD[0]).numpy()
        got = ort_logits(sess, x)
        assert got.shape == (n, 10)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert check_fp32_parity(models["fp32"], models["model"], class_data(64, 3)[0]) <= 1e-4


def test_fp32_parity_detects_other_model(models):
    other = VGG([16, "M", 32], in_channels=1, num_classes=10).eval()
    with pytest.raises(CompressError, match="differ from torch"):
        check_fp32_parity(models["fp32"], other, class_data(16, 4)[0])


def test_int8_file_is_standard_qdq(models):
    proto = onnx.load(models["int8"])
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    dtypes = {i.name: i.data_type for i in proto.graph.initializer}
    weights = [n for n, t in dtypes.items() if n.endswith("weight_int8")]
    assert len(weights) == 3 and all(dtypes[n] == TensorProto.INT8 for n in weights)
    assert sum(t == TensorProto.INT32 for t in dtypes.values()) == 3  # the biases
    assert not any(t == TensorProto.FLOAT and n.endswith("weight") for n, t in dtypes.items())
    assert len(proto.graph.input) == 1 and proto.graph.input[0].name == "images"


@pytest.mark.parametrize("name", ["fp32", "int8"])
def test_files_are_lean_and_carry_metadata(models, name):
    proto = onnx.load(models[name])
    props = {p.key: p.value for p in proto.metadata_props}
    assert {k: props[k] for k in META} == META
    assert json.loads(props[NORMALIZATION_KEY]) == {"mean": MEAN, "std": STD}
    assert not any(n.metadata_props or n.doc_string for n in proto.graph.node)
    assert not proto.graph.value_info
    assert not [f for f in os.listdir(models["dir"]) if f.endswith((".data", ".tmp"))]


def test_int8_smaller_than_fp32(models):
    fp32, int8 = os.path.getsize(models["fp32"]), os.path.getsize(models["int8"])
    print(f"\nFP32 {fp32} B, INT8 {int8} B")
    assert int8 < 0.7 * fp32


def test_int8_fused_into_integer_kernels(models):
    kernels = int8_kernels(models["int8"])
    print("\nINT8 kernels:", kernels)
    assert "QLinearConv" in kernels and "Conv" not in kernels
    assert {"QGemm", "QLinearMatMul"} & set(kernels)
    assert "Conv" in int8_kernels(models["fp32"])


def test_int8_agrees_with_fake_quant(models):
    x, y = class_data(256, seed=7)
    agreement = check_int8_agreement(models["int8"], models["qmodel"], x)
    print(f"\nINT8 top-1 agreement {agreement:.4f}")
    assert agreement >= 0.99
    logits = ort_logits(models["int8"], x, batch_size=100)  # batches must not matter
    assert (logits.argmax(1) == y.numpy()).mean() > 0.9  # and the model did learn
    # the caller's logits (one onnxruntime pass shared with the top-1) are the ones checked
    assert check_int8_agreement(models["int8"], models["qmodel"], x, logits=logits) == agreement
    shifted = np.roll(logits, 1, axis=1)
    with pytest.raises(CompressError, match="agrees with the fake-quant model on only"):
        check_int8_agreement(models["int8"], models["qmodel"], x, logits=shifted)
    # near-ties: the file's logits nudged so that the runner-up wins where the fake-quant
    # model's top-2 gap is smallest; the error says how close those were
    ref = logits.copy()
    top2 = np.sort(ref, 1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    near = np.argsort(gap)[:5]
    nudged = ref.copy()
    second = np.argsort(ref, 1)[:, -2]
    nudged[near, second[near]] += gap[near] + 1e-3
    with pytest.raises(CompressError) as e:
        check_int8_agreement(models["int8"], models["qmodel"], x, min_agreement=0.999, logits=nudged)
    said = float(re.search(r"on the 5 others the fake-quant model's logit for the INT8 file's class is at most "
                           r"(\S+) below its top-1's", str(e.value))[1])
    assert said <= gap[near].max() + 0.05   # the fake-quant logits are the file's, to rounding


def test_int8_agreement_detects_other_model(models):
    other = quantize_model(VGG([16, "M", 32], in_channels=1, num_classes=10), QuantSpec())
    calibrate(other, [class_data(64, 8)[0]])
    with pytest.raises(CompressError, match="agrees with the fake-quant model on only"):
        check_int8_agreement(models["int8"], other, class_data(256, 9)[0])


def test_ptq_export_of_calibrated_model(tmp_path, models):
    """PTQ path: calibrate a float model (no QAT) and export it."""
    qmodel = quantize_model(models["model"], QuantSpec())
    calibrate(qmodel, [class_data(128, seed=s)[0].sub(MEAN[0]).div(STD[0]) for s in (20, 21)])
    path = tmp_path / "ptq.onnx"
    export_onnx(to_int8_module(qmodel), path, input_shape=SHAPE, mean=MEAN, std=STD,
                metadata={})
    assert check_int8_agreement(path, qmodel, class_data(256, seed=22)[0]) >= 0.99


def test_channels_last_exports_like_nchw_and_quietly(tmp_path, models, capfd):
    cl = VGG([16, "M", 32], in_channels=1, num_classes=10)
    cl.load_state_dict(models["model"].state_dict())
    cl = cl.to(memory_format=torch.channels_last)
    path = tmp_path / "cl.onnx"
    export_onnx(cl, path, input_shape=SHAPE, mean=MEAN, std=STD, metadata={})
    assert capfd.readouterr() == ("", "")  # the exporter's progress lines are swallowed
    nodes = lambda p: [n.op_type for n in onnx.load(p).graph.node]  # noqa: E731
    assert nodes(path) == nodes(models["fp32"])
    assert next(cl.parameters()).is_contiguous(memory_format=torch.channels_last)  # untouched


def test_latency(models):
    lat = ort_latency_ms(models["int8"], 4, warmup=1, runs=5, threads=1)
    assert set(lat) == {"median", "p90"} and 0 < lat["median"] <= lat["p90"]


def test_sessions_timed_in_turns_stop_spinning_after_each_run(models, monkeypatch):
    """Sessions timed in turns: each one's worker threads stop spinning when its Run returns,
    so the next file timed does not share the cores with them."""
    import onnxruntime as ort

    made = []

    class Spy(ort.InferenceSession):
        def __init__(self, path, so, **kw):
            try:
                made.append(so.get_session_config_entry("session.force_spinning_stop"))
            except Exception:   # onnxruntime raises for a key never set
                made.append(None)
            super().__init__(path, so, **kw)

    monkeypatch.setattr(ort, "InferenceSession", Spy)
    lats = ort_latency_side_by_side([models["int8"], models["fp32"]], 2, warmup=1, runs=3, threads=2)
    assert made == ["1", "1"] and len(lats) == 2
    made.clear()
    ort_logits(models["fp32"], torch.rand(2, *SHAPE))   # inference only: onnxruntime's default
    assert made == [None]


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # Python branch on a tensor value: torch.export cannot trace it
            return x.flatten(1)
        return -x.flatten(1)


def test_export_failure_is_one_line_compress_error(tmp_path):
    path = tmp_path / "bad.onnx"
    with pytest.raises(CompressError, match="ONNX export of DataDependent failed") as e:
        export_onnx(DataDependent(), path, input_shape=SHAPE, mean=MEAN, std=STD, metadata={})
    assert "\n" not in str(e.value)
    assert not os.listdir(tmp_path)  # nothing half-written


def test_bad_arguments(tmp_path):
    kw = dict(input_shape=SHAPE, mean=MEAN, std=STD)
    with pytest.raises(CompressError, match="metadata must map str to str"):
        export_onnx(nn.Flatten(), tmp_path / "m.onnx", metadata={"n": 3}, **kw)
    with pytest.raises(CompressError, match="input_shape"):
        export_onnx(nn.Flatten(), tmp_path / "m.onnx", metadata={},
                    input_shape=(3, 16, 16), mean=MEAN, std=STD)
    with pytest.raises(CompressError, match="cannot load"):
        ort_session(tmp_path / "missing.onnx")


class _Scaled(torch.nn.Module):
    def __init__(self, model, k):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, x):
        return self.model(x) * self.k


def test_fp32_parity_bound_follows_the_logits_scale(tmp_path, models):
    """Logits near 1000 differ by float32 rounding far above 1e-4 in absolute terms: the bound
    is 1e-4 of the largest |logit|, and a 0.1% different model is still refused."""
    big = _Scaled(models["model"], 1000.0).eval()
    path = tmp_path / "big.onnx"
    export_onnx(big, path, input_shape=SHAPE, mean=MEAN, std=STD, metadata={})
    x = class_data(32, 9)[0]
    with torch.no_grad():
        scale = float(big((x - MEAN[0]) / STD[0]).abs().max())
    assert scale > 10
    assert check_fp32_parity(path, big, x) <= 1e-4 * scale
    with pytest.raises(CompressError, match="largest"):
        check_fp32_parity(path, _Scaled(models["model"], 1001.0).eval(), x)


def _handoff_graph(first_conv: str, channels: int = 16):
    """images [-> Q/DQ] -> Conv(1->C) -> Relu -> Q -> DQ -> Conv(C->16, int8 weights) -> Relu
    -> Q -> DQ -> output; `first_conv`: "float" (float weights on the float input), "dq input"
    (float weights on the dequantized input) or "integer" (dequantized weights too)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper as h, numpy_helper as nh

    rng = np.random.default_rng(0)
    inits = [nh.from_array(np.array(0.02, np.float32), "s"), nh.from_array(np.array(0, np.uint8), "z"),
             nh.from_array(rng.integers(-63, 64, (16, channels, 3, 3)).astype(np.int8), "w2q"),
             nh.from_array(np.full(16, 0.01, np.float32), "w2s"), nh.from_array(np.zeros(16, np.int8), "w2z")]
    nodes = [h.make_node("Identity", ["images"], ["x"])] if first_conv == "float" else [
        h.make_node("QuantizeLinear", ["images", "s", "z"], ["xq"]),
        h.make_node("DequantizeLinear", ["xq", "s", "z"], ["x"])]
    w1 = rng.standard_normal((channels, 1, 3, 3)).astype(np.float32)
    if first_conv == "integer":
        inits += [nh.from_array(np.round(w1 * 20).astype(np.int8), "w1q"),
                  nh.from_array(np.full(channels, 0.05, np.float32), "w1s"),
                  nh.from_array(np.zeros(channels, np.int8), "w1z")]
        nodes.append(h.make_node("DequantizeLinear", ["w1q", "w1s", "w1z"], ["w1"], axis=0))
    else:
        inits.append(nh.from_array(w1, "w1"))
    nodes += [h.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
              h.make_node("Relu", ["c1"], ["r1"]),
              h.make_node("QuantizeLinear", ["r1", "s", "z"], ["q1"]),
              h.make_node("DequantizeLinear", ["q1", "s", "z"], ["d1"]),
              h.make_node("DequantizeLinear", ["w2q", "w2s", "w2z"], ["w2"], axis=0),
              h.make_node("Conv", ["d1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
              h.make_node("Relu", ["c2"], ["r2"]),
              h.make_node("QuantizeLinear", ["r2", "s", "z"], ["q2"]),
              h.make_node("DequantizeLinear", ["q2", "s", "z"], ["logits"])]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("images", TensorProto.FLOAT, ["n", 1, 12, 12])],
                         [h.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 16, 12, 12])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 20)])


@pytest.mark.parametrize("first_conv, channels, rewritten",
                         [("float", 16, 1), ("float", 32, 1), ("float", 8, 0), ("float", 24, 0),
                          ("dq input", 16, 0), ("integer", 16, 0)])
def test_nhwc_handoff_only_from_a_float_op_with_16k_channels(first_conv, channels, rewritten):
    # a conv with dequantized weights is an integer kernel, and onnxruntime quantizes the float
    # weights of one between a DequantizeLinear and a QuantizeLinear itself; 8 or 24 channels
    # do not fill onnxruntime's 16-wide NCHWc blocks on AVX-512
    import numpy as np
    import onnxruntime as ort

    from compress.onnx_io import _rewrite_nhwc_handoff

    model = _handoff_graph(first_conv, channels)
    before = model.SerializeToString()
    assert _rewrite_nhwc_handoff(model) == rewritten
    __import__("onnx").checker.check_model(model, full_check=True)
    x = np.random.default_rng(1).random((4, 1, 12, 12), dtype=np.float32)
    run = lambda m: ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    np.testing.assert_array_equal(run(before), run(model.SerializeToString()))


def test_exports_of_one_process_share_one_torchlib_registry(tmp_path, monkeypatch):
    """torch.onnx's registry is built once per opset and reused by later exports, which
    write the same bytes as the export that built it; the hook is removed afterwards."""
    from torch.onnx._internal.exporter import _registration

    from compress import onnx_io

    original = _registration.ONNXRegistry.__dict__["from_torchlib"]
    builds = []
    real = original.__func__

    def counting(cls, *a, **k):
        builds.append(1)
        return real(cls, *a, **k)

    monkeypatch.setattr(onnx_io, "_TORCHLIB_REGISTRIES", {})
    monkeypatch.setattr(_registration.ONNXRegistry, "from_torchlib", classmethod(counting))
    torch.manual_seed(0)
    model = VGG([8, "M", 16], in_channels=1).eval()
    paths = [tmp_path / f"m{i}.onnx" for i in range(3)]
    for p in paths:
        export_onnx(model, p, input_shape=SHAPE, mean=MEAN, std=STD, metadata=META)
    assert len(builds) == 1
    assert paths[0].read_bytes() == paths[1].read_bytes() == paths[2].read_bytes()
    assert _registration.ONNXRegistry.__dict__["from_torchlib"].__func__ is counting   # restored
