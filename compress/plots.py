"""PNG charts of a run, drawn from stored results only (report.json and each stage's
result.json), so ``compress report`` redraws them without training.

- ``curves.png``: every stage's per-epoch test/train top-1, loss terms and learning rate on
  one timeline of training epochs, stage boundaries marked.
- ``pareto.png``: the exported files, top-1 against file size and against latency.
- ``methods.png``: top-1 per method with the baseline marked (runs with a ``comparison``).

Matplotlib's object API with the Agg canvas (no pyplot, no display, no global state).
"""

import json
import math
from pathlib import Path

from .storage import atomic_write

FORMAT_MARKERS = {"onnx-fp32": "o", "onnx-int8": "s"}
# cost keys of an export point, with axis labels
COSTS = {"kb": "file size (KB)", "b1": "latency, batch 1 (ms)", "b64": "latency, batch 64 (ms)"}


def _figure(w, h):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def _save(fig, path):
    path = Path(path)
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    return path


# ---- stored results ------------------------------------------------------------------------

def load_stages(report, run_dir):
    """[{name, kind, top1, history}] in recipe order: the report's stage rows joined with
    each stage's stored per-epoch history (``runs/<recipe>/stages/<name>/result.json``;
    empty where it is missing)."""
    out = []
    for s in report["stages"]:
        history = []
        p = Path(run_dir) / "stages" / s["name"] / "result.json"
        if p.is_file():
            try:
                history = json.loads(p.read_text()).get("info", {}).get("history") or []
            except (OSError, ValueError, AttributeError):
                history = []
            if not (isinstance(history, list) and all(isinstance(h, dict) for h in history)):
                history = []   # not what this version wrote: drawn without a curve
        out.append({"name": s["name"], "kind": s["kind"], "top1": s.get("top1"), "history": history})
    return out


def export_points(report, run=None):
    """One point per exported file: {run, model, format, path, kb, top1, b1, b64}."""
    run = run or report["recipe"]
    return [{"run": run, "model": e["model"], "format": e["format"], "path": e["path"],
             "kb": e["bytes"] / 1024, "top1": e["top1"], "b1": e["latency_ms"]["b1"],
             "b64": e["latency_ms"]["b64"]} for e in report["exports"]]


def pareto_front(points, cost, gain="top1"):
    """Per point, whether it is Pareto-optimal: no other point has a cost <= its cost and
    a gain >= its gain with at least one strictly better. Equal points are both optimal.

    >>> pareto_front([{"kb": 1, "top1": 90}, {"kb": 2, "top1": 89}, {"kb": 3, "top1": 95}], "kb")
    [True, False, True]
    """
    flags = []
    for p in points:
        dominated = any(q[cost] <= p[cost] and q[gain] >= p[gain] and (q[cost] < p[cost] or q[gain] > p[gain])
                        for q in points)
        flags.append(not dominated)
    return flags


# ---- learning curves -----------------------------------------------------------------------

def timeline(stages):
    """Lay the stages on one axis of training epochs: [(stage, start, end)]; a stage without
    epochs (prune, export) has start == end."""
    out, x = [], 0
    for s in stages:
        n = len(s["history"])
        out.append((s, x, x + n))
        x += n
    return out


def plot_curves(stages, path, title=""):
    """Learning curves of every stage on one timeline of epochs, boundaries marked.

    >>> plot_curves(load_stages(report, "runs/vgg_prune_kd"), "curves.png")  # doctest: +SKIP
    """
    from matplotlib.lines import Line2D

    import matplotlib

    spans = timeline(stages)
    end = spans[-1][2] if spans else 1
    fig = _figure(min(22.0, max(11.0, 8 + 0.16 * end)), 8.5)
    ax_acc, ax_loss, ax_lr = fig.subplots(3, 1, sharex=True, height_ratios=[1.4, 1, 0.8])
    terms = sorted({k for s in stages for h in s["history"] for k in h if k.startswith("loss/")})
    palette = matplotlib.colormaps["tab10" if len(terms) <= 7 else "tab20"].colors
    skip = {0, 1, 6, 7} if len(terms) <= 6 else set()   # C0/C1 are top-1, C7 the learning rate
    palette = [c for i, c in enumerate(palette) if i not in skip]
    colors = {t: palette[i % len(palette)] for i, t in enumerate(terms)}
    n_trained = sum(b > a for _, a, b in spans)
    crowded = n_trained > 5 or any(b - a < 0.06 * end for _, a, b in spans if b > a)
    total = any(sum(k.startswith("loss/") for k in h) > 1 for s in stages for h in s["history"])
    trained = [(s, a, b) for s, a, b in spans if b > a]
    shade, points = 0, []
    for s, a, b in spans:
        h = s["history"]
        if b > a:
            xs = [a + i + 1 for i in range(len(h))]
            if shade % 2 == 0:
                for ax in (ax_acc, ax_loss, ax_lr):
                    ax.axvspan(a, b, color="0.93", zorder=0, lw=0)
            shade += 1
            test = [(x, e["test_top1"]) for x, e in zip(xs, h) if "test_top1" in e]
            train = [(x, e["train_top1"]) for x, e in zip(xs, h) if "train_top1" in e]
            if test:
                ax_acc.plot(*zip(*test), "-o", color="C0", ms=3.5, lw=1.6)
            if train:
                ax_acc.plot(*zip(*train), "--", color="C1", lw=1.2)
            for t in terms:
                pts = [(x, e[t]) for x, e in zip(xs, h) if t in e]
                if pts:
                    ax_loss.plot(*zip(*pts), "-o", color=colors[t], ms=3, lw=1.4)
            pts = [(x, e["loss"]) for x, e in zip(xs, h) if "loss" in e]
            if pts and any(sum(k.startswith("loss/") for k in e) > 1 for e in h):   # several terms
                ax_loss.plot(*zip(*pts), "-", color="k", lw=0.9, alpha=0.6)
            lrs = [(x, e["lr"]) for x, e in zip(xs, h) if e.get("lr", 0) > 0]
            if lrs:
                ax_lr.plot(*zip(*lrs), "-o", color="C7", ms=3, lw=1.4)
            if s["top1"] is not None and not test:   # older results: only the final top-1
                ax_acc.plot([b], [s["top1"]], "o", color="C0", ms=5)
        elif s["top1"] is not None:                   # a stage without epochs, e.g. prune
            points.append((s["name"], a, s["top1"]))
        else:
            continue
        for ax in (ax_acc, ax_loss, ax_lr):
            for x in {a, b}:
                ax.axvline(x, color="0.45", lw=0.8, ls=":", zorder=1)
        if b > a:   # many stages: names only, slanted, so neighbours do not overprint
            ax_acc.text((a + b) / 2 if not crowded else a + 0.2, 1.01,
                        s["name"] if crowded else f"{s['name']} ({s['kind']})",
                        transform=ax_acc.get_xaxis_transform(), ha="center" if not crowded else "left",
                        va="bottom", fontsize=8 if crowded else 9, weight="bold", rotation=35 if crowded else 0,
                        rotation_mode="anchor")
    # Stages without epochs (prune) as markers; one far below the curves sits on the lower
    # edge with its value written, so it does not squash the curves into a thin band.
    curve = [v for s in stages for e in s["history"] for k, v in e.items() if k in ("test_top1", "train_top1")]
    curve += [s["top1"] for s, a, b in spans if b > a and s["top1"] is not None]
    floor = min(curve) - 4 if curve else None
    for name, x, top1 in points:
        off = floor is not None and top1 < floor
        y = floor if off else top1
        ax_acc.plot([x], [y], "v", color="C3", ms=8, zorder=5, clip_on=False)
        ax_acc.annotate(f"{name}: {top1:.2f}%" + (" (below the axis)" if off else ""), (x, y),
                        xytext=(6, 3), textcoords="offset points", color="C3", fontsize=8, va="bottom")
    if floor is not None and any(t < floor for _, _, t in points):
        ax_acc.set_ylim(bottom=floor)
    ax_acc.set_ylabel("top-1 (%)")
    ax_loss.set_ylabel("loss (weighted, per term)")
    ax_lr.set_ylabel("learning rate")
    if any(len(ln.get_ydata()) for ln in ax_lr.get_lines()):   # a list when no curve was drawn
        ax_lr.set_yscale("log")
    ax_lr.set_xlabel("training epochs (cumulative across stages; shaded/dotted: stage boundaries)")
    ax_lr.set_xlim(0, max(end, 1) + 0.3)
    ax_lr.xaxis.get_major_locator().set_params(integer=True)
    acc_handles = [Line2D([], [], color="C0", marker="o", ms=3.5, label="test top-1 (after each epoch)"),
                   Line2D([], [], color="C1", ls="--", label="train top-1 (running, during epoch)")]
    if any(b == a and s["top1"] is not None for s, a, b in spans):
        acc_handles.append(Line2D([], [], color="C3", marker="v", ls="", label="stage without epochs (e.g. prune)"))
    ax_acc.legend(handles=acc_handles, loc="lower right", fontsize=8)
    loss_handles = [Line2D([], [], color=colors[t], marker="o", ms=3, label=t) for t in terms]
    if total:
        loss_handles.append(Line2D([], [], color="k", alpha=0.6, label="loss (sum)"))
    if loss_handles:   # many terms: the legend goes beside the axes, not over the curves
        outside = dict(loc="upper left", bbox_to_anchor=(1.005, 1.0)) if len(loss_handles) > 4 else {}
        ax_loss.legend(handles=loss_handles, fontsize=8, **({"loc": "upper right"} | outside))
    for ax in (ax_acc, ax_loss, ax_lr):
        ax.grid(True, alpha=0.3)
    if not trained:
        ax_acc.text(0.5, 0.5, "no per-epoch history stored", transform=ax_acc.transAxes, ha="center")
    fig.suptitle(f"{title}: learning curves" if title else "learning curves", fontsize=12)
    return _save(fig, path)


# ---- trade-offs ----------------------------------------------------------------------------

def plot_pareto(points, path, title="", label_all=True):
    """top-1 against file size, batch-1 and batch-64 latency; Pareto-optimal points ringed,
    joined by the frontier and labelled by run and model (every point when `label_all`).

    >>> plot_pareto(export_points(report), "pareto.png", "vgg_prune_kd")  # doctest: +SKIP
    """
    from matplotlib.lines import Line2D

    fig = _figure(15, 5)
    axes = fig.subplots(1, len(COSTS))
    runs = list(dict.fromkeys(p["run"] for p in points))
    rcolor = {r: f"C{i % 10}" for i, r in enumerate(runs)}
    multi = len(runs) > 1
    for ax, (cost, xlabel) in zip(axes, COSTS.items()):
        flags = pareto_front(points, cost)
        front = sorted((p for p, f in zip(points, flags) if f), key=lambda p: (p[cost], p["top1"]))
        if len(front) > 1:
            xs, ys = [front[0][cost]], [front[0]["top1"]]
            for p in front[1:]:
                xs += [p[cost], p[cost]]
                ys += [ys[-1], p["top1"]]
            ax.plot(xs, ys, "-", color="0.35", lw=1, zorder=1)
        rank = {id(p): i for i, p in enumerate(sorted(points, key=lambda p: p[cost]))}
        for p, f in zip(points, flags):
            ax.scatter(p[cost], p["top1"], marker=FORMAT_MARKERS.get(p["format"], "D"), s=60,
                       color=rcolor[p["run"]], alpha=1.0 if f else 0.45, zorder=3,
                       edgecolors="k" if f else "none", linewidths=1.4)
            if f or label_all:
                name = f"{p['model']} ({p['format'].removeprefix('onnx-')})"
                below = rank[id(p)] % 2   # alternate above/below along x: neighbours do not collide
                ax.annotate(f"{p['run']}: {name}" if multi else name, (p[cost], p["top1"]),
                            xytext=(6, -11 if below else 5), textcoords="offset points", fontsize=7.5,
                            weight="bold" if f else "normal")
        vals = [p[cost] for p in points if p[cost] > 0]
        if vals and max(vals) / min(vals) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel + (" (log scale)" if ax.get_xscale() == "log" else ""))
        ax.set_ylabel("top-1 on the test set (%)")
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.25, y=0.15)
    handles = [Line2D([], [], marker=m, ls="", color="0.3", label=f) for f, m in FORMAT_MARKERS.items()
               if any(p["format"] == f for p in points)]
    handles.append(Line2D([], [], marker="o", ls="-", color="0.35", mfc="w", mec="k", mew=1.4,
                          label="Pareto-optimal (frontier)"))
    if multi:
        handles += [Line2D([], [], marker="o", ls="", color=rcolor[r], label=r) for r in runs]
    axes[-1].legend(handles=handles, loc="best", fontsize=8)
    head = f"{title}: " if title else ""
    fig.suptitle(f"{head}top-1 vs cost of each exported ONNX file (onnxruntime, CPU) — "
                 "up and to the left is better", fontsize=12)
    return _save(fig, path)


def plot_method_bars(rows, baseline, path, baseline_top1=None, title=""):
    """Top-1 per method as bars, the baseline's bar hatched and its top-1 a dashed line.
    `rows` is [(method, top1)]; `baseline` a method name (its top-1 from `rows`, else
    `baseline_top1`).

    >>> plot_method_bars([("ce", 90.1), ("kd", 91.3)], "ce", "methods.png")  # doctest: +SKIP
    """
    rows = [(str(m), float(t)) for m, t in rows]
    if baseline_top1 is None:
        baseline_top1 = next((t for m, t in rows if m == baseline), None)
    fig = _figure(max(6.0, 1.1 * len(rows) + 2.5), 4.8)
    ax = fig.subplots()
    xs = range(len(rows))
    tops = [t for _, t in rows] + ([baseline_top1] if baseline_top1 is not None else [])
    lo = max(0.0, math.floor(min(tops) - 3)) if tops else 0.0
    hi = min(100.0, max(tops) + 2) if tops else 100.0
    for x, (m, t) in zip(xs, rows):
        is_base = m == baseline
        ax.bar(x, t - lo, bottom=lo, color="0.7" if is_base else "C0", hatch="//" if is_base else None,
               edgecolor="k", width=0.65)
        delta = "" if baseline_top1 is None or is_base else f"\n{t - baseline_top1:+.2f}"
        ax.text(x, t + 0.1, f"{t:.2f}{delta}", ha="center", va="bottom", fontsize=8)
    if baseline_top1 is not None:
        ax.axhline(baseline_top1, color="C3", ls="--", lw=1.2, label=f"baseline {baseline}: {baseline_top1:.2f}%")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xticks(list(xs), [m for m, _ in rows], rotation=20 if len(rows) > 5 else 0, ha="right" if len(rows) > 5 else "center")
    ax.set_ylim(lo, hi + 0.5)
    ax.set_xlabel("method (stage)")
    ax.set_ylabel(f"top-1 on the test set (%; axis from {lo:g})")
    ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"{title}: top-1 by method" if title else "top-1 by method", fontsize=12)
    return _save(fig, path)


def comparison_rows(report):
    """([(method, top1)], baseline name, baseline top-1) from a report's ``comparison`` —
    {"baseline": name, "rows": [{"method", "top1", ...}]}, or a list of rows with the
    baseline named in ``report["baseline"]`` — or None when the report has none."""
    comp = report.get("comparison")
    if not comp:
        return None
    rows = comp.get("rows", []) if isinstance(comp, dict) else comp
    baseline = comp.get("baseline") if isinstance(comp, dict) else report.get("baseline")
    pairs = [(r["method"], r["top1"]) for r in rows if r.get("top1") is not None]
    base_top1 = next((t for m, t in pairs if m == baseline), None)
    if base_top1 is None:
        base_top1 = next((s["top1"] for s in report.get("stages", []) if s["name"] == baseline), None)
    return pairs, baseline, base_top1


def plot_confusion(matrix, class_names, path, title=""):
    """Confusion matrix: rows true class, columns predicted; colour = share of the true
    class (%), each cell's image count written in it."""
    import numpy as np

    cm = np.asarray(matrix)
    n = len(cm)
    rows = cm.sum(1, keepdims=True)
    share = 100.0 * cm / np.maximum(rows, 1)
    size = max(6.0, 0.55 * n + 3)
    fig = _figure(size + 1.2, size)
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=100)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7,
                            color="w" if share[i, j] > 55 else "k")
    ticks = list(range(n))
    names = [str(c) for c in class_names] if len(class_names) == n else [str(i) for i in ticks]
    if n <= 40:
        ax.set_xticks(ticks, names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(ticks, names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(im, ax=ax, label="share of the true class (%); numbers: images", shrink=0.8)
    ax.set_title(title or "confusion matrix", fontsize=11)
    return _save(fig, path)


def render_run(report, run_dir, export_dir):
    """Draw every chart of one run into `export_dir` from stored results; returns the paths.

    >>> render_run(report, "runs/vgg_prune_kd", "exports/vgg_prune_kd")  # doctest: +SKIP
    """
    export_dir = Path(export_dir)
    name = report["recipe"]
    paths = [plot_curves(load_stages(report, run_dir), export_dir / "curves.png", name)]
    if report.get("exports"):
        paths.append(plot_pareto(export_points(report), export_dir / "pareto.png", name))
    comp = comparison_rows(report)
    if comp and comp[0]:
        rows, baseline, base_top1 = comp
        paths.append(plot_method_bars(rows, baseline, export_dir / "methods.png", base_top1, name))
    return paths
