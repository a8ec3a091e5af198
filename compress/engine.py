"""The one training loop (plain training, KD and QAT all use it), evaluation, optimizers
and schedules."""

import functools
import itertools
import os
import time
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from . import distributed
from .data import Split, iterate, num_batches
from .errors import CompressError


class NonFiniteLoss(CompressError):
    """Training produced a NaN or infinite loss; `desc` is the epoch's "<stage> e/E" label."""

    def __init__(self, desc, steps, what="the loss became NaN or infinite"):
        self.desc, self.steps, self.what = desc, steps, what
        super().__init__(f"{desc}: {what} within the first {steps} steps")


@dataclass
class RunContext:
    """What a stage needs beyond its own config; stages never branch on each other's kind."""

    recipe: object
    data: object                    # compress.data.Data, tensors already on `device`
    device: torch.device
    results: dict = field(default_factory=dict)   # stage name -> StageResult (earlier stages)
    cache: dict = field(default_factory=dict)     # run-wide cache, e.g. teacher logits
    stage_dir: object = None        # where this stage may write files
    export_dir: object = None
    storage: object = None          # compress.storage.Storage: every delete/overwrite is checked by it
    seed: int = 0
    logger: object = None           # compress.tracking.Tracker (.epoch(stage, epoch, metrics)) or None
    bf16: bool = False              # autocast to bf16 (the recipe's `precision`, resolved for the device)
    fresh: bool = False             # `run --fresh`: nothing stored is read (results, cached teacher logits)

    @property
    def cuda(self):
        return self.device.type == "cuda"

    def autocast(self):
        """bf16 autocast when the run's precision is bf16; plain fp32 otherwise."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    @property
    def precision(self):
        """'bf16' or 'fp32': what the run computes in (for logs and the report)."""
        return "bf16" if self.bf16 else "fp32"

    def generator(self, salt=0):
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1000003 + salt)
        return g


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA) under which it runs AVX2 kernels or
# older, and those under which it has no bf16 dot product
_AVX2_OR_LOWER_ISAS = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2"}
_NO_BF16_ISAS = _AVX2_OR_LOWER_ISAS | {"AVX512_CORE", "AVX512_CORE_VNNI"}


def _onednn_isa_cap():
    """The ISA oneDNN is capped to by the environment, upper-cased; '' when not capped."""
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()


def native_bf16(device):
    """Whether `device` computes bf16 convolutions and matmuls in hardware: CUDA, or a CPU with
    AMX tiles or AVX512-BF16 (elsewhere oneDNN emulates bf16, slower than fp32) that oneDNN
    is not capped below (``ONEDNN_MAX_CPU_ISA=AVX2`` runs as on an AVX2-only CPU)."""
    if device.type == "cuda":
        return True
    if _onednn_isa_cap() in _NO_BF16_ISAS:
        return False
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, "_is_amx_tile_supported", None), getattr(cpu, "_is_avx512_bf16_supported", None)]
    return any(bool(f()) for f in checks if f is not None)


def onednn_avx2_or_lower():
    """Whether oneDNN runs its AVX2 (or older) kernels here: a CPU without AVX-512 (as CPUID
    reports it) or oneDNN capped below it by ``ONEDNN_MAX_CPU_ISA``."""
    if _onednn_isa_cap() in _AVX2_OR_LOWER_ISAS:
        return True
    avx512 = getattr(getattr(torch, "cpu", None), "_is_avx512_supported", None)
    return avx512 is not None and not avx512()


def onednn_1x1_hazards(module, device):
    """Paths of the trainable convolutions whose weight gradient oneDNN's AVX2 1x1 kernel
    computes wrongly on `device`: 1x1, strided, fewer than 8 input channels per group, on a
    CPU where oneDNN runs AVX2 kernels. With channels_last input that kernel writes past its
    workspace (uxlfoundation/oneDNN#6035): measured here, run as an AVX2 CPU, a 1x1 stride-2
    conv with 2-7 input channels hung, aborted with heap corruption or returned, at random;
    with 1 or 8 and more, or stride 1, it never failed."""
    if device.type != "cpu" or not onednn_avx2_or_lower():
        return []
    hazards = []
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            if _hazard(m.weight, m.stride):
                hazards.append(name)
        elif isinstance(m, torch.fx.GraphModule):     # a pt2e QAT model: convs are graph calls
            for node in m.graph.nodes:
                if node.op == "call_function" and node.target in (torch.ops.aten.conv2d.default,
                                                                  torch.ops.aten.convolution.default):
                    stride = node.args[3] if len(node.args) > 3 else node.kwargs.get("stride", (1, 1))
                    if _hazard(_graph_param(m, node.args[1]), stride):
                        hazards.append(f"{name}.{node.name}" if name else node.name)
    return hazards


def _hazard(weight, stride):
    return (weight is not None and weight.requires_grad and weight.dim() == 4
            and tuple(weight.shape[2:]) == (1, 1) and tuple(stride) != (1, 1) and 1 < weight.shape[1] < 8)


def _graph_param(gm, node, depth=8):
    """The parameter a graph value comes from through single-input ops (the fake quantization
    of a conv's weight, its BatchNorm scaling): follows first arguments to a get_attr."""
    while isinstance(node, torch.fx.Node) and node.op != "get_attr" and node.args and depth:
        node, depth = node.args[0], depth - 1
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        try:
            return gm.get_parameter(node.target)
        except AttributeError:
            return None
    return None


@contextmanager
def _onednn_guard(model, objective, device, name):
    """oneDNN off while `model` trains when it has a conv of ``onednn_1x1_hazards``
    (oneDNN#6035 corrupts memory there; ATen's own, slower convolutions train it correctly),
    with one line saying so; as it was afterwards."""
    hazards = onednn_1x1_hazards(model, device) + onednn_1x1_hazards(objective, device)
    enabled = torch.backends.mkldnn.enabled
    if not (hazards and enabled):
        yield
        return
    if distributed.is_main():
        more = ", ..." if len(hazards) > 3 else ""
        print(f"  {name}: oneDNN off for this stage: its AVX2 kernel corrupts memory training a strided "
              f"1x1 conv with 2-7 input channels ({', '.join(hazards[:3])}{more}; oneDNN issue 6035)")
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache   # once per process; later calls return what the first one did
def tune_allocator():
    """Keep freed tensor memory in this process for the next step (glibc only; once per
    process). By default glibc gives every block over its mmap threshold (128 KB, raised
    only as blocks are freed) back to the kernel when freed and trims the heap's top, so each
    training step faults its activations in again: a vgg_small fp32 step at batch 128 took
    0.55M page faults per 20 steps and 86 ms, against 0.17M and 79 ms with this (measured
    as an AVX2 CPU, 2 threads). Blocks up to 32 MB (glibc's upper bound) come from the heap
    and the heap is not trimmed, so the process holds its peak memory until it exits.
    Left alone when the environment already chooses: ``GLIBC_TUNABLES`` naming malloc,
    ``MALLOC_*`` variables, an allocator in ``LD_PRELOAD`` (jemalloc, tcmalloc), or
    ``COMPRESS_MALLOC=default``. Returns a short description of the setting in force."""
    import ctypes
    import platform
    import sys

    env = os.environ
    chosen = ("malloc" in env.get("GLIBC_TUNABLES", "") or any(k.startswith("MALLOC_") for k in env)
              or "malloc" in env.get("LD_PRELOAD", "") or env.get("COMPRESS_MALLOC", "").lower() == "default")
    what = "as the environment sets it" if chosen else "default"
    if not chosen and sys.platform == "linux" and platform.libc_ver()[0] == "glibc":
        try:
            mallopt = ctypes.CDLL(None).mallopt
            if mallopt(_M_MMAP_THRESHOLD, 32 << 20) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1):
                what = "glibc: mmap threshold 32 MB, no trimming"
        except (OSError, AttributeError):   # no mallopt in this C library
            pass
    return what


def use_bf16(precision, device):
    """The recipe's `precision` ('auto', 'bf16', 'fp32') resolved for `device`."""
    return precision == "bf16" or (precision == "auto" and native_bf16(device))


class Frozen(nn.Module):
    """A teacher frozen by construction: eval mode that ``train()`` cannot undo, no grads,
    forward under ``torch.no_grad()``. Feature hooks attach to ``.module``'s paths;
    :meth:`logits` runs :attr:`folded`, which they do not see."""

    def __init__(self, module):
        super().__init__()
        self._folded = []   # built on first use; a list, so not a submodule (nor its parameters)
        self.module = module.eval().requires_grad_(False)

    def train(self, mode=True):
        return super().train(False)

    def _apply(self, fn, *args, **kwargs):   # .to() / .float() / ...: fold the moved weights again
        self._folded.clear()
        return super()._apply(fn, *args, **kwargs)

    @property
    def folded(self):
        """``.module`` with each BatchNorm folded into the layer before it
        (:func:`fold_batchnorm`); the weights never change, so it is built once."""
        if not self._folded:
            self._folded.append(fold_batchnorm(self.module).requires_grad_(False))
        return self._folded[0]

    def forward(self, x):
        with torch.no_grad():
            return self.module(x)

    def logits(self, x):
        """The teacher's output for passes that need no feature of it (the logit cache, KD on
        logits): computed by :attr:`folded`, one memory pass fewer per BatchNorm."""
        with torch.no_grad():
            return self.folded(x)


def fold_batchnorm(model):
    """An inference copy of `model` with every BatchNorm that follows a convolution (or a
    linear layer) folded into its weights (torch.fx), in channels_last; `model` itself when
    there is nothing to fold or it cannot be traced symbolically. Same function up to
    rounding (fp32: ~1e-5 on vgg_small's logits); for teacher passes and learning-curve
    evaluations, where it saves a memory pass per BatchNorm (teacher logits over the
    training set: 1.1x faster in fp32, 1.2x in bf16 on a 2-core Xeon). `model` is
    put in eval mode (folding uses the running statistics)."""
    from torch.fx.experimental.optimization import fuse

    def norms(m):
        return sum(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())

    before = norms(model)
    if not before:
        return model
    try:
        folded = fuse(model.eval(), inplace=False)
    except Exception:   # noqa: BLE001 - data-dependent control flow etc.: run the model unfolded
        return model
    if norms(folded) == before:
        return model
    return folded.to(memory_format=torch.channels_last)


def build_optimizer(spec, params):
    o = spec.optimizer
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]   # BN and biases: no weight decay
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
    return torch.optim.AdamW(groups, lr=o.lr)


def build_scheduler(spec, optimizer, total_steps):
    if spec.schedule == "onecycle":
        total = max(total_steps, 1)
        # A warm-up of at most one step is none: OneCycleLR divides 0 by 0 at exactly one.
        warmup = spec.warmup if spec.warmup * total > 1 else 0.0
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=spec.optimizer.lr, total_steps=total,
            pct_start=warmup, cycle_momentum=False, anneal_strategy="linear",
            div_factor=25.0, final_div_factor=1e3)
    if spec.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _all_finite(model):
    """Every floating-point parameter and buffer (BatchNorm statistics, quantization ranges)
    of `model` is finite."""
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


def train_one_epoch(model, objective, optimizer, scheduler, batches, ctx, *, steps, desc="", batch_size=1,
                    after_step=None, record=None):
    """One pass over `batches`. `objective(model, batch) -> (loss, {term: value}, logits)`;
    `after_step(model)` runs after each optimizer step (e.g. a weight average's update);
    `record(batch, logits)` sees each batch's logits (e.g. data pruning's per-image scores).

    Metrics accumulate on the device and are read once at the end (no per-step sync,
    except a progress-bar refresh and a finiteness check every 50 steps). Returns
    {"loss/<term>": mean, "train_top1": %, "lr": the learning rate of the last step,
    "steps": optimizer steps taken}. A NaN or infinite loss raises :class:`NonFiniteLoss`
    at the next check (within 50 steps, or at the epoch's end).
    """
    model.train()
    objective.train()
    sums, correct, seen = {}, torch.zeros((), device=ctx.device), 0
    finite = torch.ones((), dtype=torch.bool, device=ctx.device)   # all losses so far finite
    bar = tqdm(total=steps * batch_size, desc=desc, unit="img", unit_scale=True, leave=False,
               disable=None if distributed.is_main() else True, dynamic_ncols=True)
    t0 = time.perf_counter()
    lr, n_steps = optimizer.param_groups[0]["lr"], 0   # Python floats/ints: no device sync
    for step, batch in enumerate(batches):
        try:
            with ctx.autocast():
                loss, parts, logits = objective(model, batch)
        except Exception:
            # Weights that a diverging run blew up (or a non-finite loss made NaN) can overflow a
            # forward, which may then fail before the next finiteness check (pt2e's observers
            # assert min <= max on NaN): report the divergence, not that traceback. No collective
            # here: a rank whose own state is finite re-raises, and every rank stops either way.
            if n_steps and not (bool(finite) and _all_finite(model)):
                bar.close()
                raise NonFiniteLoss(desc, n_steps, "the loss, weights or activations became NaN or "
                                                   "infinite") from None
            raise
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lr = optimizer.param_groups[0]["lr"]   # the rate this step uses (the scheduler moves it next)
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step(model)
        if record is not None:
            record(batch, logits)
        n_steps += 1
        finite &= torch.isfinite(loss.detach())
        for k, v in parts.items():
            sums[k] = sums.get(k, 0) + v.detach().float() * len(batch.y)
        correct += (logits.detach().argmax(1) == batch.y).sum()
        seen += len(batch.y)
        bar.update(len(batch.y))
        # one sync per 50 steps stops a diverged run early; under DDP every rank stops together
        if step % 50 == 49 and not distributed.all_agree(finite):
            bar.close()
            raise NonFiniteLoss(desc, n_steps)
        if step % 50 == 49 and not bar.disable:
            bar.set_postfix(loss=f"{float(sum(sums.values())) / seen:.3f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.3g}", refresh=False)
    bar.close()
    if not distributed.all_agree(finite):
        raise NonFiniteLoss(desc, n_steps)
    if distributed.active():   # metrics of the global batch, not of this rank's shard (one all-reduce)
        vals = distributed.all_sum([*sums.values(), correct, torch.tensor(float(seen), device=ctx.device)])
        sums, correct, seen = dict(zip(sums, vals)), vals[-2], int(vals[-1])
    out = {f"loss/{k}": float(v) / max(seen, 1) for k, v in sums.items()}
    out["loss"] = sum(out.values())
    out["train_top1"] = 100.0 * float(correct) / max(seen, 1)
    out["images_per_s"] = seen / max(time.perf_counter() - t0, 1e-9)
    out["lr"], out["steps"] = lr, n_steps
    return out


@torch.no_grad()
def predict(model, split, ctx, batch_size=None, channels_last=None, exact=False):
    """Logits of `model` on every image of `split` (normalised as in training), on the device;
    under the run's autocast unless `exact` (fp32, as the exported FP32 file runs)."""
    bs = batch_size or ctx.recipe.data.eval_batch_size
    cl = channels_last if channels_last is not None else True
    was = model.training
    model.eval()
    net = model if exact else fold_batchnorm(model)   # exact: the model as it is, as it is exported
    outs = []
    amp = nullcontext() if exact else ctx.autocast()
    for b in iterate(split, ctx.data, bs, channels_last=cl):
        with amp:
            outs.append(net(b.x).float())
    model.train(was)
    return torch.cat(outs)


def evaluate(model, ctx, split=None, exact=True):
    """top-1 in percent on the whole test split (or `split`); in fp32 unless not `exact` (the
    run's bf16 autocast: learning-curve points only, never a stage's top-1)."""
    split = split if split is not None else ctx.data.test
    logits = predict(model, split, ctx, exact=exact)
    return 100.0 * float((logits.argmax(1) == split.y).float().mean())


class _Stretched:
    """A scheduler stepped `full` times over an epoch of `actual` (<= `full`) steps, spread
    evenly: a data-pruning epoch moves the learning rate as far as a whole epoch does."""

    def __init__(self, scheduler, full, actual):
        self.scheduler, self.full, self.actual, self.done = scheduler, full, actual, 0

    def step(self):
        self.done += 1
        for _ in range(self.done * self.full // self.actual - (self.done - 1) * self.full // self.actual):
            self.scheduler.step()


class DataPruning:
    """InfoBatch (Qin et al., ICLR 2024) over a training split: per-image scores (each image's
    cross-entropy when last trained on), and per epoch the images to train on and their
    loss weights. Scores start equal, so the first epoch keeps every image."""

    def __init__(self, spec, n, epochs, device, generator):
        self.spec, self.epochs, self.gen = spec, epochs, generator
        self.scores = torch.ones(n, device=device)
        self._fresh = torch.zeros(n, device=device)
        self._seen = torch.zeros(n, device=device)

    def plan(self, epoch):
        """(indices, weights) for `epoch`, or (None, None) for the whole split unweighted."""
        if epoch >= self.epochs - self.spec.full_epochs:
            return None, None
        r = self.spec.ratio
        well = self.scores < self.scores.mean()
        drop = well & (torch.rand(len(self.scores), device=self.scores.device, generator=self.gen) < r)
        weights = torch.ones_like(self.scores)
        weights[well & ~drop] = 1.0 / (1.0 - r)
        return (~drop).nonzero().squeeze(1), weights

    def record(self, batch, logits):
        with torch.no_grad():
            loss = nn.functional.cross_entropy(logits.detach().float(), batch.y, reduction="none")
            self._fresh[batch.index] = loss
            self._seen[batch.index] = 1.0

    def end_epoch(self):
        """Images trained on this epoch take their new scores (each image is in one batch of
        an epoch, on one rank, so the sums over ranks are its score and 1)."""
        fresh, seen = distributed.all_sum([self._fresh, self._seen])
        self.scores = torch.where(seen > 0, fresh, self.scores)
        self._fresh.zero_()
        self._seen.zero_()


def fit(model, objective, spec, ctx, *, name, on_epoch_start=None):
    """Train `model` with `objective` for ``spec.epochs`` (a TrainingSpec): optimizer,
    schedule, augmentation, progress and logging. Stages wrap this; they never copy it.

    `on_epoch_start(epoch)` lets a stage change phase (e.g. QAT freezes observers).
    Returns the per-epoch metric dicts. Those of every ``spec.eval_every``-th epoch carry
    ``test_top1`` (and ``test_images``, how many test images it was measured on:
    ``spec.eval_subset`` or the whole split) for the learning curves; the last epoch's is
    always measured on the whole test set, so it is the stage's final top-1.
    """
    params = list(model.parameters()) + list(objective.parameters())
    optimizer = build_optimizer(spec, params)
    data = ctx.data.train
    steps = num_batches(len(data), spec.batch_size, drop_last=True)
    if spec.steps_per_epoch:   # a partial epoch: the first steps of each fresh shuffle
        steps = min(steps, spec.steps_per_epoch)
    scheduler = build_scheduler(spec, optimizer, steps * spec.epochs)
    gen = ctx.generator(salt=zlib.crc32(name.encode()))
    averaged = None
    if spec.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        # BN statistics are averaged too (use_buffers), so the average is evaluated as is.
        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(spec.ema), use_buffers=True)
    # torchrun: `batch_size` is the global batch; each rank trains on its rows of it under DDP
    restore_bn = distributed.use_sync_batchnorm(model, spec.sync_batchnorm)
    step_objective, shard = distributed.wrap(model, objective, ctx.device), distributed.shard()
    pruning = (DataPruning(spec.data_pruning, len(data), spec.epochs, ctx.device,
                           ctx.generator(salt=zlib.crc32(name.encode()) + 1))
               if spec.data_pruning else None)
    history = []
    with _onednn_guard(model, objective, ctx.device, name):
        for epoch in range(spec.epochs):
            if on_epoch_start:
                on_epoch_start(epoch)
            size = spec.progressive_resize[epoch] if epoch < len(spec.progressive_resize) else None
            keep, weights = pruning.plan(epoch) if pruning else (None, None)
            n_steps, sched = steps, scheduler
            if keep is not None:
                n_steps = min(steps, max(1, num_batches(len(keep), spec.batch_size, drop_last=True)))
                sched = _Stretched(scheduler, steps, n_steps)
            batches = itertools.islice(iterate(data, ctx.data, spec.batch_size, shuffle=True,
                                               augment=spec.augment, generator=gen, channels_last=True,
                                               drop_last=True, shard=shard, size=size,
                                               indices=keep, weights=weights), n_steps)
            m = train_one_epoch(model, step_objective, optimizer, sched, batches, ctx, steps=n_steps,
                                desc=f"{name} {epoch + 1}/{spec.epochs}",
                                batch_size=spec.batch_size // shard[1],
                                after_step=averaged.update_parameters if averaged is not None else None,
                                record=pruning.record if pruning else None)
            if pruning:
                pruning.end_epoch()
                m["kept_images"] = len(data) if keep is None else len(keep)
            last = epoch == spec.epochs - 1
            if averaged is not None and last:   # the average is the result
                model.load_state_dict(averaged.module.state_dict())
            evaluated = averaged.module if averaged is not None and not last else model
            if last or (spec.eval_every and (epoch + 1) % spec.eval_every == 0):
                split = ctx.data.test
                if not last and spec.eval_subset and spec.eval_subset < len(split):
                    split = Split(split.x[:spec.eval_subset], split.y[:spec.eval_subset])
                m["test_top1"], m["test_images"] = evaluate(evaluated, ctx, split, exact=last), len(split)
            history.append(m)
            if ctx.logger:
                ctx.logger.epoch(name, epoch, m)
    restore_bn()
    return history


