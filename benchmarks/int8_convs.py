"""Which convolutions onnxruntime runs faster as INT8 than as FP32 on this CPU.

    python benchmarks/int8_convs.py [--threads N] [--batch B] [--runs R] [--size S] [--kernel K ...]
                                    [--depthwise | --shapes IN:OUT ...]
    python benchmarks/cpu_as.py avx2 -- python benchmarks/int8_convs.py

For each convolution shape of a grid (input and output channels, k x k, S x S maps; with
--depthwise, depthwise convs of 8 to 240 channels) it builds
two one-conv ONNX graphs: FP32 (Conv + Relu) and the QDQ form `compress` exports (uint8
activations, 7-bit symmetric per-channel int8 weights, which onnxruntime fuses into one
QLinearConv). Both run in turns (one call of each per round) and onnxruntime's profiler
times the convolution's own kernel (the layout transposes and the input's quantization that
a one-conv graph adds are not counted: in a whole graph they are shared). It prints the
medians, INT8/FP32, and whether `compress`'s rule (``compress.ort_runtime.integer_conv_slow``,
used by ``float_convs: auto``) keeps that conv float, so the rule can be checked against
this CPU's kernels.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import machine_lines  # noqa: E402

from compress.ort_runtime import integer_conv_slow  # noqa: E402

SHAPES = [(cin, cout) for cout in (8, 16, 32) for cin in (1, 3, 4, 8, 16, 32)]   # (in, out) channels
DEPTHWISE = (8, 16, 24, 32, 48, 64, 96, 144, 240)     # channels of the depthwise grid (groups = channels)


def conv_graph(cin, cout, k, size, int8, rng, groups=1):
    w = rng.standard_normal((cout, cin // groups, k, k)).astype(np.float32) * 0.1
    b = np.zeros(cout, np.float32)
    inits = [numpy_helper.from_array(b, "b")]
    if int8:
        scale = np.abs(w).reshape(cout, -1).max(1) / 63
        inits += [numpy_helper.from_array(np.round(w / scale[:, None, None, None]).astype(np.int8), "wq"),
                  numpy_helper.from_array(scale.astype(np.float32), "ws"),
                  numpy_helper.from_array(np.zeros(cout, np.int8), "wz"),
                  numpy_helper.from_array(np.array(0.02, np.float32), "s"),
                  numpy_helper.from_array(np.array(0, np.uint8), "z")]
        nodes = [helper.make_node("DequantizeLinear", ["x", "s", "z"], ["xf"]),
                 helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0),
                 helper.make_node("Conv", ["xf", "w", "b"], ["c"], pads=[k // 2] * 4, group=groups, name="conv"),
                 helper.make_node("Relu", ["c"], ["r"]),
                 helper.make_node("QuantizeLinear", ["r", "s", "z"], ["y"])]
        io = TensorProto.UINT8
    else:
        inits.append(numpy_helper.from_array(w, "w"))
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[k // 2] * 4, group=groups, name="conv"),
                 helper.make_node("Relu", ["c"], ["y"])]
        io = TensorProto.FLOAT
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", io, ["N", cin, size, size])],
                              [helper.make_tensor_value_info("y", io, ["N", cout, size, size])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def conv_kernel_ms(profile_file):
    """Kernel times (ms) of the convolution node, one per run, from an onnxruntime profile."""
    return [e["dur"] / 1e3 for e in json.loads(Path(profile_file).read_text())
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
            and "Conv" in e["args"].get("op_name", "")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--size", type=int, default=28, help="height and width of the input maps")
    ap.add_argument("--kernel", type=int, nargs="+", default=[3, 1], help="kernel sizes (k x k)")
    ap.add_argument("--depthwise", action="store_true",
                    help="depthwise convs (groups = channels) of the channel counts of a MobileNetV2 instead")
    ap.add_argument("--shapes", nargs="+", metavar="IN:OUT", help="these (input, output) channel pairs "
                    "instead of the grid, e.g. 3:64 for an RGB stem")
    args = ap.parse_args()
    try:
        shapes = [tuple(int(v) for v in p.split(":")) for p in args.shapes] if args.shapes else SHAPES
        assert all(len(p) == 2 and min(p) > 0 for p in shapes)
    except (ValueError, AssertionError):
        ap.error(f"--shapes: expected IN:OUT pairs of positive channel counts, e.g. 3:64, got {args.shapes}")
    for line in machine_lines(args.threads):
        print(line)
    print(f"one k x k conv + ReLU, {args.batch} images of {args.size}x{args.size}, {args.threads} onnxruntime "
          f"threads, medians of {args.runs} runs in turns (kernel time from onnxruntime's profiler)")
    print(f"{'k':>2} {'in':>4} {'out':>4} {'groups':>6} {'FP32 ms':>9} {'INT8 ms':>9} {'INT8/FP32':>10}  "
          f"float_convs: auto")
    rng = np.random.default_rng(0)
    grid = [(c, c, c) for c in DEPTHWISE] if args.depthwise else [(cin, cout, 1) for cin, cout in shapes]
    with tempfile.TemporaryDirectory() as tmp:
        for (cin, cout, groups), k in ((shape, k) for k in args.kernel for shape in grid):
            sessions, feeds = [], []
            for int8 in (False, True):
                so = ort.SessionOptions()
                so.intra_op_num_threads = args.threads
                so.enable_profiling = True
                so.profile_file_prefix = os.path.join(tmp, f"p{k}_{cin}_{cout}_{int(int8)}")
                so.log_severity_level = 3
                graph = conv_graph(cin, cout, k, args.size, int8, rng, groups)
                sess = ort.InferenceSession(graph.SerializeToString(), so, providers=["CPUExecutionProvider"])
                x = rng.random((args.batch, cin, args.size, args.size), dtype=np.float32)
                feeds.append({"x": (x * 255).astype(np.uint8) if int8 else x})
                sessions.append(sess)
            for _ in range(5):
                for s, f in zip(sessions, feeds):
                    s.run(None, f)
            for _ in range(args.runs):
                for s, f in zip(sessions, feeds):
                    s.run(None, f)
            fp32, int8 = (float(np.median(conv_kernel_ms(s.end_profiling())[5:])) for s in sessions)
            kept = "float" if integer_conv_slow(cout, cin, groups, (k, k)) else "int8"
            print(f"{k:2d} {cin:4d} {cout:4d} {groups:6d} {fp32:9.3f} {int8:9.3f} {int8 / fp32:9.2f}x  {kept}",
                  flush=True)


if __name__ == "__main__":
    main()
