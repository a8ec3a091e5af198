"""``compress sweep RECIPE --param PATH=V1,V2 ...``: the recipe once per configuration, as
Ray Tune trials, to a Pareto front of top-1 against INT8 file size and latency.

Layout under the workdir (``<sweep>`` = ``<recipe>-sweep``)::

    runs/<sweep>/shared/          a workdir running, once, the stages no --param changes
    runs/<sweep>/trials/<trial>/  one workdir per configuration, seeded with the shared
                                  stage results (hard links; verified by hash on reuse)
    runs/<sweep>/ray/             Ray Tune's own experiment files
    exports/<sweep>/              sweep.json, sweep.md, pareto.png

The stage cache does the rest: a trial reuses every stage whose content key is unchanged,
so the teacher is trained once, and an interrupted sweep re-run finishes only what is missing.
"""

import fcntl
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

from .config import parse_value, path_keys
from .errors import CompressError
from .storage import Storage
from .yamlio import load_yaml

INSTALL = "compress sweep needs Ray Tune: pip install -e '.[sweep]' (or pip install 'ray[tune]')"


def parse_params(texts):
    """[(path, [values])] from ``PATH=V1,V2,...`` (each value parsed as YAML: 0.6 is a float)."""
    out, seen = [], []   # seen: each path's keys (loss.0.T and loss[0].T are one field)
    for t in texts:
        path, sep, vals = t.partition("=")
        path = path.strip()
        if not sep or not path or not vals.strip():
            raise CompressError(f"--param {t}: expected PATH=V1,V2,..., e.g. stages.prune.ratio=0.6,0.7")
        keys = path_keys(path, f"--param {t}")
        if keys in seen:
            raise CompressError(f"--param {path}: given twice; list all its values in one --param")
        seen.append(keys)
        values = []
        for v in vals.split(","):
            parsed = parse_value(v, f"--param {path}")   # YAML 1.2, as a recipe and --set
            if parsed not in values:
                values.append(parsed)
        out.append((path, values))
    if not out:
        raise CompressError("sweep: give at least one --param PATH=V1,V2,...")
    return out


def configurations(params, search, samples, seed):
    """The configurations to run, each [(path, value)]: every combination (grid), or
    `samples` distinct combinations drawn with the recipe's seed (random), so a re-run of
    the same command draws the same ones and resumes them."""
    grid = [list(zip([p for p, _ in params], combo)) for combo in itertools.product(*(v for _, v in params))]
    if search == "random":
        return random.Random(seed).sample(grid, min(samples, len(grid)))
    return grid


def assignments(config):
    return [f"{p}={json.dumps(v)}" for p, v in config]


def trial_name(config):
    """A safe folder name from the overrides (``prune.ratio-0.6_distill.loss.0.T-2``)."""
    text = "_".join(f"{p.removeprefix('stages.')}-{v}" for p, v in config)
    text = re.sub(r"[^A-Za-z0-9_.-]", "_", text).lstrip("._") or "trial"
    if len(text) > 80:
        text = text[:60] + "-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    return text


def label(config):
    """Short label of a configuration for tables and charts: the last path element of each
    parameter (the full path where two would read the same)."""
    last = [p.rsplit(".", 1)[-1] for p, _ in config]
    names = [lp if last.count(lp) == 1 else p.removeprefix("stages.") for lp, (p, _) in zip(last, config)]
    return " ".join(f"{n}={v}" for n, (_, v) in zip(names, config))


def load_raw(path, overrides, keep=None):
    """The recipe of `path` with `overrides`, parsed; with `keep`, only those stages."""
    from .config import apply_override, load_recipe, parse_recipe

    recipe = load_recipe(path, overrides)          # every error names its field
    if keep is None:
        return recipe
    raw = load_yaml(Path(path).read_text(encoding="utf-8"), str(path))
    for o in overrides:
        apply_override(raw, o)
    raw["stages"] = [s for s in raw["stages"] if s.get("name") in keep]
    raw.pop("compare", None)
    return parse_recipe(raw)


def stage_keys(recipe):
    keys = {}
    for i, s in enumerate(recipe.stages):
        keys[s.name] = recipe.stage_key(i, {ref: keys[ref] for _, ref in s.stage_refs()})
    return keys


def shared_stages(recipes):
    """Names of the stages whose content key is the same in every configuration (closed
    under inputs, since a key includes its inputs' keys)."""
    keys = [stage_keys(r) for r in recipes]
    return [n for n in keys[0] if all(k.get(n) == keys[0][n] for k in keys)]


def _link_tree(src_workdir, dst_workdir, recipe_name, stages):
    """Give a trial workdir the stored results of `stages` (result.json and every file it
    lists) as hard links, or copies across file systems. Writers replace files by rename,
    so a trial that recomputes a stage never changes the shared copy."""
    for s in stages:
        src = Path(src_workdir) / "runs" / recipe_name / "stages" / s
        meta_path = src / "result.json"
        if not meta_path.is_file():
            continue
        meta = json.loads(meta_path.read_text())
        dst = Path(dst_workdir) / "runs" / recipe_name / "stages" / s
        old = dst / "result.json"
        if old.is_file() and json.loads(old.read_text()).get("key") == meta.get("key"):
            continue
        for rel in [*meta.get("hashes", {}), os.path.relpath(meta_path, src_workdir)]:
            b = Path(dst_workdir) / rel
            b.parent.mkdir(parents=True, exist_ok=True)
            b.unlink(missing_ok=True)
            _link(Path(src_workdir) / rel, b)


def _link(a, b):
    """Hard-link file `a` as `b`, or copy it across file systems."""
    try:
        os.link(a, b)
    except FileExistsError:   # another trial linked it first: the same content
        pass
    except OSError:
        shutil.copy2(a, b)


def _point(report, workdir):
    """The INT8 export (the last one) of a trial's report as a Pareto point, else the last export."""
    exports = report.get("exports") or []
    if not exports:
        return None
    int8 = [e for e in exports if e["format"] == "onnx-int8"]
    e = (int8 or exports)[-1]
    return {"model": e["model"], "format": e["format"], "top1": e["top1"], "kb": round(e["bytes"] / 1024, 2),
            "path": str(Path(workdir) / "exports" / report["recipe"] / e["path"]),
            "trial_latency_ms": e["latency_ms"]}


# ---- one trial (runs in a Ray worker) -------------------------------------------------------

def run_one(spec, config):
    """Run the recipe with one configuration in its own workdir; returns the report."""
    from .pipeline import run_recipe
    from .plugins import load_plugins

    import torch

    load_plugins(spec["plugins"])
    torch.set_num_threads(max(1, int(spec["threads"])))
    overrides = spec["overrides"] + assignments(config)
    workdir = Path(spec["trials"]) / trial_name(config)
    workdir.mkdir(parents=True, exist_ok=True)
    recipe = load_raw(spec["recipe"], overrides)
    # one run per configuration folder at a time (a search may propose a configuration twice)
    with open(workdir / ".sweep.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if spec["shared"]:
            _link_tree(spec["shared_dir"], workdir, recipe.name, spec["shared"])
        (workdir / "overrides.json").write_text(json.dumps(dict(config), indent=1) + "\n")
        shared_cache = Path(spec["shared_dir"]) / "runs" / recipe.name / "cache"
        cache = workdir / "runs" / recipe.name / "cache"
        _link_files(shared_cache, cache)    # teacher logits an earlier trial computed
        report = run_recipe(recipe, workdir=workdir, device=spec["device"])
        _link_files(cache, shared_cache)    # ... and those this one computed, for the next
    return report


def _link_files(src, dst):
    """Hard-link (or copy) the files of folder `src` that `dst` lacks into `dst`. Writers
    replace files by rename, so no run changes a file another run reads."""
    if not src.is_dir():
        return
    dst.mkdir(parents=True, exist_ok=True)
    for a in src.glob("*.pt"):
        if not (dst / a.name).exists():
            _link(a, dst / a.name)


def _trainable(spec):
    def trial(cfg):
        from ray import tune

        config = cfg["config"] if "config" in cfg else [(p, cfg[f"p{i}"]) for i, p in enumerate(spec["paths"])]
        report = run_one(spec, [tuple(c) for c in config])
        pt = _point(report, Path(spec["trials"]) / trial_name(config)) or {"top1": 0.0, "kb": 0.0}
        tune.report({"top1": pt["top1"], "kb": pt["kb"], "trial": trial_name(config)})
    return trial


def _shared_task(spec):
    from .pipeline import run_recipe
    from .plugins import load_plugins

    import torch

    load_plugins(spec["plugins"])
    torch.set_num_threads(max(1, int(spec["threads"])))
    recipe = load_raw(spec["recipe"], spec["overrides"] + spec["first"], keep=set(spec["shared"]))
    run_recipe(recipe, workdir=spec["shared_dir"], device=spec["device"])


# ---- the command ----------------------------------------------------------------------------

def _import_ray(search):
    try:
        import ray
        from ray import tune
    except ImportError:
        raise CompressError(INSTALL) from None
    if search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise CompressError("--search optuna needs optuna: pip install -e '.[sweep]' (or pip install optuna)") from None
    return ray, tune


def run_sweep(args):
    """The `compress sweep` command; returns the sweep.json dict.

    >>> # compress sweep recipes/vgg_prune_kd.yaml --param stages.prune.ratio=0.6,0.7 --max-concurrent 2
    """
    params = parse_params(args.params)
    if args.max_concurrent < 1 or args.samples < 1 or args.gpus_per_trial < 0:
        raise CompressError("--max-concurrent and --samples must be >= 1, --gpus-per-trial >= 0")
    base = load_raw(args.recipe, args.overrides)
    configs = configurations(params, args.search, args.samples, base.seed)
    every = [list(zip([p for p, _ in params], c)) for c in itertools.product(*(v for _, v in params))]
    recipes = [load_raw(args.recipe, args.overrides + assignments(c)) for c in every]   # all checked first
    shared = shared_stages(recipes)
    ray, tune = _import_ray(args.search)

    # runs/<recipe>-sweep/: up to 106 characters, as a recipe name may have 100
    storage = Storage(Path(args.workdir).resolve(), base.name, suffix="-sweep")
    sweep_name = storage.run_dir.name
    run_dir, export_dir = storage.run_dir, storage.export_dir
    ncpu = os.cpu_count() or 1
    threads = max(1, ncpu // args.max_concurrent)
    spec = {"recipe": str(Path(args.recipe).resolve()), "overrides": list(args.overrides), "plugins": list(args.plugins),
            "device": args.device if args.device != "auto" else ("cuda" if args.gpus_per_trial > 0 else "cpu"),
            "threads": threads, "shared": shared, "shared_dir": str(run_dir / "shared"),
            "trials": str(run_dir / "trials"), "paths": [p for p, _ in params], "first": assignments(every[0])}
    changed = [s.name for s in base.stages if s.name not in shared]
    print(f"{sweep_name}: {len(configs) if args.search != 'optuna' else args.samples} trials "
          f"({args.search}) of {', '.join(p for p, _ in params)}; shared stages, computed once: "
          f"{', '.join(shared) or 'none'}; per trial: {', '.join(changed)}")

    t0 = time.perf_counter()
    if args.address:
        ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
    else:
        ray.init(num_cpus=ncpu, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        res = {"cpu": threads, "gpu": args.gpus_per_trial}
        if shared:
            task = ray.remote(num_cpus=threads, num_gpus=args.gpus_per_trial)(_shared_task)
            ray.get(task.remote(spec))
            print(f"shared stages stored in {spec['shared_dir']} ({time.perf_counter() - t0:.1f} s)")
        if args.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            space = {f"p{i}": tune.choice(v) for i, (_, v) in enumerate(params)}
            tc = tune.TuneConfig(search_alg=OptunaSearch(metric=["top1", "kb"], mode=["max", "min"], seed=base.seed),
                                 num_samples=args.samples, max_concurrent_trials=args.max_concurrent)
        else:
            space = {"config": tune.grid_search(configs)}
            tc = tune.TuneConfig(num_samples=1, max_concurrent_trials=args.max_concurrent)
        tuner = tune.Tuner(tune.with_resources(_trainable(spec), res), param_space=space, tune_config=tc,
                           run_config=tune.RunConfig(name="ray", storage_path=str(run_dir.resolve()), verbose=0))
        grid = tuner.fit()
        if args.search == "optuna":
            configs = [[(p, r.config[f"p{i}"]) for i, p in enumerate(spec["paths"])] for r in grid]
        errors = [str(r.error).strip().splitlines()[-1] for r in grid if r.error is not None]
    finally:
        ray.shutdown()
    out = collect(base, configs, params, shared, spec, export_dir, time.perf_counter() - t0, args)
    for e in errors:
        print(f"trial failed: {e}", file=sys.stderr)
    print(f"sweep: {export_dir / 'sweep.md'} ({len(out['trials'])} trials, {time.perf_counter() - t0:.1f} s)")
    if errors:
        raise CompressError(f"{len(errors)} of {len(configs)} trials failed; finished ones are stored, "
                            "re-run the same command to retry the rest")
    return out


def collect(base, configs, params, shared, spec, export_dir, seconds, args):
    """sweep.json, sweep.md and pareto.png from the trials' stored reports; the INT8 files'
    latency is measured again here, one file at a time, as trials ran side by side."""
    from .storage import atomic_write, write_json
    from .ort_runtime import ort_latency_ms
    from .plots import pareto_front, plot_pareto

    runs = getattr(base.stages[-1], "latency_runs", 50)
    trials, seen = [], set()
    for config in configs:
        name = trial_name(config)
        if name in seen:
            continue
        seen.add(name)
        workdir = Path(spec["trials"]) / name
        rp = workdir / "exports" / base.name / "report.json"
        if not rp.is_file():
            continue
        report = json.loads(rp.read_text())
        pt = _point(report, workdir)
        if pt:
            lat = {f"b{b}": round(ort_latency_ms(pt["path"], b, runs=runs)["median"], 3) for b in (1, 64)}
            pt.update(b1=lat["b1"], b64=lat["b64"])
        trials.append({"trial": name, "label": label(config), "overrides": dict(config),
                       "workdir": os.path.relpath(workdir, Path(args.workdir).resolve()),
                       "stages": [{k: s.get(k) for k in ("name", "kind", "top1", "params", "macs", "reused")}
                                  for s in report["stages"]],
                       "point": pt})
    points = [{**t["point"], "run": t["label"]} for t in trials if t["point"]]
    flags = {c: pareto_front(points, c) for c in ("kb", "b1", "b64")}
    by_label = {p["run"]: i for i, p in enumerate(points)}
    for t in trials:
        i = by_label.get(t["label"])
        t["pareto"] = {c: bool(flags[c][i]) for c in flags} if i is not None else {}
    out = {"recipe": base.name, "search": args.search, "params": {p: v for p, v in params},
           "shared_stages": shared, "seconds": round(seconds, 1), "trials": trials}
    write_json(export_dir / "sweep.json", out)
    md = render_markdown(out, args)
    atomic_write(export_dir / "sweep.md", lambda t: Path(t).write_text(md))
    if points:
        plot_pareto(points, export_dir / "pareto.png", f"{base.name} sweep")
    return out


def render_markdown(out, args):
    trials = [t for t in out["trials"] if t["point"]]
    fmt = trials[0]["point"]["format"] if trials else "onnx-int8"
    cmd = " ".join(["compress sweep", str(args.recipe), *(f"--param {p}" for p in args.params),
                    *(f"--set {s}" for s in args.overrides), f"--search {args.search}",
                    f"--max-concurrent {args.max_concurrent}"])
    lines = [f"# Sweep of {out['recipe']}", "", f"`{cmd}`", "",
             f"{len(out['trials'])} trials; stages computed once and shared by every trial: "
             f"{', '.join(out['shared_stages']) or 'none'}. Top-1 and size of each trial's {fmt} file, "
             "top-1 by onnxruntime on the test set; latency by onnxruntime on the CPU, measured again after "
             "all trials, one file at a time (trials ran side by side). Pareto-optimal: no other trial's file "
             "is both at most as large (or fast) and at least as accurate.", "",
             "| trial | " + " | ".join(out["params"]) + " | top-1 (%) | size (KB) | latency b1 (ms) | "
             "latency b64 (ms) | Pareto-optimal on |",
             "|---|" + "---|" * len(out["params"]) + "---:|---:|---:|---:|---|"]
    for t in trials:
        p = t["point"]
        on = [n for c, n in (("kb", "size"), ("b1", "b1"), ("b64", "b64")) if t["pareto"].get(c)]
        vals = " | ".join(str(t["overrides"][k]) for k in out["params"])
        lines.append(f"| {t['trial']} | {vals} | {p['top1']:.2f} | {p['kb']:.1f} | {p['b1']:.3f} | "
                     f"{p['b64']:.3f} | {', '.join(on) or '–'} |")
    for cost, title in (("kb", "top-1 vs file size"), ("b1", "top-1 vs latency (batch 1)")):
        front = sorted((t for t in trials if t["pareto"].get(cost)), key=lambda t: t["point"][cost])
        unit = "KB" if cost == "kb" else "ms"
        lines += ["", f"## Pareto front: {title}", "", f"| trial | {title.split(' vs ')[1]} ({unit}) | top-1 (%) |",
                  "|---|---:|---:|"]
        lines += [f"| {t['trial']} | {t['point'][cost]:g} | {t['point']['top1']:.2f} |" for t in front]
    lines += ["", "![top-1 against size and latency](pareto.png)", ""]
    return "\n".join(lines)


def add_arguments(p):
    p.add_argument("--param", dest="params", action="append", default=[], metavar="PATH=V1,V2,...",
                   help="a recipe field and its values, e.g. stages.prune.ratio=0.6,0.7 (repeatable)")
    p.add_argument("--samples", type=int, default=1, help="configurations to draw (random, optuna; default 1)")
    p.add_argument("--search", choices=["grid", "random", "optuna"], default="grid")
    p.add_argument("--max-concurrent", type=int, default=1, help="trials running at once (default 1)")
    p.add_argument("--gpus-per-trial", type=float, default=0, help="GPUs per trial (default 0: CPU)")
    p.add_argument("--address", help="join this Ray cluster (default: start a local Ray with this machine's CPUs)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="default: cuda with --gpus-per-trial > 0, else cpu")
    p.add_argument("--workdir", default=".", help="where runs/ and exports/ go (default: .)")
