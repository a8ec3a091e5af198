"""Recipes: YAML parsed once into typed, frozen objects with defaults in code.

Every problem is a :class:`CompressError` whose message starts with the path of
the field, e.g. ``stages[1].ratio: must be < 1, got 1.5``.
"""

import copy
import difflib
import functools
import hashlib
import importlib
import inspect
import json
import re
import sysconfig
import types
from dataclasses import dataclass
from types import UnionType
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

import pydantic
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import CompressError, did_you_mean, unknown
from .storage import SafeName
from .yamlio import MAX_BYTES, load_yaml

# Upper bounds far above any real use; past them a value is a typo (1e23 epochs) or would
# overflow a C integer deep inside torch (seed 99999999999999999999999).
MAX_EPOCHS = 10_000
MAX_BATCH = 1 << 16
MAX_SEED = 2**32 - 1


class Spec(BaseModel):
    """Base of every config object: unknown keys refused, immutable after parsing."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True,
                              protected_namespaces=(), allow_inf_nan=False)   # .inf/.nan: refused


# ---- error formatting ----------------------------------------------------------------

def _walk(cls, loc, prefix):
    """(dotted path, model class reached) for a pydantic error location, following models,
    lists, dicts, Optional and discriminated unions (whose tag is not part of the path)."""
    path, ann = prefix, cls
    i = 0
    while i < len(loc):
        el = loc[i]
        origin, args = get_origin(ann), get_args(ann)
        if origin is Annotated:
            ann = args[0]
            continue
        if origin in (Union, UnionType):
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            tagged = [m for m in models if any(f.default == el for f in m.model_fields.values())]
            if tagged and len(models) > 1:
                ann, i = tagged[0], i + 1      # the tag names the union member: not in the path
                continue
            if not models and _member_tag(el):
                # pydantic names the member of a plain union it tried ('str', 'list[str]')
                is_list = el.startswith(("list[", "tuple["))
                bare = [get_args(a)[0] if get_origin(a) is Annotated else a for a in args]
                ann = next((a for a, b in zip(args, bare) if (get_origin(b) in (list, tuple)) == is_list), args[0])
                i += 1
                continue
            ann = models[0] if len(models) == 1 else (args[0] if args[0] is not type(None) else args[-1])
            continue
        if isinstance(el, int):
            path += f"[{el}]"
            ann = args[0] if origin in (list, tuple) and args else None
        else:
            path += f".{el}" if path else str(el)
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                f = ann.model_fields.get(el) or next(
                    (f for f in ann.model_fields.values() if f.alias == el), None)
                ann = f.annotation if f else None
            elif origin is dict and args:
                ann = args[1]
            else:
                ann = None
        i += 1
    while get_origin(ann) in (Annotated, Union, UnionType):
        ann = next((a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return path, ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _member_tag(el):
    """Whether a pydantic error location element names a member of a plain union."""
    return isinstance(el, str) and (el in ("str", "int", "float", "bool")
                                    or el.startswith(("list[", "tuple[", "dict[", "function-")))


def _valid_keys(model_cls):
    return [f.alias or n for n, f in model_cls.model_fields.items()] if model_cls else []


def _short(v):
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _message(err, cls_fields):
    t, msg, inp = err["type"], err["msg"], err.get("input")
    ctx = err.get("ctx") or {}
    if t == "extra_forbidden":
        name = err["loc"][-1]
        return f"unknown key{did_you_mean(name, cls_fields)}; valid: {', '.join(sorted(cls_fields))}"
    if t == "missing":
        return "required key is missing"
    if t in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
              "less_than_equal": "<="}[t]
        bound = next(iter(ctx.values()))
        return f"must be {op} {bound}, got {_short(inp)}"
    if t == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {_short(inp)}"
    if t == "union_tag_invalid":
        valid = [v.strip(" '") for v in str(ctx.get("expected_tags", "")).split(",")]
        return unknown(ctx.get("discriminator", "tag").strip("'") + " value", ctx.get("tag"), valid)
    if t == "union_tag_not_found":
        tag = str(ctx.get("discriminator", "")).strip("'")
        typo = difflib.get_close_matches(tag, [str(k) for k in inp], n=1, cutoff=0.6) if isinstance(inp, dict) else []
        hint = f" ('{typo[0]}' is no key: did you mean '{tag}'?)" if typo else ""
        return f"required key '{tag}' is missing{hint}"

    if t == "value_error":
        return msg.removeprefix("Value error, ")
    if t == "finite_number":
        return f"must be a finite number, got {_short(inp)}"
    return f"{msg[0].lower() + msg[1:]}, got {_short(inp)}"


def parse(cls, data, path):
    """Validate `data` into `cls`, raising a CompressError that names the field path."""
    if not isinstance(data, dict):
        raise CompressError(f"{path}: must be a mapping, got {_short(data)}")
    try:
        return cls.model_validate(data)
    except pydantic.ValidationError as e:
        errors = e.errors()
        # A misspelt key is both unknown and (as the key it meant) missing: the unknown key,
        # with its did-you-mean, is the message that helps.
        err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
        loc = tuple(err["loc"])
        k = next((j for j, el in enumerate(loc) if _member_tag(el)), None)
        if k is not None and err["type"] != "extra_forbidden":
            # a plain union: the member that got furthest (a list whose element is wrong) says most
            deeper = [x for x in errors if tuple(x["loc"][:k]) == loc[:k] and len(x["loc"]) > k + 1
                      and _member_tag(x["loc"][k])]
            if deeper:
                err = deeper[0]
                loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            where, owner = _walk(cls, loc[:-1], path)
            where = f"{where}.{loc[-1]}" if where else str(loc[-1])
        else:
            where, owner = _walk(cls, loc, path)[0], None
        if err["type"].startswith("union_tag"):
            where += "." + str((err.get("ctx") or {}).get("discriminator", "")).strip("'")
        msg = _message(err, _valid_keys(owner))
        if loc and _member_tag(loc[-1]):   # every member of a plain union failed: say each
            tried = [x for x in errors if len(x["loc"]) == len(loc) and tuple(x["loc"][:-1]) == loc[:-1]]
            fitting = [x for x in tried if not x["type"].endswith("_type")]   # right type, wrong value
            wants = list(dict.fromkeys(re.sub(r"^input should be ", "", _message(x, []).split(", got ")[0])
                                       for x in tried))
            if fitting:
                msg = _message(fitting[0], [])
            elif len(wants) > 1:
                msg = f"input should be {' or '.join(wants)}, got {_short(err.get('input'))}"
        # a whole-object check names its field first ("ratio: ..."): join it to the path
        m = re.match(r"^([A-Za-z_]\w*): (.*)$", msg) if err["type"] == "value_error" else None
        if m and owner is None and m.group(1) in _valid_keys(_walk(cls, loc, path)[1]):
            where, msg = f"{where}.{m.group(1)}", m.group(2)
        raise CompressError(f"{where}: {msg}") from None


# ---- shared pieces of stage configs ------------------------------------------------------

class OptimizerSpec(Spec):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0, description="peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)


class AugmentSpec(Spec):
    crop: int = Field(0, ge=0, description="random-crop padding in pixels; 0 = off")
    flip: bool = False

    @property
    def deterministic(self):
        return self.crop == 0 and not self.flip

    @property
    def views(self):
        """How many fixed transforms the batches are drawn from (None: unbounded). A flip
        is one of two; a random crop has no finite set, so outputs cannot be cached."""
        return None if self.crop else (2 if self.flip else 1)


class DataPruningSpec(Spec):
    """InfoBatch (Qin et al., ICLR 2024): unbiased dynamic data pruning. Each epoch drops, with
    probability `ratio`, every training image whose loss when last trained on was below the
    mean of those losses, and scales the loss of the kept ones among them by 1 / (1 - ratio),
    so that the expected gradient is the full epoch's; the last `full_epochs` train on every
    image unweighted. The learning-rate schedule follows the epochs, not the steps."""

    ratio: float = Field(0.5, gt=0, lt=1, description="probability of dropping an image whose last "
                         "loss was below the mean")
    full_epochs: int = Field(1, ge=0, description="final epochs on the whole training set (annealing)")


class TrainingSpec(Spec):
    """What every stage that runs the training loop shares (train, distill, qat)."""

    epochs: int = Field(1, ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(256, ge=1, le=MAX_BATCH)
    steps_per_epoch: Optional[int] = Field(None, ge=1, description="optimizer steps per epoch, each on a "
                                           "fresh shuffled batch (at most one pass); None: a whole pass")
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup: float = Field(0.25, ge=0, lt=1, description="OneCycle warm-up fraction")
    augment: AugmentSpec = AugmentSpec()
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    progressive_resize: list[Annotated[int, Field(ge=4)]] = Field(
        [], description="image side in pixels for each of the first epochs (e.g. [16, 20, 24]: "
        "epoch 1 at 16x16, ...), images resized after augmentation; the later epochs, and every "
        "evaluation, at the data's own size")
    # Measured on vgg_small (2 cores): a whole test-set pass costs ~6% of a teacher epoch
    # and ~3% of a pruned student's; the final evaluation always runs on the whole test set.
    eval_every: int = Field(1, ge=0, description="test top-1 after every k-th epoch (0: only after the last)")
    eval_subset: Optional[int] = Field(None, ge=1, description="test images for the evaluations before "
                                       "the last (the first N); the last always uses the whole test set")
    ema: Optional[float] = Field(None, gt=0, lt=1, description="decay per step of an exponential moving "
                                 "average of the weights and BN statistics, which becomes the result")
    sync_batchnorm: bool = Field(False, description="torchrun on CUDA: BatchNorm statistics over the "
                                 "global batch (SyncBatchNorm); no effect in one process")
    data_pruning: Optional[DataPruningSpec] = Field(None, description="InfoBatch dynamic data pruning: "
                                                    "epochs skip part of the well-learned images")

    @model_validator(mode="after")
    def _full_size_last(self):
        if len(self.progressive_resize) >= self.epochs:
            raise ValueError(f"progressive_resize: {len(self.progressive_resize)} sizes for {self.epochs} "
                             "epochs; give fewer sizes than epochs, so that the last epoch trains at the "
                             "data's own size")
        return self


@dataclass(frozen=True)
class StageRef:
    """Marks a stage-config field whose value names an earlier stage whose model the stage
    reads. The pipeline finds a stage's inputs through these markers (never by field name):
    it checks that they exist and come earlier, hashes their results into the stage's cache
    key, and refuses a quantized model where `float_model` is set.

    `role`: "input" (the model this stage transforms: its lineage), "teacher", "member".

    >>> source: Annotated[str, StageRef("input", float_model=True)]
    """

    role: str = "input"
    float_model: bool = False


@dataclass(frozen=True)
class ModelRef:
    """Marks a field whose value names an entry of the recipe's `models` section."""


def stage_ref(role="input", float_model=False):
    """The annotation of a field naming one earlier stage, e.g. ``from_: stage_ref()``."""
    return Annotated[str, StageRef(role, float_model)]


MODEL_REF = Annotated[str, ModelRef()]


def _fits(value, ann):
    while get_origin(ann) is Annotated:
        ann = get_args(ann)[0]
    if ann is type(None):
        return value is None
    if get_origin(ann) is list:
        return isinstance(value, list)
    if isinstance(ann, type):
        return isinstance(value, ann)
    return False


def _collect_refs(value, ann, meta, path, out):
    """Append (path, marker, name) for every StageRef/ModelRef-marked string in `value`."""
    marks = [m for m in meta if isinstance(m, (StageRef, ModelRef))]
    if marks and isinstance(value, str):
        out.append((path, marks[0], value))
        return
    origin = get_origin(ann)
    if origin is Annotated:
        base, *more = get_args(ann)
        _collect_refs(value, base, [*meta, *more], path, out)
    elif origin in (Union, UnionType):
        for a in get_args(ann):
            if _fits(value, a):
                _collect_refs(value, a, meta, path, out)
                return
    elif origin is list and isinstance(value, list):
        item = (get_args(ann) or (Any,))[0]
        for i, v in enumerate(value):
            _collect_refs(v, item, meta, f"{path}[{i}]", out)
    elif isinstance(value, BaseModel):
        for name, f in type(value).model_fields.items():
            key = f.alias or name
            _collect_refs(getattr(value, name), f.annotation, f.metadata, f"{path}.{key}" if path else key, out)


class StageSpec(Spec):
    """Base of stage configs. Subclasses add their own fields (one file per stage kind);
    fields naming other stages are typed with :class:`StageRef` (``stage_ref()``), fields
    naming `models` entries with :data:`MODEL_REF`.
"""

    name: SafeName = Field(description="names runs/<recipe>/stages/<name>/")
    kind: str

    def refs(self):
        """[(field path, StageRef or ModelRef, name)] declared by this stage's field types."""
        out = []
        _collect_refs(self, type(self), [], "", out)
        return out

    def stage_refs(self, role=None):
        """[(field path, stage name)] this stage reads results from (of one `role`, or all)."""
        return [(p, n) for p, m, n in self.refs() if isinstance(m, StageRef) and role in (None, m.role)]

    def model_refs(self):
        """[(field path, models entry)] this stage builds from the recipe's `models` section."""
        return [(p, n) for p, m, n in self.refs() if isinstance(m, ModelRef)]

    def output_files(self):
        """[(field path, file name)] the stage writes into the recipe's exports folder; two
        stages (or items) writing one name would overwrite each other, so `parse` refuses it."""
        return []


TeacherRef = Union[stage_ref("teacher"), Annotated[list[stage_ref("teacher")], Field(min_length=1)]]


def check_teacher_weights(teacher, weights):
    """None, or why `teacher_weights` does not fit `teacher` (one weight per teacher, > 0)."""
    if weights is None:
        return None
    n = len(teacher) if isinstance(teacher, list) else 1
    if len(weights) != n or any(w <= 0 for w in weights):
        return f"teacher_weights: need {n} positive weights (one per teacher), got {weights}"
    return None


class DataSpec(Spec):
    name: str = "fashion_mnist"
    root: Optional[str] = Field(None, description="where the data is; when set, the only place looked")
    download: Optional[bool] = Field(None, description="None: the dataset's own default")
    train_subset: Optional[int] = Field(None, ge=1, description="use only the first N training images")
    test_subset: Optional[int] = Field(None, ge=1, description="use only the first N test images")
    # 128: measured on a 2-core Xeon (AMX), the trained vgg_small's logits over both views of the
    # training set take 5.5 s at 128 and 9-11 s at 256 in bf16 (6-7 s at 64; 1024 is slower still),
    # the same at 128 and 256 in fp32: the activations of a 128-batch stay in cache
    eval_batch_size: int = Field(128, ge=1, le=MAX_BATCH)


class ModelDef(Spec):
    arch: str
    args: dict[str, Any] = {}


class CompareSpec(Spec):
    """A method-comparison table in the report: one row per stage, deltas vs `baseline`."""

    baseline: str = Field(description="the stage every other row is compared with")
    stages: list[str] = Field(min_length=1, description="the stages compared, one row each")


class Recipe(Spec):
    name: SafeName = Field(description="names runs/<name>/ and exports/<name>/")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    data: DataSpec = DataSpec()
    models: dict[str, ModelDef] = {}
    stages: list[Any]
    compare: Optional[CompareSpec] = None
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="training, evaluation and teacher passes under bf16 autocast ('bf16') or in "
        "fp32; 'auto': bf16 on CUDA and on CPUs with native bf16 arithmetic (AMX or AVX512-BF16), fp32 "
        "on the others. Loss terms and fake quantization always compute in fp32.")

    def stage(self, name):
        return next(s for s in self.stages if s.name == name)

    def stage_key(self, index, upstream_keys):
        """Content hash of a stage: its config, the data, the seed, the model defs it builds,
        the keys of the stages it reads and the code that computes it
        (:func:`code_fingerprint`). Unchanged key -> stored result is reused."""
        s = self.stages[index]
        payload = {
            "stage": s.model_dump(mode="json", by_alias=True),
            "data": self.data.model_dump(mode="json"),
            "seed": self.seed,
            "models": {m: self.models[m].model_dump(mode="json") for _, m in s.model_refs()},
            "inputs": upstream_keys,
            "code": code_fingerprint(self, s),
            "precision": self.precision,
            "format": 2,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def source_file(obj):
    """The file defining `obj` (a class, function or module), or None (built-in, or defined
    where no file is, as in an interactive session)."""
    try:
        return inspect.getsourcefile(obj)
    except TypeError:   # built-in: no source of its own
        return None


@functools.lru_cache(maxsize=1)
def _library_dirs():
    return tuple({Path(d).resolve() for k, d in sysconfig.get_paths().items() if k.endswith(("stdlib", "lib")) and d})


def library_file(f):
    """Whether file `f` belongs to the standard library or an installed library (site-packages)."""
    p = Path(f).resolve()
    return any(d == p or d in p.parents for d in _library_dirs())


def _user_files(obj):
    """The source files of user code `obj` draws on (a --plugin's model factory or loss
    term): its module's file and, transitively, those of the modules, classes and functions
    that module's globals name, outside the standard library, site-packages and this package
    (e.g. a model class a plugin imports from a file beside it)."""
    package = Path(__file__).resolve().parent

    def user(f):
        p = Path(f).resolve()
        return not (p == package or package in p.parents or library_file(p))

    todo, seen, files = [inspect.getmodule(obj)], set(), []
    while todo:
        mod = todo.pop()
        f = getattr(mod, "__file__", None)
        if not f or f in seen or not f.endswith(".py") or not user(f):
            continue
        seen.add(f)
        files.append(f)
        for v in list(vars(mod).values()):
            if isinstance(v, types.ModuleType):
                todo.append(v)
            elif inspect.isclass(v) or inspect.isfunction(v):
                todo.append(inspect.getmodule(v))
    return files


def code_files(recipe, stage):
    """The source files whose code computes `stage`: its stage kind's file (and the modules the
    kind names as its ``code``: the quantization backends for qat and export), the files of its
    loss terms and of the models it builds (wherever they are defined: in the package or in
    a --plugin file, with the user files a plugin imports)."""
    from .losses import LOSSES, TermSpec
    from .models import MODELS
    from .stages import STAGES

    kind = STAGES[stage.kind]
    objs = [kind.run, kind.spec, *map(importlib.import_module, kind.code)]
    terms = [v for v in stage.__dict__.values() if isinstance(v, TermSpec)]
    terms += [t for v in stage.__dict__.values() if isinstance(v, list) for t in v if isinstance(t, TermSpec)]
    for t in terms:
        if t.term in LOSSES:
            objs += [LOSSES[t.term], LOSSES[t.term].spec_cls]
    for _, m in stage.model_refs():
        if m in recipe.models and recipe.models[m].arch in MODELS:
            objs.append(MODELS[recipe.models[m].arch])
    files = {f for f in map(source_file, objs) if f}
    files.update(f for o in objs for f in _user_files(o))
    return sorted(files)


def code_fingerprint(recipe, stage):
    """{"version": package version, "files": {file name: SHA-256}} of the code computing `stage`
    (:func:`code_files`): editing a loss term, stage kind, model or plugin file recomputes
    the stages that use it, and only those (and the stages that read their results)."""
    from . import __version__

    return {"version": __version__, "files": source_digests(code_files(recipe, stage))}


def source_digests(files):
    """{name: SHA-256 prefix} of source `files`, named independently of where the package or a
    plugin lives (``compress/...``, ``plugin:<file name>``): a moved checkout matches."""
    package = Path(__file__).resolve().parent
    digests = {}
    for f in files:
        try:
            with open(f, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()[:16]
        except OSError:
            digest = "unreadable"
        p = Path(f).resolve()
        # named independently of where the package or plugin lives: a moved checkout reuses
        name = f"compress/{p.relative_to(package).as_posix()}" if package in p.parents else f"plugin:{p.name}"
        digests[name] = digest
    return digests


# ---- loading -------------------------------------------------------------------------------

def parse_value(text, path):
    """A --set VALUE, read as YAML 1.2 like a recipe (``1e-3`` is a float); text that is not
    a valid YAML value stays a string."""
    try:
        return load_yaml(text, f"--set {path}")
    except CompressError as e:
        if "YAML syntax error" in str(e):
            return text
        raise


def apply_override(raw, assignment):
    """Apply ``PATH=VALUE`` to the raw recipe dict. Stages are addressed by name or index
    (``stages.teacher.epochs=1``), list elements as ``loss.0`` or ``loss[0]``; ``*``
    addresses every list element that already has the rest of the path
    (``stages.*.epochs=20``). VALUE is parsed as YAML (``1`` is an int, ``[1, 2]`` a list)."""
    if "=" not in assignment:
        raise CompressError(f"--set {assignment}: expected PATH=VALUE, e.g. stages.teacher.epochs=1")
    path, value = assignment.split("=", 1)
    keys = path_keys(path, f"--set {assignment}")
    _assign(raw, keys, parse_value(value, path.strip()), "", path.strip())
    return raw


def path_keys(path, where):
    """The keys of a dotted recipe path; ``loss[0]`` is ``loss.0``, the spelling error
    messages use (``stages[2].loss[0].T``), and a bracketed key may hold dots
    (``layers[features.0]``, a module path).

    >>> path_keys("stages[2].loss[0].T", "--set")
    ['stages', '2', 'loss', '0', 'T']
    >>> path_keys("stages.prune.layers[features.0]", "--set")
    ['stages', 'prune', 'layers', 'features.0']
    """
    s = path.strip()
    keys, after_dot = [], True   # the path starts, as after a dot, with an element
    for m in re.finditer(r"\[([^\[\]]*)\]|([^.\[\]]+)|(\.)|(.)", s):
        bracket, name, dot, stray = m.groups()
        if stray is not None or (name is not None and not after_dot):
            start, end = s.rfind(".", 0, m.start()) + 1, s.find(".", m.start())
            part = s[start:end if end >= 0 else len(s)]
            raise CompressError(f"{where}: malformed index in '{part}'; write name[i] or name.i, "
                                "e.g. stages.distill.loss[0].T=2")
        if dot is not None:
            if after_dot:
                raise CompressError(f"{where}: empty path element")
            after_dot = True
            continue
        key = name if name is not None else bracket
        if not key:
            raise CompressError(f"{where}: empty path element")
        keys.append(key)
        after_dot = False
    if after_dot:
        raise CompressError(f"{where}: empty path element")
    return keys


def _has_path(node, keys):
    for k in keys:
        if isinstance(node, dict) and k in node:
            node = node[k]
        elif isinstance(node, list) and k.isdigit() and int(k) < len(node):
            node = node[int(k)]
        else:
            return False
    return True


def _assign(node, keys, value, where, path):
    k, rest = keys[0], keys[1:]
    if isinstance(node, list):
        if k == "*":
            hits = [el for el in node if _has_path(el, rest)]
            if not hits or not rest:
                raise CompressError(f"--set {path}: no element of {where} has '{'.'.join(rest)}'")
            for el in hits:
                _assign(el, rest, copy.deepcopy(value), f"{where}.*", path)
            return
        named = {el.get("name"): i for i, el in enumerate(node) if isinstance(el, dict) and el.get("name")}
        if k.isdigit() and int(k) < len(node):
            idx = int(k)
        elif k in named:
            idx = named[k]
        else:
            valid = ", ".join(map(str, named)) or f"indices 0..{len(node) - 1}"
            raise CompressError(f"--set {path}: {where} has no element '{k}'; valid: {valid}")
        if not rest:
            node[idx] = value
        else:
            _assign(node[idx], rest, value, f"{where}.{k}", path)
    elif isinstance(node, dict):
        dotted = ".".join(keys)
        held = [key for key in node if isinstance(key, str) and (dotted == key or dotted.startswith(key + "."))]
        if k not in node and held:   # a key that holds dots (a module path)
            key = max(held, key=len)
            spelled = f"{where}[{key}]" if where else f"[{key}]"
            raise CompressError(f"--set {path}: {where or 'the recipe'} has the key '{key}'; write it in "
                                f"brackets: {spelled}{dotted[len(key):]}=...")
        if not rest:
            node[k] = value
        else:
            _assign(node.setdefault(k, {}), rest, value, f"{where}.{k}" if where else k, path)
    else:
        raise CompressError(f"--set {path}: {where} is a value, not a mapping or list")


def load_recipe(path, overrides=()):
    """Read, override and validate a recipe file. Raises CompressError on any problem.

    >>> recipe = load_recipe("recipes/vgg_prune_kd.yaml", ["stages.teacher.epochs=1"])
    """
    from .stages import STAGES  # noqa: F401  (fills the stage registry)

    p = Path(path)
    if not p.is_file():
        why = "is a directory" if p.is_dir() else "is not a regular file" if p.exists() else "does not exist"
        raise CompressError(f"recipe file '{path}' {why}")
    try:
        size = p.stat().st_size
        if size > MAX_BYTES:   # checked before reading: a 50 MB file costs nothing
            raise CompressError(f"{path}: {size} bytes; a recipe may have at most {MAX_BYTES}")
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CompressError(f"{path}: cannot read recipe ({getattr(e, 'strerror', None) or e})") from None
    raw = load_yaml(text, str(path))
    if not isinstance(raw, dict):
        raise CompressError(f"{path}: a recipe must be a mapping with name, data, models, stages")
    raw = copy.deepcopy(raw)
    for o in overrides:
        apply_override(raw, o)
    return parse_recipe(raw)


def _term_fields(cls):
    """[(field name, key in YAML)] of the fields of a stage config holding lists of loss terms."""
    from .losses import TERM_LIST

    def holds_terms(ann):
        args = get_args(ann) if get_origin(ann) is list else ()
        return bool(args) and TERM_LIST in getattr(args[0], "__metadata__", ())

    return [(n, f.alias or n) for n, f in cls.model_fields.items() if holds_terms(f.annotation)]


def _role_fields(cls, role):
    """Keys of the fields of a stage config that name `role` stages (by their StageRef marks)."""
    def marks(ann, meta=()):
        found = [m for m in meta if isinstance(m, StageRef)]
        if get_origin(ann) is Annotated:
            base, *more = get_args(ann)
            return found + marks(base, more)
        return found + [m for a in get_args(ann) for m in marks(a)]

    return [f.alias or n for n, f in cls.model_fields.items()
            if any(m.role == role for m in marks(f.annotation, f.metadata))]


def _check_terms(spec, kind, where):
    """Refuse a loss term the parsed stage cannot run, in one line naming the term's field and
    the terms valid there: one that reads a cohort's peers outside a stage kind that trains a
    cohort (`dml` in a distill stage), one that needs a teacher in a stage without one."""
    from .losses import LOSSES
    from .stages import STAGES

    has_teacher = bool(spec.stage_refs("teacher"))

    def misfit(term):
        cls = LOSSES[term]
        if cls.uses_cohort and not kind.trains_cohort:
            return "cohort"
        if cls.uses_teacher and not has_teacher:
            return "teacher"
        return None

    valid = ", ".join(sorted(n for n in LOSSES if misfit(n) is None)) or "(none)"
    for name, key in _term_fields(type(spec)):
        for j, t in enumerate(getattr(spec, name)):
            at, why = f"{where}.{key}[{j}].term", misfit(t.term)
            if why == "cohort":
                kinds = " or ".join(sorted(k for k in STAGES if STAGES[k].trains_cohort)) or "cohort-training"
                raise CompressError(f"{at}: '{t.term}' trains a cohort of peers and is only valid in a {kinds} "
                                    f"stage; valid in a {spec.kind} stage: {valid}")
            if why == "teacher" and (fields := _role_fields(type(spec), "teacher")):
                raise CompressError(f"{at}: '{t.term}' needs a teacher; set {where}.{fields[0]} to an earlier "
                                    f"stage, or use a term that needs none: {valid}")
            if why == "teacher":
                raise CompressError(f"{at}: '{t.term}' needs a teacher, and a {spec.kind} stage has none; "
                                    f"valid in a {spec.kind} stage: {valid}")


def _parse_terms(cls, s, where):
    """`s` with each loss term parsed by the registry's class for its `term`, read now (not
    when a stage module was imported), so terms a plugin registers at any time are known."""
    from .losses import LOSSES

    s = dict(s)
    for _, key in _term_fields(cls):
        items = s.get(key)
        if not isinstance(items, list):
            continue
        parsed = []
        for j, t in enumerate(items):
            at = f"{where}.{key}[{j}]"
            if not isinstance(t, dict):
                raise CompressError(f"{at}: must be a mapping with term and its fields, got {_short(t)}")
            _check_tag(t, "term", at, "loss term", LOSSES)
            parsed.append(parse(LOSSES[t["term"]].spec_cls, t, at))
        s[key] = parsed
    return s


def _check_tag(d, tag, where, what, registry):
    """The registry key `d[tag]` names (a stage's `kind`, a loss item's `term`), or a one-line
    error: missing (with a hint when a key looks like a misspelt tag) or unknown."""
    if tag not in d:
        typo = difflib.get_close_matches(tag, [str(k) for k in d], n=1, cutoff=0.6)
        hint = f" ('{typo[0]}' is no key: did you mean '{tag}'?)" if typo else ""
        raise CompressError(f"{where}.{tag}: required key is missing{hint}; valid: {', '.join(sorted(registry))}")
    if not isinstance(d[tag], str) or d[tag] not in registry:
        raise CompressError(f"{where}.{tag}: {unknown(what, d[tag], registry)}")
    return d[tag]


def parse_recipe(raw):
    from .stages import STAGES

    # Top-level keys starting with "x-" hold YAML anchors shared by stages (`<<: *budget`);
    # they are not part of the schema.
    raw = {k: v for k, v in raw.items() if not str(k).startswith("x-")}

    stages_raw = raw.get("stages")
    recipe = parse(Recipe, {**raw, "stages": []}, "")  # first: a misspelt `stages` is an unknown key
    if not isinstance(stages_raw, list) or not stages_raw:
        raise CompressError("stages: must be a non-empty list of {name, kind, ...}")
    stages, seen, quantized, written = [], {}, {}, {}
    for i, s in enumerate(stages_raw):
        where = f"stages[{i}]"
        if not isinstance(s, dict):
            raise CompressError(f"{where}: must be a mapping with name and kind, got {_short(s)}")
        _check_tag(s, "kind", where, "stage kind", STAGES)
        kind = STAGES[s["kind"]]
        spec = parse(kind.spec, _parse_terms(kind.spec, s, where), where)
        _check_terms(spec, kind, where)
        if spec.name in seen:
            raise CompressError(f"{where}.name: duplicate stage name '{spec.name}' (also stages[{seen[spec.name]}])")
        q = kind.quantizes
        for field, mark, ref in spec.refs():
            if isinstance(mark, ModelRef):
                if ref not in recipe.models:
                    raise CompressError(f"{where}.{field}: {unknown('models entry', ref, recipe.models)}")
                continue
            if ref not in seen:
                later = any(isinstance(x, dict) and x.get("name") == ref for x in stages_raw[i:])
                why = "comes later" if later else "does not exist"
                raise CompressError(f"{where}.{field}: stage '{ref}' {why}; earlier stages: "
                                    f"{', '.join(seen) or 'none'}")
            src = stages[seen[ref]]
            if not STAGES[src.kind].makes_model:
                raise CompressError(f"{where}.{field}: stage '{ref}' ({src.kind}) produces no model")
            if mark.float_model and quantized[ref]:
                raise CompressError(f"{where}.{field}: stage '{ref}' ({src.kind}) holds a quantized model; "
                                    f"a {spec.kind} stage needs a float model (one from before quantization)")
            q = q or (quantized[ref] and mark.role in ("input", "member"))
        for field, fname in spec.output_files():
            if fname in written:
                raise CompressError(f"{where}.{field}: writes {fname}, as {written[fname]} does; each stage "
                                    "and format can be exported once per recipe")
            written[fname] = f"{where}.{field}"
        seen[spec.name] = i
        quantized[spec.name] = q
        stages.append(spec)
    if recipe.compare is not None:
        refs = [("compare.baseline", recipe.compare.baseline)]
        refs += [(f"compare.stages[{i}]", n) for i, n in enumerate(recipe.compare.stages)]
        for where, ref in refs:
            if ref not in seen:
                raise CompressError(f"{where}: {unknown('stage', ref, seen)}")
            if not STAGES[stages[seen[ref]].kind].makes_model:
                raise CompressError(f"{where}: stage '{ref}' ({stages[seen[ref]].kind}) produces no model")
    return recipe.model_copy(update={"stages": stages})
