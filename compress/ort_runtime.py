"""Running ONNX files in onnxruntime on the CPU: sessions, logits, latency measured in turns,
and what its graph optimizations make of a file (integer kernels, float islands, convolutions
slow as INT8). Needs onnx, onnxruntime and numpy only, not torch: `compress bench` imports
this and starts in about 1.3 s where torch's imports alone take 2.3 s."""

import collections
import os
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort

from .errors import CompressError, one_line


def _session_options(threads: int | None, timed: bool = False) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only; ORT warns about every unused initializer
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if timed:
        # Worker threads stop spinning when a Run returns. Otherwise the next file timed in
        # turns shares the cores with this session's still-spinning threads: measured, two
        # threads, the default recipe's INT8 / FP32 students took 1.31 / 2.40 ms in turns
        # against 0.76 / 1.26 ms each alone (0.93 / 1.47 ms in turns with this).
        so.add_session_config_entry("session.force_spinning_stop", "1")
    return so


def ort_session(path, threads: int | None = None, timed: bool = False) -> ort.InferenceSession:
    """CPU onnxruntime session with all graph optimizations (integer-kernel fusion);
    `timed`: set up for latency measured in turns with other sessions.

    >>> sess = ort_session("model.onnx", threads=2)  # doctest: +SKIP
    """
    try:
        return ort.InferenceSession(str(path), _session_options(threads, timed),
                                    providers=["CPUExecutionProvider"])
    except Exception as e:
        raise CompressError(f"onnxruntime cannot load {path}: {one_line(e)}") from e


def _as_images(images) -> np.ndarray:
    if hasattr(images, "detach"):   # a torch tensor (torch is not imported here)
        images = images.detach().cpu().numpy()
    x = np.ascontiguousarray(images, dtype=np.float32)
    if x.ndim != 4:
        raise CompressError(f"images must be NCHW, got shape {tuple(x.shape)}")
    return x


def ort_logits(path_or_session, images, batch_size: int = 1024) -> np.ndarray:
    """Logits (N, classes) that onnxruntime computes for float32 [0, 1] NCHW `images`.

    >>> ort_logits("model.onnx", torch.rand(8, 1, 28, 28)).shape  # doctest: +SKIP
    (8, 10)
    """
    sess = (path_or_session if isinstance(path_or_session, ort.InferenceSession)
            else ort_session(path_or_session))
    x = _as_images(images)
    name = sess.get_inputs()[0].name
    try:
        outs = [sess.run(None, {name: x[i:i + batch_size]})[0]
                for i in range(0, len(x), batch_size)]
    except Exception as e:
        raise CompressError(f"onnxruntime inference failed: {one_line(e)}") from e
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def ort_latency_ms(path, batch: int, *, warmup: int = 5, runs: int = 30,
                   threads: int | None = None) -> dict:
    """Wall-clock milliseconds per call of one `batch` of random images:
    ``{"median": ms, "p90": ms}``.

    >>> ort_latency_ms("model.onnx", 1, threads=2)  # doctest: +SKIP
    {'median': 0.21, 'p90': 0.25}
    """
    return ort_latency_side_by_side([path], batch, warmup=warmup, runs=runs, threads=threads)[0]


def ort_latency_side_by_side(paths, batch: int, *, warmup: int = 5, runs: int = 30,
                             threads: int | None = None) -> list[dict]:
    """`ort_latency_ms` of several files measured in turns (one call of each file per
    round), so that a load which comes and goes on a shared machine slows them alike and
    their ratios stay meaningful. One ``{"median": ms, "p90": ms}`` per file.

    >>> ort_latency_side_by_side(["int8.onnx", "fp32.onnx"], 64, threads=2)  # doctest: +SKIP
    [{'median': 1.1, 'p90': 1.3}, {'median': 1.6, 'p90': 1.9}]
    """
    feeds = []
    for path in paths:
        sess = ort_session(path, threads, timed=True)
        inp = sess.get_inputs()[0]
        chw = inp.shape[1:]
        if not all(isinstance(d, int) for d in chw):
            raise CompressError(f"{path}: input shape {inp.shape} is not fixed beyond the batch axis")
        x = np.random.default_rng(0).random((batch, *chw), dtype=np.float32)
        feeds.append((sess, {inp.name: x}))
    for sess, feed in feeds:
        for _ in range(warmup):
            sess.run(None, feed)
    times = [[] for _ in feeds]
    for _ in range(runs):
        for t, (sess, feed) in zip(times, feeds):
            t0 = time.perf_counter()
            sess.run(None, feed)
            t.append((time.perf_counter() - t0) * 1e3)
    return [{"median": float(np.median(t)), "p90": float(np.percentile(t, 90))} for t in times]


def ort_op_counts(path) -> dict[str, int]:
    """{op type: count} of the graph onnxruntime runs after all graph optimizations (the
    model it writes to ``SessionOptions.optimized_model_filepath``), in graph order: e.g.
    ``QLinearConv`` where a DequantizeLinear -> Conv -> QuantizeLinear group was fused.

    >>> ort_op_counts("student_int8.onnx")["QLinearConv"]  # doctest: +SKIP
    21
    """
    counts: dict[str, int] = {}
    for op in _optimized_op_types(str(path)):
        counts[op] = counts.get(op, 0) + 1
    return counts


def _optimized_graph(model: str | bytes) -> onnx.GraphProto:
    """The graph onnxruntime runs for a file (path) or a serialized model (bytes) after all
    graph optimizations."""
    with tempfile.TemporaryDirectory() as tmp:
        so = _session_options(None)
        so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        try:
            ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        except Exception as e:
            what = model if isinstance(model, str) else "the exported graph"
            raise CompressError(f"onnxruntime cannot load {what}: {one_line(e)}") from e
        return onnx.load(so.optimized_model_filepath, load_external_data=False).graph


def _optimized_op_types(model: str | bytes) -> list[str]:
    """Op types, in order, of the graph onnxruntime runs after all graph optimizations."""
    return [n.op_type for n in _optimized_graph(model).node]


# Ops that only move or relabel data: not counted as float arithmetic in an INT8 graph.
_LAYOUT_OPS = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "ReorderInput",
               "ReorderOutput")


def float_islands(path) -> dict[str, int]:
    """{op type: count} of the float ops onnxruntime runs *inside* an INT8 file's integer part
    after graph optimization: each reads a DequantizeLinear of an integer op's output and leads
    to a QuantizeLinear, because onnxruntime has no integer kernel for it (the HardSigmoid and
    Mul of hard-swish, for instance). The float lead from the input, the float tail after the
    last integer op, convolutions (see :func:`slow_integer_convs`) and layout ops are not
    counted.

    >>> float_islands("mobilenet_v3_int8.onnx")  # doctest: +SKIP
    {'HardSigmoid': 24, 'Mul': 25}
    """
    g = _optimized_graph(str(path))
    made_by = {o: n for n in g.node for o in n.output}
    readers = collections.defaultdict(list)
    for k, n in enumerate(g.node):
        for i in n.input:
            readers[i].append(k)
    counted, counts = set(), collections.Counter()
    for dq in g.node:
        src = made_by.get(dq.input[0]) if dq.op_type == "DequantizeLinear" and dq.input else None
        if src is None or src.op_type in ("QuantizeLinear", "DynamicQuantizeLinear"):
            continue   # a weight, or the input's quantization: the float lead follows
        island, todo, requantized, seen = [], list(dq.output), False, set()
        while todo:
            for k in readers.get(todo.pop(), []):
                n = g.node[k]
                if k in seen or n.op_type == "DequantizeLinear":
                    continue
                seen.add(k)
                if n.op_type == "QuantizeLinear":
                    requantized = True
                    continue
                if n.op_type.startswith(("QLinear", "QGemm", "ConvInteger", "MatMulInteger")):
                    continue
                island.append(k)
                todo.extend(n.output)
        if requantized:
            for k in island:
                op = g.node[k].op_type
                if k not in counted and "Conv" not in op and op not in _LAYOUT_OPS:
                    counted.add(k)
                    counts[op] += 1
    return dict(counts)


def int8_kernels(path) -> list[str]:
    """Op types onnxruntime runs after graph optimization, in graph order, each once
    (e.g. QLinearConv where the QDQ pattern was fused into an integer kernel).

    >>> "QLinearConv" in int8_kernels("student_int8.onnx")  # doctest: +SKIP
    True
    """
    return list(ort_op_counts(path))


# Integer convolutions onnxruntime runs; any other op type naming a convolution (Conv,
# FusedConv, NchwcConv after its layout pass) computes in float.
_INT_CONVS = ("QLinearConv", "ConvInteger")


def check_int8_kernels(path, float_convs: int = 0) -> dict[str, int]:
    """Check that onnxruntime's optimized graph of an INT8 file runs every convolution as
    an integer kernel (``QLinearConv``/``ConvInteger``), except the `float_convs` the export
    deliberately left in float (a first conv on 1-3 channels); returns the counts of the integer
    ops (``QLinearConv``, ``QLinearAdd``, ``QGemm``, ...) and of float ``Add``s, which a
    residual network should not have. Raises CompressError naming the float ops left.

    >>> check_int8_kernels("resnet_int8.onnx")  # doctest: +SKIP
    {'QLinearConv': 21, 'QLinearAdd': 9, 'QGemm': 1, 'Add': 0}
    """
    counts = ort_op_counts(path)
    floats = {op: n for op, n in counts.items() if "Conv" in op and op not in _INT_CONVS}
    if sum(floats.values()) > float_convs:
        raise CompressError(f"{path}: onnxruntime runs {sum(floats.values())} convolution(s) in float "
                            f"({', '.join(f'{op} x{n}' for op, n in floats.items())}, {float_convs} "
                            "intended); the QDQ graph was not fused into integer kernels")
    out = {op: n for op, n in counts.items() if op.startswith("QLinear") or op in ("QGemm", "ConvInteger")}
    out["Add"] = counts.get("Add", 0)
    return out


def integer_conv_slow(out_channels: int, in_channels: int, groups: int, kernel) -> bool:
    """True for a dense convolution that onnxruntime's CPU kernels run slower as INT8 than as FP32.

    onnxruntime's fast integer convolution (MLAS's symmetric "ConvSym" kernel, taken for our
    symmetric int8 weights) needs at least 16 output channels and input channels in multiples
    of 4; other convs run as im2col + a generic integer GEMM, which pays only for a k x k conv
    on 16 or more inputs (3x3 on 18, 19, 22, 26, 38, 54 inputs: 0.10-0.53x natively, 0.28-0.97x
    as AVX2; 1x1 on such inputs mostly slower, 0.52-2.85x). A k x k conv on 4 input channels is
    too short a dot product to pay even with the fast kernel. `python benchmarks/int8_convs.py`
    (64 images of 28x28, one conv, kernel time; README "Which convolutions stay float"), INT8 /
    FP32: 3x3 1->16 7.6x, 4->16 1.28x, 8->8 1.25x, 1x1 16->8 1.50x; 3x3 16->8 0.82x, 8->16 0.73x,
    16->16 0.52x, 1x1 4->16 0.71x; the same verdicts run as an AVX2 CPU. Depthwise 3x3
    (``--depthwise``, 28, 14 and 7 pixels square, natively and as AVX2): slower as INT8 at every
    channel count below 96 in nearly every run (8 channels 2.8-9.9x, 24 4.3-6.0x, 48 0.85-2.6x,
    64 0.86-6.4x); at 96 to 240 channels 0.68-2.5x, no consistent verdict, so left integer.
    Other grouped convs: not measured, left integer."""
    if groups != 1:
        return groups == in_channels and in_channels < 96   # depthwise on few channels
    k = 1
    for d in kernel:
        k *= int(d)
    generic_pays = k > 1 and in_channels >= 16        # im2col + integer GEMM still wins
    return ((in_channels % 4 != 0 and not generic_pays) or (k > 1 and in_channels < 8)
            or (out_channels < 16 and not generic_pays))


def slow_integer_convs(path) -> int:
    """How many of an INT8 file's integer convolutions (a ``Conv`` whose weights come from a
    ``DequantizeLinear`` of int8) have a shape onnxruntime runs slower as INT8 than as FP32
    (:func:`integer_conv_slow`, measured by ``benchmarks/int8_convs.py``).

    >>> slow_integer_convs("resnet_int8.onnx")  # doctest: +SKIP
    19
    """
    g = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name: i for i in g.initializer}
    made_by = {o: n for n in g.node for o in n.output}
    count = 0
    for n in g.node:
        dq = made_by.get(n.input[1]) if n.op_type == "Conv" and len(n.input) > 1 else None
        w = inits.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if w is None or w.data_type != onnx.TensorProto.INT8 or len(w.dims) < 3:
            continue
        groups = next((a.i for a in n.attribute if a.name == "group"), 1)
        count += integer_conv_slow(w.dims[0], w.dims[1] * groups, groups, w.dims[2:])
    return count
