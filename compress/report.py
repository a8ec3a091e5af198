"""report.json (machine-readable) and report.md (tables a person reads), written atomically.

The report's rows are typed (:class:`Report` and its row classes): `run` builds the report
through them and `compare`/`report` read a report.json through them, so a damaged or
foreign file is one error naming the field, never a traceback deep in a table.
"""

from pathlib import Path
from typing import Optional

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from .errors import CompressError
from .storage import SafeName, atomic_write, write_json


class Row(BaseModel):
    """Typed fields are checked (no coercion); fields added by newer versions are kept."""

    model_config = ConfigDict(extra="allow", strict=True)


Count = Optional[int]
Number = Optional[float]


class MemberRow(Row):
    name: str
    top1: Number = None
    params: Count = None


class StageRow(Row):
    name: str
    kind: str
    top1: Number = None
    params: Count = None
    macs: Count = None
    seconds: float = Field(ge=0)
    reused: bool = False
    params_before: Count = None
    macs_before: Count = None
    prune_ratio: Number = None
    members: list[MemberRow] = []


class Latency(Row):
    b1: float = Field(gt=0)
    b64: float = Field(gt=0)


class ExportRow(Row):
    model: str
    format: str
    path: str
    bytes: int = Field(gt=0)
    top1: Number = None
    latency_ms: Latency
    check: dict = {}


class DataRow(Row):
    name: str
    num_classes: int
    input_shape: list[int]
    train_images: int = 0
    test_images: int = 0


class ComparisonRow(Row):
    method: str
    top1: Number = None
    delta: Number = None
    params: Count = None
    seconds_per_epoch: Number = None
    loss: list[str] = []


class Comparison(Row):
    baseline: str
    rows: list[ComparisonRow]


class Environment(Row):
    device: str
    threads: int
    precision: str = "fp32"   # "bf16" when training and evaluation ran under bf16 autocast
    cpu: Optional[str] = None   # lscpu's model name (older reports: the platform's machine name)
    isa: Optional[list[str]] = None   # its kernel flags (commands.KERNEL_FLAGS); None: unknown


class Report(Row):
    recipe: SafeName
    data: DataRow
    stages: list[StageRow]
    exports: list[ExportRow]
    total_seconds: float
    wall_seconds: float
    reference: Optional[str] = None
    comparison: Optional[Comparison] = None
    lineage: dict[str, Optional[str]] = {}
    environment: Environment


def parse_report(data, where):
    """`data` (a report.json's content) checked against :class:`Report`; returns it as a dict.
    Any problem is one CompressError naming the field."""
    if not isinstance(data, dict) or not {"recipe", "stages", "exports"} <= set(data):
        raise CompressError(f"{where}: not a compress report.json (needs recipe, stages, exports)")
    try:
        return Report.model_validate(data).model_dump(mode="json")
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"]).lstrip(".")
        got = repr(err.get("input"))
        got = got if len(got) <= 60 else got[:57] + "..."
        msg = "required field is missing" if err["type"] == "missing" else f"{err['msg'][0].lower()}{err['msg'][1:]}, got {got}"
        raise CompressError(f"{where}: {loc}: {msg}; not a report.json this version can read") from None


def _count(n):
    if n is None:
        return "–"
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def _size(b):
    return f"{b / 1024:.1f} KB" if b < 1024 * 1024 else f"{b / 1024 / 1024:.2f} MB"


def _pct(v):
    return "–" if v is None else f"{v:.2f}"


def reference_export(report):
    """The teacher's FP32 export (the baseline every ratio is taken against), if any."""
    ref = report.get("reference")
    exps = report["exports"]
    return next((e for e in exps if e["model"] == ref and e["format"] == "onnx-fp32"),
                next((e for e in exps if e["format"] == "onnx-fp32"), None))


def fp32_twin(report, exp):
    """The FP32 export of the model an INT8 export was quantized from (following `from`)."""
    lineage = report.get("lineage", {})
    fp32 = {e["model"]: e for e in report["exports"] if e["format"] == "onnx-fp32"}
    name, seen = exp["model"], set()
    while name and name not in seen:
        if name in fp32:
            return fp32[name]
        seen.add(name)
        name = lineage.get(name)
    return None


def _cpu(env):
    """``MODEL (flag flag ...)`` from a report's environment (the flags where it recorded them)."""
    isa = env.get("isa")
    return f"{env['cpu']} ({' '.join(isa)})" if isa else str(env["cpu"])


def render_markdown(report):
    d = report["data"]
    stage_by = {s["name"]: s for s in report["stages"]}
    lines = [f"# {report['recipe']}: compression report", "",
             f"Data: {d['name']} ({d['num_classes']} classes, input {d['input_shape']}); "
             f"top-1 on the whole test set. Device: {report['environment']['device']} "
             f"({report['environment'].get('precision', 'fp32')}). "
             f"Stage compute {report['total_seconds']:.1f} s; this invocation {report['wall_seconds']:.1f} s.",
             "", "## Stages", "",
             "| stage | kind | top-1 (%) | params | MACs | seconds |",
             "|---|---|---:|---:|---:|---:|"]
    for s in report["stages"]:
        secs = f"{s['seconds']:.1f}" + (" (reused)" if s.get("reused") else "")
        lines.append(f"| {s['name']} | {s['kind']} | {_pct(s['top1'])} | {_count(s['params'])} | "
                     f"{_count(s['macs'])} | {secs} |")
        for m in s.get("members", []):
            lines.append(f"| ↳ {m['name']} | member | {_pct(m['top1'])} | {_count(m['params'])} | | |")
    comp = report.get("comparison")
    if comp:
        lines += ["", f"## Methods compared (baseline: {comp['baseline']})", "",
                  "Every row trains the same student architecture from the same initialisation with "
                  "the same budget; top-1 on the whole test set.", "",
                  "| method | top-1 (%) | Δ vs baseline (pt) | params | seconds / epoch | loss terms |",
                  "|---|---:|---:|---:|---:|---|"]
        for r in comp["rows"]:
            spe = "–" if r["seconds_per_epoch"] is None else f"{r['seconds_per_epoch']:.1f}"
            lines.append(f"| {r['method']} | {_pct(r['top1'])} | {r['delta']:+.2f} | {_count(r['params'])} | "
                         f"{spe} | {', '.join(r['loss'])} |")
    exps = report["exports"]
    if exps:
        ref = reference_export(report)
        ref_params = stage_by.get(ref["model"], {}).get("params") if ref else None
        lines += ["", f"## Exported models (onnxruntime, CPU, {report['environment']['threads']} threads)", "",
                  "Top-1 and latency are measured on each file by onnxruntime"
                  + (f" on {_cpu(report['environment'])}" if report["environment"].get("cpu") else "") + "."
                  + (f" Ratios are against the teacher's FP32 file (`{ref['path']}`)." if ref else ""), "",
                  "| model | format | file | size | top-1 (%) | latency b1 (ms) | latency b64 (ms) | "
                  "params vs teacher | size vs teacher | speed-up b1 | speed-up b64 |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for e in exps:
            p = stage_by.get(e["model"], {}).get("params")
            pr = f"{100 * p / ref_params:.1f}%" if (p and ref_params) else "–"
            sr = f"{100 * e['bytes'] / ref['bytes']:.1f}%" if ref else "–"
            s1 = f"{ref['latency_ms']['b1'] / e['latency_ms']['b1']:.2f}×" if ref else "–"
            s64 = f"{ref['latency_ms']['b64'] / e['latency_ms']['b64']:.2f}×" if ref else "–"
            lines.append(f"| {e['model']} | {e['format']} | `{e['path']}` | {_size(e['bytes'])} | "
                         f"{_pct(e['top1'])} | {e['latency_ms']['b1']:.3f} | {e['latency_ms']['b64']:.3f} | "
                         f"{pr} | {sr} | {s1} | {s64} |")
        lines += ["", "## INT8 against FP32", ""]
        said = False
        for e in exps:
            if e["format"] != "onnx-int8":
                continue
            twin = fp32_twin(report, e)
            if twin is None:
                continue
            said = True
            for b in ("b1", "b64"):
                q, f = e["latency_ms"][b], twin["latency_ms"][b]
                if q < f:
                    lines.append(f"- `{e['path']}` is {f / q:.2f}× faster than its FP32 twin `{twin['path']}` at "
                                 f"batch {b[1:]} ({q:.3f} ms vs {f:.3f} ms).")
                else:
                    lines.append(f"- `{e['path']}` is **not faster** than its FP32 twin `{twin['path']}` at "
                                 f"batch {b[1:]}: {q:.3f} ms vs {f:.3f} ms ({q / f:.2f}× the latency, "
                                 f"{q - f:+.3f} ms), {_why_not_faster(report, e, b, q)}.")
            lines.append(f"- Size: {_size(e['bytes'])} vs {_size(twin['bytes'])} "
                         f"({twin['bytes'] / e['bytes']:.1f}× smaller); top-1 {_pct(e['top1'])}% vs "
                         f"{_pct(twin['top1'])}%.")
        if not said:
            lines.append("- No INT8 file has an FP32 twin in this run.")
        lines += ["", "## Checks", ""]
        for e in exps:
            c = e.get("check", {})
            if "max_abs_diff" in c:
                lines.append(f"- `{e['path']}`: max |logit difference| vs PyTorch {c['max_abs_diff']:.2e}.")
            if "top1_agreement" in c:
                ptq = " (post-training quantization)" if c.get("post_training") else ""
                lines.append(f"- `{e['path']}`: top-1 agreement with the fake-quant model "
                             f"{100 * c['top1_agreement']:.2f}%{ptq}.")
            if c.get("float_convs"):
                names = c["float_convs"]
                lines.append(f"- `{e['path']}`: {len(names)} leading convolution(s) kept float "
                             f"(`float_convs: auto`, slower as INT8 here): "
                             + ", ".join(f"`{n}`" for n in names[:8]) + (", ..." if len(names) > 8 else "") + ".")
    return "\n".join(lines) + "\n"


def _why_not_faster(report, export, batch, ms):
    """One clause saying why an INT8 file did not beat its FP32 twin, from what the run
    measured: the CPU's VNNI flags, the batch, the model's MACs."""
    vnni = report.get("environment", {}).get("vnni")
    macs = next((s.get("macs") for s in report["stages"] if s["name"] == export["model"]), None)
    slow = export.get("check", {}).get("slow_int8_convs")
    islands = export.get("check", {}).get("float_ops")
    if islands:
        ops = " and ".join(f"{n} {op}" for op, n in islands.items())
        return (f"because onnxruntime has no integer kernel for {ops} in it: each runs in float between a "
                "DequantizeLinear and a QuantizeLinear, which cost more than the integer convolutions save"
                + (f" (and {slow} of its integer convolutions have shapes it runs slower as INT8)" if slow else ""))
    if slow:
        ops = export.get("check", {}).get("ort_int8_ops", {})
        of = f" of its {ops['QLinearConv']}" if ops.get("QLinearConv") else ""
        return (f"because {slow}{of} integer convolutions have shapes onnxruntime runs slower as INT8 than "
                "as FP32 (compress.ort_runtime.integer_conv_slow, measured by benchmarks/int8_convs.py): a qat "
                "stage's `float_convs: auto` keeps such convolutions float where they lead from the input")
    if vnni == []:
        return ("because this CPU has no VNNI: onnxruntime's integer convolutions then multiply in "
                "16-bit steps and gain little over FP32, while quantizing, dequantizing and layout "
                "changes still cost")
    if batch == "b1":
        return (f"because a call this short ({ms:.3f} ms) is dominated by fixed costs (quantizing the "
                "input, layout changes, dequantizing the logits) that the integer arithmetic does not repay")
    size = f"only {macs / 1e6:.1f}M multiply-adds per image" if macs else "little arithmetic"
    return (f"because the model has {size}: quantizing, dequantizing and layout changes cost about "
            "what the integer kernels save")


def write_report(report, export_dir):
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    write_json(export_dir / "report.json", report)
    md = render_markdown(report)
    atomic_write(export_dir / "report.md", lambda p: Path(p).write_text(md))
