"""Stage registry: one file per stage kind, each exposing ``run(cfg, ctx) -> StageResult``
and ``plan(cfg, inputs, build) -> skeleton model`` (used by ``compress validate``)."""

import importlib
import pkgutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import CompressError
from ..registry import Registry

STAGES = Registry("stage kind")


@dataclass(frozen=True)
class PlanBuilder:
    """What a ``plan`` function gets as `build`: ``build(name)`` makes the skeleton of the
    recipe's ``models.<name>`` sized for the data (a CompressError when it cannot map the
    data's images to logits, see :func:`logits_problem`); ``input_shape`` (C, H, W) lets a plan
    trace a model (e.g. through quantization preparation)."""

    recipe: object
    input_shape: tuple
    num_classes: int

    def __call__(self, name):
        model = new_model(self.recipe, name, self.input_shape[0], self.num_classes)[0]
        # run validates first, so each model is probed once per run, here
        if why := logits_problem(model, self.input_shape, self.num_classes):
            raise CompressError(f"models.{name}: {self.recipe.models[name].arch} {why}")
        return model


@dataclass(frozen=True)
class StageKind:
    spec: type            # the pydantic config class
    run: Callable         # run(cfg, ctx) -> StageResult
    plan: Callable        # plan(cfg, inputs, build: PlanBuilder) -> nn.Module | None
    makes_model: bool = True
    quantizes: bool = False   # its model is quantized (stages needing a float model refuse it)
    trains_cohort: bool = False   # its student is a cohort of peers (loss terms with uses_cohort)
    code: tuple = ()      # modules whose files also compute its result (part of its cache key)


def register(name, spec, plan, makes_model=True, quantizes=False, trains_cohort=False, code=()):
    def deco(run):
        STAGES.register(name)(StageKind(spec, run, plan, makes_model, quantizes, trains_cohort, tuple(code)))
        return run
    return deco


@dataclass
class StageResult:
    """What a stage produced. `model` is loaded lazily when the result was reused."""

    spec: Optional[dict] = None              # architecture spec that rebuilds the model
    metrics: dict = field(default_factory=dict)   # top1 (%), params, macs, ...
    info: dict = field(default_factory=dict)      # stage-specific facts (widths, exports)
    files: list = field(default_factory=list)     # files written outside the checkpoint
    model: object = None
    loader: Optional[Callable] = None
    seconds: float = 0.0
    reused: bool = False

    def get_model(self):
        if self.model is None and self.loader is not None:
            self.model = self.loader()
        return self.model


def model_cost(model, input_shape):
    """(params, MACs) of a float model, counted by torch-pruning on one image."""
    import copy

    import torch_pruning as tp

    m = copy.deepcopy(model).float().cpu().eval()
    macs, params = tp.utils.count_ops_and_params(m, torch.zeros(1, *input_shape))
    return int(params), int(macs)


def describe(model, ctx, cost_model=None, history=None):
    """Metrics every model-producing stage reports: top1 on the whole test set, params, MACs.
    With the `history` of ``engine.fit`` the last epoch's evaluation (always on the whole
    test set, of the same model) is reused instead of measured again."""
    from ..engine import evaluate

    params, macs = model_cost(cost_model if cost_model is not None else model, ctx.data.input_shape)
    last = history[-1] if history else {}
    top1 = last["test_top1"] if last.get("test_images") == len(ctx.data.test) else evaluate(model, ctx)
    return {"top1": round(top1, 2), "params": params, "macs": macs}



def new_model(recipe, name, in_channels, num_classes, salt=""):
    """(model, spec) for the recipe's `models.<name>` entry, sized for the data. `salt`
    draws a different initialisation of the same entry (e.g. the peers of a cohort)."""
    from ..errors import CompressError
    from ..models import REFUSED_ARGS, build_model, factory_params, make_spec, model_factory, validate_cfg

    d = recipe.models[name]
    factory = model_factory(d.arch, f"models.{name}.arch")
    allowed, any_kwargs = factory_params(factory)
    for k in d.args:
        if k in REFUSED_ARGS:
            raise CompressError(f"models.{name}.args.{k}: not allowed: models start from a random "
                                "initialisation (nothing is downloaded or loaded)")
        if (k not in allowed and not any_kwargs) or k in ("in_channels", "num_classes"):
            valid = sorted(allowed - {"in_channels", "num_classes"})
            raise CompressError(f"models.{name}.args.{k}: unknown argument of {d.arch}; valid: {', '.join(valid)}"
                                " (in_channels and num_classes come from the data)")
    if "cfg" in d.args and d.args["cfg"] is not None and (why := validate_cfg(d.args["cfg"])):
        raise CompressError(f"models.{name}.args.cfg: {why}")
    if "width" in d.args and not (isinstance(d.args["width"], (int, float)) and d.args["width"] > 0):
        raise CompressError(f"models.{name}.args.width: must be a positive number, got {d.args['width']!r}")
    args = {**d.args, "in_channels": in_channels, "num_classes": num_classes}
    spec = {"arch": d.arch, "args": args}
    # Every stage that builds `models.<name>` starts from the same weights (seeded by the
    # recipe seed and the entry's name), so methods compared on one student are compared
    # from one initialisation.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed * 1000003 + zlib.crc32(f"models.{name}{salt}".encode()))
        try:
            model = build_model(spec)
        except CompressError as e:
            raise CompressError(f"models.{name}: {e}") from None
        except (MemoryError, RuntimeError, OverflowError, ValueError, TypeError, AssertionError) as e:
            # e.g. width: 1e9, .inf; a library constructor's own complaint about an argument
            raise CompressError(f"models.{name}: cannot build {d.arch} with args {dict(d.args)} "
                                f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:120]})") from None
    return model, make_spec(d.arch, args)


def logits_problem(model, input_shape, num_classes):
    """Why `model` does not map a batch of 2 `input_shape` images to [2, num_classes] logits
    in training and in evaluation mode (e.g. a ViT that needs 224x224, a net whose pools
    shrink 28x28 to nothing, auxiliary heads in training mode), or None. Runs on a copy
    with the random state kept, so the model and the run's random draws are untouched."""
    import copy

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        probe = copy.deepcopy(model).float().cpu()
        x = torch.zeros(2, *input_shape)
        for mode in ("training", "evaluation"):
            probe.train(mode == "training")
            try:
                out = probe(x)
            except Exception as e:  # noqa: BLE001 - whatever the model raises becomes one line
                return (f"cannot run on {tuple(input_shape)} images in {mode} mode "
                        f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:120]})")
            if not isinstance(out, torch.Tensor):
                return (f"returns {type(out).__name__} in {mode} mode, not a logits tensor "
                        "(auxiliary outputs are not supported)")
            if tuple(out.shape) != (2, num_classes):
                return (f"maps a batch of 2 {tuple(input_shape)} images to shape {tuple(out.shape)} "
                        f"in {mode} mode, not the logits (2, {num_classes})")
    return None


def input_model(cfg, ctx, build_fresh=True):
    """(model, spec) a stage starts from: a copy of stage `from`'s model, or a fresh
    `model` from the recipe's models section."""
    import copy

    if getattr(cfg, "from_", None):
        src = ctx.results[cfg.from_]
        return copy.deepcopy(src.get_model()), copy.deepcopy(src.spec)
    model, spec = new_model(ctx.recipe, cfg.model, ctx.data.input_shape[0], ctx.data.num_classes)
    return model, spec


def plan_student(cfg, inputs, build):
    """Skeleton of a stage that keeps its input's structure (train, distill, prune)."""
    import copy

    if getattr(cfg, "from_", None):
        return copy.deepcopy(inputs[cfg.from_])
    return build(cfg.model)


def prepare(model, ctx):
    """Move a model to the device in channels_last (faster convs on CPU and GPU)."""
    return model.to(ctx.device).to(memory_format=torch.channels_last)


def teacher_of(cfg, ctx):
    """The stage's frozen teacher: one stage's model, or the weighted mean of several
    (multi-teacher KD); None when the stage has no teacher."""
    import copy

    from ..engine import Frozen
    from ..models import Ensemble

    names = cfg.teacher if isinstance(cfg.teacher, list) else [cfg.teacher] if cfg.teacher else []
    if not names:
        return None
    models = [ctx.results[n].get_model() for n in names]
    if len(models) == 1:
        return prepare(Frozen(models[0]), ctx)
    return prepare(Frozen(Ensemble([copy.deepcopy(m) for m in models], cfg.teacher_weights)), ctx)


def teacher_key(cfg):
    names = cfg.teacher if isinstance(cfg.teacher, list) else [cfg.teacher]
    return (tuple(names), tuple(cfg.teacher_weights or ()))


def teacher_logits(ctx, teacher_name, teacher, augment):  # teacher_name: any hashable key
    """The :class:`~compress.engine.Frozen` `teacher`'s logits (``teacher.logits``: BatchNorm
    folded) for every training image in every view the batches can show
    ([views, N, classes]), computed once and cached: in the run, and on disk under
    ``runs/<recipe>/cache/`` (:func:`_stored_logits`), so that rerunning a distill or QAT
    stage (a changed setting, a killed run, a sweep's trial) does not run the teacher over
    the training set again. None when the batch transform has no finite set of views
    (random crops), so the teacher must run on each batch. Under torchrun each process
    computes its shard of the images and all gather the table."""
    from .. import distributed
    from ..data import Split, iterate

    views = augment.views
    if views is None:
        return None
    key = ("teacher_logits", teacher_name, views)
    if key not in ctx.cache:
        bs = ctx.recipe.data.eval_batch_size
        train = ctx.data.train

        def rows(idx):   # [len(idx), views, classes]
            part = train if len(idx) == len(train) else Split(train.x[idx], train.y[idx])
            out = []
            with torch.no_grad():
                for v in range(views):
                    batches = iterate(part, ctx.data, bs, channels_last=True, flip_all=bool(v))
                    with ctx.autocast():
                        out.append(torch.cat([teacher.logits(b.x).float() for b in batches]))
            return torch.stack(out, 1)

        path = _stored_logits_path(ctx, teacher, views) if ctx.storage is not None else None
        stored = None if path is None or ctx.fresh else _stored_logits(path, rows, len(train), bs)
        if distributed.all_agree(stored is not None):   # every rank reads it, or every rank computes
            if distributed.is_main():
                print(f"  teacher logits for {len(train)} images x {views} view{'s' * (views != 1)} read from {path}",
                      flush=True)
            ctx.cache[key] = stored.to(train.x.device)
        else:
            ctx.cache[key] = distributed.gather_rows(rows, len(train), train.x.device).transpose(0, 1).contiguous()
            if path is not None and distributed.is_main():
                _store_logits(ctx.storage, path, ctx.cache[key])
    return ctx.cache[key]


_KEEP_STORED_LOGITS = 4   # newest files kept per recipe (a few teachers, views, precisions)


def _stored_logits_path(ctx, teacher, views):
    """``runs/<recipe>/cache/teacher-logits-<digest>.pt``, the digest covering everything the
    logits depend on: the teacher's weights and buffers, the training images and labels, the
    normalization, the views, the precision, the device kind and inference batch size, and
    the code (this package's version, torch's, and the source of the teacher's module
    classes, the engine, the data pipeline and this file)."""
    import hashlib
    import json

    from .. import __version__, data as data_module, engine
    from ..checkpoint import digest_tensor
    from ..config import library_file, source_digests, source_file

    h = hashlib.sha256()
    for name, t in teacher.state_dict().items():
        h.update(name.encode())
        digest_tensor(h, t)
    digest_tensor(h, ctx.data.train.x)
    digest_tensor(h, ctx.data.train.y)
    # this package's files and the user's, by content (a moved checkout finds its tables); an
    # installed library's (torchvision's, timm's models) are left to the first-batch check
    files = {source_file(type(m)) for m in teacher.modules()} | {source_file(engine), source_file(data_module),
                                                                    __file__}
    package = Path(__file__).resolve().parents[1]   # kept when installed in site-packages too
    files = sorted(f for f in files if f and (package in Path(f).resolve().parents or not library_file(f)))
    h.update(json.dumps(source_digests(files), sort_keys=True).encode())
    h.update(json.dumps([views, ctx.precision, ctx.device.type, ctx.recipe.data.eval_batch_size,
                         [float(v) for v in ctx.data.mean], [float(v) for v in ctx.data.std],
                         __version__, torch.__version__]).encode())
    return ctx.storage.run_dir / "cache" / f"teacher-logits-{h.hexdigest()[:16]}.pt"


def _stored_logits(path, rows, n, batch):
    """The [views, n, classes] table stored at `path`, when it is readable, finite, of that
    shape, and its first `batch` rows are what the teacher computes now (``rows``: the
    function that computes the whole table, here on its first batch); else None (the table
    is then computed and stored again)."""
    if not path.is_file():
        return None
    try:
        table = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:   # noqa: BLE001 - a damaged file is recomputed, whatever the damage
        return None
    probe = rows(torch.arange(min(n, batch))).transpose(0, 1).cpu()
    if not (isinstance(table, torch.Tensor) and table.dtype == torch.float32 and table.dim() == 3
            and table.shape[1] == n and table.shape[::2] == probe.shape[::2] and bool(torch.isfinite(table).all())):
        return None
    scale = float(probe.abs().max()) + 1e-6
    # the same computation agrees to rounding (threads may sum in another order); another
    # teacher, code or precision differs by far more
    if not torch.allclose(table[:, :probe.shape[1]], probe, rtol=0, atol=1e-3 * scale):
        return None
    return table


def _store_logits(storage, path, table):
    """Write the table for later runs; a failed write (a full disk) costs only that."""
    from ..storage import atomic_write

    try:
        atomic_write(storage.owned(path), lambda p: torch.save(table.detach().cpu(), p))
        old = sorted(path.parent.glob("teacher-logits-*.pt"), key=lambda f: f.stat().st_mtime, reverse=True)
        for f in old[_KEEP_STORED_LOGITS:]:
            storage.remove(f)
    except OSError as e:
        print(f"  teacher logits not stored ({path}: {e.strerror or e}); later runs compute them again", flush=True)


# Import every stage file so its @register runs (after the helpers above exist).
for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
