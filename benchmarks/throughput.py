"""Training and evaluation throughput of `compress` against the loops the field writes.

    python benchmarks/throughput.py [--steps 20] [--rounds 3] [--device cpu|cuda] [--threads N]

In one run, on one machine, the default recipe's teacher (`vgg_small`) and its pruned student
(the recipe's `prune` settings, the `prune` stage's own code), Fashion-MNIST, batch 256, it times:

- plain PyTorch loop: the teacher trained from one in-memory tensor, channels_last, no
  per-step sync -- the unit `benchmarks/recipe_cost.py` measures the recipe in;
- ours, plain: `engine.train_one_epoch` with cross-entropy (teacher, student);
- ours, KD cached: the distill stage's step, teacher logits looked up in the per-view cache
  (the cache itself is timed once and reported apart, and amortised below);
- ours, KD online: the same step with the teacher run on every batch;
- reference KD loop, written as the tutorials write it: torchvision `FashionMNIST` with
  `ToTensor()`/`Normalize()` through a `DataLoader` (batch 256, shuffle), the teacher
  run on every batch, `loss.item()` every step;
- evaluation: `engine.evaluate`'s batched inference (teacher, student).

Every loop runs the same number of steps of the same batch size; the loops take turns
for `--rounds` rounds (so a noisy neighbour hits all of them alike) and the median
images/s per loop is quoted, with the ratios. torchvision's FashionMNIST reads only the
uncompressed IDX files under root/FashionMNIST/raw: they are written from the dataset's
.gz files into a temporary folder first.
"""

import argparse
import copy
import gzip
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.commands import cpu_info  # noqa: E402
from compress.config import load_recipe, parse_recipe  # noqa: E402
from compress.data import DEBIAN_FASHION_MNIST, fashion_mnist, iterate  # noqa: E402
from compress.engine import (Frozen, RunContext, build_optimizer, build_scheduler, predict,  # noqa: E402
                             train_one_epoch, use_bf16)
from compress.losses import Objective  # noqa: E402
from compress.losses.ce import CESpec  # noqa: E402
from compress.losses.kd import KDSpec  # noqa: E402
from compress.models import build_model  # noqa: E402
from compress.stages import teacher_logits  # noqa: E402
from compress.stages.prune import prune_model  # noqa: E402

BATCH = 256
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")


def machine_lines(threads):
    """CPU model and the flags that decide speed here, library versions, threads."""
    info = cpu_info()   # /proc/cpuinfo, as lscpu reads it
    model, flags = info["model"] or platform.processor() or "?", set(info["isa"] or ())
    import onnxruntime
    import torchvision

    lines = [f"cpu: {model}, {os.cpu_count()} logical CPUs; flags: "
             + " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in FLAGS),
             f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
             f"onnxruntime {onnxruntime.__version__}, torch threads {threads}"]
    caps = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if os.environ.get(k)}
    lines.append(f"torch kernels: {torch.backends.cpu.get_cpu_capability()}"
                 + (f" (capped: {' '.join(f'{k}={v}' for k, v in caps.items())}; onnxruntime is not capped)"
                    if caps else ""))
    if os.environ.get("COMPRESS_CPU_AS"):
        lines.append(f"run as an {os.environ['COMPRESS_CPU_AS']} CPU (benchmarks/cpu_as.py: CPUID and "
                     "/proc/cpuinfo hide the rest; flags above as seen)")
    if torch.cuda.is_available():
        lines.append(f"gpu: {torch.cuda.get_device_name(0)}")
    return lines


def fmnist_source():
    """Folder holding the four Fashion-MNIST IDX files (.gz or not)."""
    for d in (os.environ.get("COMPRESS_DATA"), DEBIAN_FASHION_MNIST):
        if d and Path(d).is_dir():
            return Path(d)
    sys.exit("Fashion-MNIST not found: set $COMPRESS_DATA or install dataset-fashion-mnist")


def torchvision_root(src, tmp):
    """A root that torchvision.datasets.FashionMNIST(download=False) accepts: the
    uncompressed IDX files under root/FashionMNIST/raw."""
    raw = Path(tmp, "FashionMNIST", "raw")
    raw.mkdir(parents=True)
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        if (src / stem).is_file():
            shutil.copyfile(src / stem, raw / stem)
        else:
            with gzip.open(src / f"{stem}.gz", "rb") as f, open(raw / stem, "wb") as g:
                shutil.copyfileobj(f, g)
    return tmp


def student_of(teacher, data):
    """The default recipe's student shape: its prune stage's settings, applied by the
    prune stage's own code."""
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "vgg_prune_kd.yaml")
    cfg = recipe.stage("prune")
    return prune_model(copy.deepcopy(teacher).cpu().eval(), cfg, data.input_shape, data.num_classes, cfg.ratio)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- the loops: each runs `steps` batches of BATCH images and returns images seen --------

def plain_loop(model, data, device, steps, generator):
    """A plain, well-written PyTorch loop: the training set as one normalised tensor in
    memory, channels_last, SGD-nesterov, cross-entropy, no per-step sync."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()
    x_all, y_all = data["x"], data["y"]
    order = torch.randperm(len(y_all), device=device, generator=generator)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for i in range(steps):
        idx = order[i * BATCH:(i + 1) * BATCH]
        x = x_all[idx].contiguous(memory_format=torch.channels_last)
        with amp:
            loss = F.cross_entropy(model(x), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * BATCH


def reference_kd_loop(student, teacher, loader, device, steps):
    """Knowledge distillation as the tutorials write it (DataLoader, transforms, teacher
    on every batch, `.item()` every step)."""
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    student.train()
    teacher.eval()
    running, seen, T, alpha = 0.0, 0, 4.0, 0.9
    for i, (images, labels) in enumerate(loader):
        if i == steps:
            break
        images, labels = images.to(device), labels.to(device)
        opt.zero_grad()
        with torch.no_grad():
            t_logits = teacher(images)
        s_logits = student(images)
        soft = F.kl_div(F.log_softmax(s_logits / T, 1), F.softmax(t_logits / T, 1),
                        reduction="batchmean") * T * T
        loss = alpha * soft + (1 - alpha) * F.cross_entropy(s_logits, labels)
        loss.backward()
        opt.step()
        running += loss.item()
        seen += len(labels)
    return seen


def ours(model, objective, ctx, steps, generator, augment):
    """`engine.train_one_epoch` on `steps` batches drawn as `fit` draws them."""
    from compress.config import TrainingSpec

    spec = TrainingSpec(epochs=1, batch_size=BATCH)
    opt = build_optimizer(spec, list(model.parameters()) + list(objective.parameters()))
    sched = build_scheduler(spec, opt, steps)
    batches = iterate(ctx.data.train, ctx.data, BATCH, shuffle=True, augment=augment, generator=generator,
                      channels_last=True, drop_last=True)
    batches = (b for _, b in zip(range(steps), batches))
    os.environ.setdefault("TQDM_DISABLE", "1")
    m = train_one_epoch(model, objective, opt, sched, batches, ctx, steps=steps, batch_size=BATCH)
    return m["steps"] * BATCH


def evaluation(model, ctx, n):
    from compress.data import Split

    split = Split(ctx.data.test.x[:n], ctx.data.test.y[:n])
    predict(model, split, ctx)
    return n


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="batches of 256 per loop and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the median per loop is quoted")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="our loops' precision, as a recipe's `precision` (default auto: bf16 where the "
                        "device computes it natively); the plain and reference loops are what they are")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time, which a shared machine's "
                        "other jobs do not inflate (use with --threads 1: idle spinning of extra "
                        "threads would count)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    os.environ["TQDM_DISABLE"] = "1"
    print("\n".join(machine_lines(torch.get_num_threads())))
    print(f"device {device}, batch {BATCH}, {a.steps} steps per loop and round, {a.rounds} rounds, "
          f"{a.clock} clock")

    src = fmnist_source()
    data = fashion_mnist(root=str(src))
    recipe = parse_recipe({"name": "throughput", "data": {"name": "fashion_mnist"},
                           "models": {"teacher": {"arch": "vgg_small"}},
                           "stages": [{"name": "t", "kind": "train", "model": "teacher"}]})
    ctx = RunContext(recipe=recipe, data=data.to(device), device=device, bf16=use_bf16(a.precision, device))
    print(f"ours: {ctx.precision} (--precision {a.precision}); plain loop: "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}; reference KD loop: fp32")
    torch.manual_seed(0)
    teacher_cpu = build_model({"arch": "vgg_small", "args": {"in_channels": 1, "num_classes": 10}})
    student_cpu = student_of(teacher_cpu, data)
    n_t = sum(p.numel() for p in teacher_cpu.parameters())
    n_s = sum(p.numel() for p in student_cpu.parameters())
    widths = [m.out_channels for m in student_cpu.modules() if isinstance(m, torch.nn.Conv2d)]
    print(f"teacher vgg_small {n_t} params; student (the default recipe's prune stage) {n_s} params, "
          f"conv widths {widths}")

    def fresh(m):
        return copy.deepcopy(m).to(device).to(memory_format=torch.channels_last)

    teacher = fresh(teacher_cpu)
    frozen = Frozen(fresh(teacher_cpu))
    aug = type(recipe.stages[0].augment)(flip=True)
    gen = torch.Generator(device=device).manual_seed(0)

    # The teacher-logit cache of the distill stage (two views: as stored, mirrored).
    sync(device)
    t0 = clock()
    cache = teacher_logits(ctx, "teacher", frozen, aug)
    sync(device)
    cache_s = clock() - t0
    print(f"teacher-logit cache: {cache.shape[0]} views x {cache.shape[1]} images in {cache_s:.2f} s")

    # Plain loop data: the training set normalised once, in memory, on the device.
    plain_data = {"x": ((ctx.data.train.x.float() / 255 - data.mean[0]) / data.std[0]),
                  "y": ctx.data.train.y}

    import torchvision
    from torchvision import transforms

    tmp = tempfile.mkdtemp(prefix="tv-fmnist-")
    try:
        tv = torchvision.datasets.FashionMNIST(
            torchvision_root(src, tmp), train=True, download=False,
            transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.2860,), (0.3530,))]))
        loader = torch.utils.data.DataLoader(tv, batch_size=BATCH, shuffle=True)
        kd = [KDSpec(T=4.0, alpha=0.9)]
        student_plain, student_kd, student_online, student_ref = (fresh(student_cpu) for _ in range(4))
        obj_plain_t = Objective([CESpec()], teacher).to(device)
        obj_plain_s = Objective([CESpec()], student_plain).to(device)
        obj_cached = Objective(kd, student_kd, frozen, teacher_logits=cache).to(device)
        obj_online = Objective(kd, student_online, frozen).to(device)
        plain_teacher = fresh(teacher_cpu)
        ref_teacher = copy.deepcopy(teacher_cpu).to(device).eval()
        loops = {
            "plain PyTorch loop, teacher": lambda: plain_loop(plain_teacher, plain_data, device, a.steps, gen),
            "ours plain, teacher": lambda: ours(teacher, obj_plain_t, ctx, a.steps, gen, aug),
            "ours plain, student": lambda: ours(student_plain, obj_plain_s, ctx, a.steps, gen, aug),
            "ours KD cached, student": lambda: ours(student_kd, obj_cached, ctx, a.steps, gen, aug),
            "ours KD online, student": lambda: ours(student_online, obj_online, ctx, a.steps, gen, aug),
            "reference KD loop, student": lambda: reference_kd_loop(student_ref, ref_teacher, loader, device,
                                                                    a.steps),
            "evaluation, teacher": lambda: evaluation(teacher, ctx, a.steps * BATCH),
            "evaluation, student": lambda: evaluation(student_kd, ctx, a.steps * BATCH),
        }
        for fn in loops.values():   # warm-up: allocator, kernels, DataLoader start
            fn()
        rates = {k: [] for k in loops}
        for _ in range(a.rounds):
            for k, fn in loops.items():
                sync(device)
                t0 = clock()
                n = fn()
                sync(device)
                rates[k].append(n / (clock() - t0))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\n{'loop':<30}{'median img/s':>14}{'min':>10}{'max':>10}")
    for k, v in rates.items():
        print(f"{k:<30}{med[k]:>14.0f}{min(v):>10.0f}{max(v):>10.0f}")
    n = len(data.train)
    cache_rate = 2 * n / cache_s
    ref = med["reference KD loop, student"]
    kd = med["ours KD cached, student"]
    # An epoch of cached KD plus the cache, built once and shared by the distill stage's
    # epochs (8 in the default recipe) and the QAT stage's (2): worst case 1 epoch.
    epoch = {e: n / (n / kd + cache_s / e) for e in (1, 10)}
    goal = 5.0 if device.type == "cuda" else 3.0
    print("\nratios (same run, medians):")
    print(f"  ours KD cached / reference KD loop              {kd / ref:6.2f}x  (goal >= {goal:.0f}x)")
    print(f"  ours KD epoch incl. building the cache, 1 epoch  {epoch[1] / ref:6.2f}x")
    print(f"  ours KD epoch incl. the cache over 10 epochs      {epoch[10] / ref:6.2f}x")
    print(f"  ours KD online / reference KD loop              {med['ours KD online, student'] / ref:6.2f}x")
    print(f"  ours KD cached / ours KD online                 {kd / med['ours KD online, student']:6.2f}x")
    print(f"  ours plain teacher / plain PyTorch loop         "
          f"{med['ours plain, teacher'] / med['plain PyTorch loop, teacher']:6.2f}x")
    print(f"  ours plain student / ours plain teacher         "
          f"{med['ours plain, student'] / med['ours plain, teacher']:6.2f}x")
    print(f"  evaluation teacher / ours plain teacher          "
          f"{med['evaluation, teacher'] / med['ours plain, teacher']:6.2f}x")
    print(f"  teacher-logit cache ({cache_rate:.0f} img/s) / plain PyTorch loop "
          f"{cache_rate / med['plain PyTorch loop, teacher']:6.2f}x")
    ok = kd / ref >= goal
    print(f"\ngoal ours KD cached >= {goal:.0f}x reference: {'yes' if ok else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
