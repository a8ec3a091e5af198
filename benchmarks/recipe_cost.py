"""The default recipe's whole cost in a unit that travels between machines: epochs of a
plain PyTorch training loop of its teacher, measured on the same machine in the same run.

    python benchmarks/recipe_cost.py [RECIPE] [--set PATH=VALUE ...] [--threads N] [--device cpu|cuda]
                                     [--repeat N]

0. `compress validate RECIPE` (with the `--set`s): a recipe compress refuses stops the script
   in seconds, with compress's one-line error and exit status;
1. one epoch of a plain loop (`throughput.plain_loop`: vgg_small, batch 256,
   channels_last, the training set as one in-memory tensor, SGD; on CUDA under bf16
   autocast) over the whole training set, on `--device`;
2. `compress run RECIPE --fresh --device D` in a temporary work directory, timed from outside
   (process start-up, data loading and every stage included);
3. the plain epoch again (the load of a shared machine drifts; both are printed and their
   mean is the unit);
4. with ``--repeat N``, steps 2 and 3 N times in all (fresh runs, each against the mean of the
   plain epochs just before and after it), then the median of the N ratios;
5. `compress bench` of the (last run's) INT8 student against its FP32 twin, timed in turns.

It prints the machine (lscpu model and flags, library versions, threads), the stage times,
the ratio wall / plain epoch, and the default recipe's targets: ratio <= 6, INT8 top-1 >= 92.5%
in onnxruntime, <= 10% of the teacher's parameters, INT8 file <= 4% of the teacher's FP32
file, INT8 batch-64 latency <= 0.75x its FP32 twin's.

    python benchmarks/cpu_as.py avx2 -- python benchmarks/recipe_cost.py

runs all of it as on an AVX2-only CPU: CPUID and /proc/cpuinfo hide AVX-512, VNNI and AMX, so
PyTorch (ATen, oneDNN), onnxruntime's MLAS and `precision: auto` (fp32 there) choose that CPU's
kernels (see cpu_as.py; the core, caches and clocks stay this machine's).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throughput import BATCH, fmnist_source, machine_lines, plain_loop  # noqa: E402

from compress.data import fashion_mnist  # noqa: E402
from compress.models import build_model  # noqa: E402

TARGETS = {"ratio": 6.0, "int8_top1": 92.5, "params": 0.10, "file": 0.04, "latency_b64": 0.75}


def plain_epoch(data, threads, device):
    """Seconds of one plain-loop epoch of a fresh vgg_small over the whole training set."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model({"arch": "vgg_small", "args": {"in_channels": 1, "num_classes": 10}})
    model = model.to(device, memory_format=torch.channels_last)
    tensors = {"x": ((data.train.x.float() / 255 - data.mean[0]) / data.std[0]).to(device),
               "y": data.train.y.to(device)}
    gen = torch.Generator(device=device).manual_seed(0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    plain_loop(model, tensors, device, 3, gen)       # warm-up (allocator, kernels)
    sync()
    t0 = time.perf_counter()
    plain_loop(model, tensors, device, len(data.train) // BATCH, gen)
    sync()
    return time.perf_counter() - t0


def b64_ratio(bench_out):
    """INT8 / FP32 median latency at batch 64 from `compress bench --compare`'s side-by-side
    table (its ratio column is each file's median over the first file's, the INT8 one)."""
    batch, rows = None, {}
    for line in bench_out.splitlines():
        if m := re.match(r"^\s+batch (\d+)$", line):
            batch = int(m.group(1))
        elif m := re.match(r"^\s+(\S+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)×$", line):
            rows.setdefault(batch, []).append(float(m.group(2)))
    r = rows.get(64, [])
    return r[0] / r[1] if len(r) >= 2 else float("nan")


def slashed(values, fmt=".1f"):
    """'a / b / c': one value per run."""
    return " / ".join(f"{v:{fmt}}" for v in values)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", nargs="?", default="recipes/vgg_prune_kd.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="threads of the plain loop; the recipe uses torch's default (same unless set)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the plain loop and the recipe train (onnxruntime times the files on the CPU)")
    p.add_argument("--repeat", type=int, default=1,
                   help="fresh runs of the recipe, each between two plain epochs; the median ratio is "
                        "quoted (a shared machine's load comes and goes)")
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device (torch.cuda.is_available() is False); valid: cpu",
              file=sys.stderr)
        return 2
    if a.repeat < 1:
        print(f"error: --repeat must be at least 1, got {a.repeat}", file=sys.stderr)
        return 2
    device = torch.device(a.device)
    sets = sum((["--set", s] for s in a.overrides), [])
    env = {**os.environ, "TQDM_DISABLE": "1"}
    root = Path(__file__).resolve().parents[1]
    # a recipe that compress refuses fails here, in seconds, not after a plain epoch
    rc = subprocess.run([sys.executable, "-m", "compress", "validate", a.recipe, *sets], env=env, cwd=root,
                        stdout=subprocess.DEVNULL).returncode
    if rc:   # compress printed why
        return rc
    print("\n".join(machine_lines(a.threads)))
    data = fashion_mnist(root=str(fmnist_source()))
    plains = [plain_epoch(data, a.threads, device)]
    print(f"plain PyTorch epoch (vgg_small, {len(data.train)} images, batch {BATCH}, {device}): {plains[0]:.1f} s",
          flush=True)
    walls, reps = [], []
    with tempfile.TemporaryDirectory() as top:
        for i in range(a.repeat):
            work = Path(top, f"run{i}")
            cmd = [sys.executable, "-m", "compress", "run", a.recipe, "--workdir", str(work), "--device", a.device,
                   "--fresh", *sets]
            print(("" if a.repeat == 1 else f"\nrun {i + 1} of {a.repeat}\n") + "$ " + " ".join(cmd[1:]), flush=True)
            t0 = time.perf_counter()
            rc = subprocess.run(cmd, env=env, cwd=root).returncode
            if rc:   # compress printed why
                return rc
            walls.append(time.perf_counter() - t0)
            exp = next(Path(work, "exports").glob("*/report.json")).parent
            reps.append(json.loads((exp / "report.json").read_text()))
            plains.append(plain_epoch(data, a.threads, device))
            print(f"plain PyTorch epoch again: {plains[-1]:.1f} s", flush=True)
        rep = reps[-1]
        ex = {(e["model"], e["format"]): e for e in rep["exports"]}
        q = next((e for e in rep["exports"] if e["format"] == "onnx-int8"), None)
        twin = ex.get((rep["stages"][[s["name"] for s in rep["stages"]].index(q["model"]) - 1]["name"],
                       "onnx-fp32")) if q else None
        bench_out = ""
        if q and twin:
            bcmd = [sys.executable, "-m", "compress", "bench", str(exp / q["path"]), "--compare",
                    str(exp / twin["path"]), "--batch", "1", "64", "--runs", "200", "--threads", str(a.threads)]
            print("$ " + " ".join(bcmd[1:]).replace(str(exp), "exports/<recipe>"), flush=True)
            bench_out = subprocess.run(bcmd, check=True, env=env, capture_output=True, text=True, cwd=root).stdout
            print(bench_out)
    units = [(b + c) / 2 for b, c in zip(plains, plains[1:])]   # each run against its neighbours
    ratios = [w / u for w, u in zip(walls, units)]
    w = 9 + 8 * (a.repeat - 1)   # room for 'a / b / c' seconds
    print(f"{'stage':<12}{'kind':<9}{'seconds':>{w}}{'plain epochs':>14}{'top1 %':>{w}}")
    for k, s in enumerate(rep["stages"]):
        secs = [r["stages"][k]["seconds"] for r in reps]
        tops = [r["stages"][k]["top1"] for r in reps]
        top = "" if tops[0] is None else slashed(dict.fromkeys(tops), "g")
        print(f"{s['name']:<12}{s['kind']:<9}{slashed(secs):>{w}}"
              f"{statistics.median(x / u for x, u in zip(secs, units)):>14.2f}{top:>{w}}")
    totals = [r["total_seconds"] for r in reps]
    print(f"{'stages':<21}{slashed(totals):>{w}}"
          f"{statistics.median(x / u for x, u in zip(totals, units)):>14.2f}")
    ratio = statistics.median(ratios)
    print(f"\nwall (process, incl. start-up and data) {slashed(walls)} s; plain epochs "
          f"{slashed(plains)} s")
    if a.repeat == 1:
        print(f"recipe wall / plain teacher epoch: {ratio:.2f}x")
    else:
        print(f"recipe wall / plain teacher epoch, each run against the plain epochs beside it: "
              f"{slashed(ratios, '.2f')}x, median {ratio:.2f}x")
    if not q:
        return 0
    ref = ex.get((rep["reference"], "onnx-fp32"))
    st = {s["name"]: s for s in rep["stages"]}
    params = st[q["model"]]["params"] / st[rep["reference"]]["params"]
    size = q["bytes"] / ref["bytes"] if ref else float("nan")
    lat = b64_ratio(bench_out)
    checks = [(f"wall <= {TARGETS['ratio']:g}x a plain teacher epoch ({ratio:.2f}x)", ratio <= TARGETS["ratio"]),
              (f"INT8 top-1 >= {TARGETS['int8_top1']}% ({q['top1']:.2f}%)", q["top1"] >= TARGETS["int8_top1"]),
              (f"params <= 10% of the teacher's ({100 * params:.2f}%)", params <= TARGETS["params"]),
              (f"INT8 file <= 4% of the teacher's FP32 file ({100 * size:.2f}%)", size <= TARGETS["file"]),
              (f"INT8 b64 latency <= 0.75x its FP32 twin's ({lat:.2f}x)", lat <= TARGETS["latency_b64"])]
    print("\ntargets:\n" + "\n".join(f"  {'yes' if ok else 'NO '}  {n}" for n, ok in checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
