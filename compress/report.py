"""report.json (machine-readable) and report.md (tables a person reads), written atomically."""

from pathlib import Path

from .checkpoint import write_json, atomic_write


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


def render_markdown(report):
    d = report["data"]
    stage_by = {s["name"]: s for s in report["stages"]}
    lines = [f"# {report['recipe']}: compression report", "",
             f"Data: {d['name']} ({d['num_classes']} classes, input {d['input_shape']}); "
             f"top-1 on the whole test set. Device: {report['environment']['device']}. "
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
                  "Top-1 and latency are measured on each file by onnxruntime. Ratios are against "
                  f"the teacher's FP32 file (`{ref['path']}`)." if ref else "", "",
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
    return "\n".join(lines) + "\n"


def _why_not_faster(report, export, batch, ms):
    """One clause saying why an INT8 file did not beat its FP32 twin, from what the run
    measured: the CPU's VNNI flags, the batch, the model's MACs."""
    vnni = report.get("environment", {}).get("vnni")
    macs = next((s.get("macs") for s in report["stages"] if s["name"] == export["model"]), None)
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
