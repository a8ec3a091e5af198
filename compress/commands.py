"""``compress eval``, ``bench``, ``compare`` and ``report``: measuring exported files and
re-reading stored results, without training.

Every number comes from onnxruntime running the file (eval, bench) or from stored
report.json / result.json files (compare, report). Heavy imports happen inside the commands.
"""

import argparse
import json
import os
from pathlib import Path

from .errors import CompressError, unknown

# Op types onnxruntime runs as integer kernels after fusing a QDQ graph (CPU provider).
INTEGER_KERNELS = ("QLinearConv", "ConvInteger", "QGemm", "MatMulInteger", "QLinearMatMul",
                   "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearGlobalAveragePool",
                   "QLinearAveragePool", "QLinearAdd", "QLinearConcat", "NhwcMaxPool")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
FLOAT_HEAVY = ("Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul")


# ---- shared helpers --------------------------------------------------------------------------

def _onnx_file(path):
    p = Path(path)
    if not p.is_file():
        raise CompressError(f"{path}: {'a directory, not an ONNX file' if p.is_dir() else 'no such file'}")
    return p


def _check_float_input(path, input_type):
    """Refuse a file whose input is not float32 images (what bench and eval feed)."""
    name, dtype = input_type
    if dtype not in ("float", ""):
        raise CompressError(f"{path}: its input '{name}' is {dtype}; compress feeds float32 images")


def _dims(value_info):
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


def onnx_io_shapes(path):
    """(input shape, output shape) of an ONNX classifier; None for a free dimension."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types
        raise CompressError(f"{path}: not a readable ONNX file ({type(e).__name__})") from None
    if not proto.graph.input or not proto.graph.output:
        raise CompressError(f"{path}: the graph has no input or no output")
    return _dims(proto.graph.input[0]), _dims(proto.graph.output[0])


def onnx_info(path):
    """(metadata_props dict, graph op types, input shape, (input name, element type such as
    'float')) of an ONNX file."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types
        raise CompressError(f"{path}: not a readable ONNX file ({type(e).__name__})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    ops = list(dict.fromkeys(n.op_type for n in proto.graph.node))
    first = proto.graph.input[0] if proto.graph.input else None
    shape = _dims(first) if first else []
    dtype = onnx.TensorProto.DataType.Name(first.type.tensor_type.elem_type).lower() if first else ""
    return props, ops, shape, (first.name if first else "", dtype)


def fixed_batch(shape):
    """The batch size an input shape is frozen to, or None when the batch axis is free."""
    return shape[0] if shape and shape[0] else None


def _is_int8(props, ops):
    return props.get("format") == "onnx-int8" or any(op in QDQ_OPS or op.startswith("QLinear") for op in ops)


def _find_report(path):
    """The report.json in a file's folder and that file's entry in it, or (None, None)."""
    rp = Path(path).parent / "report.json"
    if not rp.is_file():
        return None, None
    from .report import parse_report

    try:
        report = parse_report(json.loads(rp.read_text()), rp)
    except (OSError, ValueError, CompressError):
        return None, None
    entry = next((e for e in report["exports"] if e["path"] == Path(path).name), None)
    return report, entry


# ---- eval ------------------------------------------------------------------------------------

def evaluate_onnx(path, data=None, root=None, test_subset=None):
    """Top-1 (%), per-class accuracy and the confusion matrix of an ONNX classifier on a
    dataset's test split, computed by onnxruntime. The file takes float32 [0, 1] NCHW
    images (normalisation is in the graph). `data` defaults to the file's ``dataset``
    metadata; class names come from its ``class_names`` metadata when present.

    >>> r = evaluate_onnx("exports/vgg_prune_kd/qat-int8.onnx", "fashion_mnist")  # doctest: +SKIP
    >>> r["top1"]  # doctest: +SKIP
    92.06
    """
    import numpy as np

    from .config import DataSpec
    from .data import DATASETS, load_data
    from .ort_runtime import ort_logits, ort_session

    path = _onnx_file(path)
    props, _, shape, input_type = onnx_info(path)
    _check_float_input(path, input_type)
    name = data or props.get("dataset")
    if not name:
        raise CompressError(f"--data: {path} names no dataset in its metadata; give --data NAME "
                            f"(valid: {', '.join(sorted(DATASETS))})")
    if name not in DATASETS:
        raise CompressError(f"--data: {unknown('dataset', name, DATASETS)}")
    if test_subset is not None and test_subset < 1:
        raise CompressError(f"--test-subset: must be >= 1, got {test_subset}")
    ds = load_data(DataSpec(name=name, root=None if root is None else str(root), download=False,
                            test_subset=test_subset))
    want = list(ds.input_shape)
    if len(shape) != 4 or any(s is not None and s != w for s, w in zip(shape[1:], want)):
        raise CompressError(f"{path}: input shape {shape} does not fit {name} images [N, {', '.join(map(str, want))}]")
    _, out_shape = onnx_io_shapes(path)
    if len(out_shape) == 2 and out_shape[1] and out_shape[1] != ds.num_classes:
        raise CompressError(f"{path}: the model has {out_shape[1]} outputs but {name} has {ds.num_classes} "
                            "classes; evaluate it on the dataset it was trained for (--data)")
    sess = ort_session(path)
    images = ds.test.x.cpu().float().div_(255).numpy()   # what the graph takes: [0, 1], NCHW
    labels = ds.test.y.cpu().numpy()
    b = fixed_batch(shape)
    if b:   # a graph frozen to batch b: run whole batches, the last padded with zeros
        pad = (-len(images)) % b
        padded = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)]) if pad else images
        logits = ort_logits(sess, padded, batch_size=b)[:len(images)]
    else:
        logits = ort_logits(sess, images)
    if logits.ndim != 2 or logits.shape[1] != ds.num_classes:
        raise CompressError(f"{path}: the model outputs shape {list(logits.shape)} but {name} has "
                            f"{ds.num_classes} classes; evaluate it on the dataset it was trained for (--data)")
    n = ds.num_classes
    pred = logits.argmax(1)
    cm = np.bincount(labels * n + pred, minlength=n * n).reshape(n, n)
    classes = list(ds.classes)
    try:
        meta_names = json.loads(props["class_names"])
        if isinstance(meta_names, list) and len(meta_names) == n:
            classes = [str(c) for c in meta_names]
    except (KeyError, ValueError):
        pass
    if len(classes) != n:
        classes = [str(i) for i in range(n)]
    per_class = [{"class": classes[i], "images": int(cm[i].sum()), "correct": int(cm[i, i]),
                  "top1": round(100.0 * cm[i, i] / cm[i].sum(), 2) if cm[i].sum() else None}
                 for i in range(n)]
    return {"model": str(path), "dataset": name, "images": int(len(labels)),
            "top1": round(100.0 * float((pred == labels).mean()), 2),
            "per_class": per_class, "confusion": cm.tolist(), "classes": classes}


def cmd_eval(args):
    from .storage import write_json
    from .plots import plot_confusion

    r = evaluate_onnx(args.model, args.data, args.root, args.test_subset)
    out = Path(args.out) if args.out else Path(args.model).parent
    stem = Path(args.model).stem
    png = plot_confusion(r["confusion"], r["classes"], out / f"{stem}-confusion.png",
                         f"{Path(args.model).name} on {r['dataset']} test ({r['images']} images): "
                         f"top-1 {r['top1']:.2f}%")
    write_json(out / f"{stem}-eval.json", r)
    print(f"top1: {r['top1']:.2f}% ({r['images']} {r['dataset']} test images, onnxruntime CPU)")
    width = max(len(c["class"]) for c in r["per_class"])
    print(f"  {'class':<{width}}  images  top-1 (%)")
    for c in r["per_class"]:
        acc = "–" if c["top1"] is None else f"{c['top1']:.2f}"
        print(f"  {c['class']:<{width}}  {c['images']:>6}  {acc:>9}")
    print(f"confusion matrix: {png}")
    print(f"per-class results: {out / f'{stem}-eval.json'}")
    return 0


# ---- bench -----------------------------------------------------------------------------------

# The CPU flags that decide which kernels PyTorch, oneDNN and onnxruntime run (x86, then Arm).
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8",
                "asimd", "asimddp", "i8mm", "bf16", "sve")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_info(cpuinfo="/proc/cpuinfo"):
    """{"model": lscpu's model name (None where /proc/cpuinfo gives none, as on most Arm
    CPUs), "isa": the KERNEL_FLAGS the CPU reports, in that order (None when unknown: no
    /proc/cpuinfo)}: what a latency or a training time should be quoted with.

    >>> cpu_info()["isa"]   # doctest: +SKIP
    ['avx2', 'fma', 'avx512f', 'avx512_vnni']
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return {"model": None, "isa": None}
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features"):
            flags.update(value.split())
        elif key == "model name" and model is None:
            model = " ".join(value.split()) or None
    return {"model": model, "isa": [f for f in KERNEL_FLAGS if f in flags]}


def cpu_line(info=None):
    """One line naming the CPU and its kernel flags, e.g. ``Intel(R) Xeon(R) Processor (avx2 fma
    avx512f avx512_vnni)``."""
    import platform

    info = cpu_info() if info is None else info
    model = info.get("model") or platform.processor() or platform.machine() or "unknown CPU"
    isa = info.get("isa")
    return f"{model} ({' '.join(isa) if isa else 'no AVX2/AVX-512/NEON flags' if isa == [] else 'flags unknown'})"


def vnni_of(isa):
    """The VNNI flags (avx512_vnni, avx_vnni, amx_int8) among `isa` (cpu_info's), sorted;
    None when `isa` is."""
    return None if isa is None else sorted(f for f in isa if f in VNNI_FLAGS)


def cpu_vnni(cpuinfo="/proc/cpuinfo"):
    """The VNNI flags the CPU reports, [] when none, None when unknown (no /proc/cpuinfo)."""
    return vnni_of(cpu_info(cpuinfo)["isa"])


def bench(path, batches=(1, 64), threads=None, runs=50):
    """{batch: {"median", "p90" (ms), "images_per_s"}} measured by onnxruntime on the CPU."""
    return bench_side_by_side([path], batches, threads, runs)[0]


def bench_side_by_side(paths, batches=(1, 64), threads=None, runs=50):
    """`bench` of several files, measured in turns (see ``ort_latency_side_by_side``):
    one {batch: {...}} per file."""
    from .ort_runtime import ort_latency_side_by_side

    out = [{} for _ in paths]
    for b in batches:
        for o, lat in zip(out, ort_latency_side_by_side(paths, b, runs=runs, threads=threads)):
            o[b] = {"median": lat["median"], "p90": lat["p90"],
                    "images_per_s": b / max(lat["median"] / 1e3, 1e-12)}
    return out


MAX_BENCH_BATCH = 65536
MAX_BENCH_BYTES = 1 << 30    # one batch of float32 input at most 1 GiB


def _check_bench_input(path, shape, batches):
    """Refuse batches the file cannot take (a frozen batch axis) or that would not fit in memory."""
    if len(shape) < 2 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        raise CompressError(f"{path}: input shape {shape} is not fixed beyond the batch axis")
    per_image = 4
    for d in shape[1:]:
        per_image *= d
    if per_image > MAX_BENCH_BYTES:   # no batch size helps: say so, not "at most 0"
        raise CompressError(f"{path}: one image of {shape[1:]} needs {per_image / 2**30:.1f} GiB of float32 "
                            f"input; the limit is {MAX_BENCH_BYTES / 2**30:g} GiB per batch")
    b = fixed_batch(shape)
    wrong = [x for x in batches if b and x != b]
    if wrong:
        raise CompressError(f"--batch {wrong[0]}: {path} takes batches of exactly {b} (its batch axis is "
                            f"fixed); use --batch {b}, or export with a dynamic batch axis")
    big = [x for x in batches if x * per_image > MAX_BENCH_BYTES]
    if big:
        raise CompressError(f"--batch {big[0]}: {big[0]} images of {shape[1:]} need "
                            f"{big[0] * per_image / 2**30:.1f} GiB of input; at most "
                            f"{MAX_BENCH_BYTES // per_image} for this model")


def _check_twin(path, twin):
    """Refuse a 'twin' that is not the same task: other input shape, class count or dataset."""
    (pi, po), (ti, to) = onnx_io_shapes(path), onnx_io_shapes(twin)
    if pi[1:] != ti[1:] or po[1:] != to[1:]:
        raise CompressError(f"--compare {twin}: input {ti} / output {to} differ from {path}'s input {pi} / "
                            f"output {po}; compare two models of the same task")
    d1, d2 = onnx_info(path)[0].get("dataset"), onnx_info(twin)[0].get("dataset")
    if d1 and d2 and d1 != d2:
        raise CompressError(f"--compare {twin}: a {d2} model, but {path} is a {d1} model; compare two "
                            "models of the same task")


def _twin_for(path, compare):
    """([files to compare with], how they were found) or ([], why not)."""
    if compare:
        others = [_onnx_file(c) for c in compare]
        for other in others:
            _check_twin(path, other)
        return others, "--compare"
    report, entry = _find_report(path)
    if entry is None:
        return [], "no report.json entry next to the file; pass --compare FP32.onnx"
    from .report import fp32_twin

    twin = fp32_twin(report, entry)
    if twin is None or twin["path"] == entry["path"]:
        return [], "the run exported no FP32 twin; pass --compare FP32.onnx"
    p = Path(path).parent / twin["path"]
    return ([p], "report.json") if p.is_file() else ([], f"twin {p} is missing")


def cmd_bench(args):
    import onnxruntime as ort

    from .ort_runtime import int8_kernels

    path = _onnx_file(args.model)
    bad = [b for b in args.batch if not 1 <= b <= MAX_BENCH_BATCH]
    if bad:
        raise CompressError(f"--batch: must be >= 1 and <= {MAX_BENCH_BATCH}, got {bad[0]}")
    if args.threads is not None and not 1 <= args.threads <= 1024:
        raise CompressError(f"--threads: must be >= 1 and <= 1024, got {args.threads}")
    if not 1 <= args.runs <= 100_000:
        raise CompressError(f"--runs: must be >= 1 and <= 100000, got {args.runs}")
    props, ops, shape, input_type = onnx_info(path)
    _check_float_input(path, input_type)
    _check_bench_input(path, shape, args.batch)
    int8 = _is_int8(props, ops)
    threads = args.threads or f"default ({os.cpu_count()} cores)"
    print(f"{path.name}: {path.stat().st_size / 1024:.1f} KB, {'INT8' if int8 else 'FP32'}; "
          f"onnxruntime {ort.__version__}, CPU, threads {threads}, median of {args.runs} runs")
    print(f"CPU: {cpu_line()}")
    # the other files are checked before anything is timed: a bad one costs no measuring
    others, how = _twin_for(path, args.compare) if (int8 or args.compare) else ([], "")
    other_int8 = []
    for other in others:
        o_props, o_ops, o_shape, o_input = onnx_info(other)
        _check_float_input(other, o_input)
        _check_bench_input(other, o_shape, args.batch)
        other_int8.append(_is_int8(o_props, o_ops))
    # All files are timed in turns, so their ratios hold on a machine whose load changes.
    measured = bench_side_by_side([path, *others], args.batch, args.threads, args.runs)
    res = measured[0]
    print(f"  {'batch':>5}  {'median (ms)':>11}  {'p90 (ms)':>9}  {'images/s':>10}")
    for b, r in res.items():
        print(f"  {b:>5}  {r['median']:>11.3f}  {r['p90']:>9.3f}  {r['images_per_s']:>10.0f}")
    vnni = cpu_vnni()
    print("CPU VNNI: " + ("unknown (no /proc/cpuinfo)" if vnni is None else
                          f"yes ({', '.join(vnni)})" if vnni else
                          "no (onnxruntime's U8S8 kernels may saturate with full 8-bit weights)"))
    if int8:
        kernels = int8_kernels(path)
        integer = [k for k in kernels if k in INTEGER_KERNELS]
        floats = [k for k in kernels if k in FLOAT_HEAVY]
        if integer:
            print(f"integer kernels after graph optimisation: yes ({', '.join(integer)})"
                  + (f"; float {', '.join(floats)} remain" if floats else ""))
        else:
            print("integer kernels after graph optimisation: no — onnxruntime runs "
                  f"{', '.join(k for k in kernels if k in QDQ_OPS + FLOAT_HEAVY) or 'float ops'} instead")
    if len(others) > 1 or (others and args.compare):
        _print_side_by_side([path, *others], measured, args.batch)
    for twin, ref, twin_int8 in zip(others, measured[1:], other_int8):
        label = ("its FP32 twin" if int8 and len(others) == 1 and not twin_int8
                 else f"the {'INT8' if twin_int8 else 'FP32'} file")
        for b in args.batch:
            q, f = res[b]["median"], ref[b]["median"]
            if q < f:
                print(f"{path.name} is {f / q:.2f}× faster than {label} {twin.name} at batch {b} "
                      f"({q:.3f} ms vs {f:.3f} ms).")
            else:
                print(f"{path.name} is not faster than {label} {twin.name} at batch {b} "
                      f"({q:.3f} ms vs {f:.3f} ms).")
    if not others and int8:
        print(f"no FP32 twin compared: {how}")
    return 0


def _print_side_by_side(paths, measured, batches):
    """One table per batch size: each file's median and p90 and its median over the first's."""
    names = [str(p) if len({q.name for q in paths}) < len(paths) else p.name for p in paths]
    w = max(len(n) for n in names)
    print("side by side (timed in turns; ratio = median / the first file's median):")
    for b in batches:
        print(f"  batch {b}\n    {'file':<{w}}  {'median (ms)':>11}  {'p90 (ms)':>9}  {'images/s':>10}  {'ratio':>6}")
        first = measured[0][b]["median"]
        for n, r in zip(names, measured):
            r = r[b]
            print(f"    {n:<{w}}  {r['median']:>11.3f}  {r['p90']:>9.3f}  "
                  f"{r['images_per_s']:>10.0f}  {r['median'] / first:>5.2f}×")


# ---- compare ---------------------------------------------------------------------------------

def _report_path(p):
    p = Path(p)
    if p.is_dir():
        p = p / "report.json"
    if not p.is_file():
        raise CompressError(f"{p}: no such file (give a report.json or the exports/<recipe> folder holding one)")
    return p


def load_report(p):
    """A report.json as a dict, checked to look like one."""
    from .report import parse_report

    p = _report_path(p)
    try:
        report = json.loads(p.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise CompressError(f"{p}: not readable JSON ({str(e)[:120]})") from None
    return parse_report(report, p)


def run_labels(paths, reports):
    """One label per report: the recipe name, prefixed with the workdir's folder name where
    two reports share a recipe name (then numbered if that is still ambiguous)."""
    names = [r["recipe"] for r in reports]
    labels = []
    for p, name in zip(paths, names):
        if names.count(name) > 1:
            workdir = Path(p).resolve().parents[2].name if len(Path(p).resolve().parents) > 2 else ""
            labels.append(f"{workdir}/{name}" if workdir else name)
        else:
            labels.append(name)
    for lab in set(labels):
        if labels.count(lab) > 1:
            k = 0
            for i, x in enumerate(labels):
                if x == lab:
                    k += 1
                    labels[i] = f"{lab}#{k}"
    return labels


def compare_table(points):
    """Markdown rows of the comparison table with the Pareto flags, and the flags."""
    from .plots import pareto_front

    flags = {c: pareto_front(points, c) for c in ("kb", "b1", "b64")}
    lines = ["| run | model | format | size (KB) | top-1 (%) | latency b1 (ms) | latency b64 (ms) | "
             "Pareto-optimal on |", "|---|---|---|---:|---:|---:|---:|---|"]
    for i, p in enumerate(points):
        on = [n for c, n in (("kb", "size"), ("b1", "b1"), ("b64", "b64")) if flags[c][i]]
        lines.append(f"| {p['run']} | {p['model']} | {p['format']} | {p['kb']:.1f} | {p['top1']:.2f} | "
                     f"{p['b1']:.3f} | {p['b64']:.3f} | {', '.join(on) or '–'} |")
    return lines, flags


def compare_reports(report_paths, out_dir):
    """compare.md (one table) and compare.png (size and latency against top-1) across runs.

    >>> compare_reports(["a/exports/vgg_prune_kd", "b/exports/vgg_prune_kd"], ".")  # doctest: +SKIP
    """
    from .storage import atomic_write
    from .plots import export_points, plot_pareto

    paths = [_report_path(p) for p in report_paths]
    reports = [load_report(p) for p in paths]
    labels = run_labels(paths, reports)
    points = [pt for r, lab in zip(reports, labels) for pt in export_points(r, lab)]
    if not points:
        raise CompressError("compare: the reports list no exported files")
    out_dir = Path(out_dir)
    lines = ["# Runs compared", "",
             "Top-1 on each run's test set and latency by onnxruntime on the CPU, as stored in each "
             "report.json. Pareto-optimal: no other file is both at most as large (or fast) and at "
             "least as accurate.", "",
             "| run | report | recipe | test images | prune ratio |", "|---|---|---|---:|---|"]
    for p, r, lab in zip(paths, reports, labels):
        ratios = ", ".join(f"{s['prune_ratio']:g}" for s in r["stages"] if s.get("prune_ratio") is not None)
        lines.append(f"| {lab} | `{p}` | {r['recipe']} | {r.get('data', {}).get('test_images', '–')} | "
                     f"{ratios or '–'} |")
    table, _ = compare_table(points)
    lines += ["", "## Exported files", "", *table, "", "![size and latency against top-1](compare.png)", ""]
    md = "\n".join(lines)
    atomic_write(out_dir / "compare.md", lambda t: Path(t).write_text(md))
    png = plot_pareto(points, out_dir / "compare.png", f"{len(reports)} runs", label_all=False)
    return md, out_dir / "compare.md", png


def cmd_compare(args):
    md, md_path, png = compare_reports(args.reports, args.out)
    print(md, end="")
    print(f"\nwrote {md_path} and {png}")
    return 0


# ---- report ----------------------------------------------------------------------------------

def export_dirs(path):
    """The exports/<recipe> folders that `path` (a report.json, an exports/<recipe> folder,
    or a workdir holding exports/) points at."""
    p = Path(path)
    if p.is_file() and p.name == "report.json":
        return [p.parent]
    if (p / "report.json").is_file():
        return [p]
    found = sorted(d.parent for d in p.glob("exports/*/report.json")) if p.is_dir() else []
    if not found:
        raise CompressError(f"{path}: no report.json here, nor under {Path(path) / 'exports'}/*/ "
                            "(give a workdir, exports/<recipe> or a report.json)")
    return found


def rerender(export_dir):
    """Re-write report.md and the charts of one run from report.json and the stored stage
    results (``<workdir>/runs/<recipe>/stages/*/result.json``); nothing is trained or measured.
    Returns (written paths, the run folder it read)."""
    from .storage import atomic_write
    from .plots import render_run
    from .report import render_markdown

    export_dir = Path(export_dir)
    report = load_report(export_dir / "report.json")
    run_dir = export_dir.resolve().parent.parent / "runs" / report["recipe"]
    md = render_markdown(report)
    atomic_write(export_dir / "report.md", lambda t: Path(t).write_text(md))
    return [export_dir / "report.md", *render_run(report, run_dir, export_dir)], run_dir


def cmd_report(args):
    for d in export_dirs(args.run_dir):
        written, run_dir = rerender(d)
        if not (run_dir / "stages").is_dir():
            print(f"note: no stored stage results at {run_dir}; curves show no per-epoch history")
        print(f"{d}: re-rendered {', '.join(p.name for p in written)}")
    return 0


# ---- argparse --------------------------------------------------------------------------------

def add_subcommands(sub):
    """Register eval, bench, compare and report on the CLI's subparsers; each sets
    ``args.handler``."""
    dbg = argparse.ArgumentParser(add_help=False)
    dbg.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    e = sub.add_parser("eval", parents=[dbg], help="top-1, per-class accuracy and confusion matrix of an "
                       "ONNX file on a dataset's test split (onnxruntime)")
    e.add_argument("model", help="an ONNX file (float32 [0, 1] NCHW input, logits output)")
    e.add_argument("--data", help="dataset name (default: the file's 'dataset' metadata)")
    e.add_argument("--root", help="dataset folder (default: the dataset's own search)")
    e.add_argument("--test-subset", type=int, help="only the first N test images (as data.test_subset)")
    e.add_argument("--out", help="folder for <model>-confusion.png and <model>-eval.json "
                   "(default: the model's folder)")
    e.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (e.g. one registering a dataset)")
    e.set_defaults(handler=cmd_eval)

    b = sub.add_parser("bench", parents=[dbg], help="onnxruntime latency and throughput; INT8 kernel and "
                       "VNNI checks; comparison with the FP32 twin")
    b.add_argument("model", help="an ONNX file")
    b.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="batch sizes (default: 1 64)")
    b.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: onnxruntime's)")
    b.add_argument("--runs", type=int, default=50, help="timed runs per batch size (default: 50)")
    b.add_argument("--compare", nargs="+", metavar="OTHER.onnx", help="also time these files, in turns "
                   "with MODEL, and print each one's latency and ratio to MODEL (default for an INT8 "
                   "file: its FP32 twin from report.json next to it)")
    b.set_defaults(handler=cmd_bench)

    c = sub.add_parser("compare", parents=[dbg], help="one table and one chart across runs' report.json")
    c.add_argument("reports", nargs="+", metavar="REPORT.json", help="report.json files (or exports/<recipe>)")
    c.add_argument("--out", default=".", help="folder for compare.md and compare.png (default: .)")
    c.set_defaults(handler=cmd_compare)

    r = sub.add_parser("report", parents=[dbg], help="re-render report.md and the charts from stored "
                       "results, without training")
    r.add_argument("run_dir", metavar="RUN_DIR", help="a workdir, exports/<recipe> or a report.json")
    r.set_defaults(handler=cmd_report)
