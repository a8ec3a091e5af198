"""TensorBoard event files of a run, on one global step axis across stages.

Layout (``tensorboard --logdir runs`` shows every recipe; each stage is one TensorBoard run,
so the stages of a recipe line up as one timeline on shared charts)::

    runs/<recipe>/tb/<stage>/   scalars of one stage, written only when the stage runs
    runs/<recipe>/tb/recipe/    the resolved recipe (text) and its hparams, each invocation

The global step counts optimizer steps from the first training stage of the recipe. A stage
reused from storage writes nothing: the events its original run wrote stay, and the steps it
took (from its stored per-epoch history) still advance the axis, so a stage that runs after
it lands where it would have in one uninterrupted run. A stage that runs again replaces its
folder's events, so a step never appears twice.

Tags: ``loss/<term>`` (one per named loss term), ``loss/total``, ``lr`` (the learning rate
of the epoch's last step), ``top1/train``, ``top1/test`` (percent), ``throughput/images_per_s``.
"""

from pathlib import Path

import yaml

from .data import num_batches

# history key -> TensorBoard tag; loss terms ("loss/<term>") keep their own names
_TAGS = {"loss": "loss/total", "lr": "lr", "train_top1": "top1/train", "test_top1": "top1/test",
         "images_per_s": "throughput/images_per_s"}
RECIPE_DIR = "recipe"


def _writer(log_dir):
    from torch.utils.tensorboard import SummaryWriter  # imported late: tensorboard is slow to import

    return SummaryWriter(log_dir=str(log_dir), flush_secs=30)


def history_steps(history, fallback_per_epoch=0):
    """Optimizer steps a stored history covers (``steps`` per epoch; older results lack it)."""
    return sum(int(h.get("steps", fallback_per_epoch)) for h in history or [])


def epoch_scalars(m):
    """{tag: value} of one per-epoch metrics dict, as logged."""
    out = {}
    for k, v in m.items():
        if not isinstance(v, (int, float)) or k == "steps":
            continue
        tag = k if k.startswith("loss/") else _TAGS.get(k)
        if tag:
            out[tag] = float(v)
    return out


def flat_hparams(obj, prefix=""):
    """Scalar leaves of a nested dict/list as {dotted.path: int|float|str|bool} (lists of
    scalars become one string), the form TensorBoard's hparams plugin takes."""
    out = {}
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        items = ((str(i), v) for i, v in enumerate(obj))
    else:
        return {prefix: obj if isinstance(obj, (int, float, str, bool)) else str(obj)}
    for k, v in items:
        out.update(flat_hparams(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def recipe_dict(recipe):
    """The resolved recipe (defaults filled in) as plain data; stages keyed by name."""
    raw = recipe.model_dump(mode="json", by_alias=True, exclude_none=True)
    raw["stages"] = [s.model_dump(mode="json", by_alias=True, exclude_none=True) for s in recipe.stages]
    return raw


class Tracker:
    """Writes a run's TensorBoard events; the engine calls :meth:`epoch` once per epoch
    (``ctx.logger``), the pipeline :meth:`begin_stage` / :meth:`end_stage` around each stage.

    >>> t = Tracker(Storage(".", "vgg_prune_kd"), recipe, data)  # doctest: +SKIP
    """

    def __init__(self, storage, recipe, data):
        self.storage = storage          # every folder this tracker clears passes its check
        self.root = Path(storage.run_dir) / "tb"
        self.recipe, self.data = recipe, data
        self.step = 0               # global step at the start of the current stage
        self._stage_steps = 0       # optimizer steps taken so far in the running stage
        self._writer = None
        self._running = None
        names = {s.name for s in recipe.stages}
        if self.root.is_dir():      # folders of stages no longer in the recipe would mislead
            for d in self.root.iterdir():
                if d.is_dir() and d.name not in names and d.name != RECIPE_DIR:
                    storage.remove(d)
        storage.remove(self.root / RECIPE_DIR)
        self._recipe_writer = _writer(self.root / RECIPE_DIR)
        text = yaml.safe_dump(recipe_dict(recipe), sort_keys=False)
        # four-space indent: TensorBoard renders text as markdown, this keeps it verbatim
        self._recipe_writer.add_text("recipe", "\n".join("    " + ln for ln in text.splitlines()), 0)
        self._recipe_writer.flush()

    def _stage_writer(self):
        if self._writer is None:
            self._writer = _writer(self.root / self._running)
        return self._writer

    def begin_stage(self, name):
        """The stage `name` is about to run (not reused): its old events are replaced."""
        self.storage.remove(self.root / name)
        self._running, self._stage_steps = name, 0

    def epoch(self, name, epoch, m):
        """Log one epoch's metrics at the global step where the epoch ends."""
        if self._running != name:
            return
        self._stage_steps += int(m.get("steps", 0))
        w = self._stage_writer()
        for tag, v in epoch_scalars(m).items():
            w.add_scalar(tag, v, self.step + self._stage_steps)

    def end_stage(self, stage, result):
        """After a stage, run or reused: a stage that ran but has no per-epoch history (prune)
        logs its test top-1 at its place on the axis; then the axis advances by its steps."""
        history = result.info.get("history") or []
        if self._running == stage.name:
            if not history and "top1" in result.metrics:
                self._stage_writer().add_scalar("top1/test", float(result.metrics["top1"]), self.step)
            if self._writer is not None:
                self._writer.close()
            self._writer, self._running = None, None
        bs = getattr(stage, "batch_size", None)
        per_epoch = num_batches(len(self.data.train), bs, drop_last=True) if bs else 0
        self.step += history_steps(history, per_epoch)

    def close(self, report=None):
        """Record the hparams (the resolved recipe, flattened) with the run's final top-1s."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if report is not None:
            metrics = {f"final/top1/{s['name']}": float(s["top1"]) for s in report["stages"]
                       if s.get("top1") is not None}
            metrics.update({f"final/top1/{e['model']}-{e['format']}": float(e["top1"])
                            for e in report["exports"]})
            hp = flat_hparams(recipe_dict(self.recipe))
            # run_name ".": the hparams go into tb/recipe/ itself, not a timestamped subfolder
            self._recipe_writer.add_hparams(hp, metrics or {"final/none": 0.0}, run_name=".")
        self._recipe_writer.close()
