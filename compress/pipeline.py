"""Walks a recipe's stages in order, reusing each stored stage whose content hash (config +
inputs) is unchanged, and writes the report. Nothing else decides the order."""

import contextlib
import hashlib
import json
import math
import os
import platform
import re
import time
import zlib
from pathlib import Path

import torch

from . import distributed
from .checkpoint import load_checkpoint, save_checkpoint, sha256
from .commands import cpu_info, vnni_of
from .config import TrainingSpec
from .data import load_data
from .engine import NonFiniteLoss, RunContext, tune_allocator, use_bf16
from .errors import CompressError
from .hooks import resolve
from .losses import LOSSES
from .models import Ensemble
from .plots import render_run
from .report import Report, StageRow, write_report
from .stages import STAGES, PlanBuilder, StageResult, prepare
from .storage import Storage, write_json
from .tracking import Tracker


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CompressError("--device cuda: CUDA is not available on this machine; valid: auto, cpu")
    return torch.device(name)


def _say(*args, **kw):
    """print on rank 0 only (torchrun: one log, not one per process)."""
    if distributed.is_main():
        print(*args, **kw)


def _stage_dir(run_dir, name):
    return Path(run_dir) / "stages" / name


def _lookup(stage, key, run_dir, ctx, workdir):
    """The stored result of `stage` if its key matches and every file is intact, else None."""
    d = _stage_dir(run_dir, stage.name)
    meta_path = d / "result.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        stored_key = meta["key"]
        intact = meta.pop("digest", None) == _digest(meta)
        hashes = dict(meta["hashes"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        _say(f"  stored result of '{stage.name}' is unreadable ({meta_path}); recomputing")
        return None
    if stored_key != key:
        return None
    if not intact:
        _say(f"  stored result {meta_path} of stage '{stage.name}' fails its content hash (modified or from an older version); recomputing")
        return None
    for rel, digest in hashes.items():
        path = Path(workdir) / rel
        if not path.is_file() or sha256(path) != digest:
            _say(f"  stored file {path} of stage '{stage.name}' is missing or corrupt; recomputing")
            return None
    ckpt = d / "model.pt"

    def loader():
        _, model = load_checkpoint(ckpt)
        return prepare(model, ctx)

    return StageResult(spec=meta.get("spec"), metrics=meta.get("metrics", {}), info=meta.get("info", {}),
                       files=meta.get("files", []), seconds=meta.get("seconds", 0.0), reused=True,
                       loader=loader if meta.get("spec") else None)


def _diverged(stage, epoch, what):
    """The one line for a stage whose training went non-finite: where, and the likely cause."""
    opt = getattr(stage, "optimizer", None)
    cause = (f"optimizer.lr ({opt.lr:g}) or optimizer.weight_decay ({opt.weight_decay:g}) is likely too "
             "high; lower it" if opt is not None else "the inputs or the loss weights are likely at fault")
    return CompressError(f"stages.{stage.name} ({stage.kind}): {what}{epoch}; {cause}. Nothing was stored "
                         "for this stage")


def _check_finite(stage, result):
    """Refuse to store a model with a NaN/inf weight, buffer or metric (a diverged run)."""
    model = result.model
    if model is not None:
        for name, t in [*model.state_dict().items()]:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise _diverged(stage, "", f"'{name}' holds NaN or infinite values after training")
    bad = [k for k, v in result.metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise _diverged(stage, "", f"metric {bad[0]} is NaN or infinite")


def _store(stage, key, result, storage, workdir):
    _check_finite(stage, result)   # nothing non-finite is ever stored (or, later, exported)
    d = storage.owned(_stage_dir(storage.run_dir, stage.name))
    d.mkdir(parents=True, exist_ok=True)
    files = list(result.files)
    if result.model is not None:
        save_checkpoint(d / "model.pt", result.spec, result.model)
        files.append(str(d / "model.pt"))
    meta = {"key": key, "kind": stage.kind, "spec": result.spec, "metrics": result.metrics,
            "info": result.info, "files": [os.path.relpath(f, workdir) for f in result.files], "seconds": result.seconds,
            "hashes": {os.path.relpath(f, workdir): sha256(f) for f in files}}
    meta["digest"] = _digest(json.loads(json.dumps(meta)))  # as it will read back
    write_json(d / "result.json", meta)  # written last: its presence means the stage completed


def _digest(meta):
    """Content hash of a result.json's own fields (all but "digest"): a hand-edited or
    damaged result is recomputed, not trusted."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def _fmt_count(n):
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def summary_line(i, n, stage, r):
    m = r.metrics
    bits = []
    if "top1" in m:
        bits.append(f"top1 {m['top1']:.2f}%")
    if "params" in m:
        bits.append(f"{_fmt_count(m['params'])} params, {_fmt_count(m['macs'])} MACs")
    if "exports" in r.info:
        bits.append(f"{len(r.info['exports'])} files")
    state = "reused" if r.reused else f"{r.seconds:.1f} s"
    return f"[{i + 1}/{n}] {stage.name} ({stage.kind}): {', '.join(bits)} [{state}]"


def run_recipe(recipe, *, workdir=".", device="auto", fresh=False):
    """Run every stage of `recipe`, reusing unchanged stored stages; returns the report dict.
    Under torchrun every process calls it; rank 0 alone writes (see compress.distributed).

    >>> run_recipe(load_recipe("recipes/vgg_prune_kd.yaml"), device="cpu")
    """
    t_start = time.perf_counter()
    tune_allocator()   # freed activations stay in the process: fewer page faults per step
    dev = distributed.init(resolve_device(device))   # torchrun: joins the group, cuda:LOCAL_RANK
    storage = Storage(Path(workdir), recipe.name)   # the only folders this run deletes or overwrites in
    data = load_data(recipe.data)
    validate_recipe(recipe, data)   # every check before anything is written or trained
    distributed.check_recipe(recipe, dev)
    # One run of a recipe per workdir at a time; under torchrun rank 0 holds the lock for all.
    with contextlib.ExitStack() as held:
        refused = None
        if distributed.is_main():
            try:
                held.enter_context(storage.lock())
            except CompressError as e:
                refused = e
        if not distributed.all_agree(refused is None):
            raise refused or CompressError(f"{storage.run_dir}: another run of this recipe is in progress "
                                           "(rank 0 could not take its lock)")
        return _run(recipe, storage, dev, fresh, data, t_start)


def _run(recipe, storage, dev, fresh, data, t_start):
    main = distributed.is_main()
    workdir = storage.workdir
    run_dir, export_dir = storage.run_dir, storage.export_dir
    if main:
        for tmp in [*run_dir.glob("stages/*/.*.tmp"), *export_dir.glob(".*.tmp")]:
            storage.remove(tmp)  # half-written by a killed run; never read, only renamed
        # the report always lands here: a file in its place fails now, not after training
        export_dir.mkdir(parents=True, exist_ok=True)
    data = data.to(dev)
    distributed.barrier()   # rank 0 has cleaned up before any rank reads stored results
    ctx = RunContext(recipe=recipe, data=data, device=dev, export_dir=export_dir, storage=storage,
                     seed=recipe.seed,   # TensorBoard: runs/<recipe>/tb/, written by rank 0
                     logger=Tracker(storage, recipe, data) if main else None,
                     bf16=use_bf16(recipe.precision, dev), fresh=fresh)
    keys = {}
    n = len(recipe.stages)
    world = f" x {distributed.world_size()} processes" if distributed.active() else ""
    _say(f"{recipe.name}: {n} stages on {dev}{world}, {ctx.precision} ({data.name}: {len(data.train)} "
         f"train / {len(data.test)} test images, {data.input_shape})")
    for i, stage in enumerate(recipe.stages):
        upstream = {ref: keys[ref] for _, ref in stage.stage_refs()}
        key = keys[stage.name] = recipe.stage_key(i, upstream)
        result = None if fresh else _lookup(stage, key, run_dir, ctx, workdir)
        if not distributed.all_agree(result is not None):   # every rank reuses it, or it runs
            # Training stages run on every rank (DDP); the others (prune, export, ...) on rank 0.
            every = issubclass(STAGES[stage.kind].spec, TrainingSpec)
            result = _run_stage(stage, key, ctx, storage, workdir) if main or every else None
            if distributed.active():
                distributed.barrier()   # rank 0 has stored the result
                if not main:            # every rank goes on from rank 0's stored result
                    result = _lookup(stage, key, run_dir, ctx, workdir)
                    if result is None:
                        raise CompressError(f"rank {distributed.rank()}: stage '{stage.name}' stored by rank 0 "
                                            f"is not readable under {run_dir}; is --workdir on a shared disk?")
        ctx.results[stage.name] = result
        if ctx.logger:
            ctx.logger.end_stage(stage, result)
        _say(summary_line(i, n, stage, result), flush=True)
    wall = time.perf_counter() - t_start
    report = None
    if main:
        report = build_report(recipe, ctx, wall)
        write_report(report, storage.owned(export_dir / "report.json").parent)
        ctx.logger.close(report)
        render_run(report, run_dir, export_dir)   # curves.png, pareto.png from the stored results
        _say(f"report: {export_dir / 'report.md'} ({wall:.1f} s)")
    return distributed.broadcast(report)


def _run_stage(stage, key, ctx, storage, workdir):
    """Run one stage; rank 0 stores its result (checkpoint, result.json)."""
    ctx.stage_dir = _stage_dir(storage.run_dir, stage.name)
    torch.manual_seed(ctx.recipe.seed * 1000003 + zlib.crc32(stage.name.encode()))
    t0 = time.perf_counter()
    if ctx.logger:
        ctx.logger.begin_stage(stage.name)
    try:
        result = STAGES[stage.kind].run(stage, ctx)
    except NonFiniteLoss as e:
        m = re.search(r"(\d+)/(\d+)$", e.desc)
        epoch = f" in epoch {m.group(1)} of {m.group(2)}" if m else ""
        raise _diverged(stage, epoch, f"{e.what} (step {e.steps})") from e
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    result.seconds = round(time.perf_counter() - t0, 2)
    if distributed.is_main():
        _store(stage, key, result, storage, workdir)
    return result


def build_report(recipe, ctx, wall):
    data = ctx.data
    stages, exports = [], []
    for s in recipe.stages:
        r = ctx.results[s.name]
        m = r.metrics
        row = StageRow(name=s.name, kind=s.kind, top1=m.get("top1"), params=m.get("params"),
                       macs=m.get("macs"), seconds=float(r.seconds), reused=r.reused,
                       params_before=m.get("params_before"), macs_before=m.get("macs_before"),
                       prune_ratio=r.info.get("ratio"), members=r.info.get("members", []))
        stages.append(row.model_dump(mode="json", exclude_none=True))
        exports += r.info.get("exports", [])
    cpu = cpu_info()
    report = {
        "recipe": recipe.name,
        "data": {"name": data.name, "num_classes": data.num_classes, "input_shape": list(data.input_shape),
                 "train_images": len(data.train), "test_images": len(data.test)},
        "stages": stages,
        "exports": exports,
        "total_seconds": round(sum(s["seconds"] for s in stages), 2),
        "wall_seconds": round(wall, 2),
        "reference": _reference(recipe),
        "comparison": _comparison(recipe, stages),
        "lineage": {s.name: next((r for _, r in s.stage_refs("input")), None) for s in recipe.stages},
        "environment": {"device": str(ctx.device), "precision": ctx.precision,
                        "torch": torch.__version__,
                        "onnxruntime": __import__("onnxruntime").__version__,
                        # the CPU's model and kernel flags: what its latencies and seconds hold for
                        "cpu": cpu["model"] or platform.processor() or platform.machine(),
                        "isa": cpu["isa"], "machine": platform.machine(),
                        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                        "threads": torch.get_num_threads(), "processes": distributed.world_size(),
                        "allocator": tune_allocator(),
                        # VNNI decides whether onnxruntime's integer kernels pay (report.md says so)
                        "vnni": vnni_of(cpu["isa"])},
    }
    return Report.model_validate(report).model_dump(mode="json")   # the schema `report` reads back


def _comparison(recipe, rows):
    """Rows of the method-comparison table (None without a `compare` section): top-1, its
    difference from the baseline, params and seconds per epoch, all from this run."""
    if recipe.compare is None:
        return None
    by = {r["name"]: r for r in rows}
    base = by[recipe.compare.baseline]["top1"]
    out = []
    for name in recipe.compare.stages:
        r, s = by[name], recipe.stage(name)
        epochs = getattr(s, "epochs", None)
        out.append({"method": name, "top1": r["top1"], "delta": round(r["top1"] - base, 2),
                    "params": r["params"], "seconds_per_epoch": round(r["seconds"] / epochs, 2) if epochs else None,
                    "loss": [t.term for t in getattr(s, "loss", [])] or ["ce"]})
    return {"baseline": recipe.compare.baseline, "rows": out}


def _reference(recipe):
    """The teacher: the first stage some distill/qat stage learns from, else the first stage."""
    for s in recipe.stages:
        for _, ref in s.stage_refs("teacher"):
            return ref
    return recipe.stages[0].name


def _check_sizes(stage, i, skel, shape):
    """A stage's random-crop padding is smaller than the data's images, and its
    `progressive_resize` sizes fit the data (no larger than its images) and the model (it
    runs on the smallest)."""
    crop = getattr(getattr(stage, "augment", None), "crop", 0)
    if crop and crop >= min(shape[1:]):
        raise CompressError(f"stages[{i}].augment.crop: {crop} px of padding on the data's {shape[1]}x{shape[2]} "
                            f"images; give 0 (off) to {min(shape[1:]) - 1} (CIFAR recipes pad 4)")
    sizes = getattr(stage, "progressive_resize", None)
    if not sizes:
        return
    side = min(shape[1:])
    if max(sizes) > side:
        raise CompressError(f"stages[{i}].progressive_resize: {max(sizes)} px is larger than the data's "
                            f"{shape[1]}x{shape[2]} images; give sizes from 4 to {side}")
    if skel is not None:
        from .quant import backend_of

        if backend_of(skel) == "pt2e":
            raise CompressError(f"stages[{i}].progressive_resize: this stage's model is a graph captured "
                                f"for {shape[1]}x{shape[2]} images (qat, pt2e backend) and runs at no "
                                "other size; remove progressive_resize here")
        was = skel.training
        try:
            with torch.no_grad():
                skel.eval()(torch.zeros(2, shape[0], min(sizes), min(sizes)))
        except Exception as e:   # noqa: BLE001 - any failure of the model at that size
            raise CompressError(f"stages[{i}].progressive_resize: the model does not run on "
                                f"{min(sizes)}x{min(sizes)} images ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); give larger sizes") from None
        finally:
            skel.train(was)


def _check_data_pruning(s, i):
    """Data pruning weights each image's loss: every term of the stage must be a mean over
    images that takes those weights (a `train` stage's cross-entropy is)."""
    if s.data_pruning.full_epochs >= s.epochs:
        raise CompressError(f"stages[{i}].data_pruning.full_epochs: {s.data_pruning.full_epochs} of the "
                            f"stage's {s.epochs} epochs leaves none to prune; give fewer than {s.epochs}")
    terms = [t.term for t in getattr(s, "loss", None) or []]
    if bad := [t for t in terms if not LOSSES[t].per_sample]:
        can = ", ".join(sorted(n for n, c in LOSSES.items() if c.per_sample))
        raise CompressError(f"stages[{i}].data_pruning: loss term '{bad[0]}' is not a mean over images, "
                            f"so its images cannot be weighted; terms that can: {can}")


def validate_recipe(recipe, data=None):
    """Check what can be checked without training: data, models, stage references, what each
    stage kind's plan proves on the skeleton (e.g. a trial prune) and the feature points and
    layer paths loss terms tap (resolved on each stage's model skeleton). Returns plan lines.
    `run` makes the same checks first, so a mistake costs no training."""
    data = data if data is not None else load_data(recipe.data)
    shape, ncls = data.input_shape, data.num_classes

    build = PlanBuilder(recipe, tuple(shape), ncls)
    skeletons, lines = {}, []
    for i, s in enumerate(recipe.stages):
        try:
            skel = STAGES[s.kind].plan(s, skeletons, build)
        except CompressError as e:   # one line that names the stage
            msg = str(e)
            named = msg.startswith(("stages.", "stages[", "models."))
            raise CompressError(msg if named else f"stages.{s.name}: {msg}") from None
        if skel is not None:
            skeletons[s.name] = skel
        _check_sizes(s, i, skel, shape)
        t_refs = [r for _, r in s.stage_refs("teacher")]
        t_skel = (Ensemble([skeletons[n] for n in t_refs]) if len(t_refs) > 1
                  else skeletons.get(t_refs[0]) if t_refs else None)
        batch = getattr(s, "batch_size", None)
        batch = min(batch, len(data.train)) if batch else None   # drop_last: every batch has this many
        for j, t in enumerate(getattr(s, "loss", []) or []):
            if why := LOSSES[t.term].batch_problem(batch):
                raise CompressError(f"stages[{i}].batch_size: {why}" + (
                    "" if batch == s.batch_size else f" (the training set has only {batch} images)"))
            term = LOSSES[t.term](t)
            for role, paths, model in (("student_layer", term.student_layers(), skel),
                                       ("teacher_layer", term.teacher_layers(), t_skel)):
                for p in paths:
                    if model is None:
                        raise CompressError(f"stages[{i}].loss[{j}].{role}: stage has no teacher")
                    resolve(model, p, f"stages[{i}].loss[{j}].{role}")
        if getattr(s, "data_pruning", None) is not None:
            _check_data_pruning(s, i)
        refs = ", ".join(f"{f}={r}" for f, _, r in s.refs())
        lines.append(f"  {i + 1}. {s.name} ({s.kind}){': ' + refs if refs else ''}")
    head = (f"{recipe.name}: valid; data {data.name} {len(data.train)}/{len(data.test)} images "
            f"{tuple(shape)}, {ncls} classes from {data.source}")
    return [head, *lines]
