"""Run a recipe from scratch and print what each stage cost and what the student bought.

    python benchmarks/stage_times.py [RECIPE] [--set PATH=VALUE ...]

Runs in a fresh temporary work directory (nothing reused), then prints the stage times
(with their share of the total), the wall time, and the student-vs-teacher ratios measured
on the exported files in the same run, checked against the default recipe's goals.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The default recipe's targets; its cost in plain teacher epochs is benchmarks/recipe_cost.py's.
GOALS = {"wall_seconds": 480, "int8_top1": 92.5, "params_ratio": 0.10, "file_ratio": 0.04}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("recipe", nargs="?", default="recipes/vgg_prune_kd.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as work:
        cmd = [sys.executable, "-m", "compress", "run", a.recipe, "--workdir", work, "--device", a.device,
               "--fresh", *sum((["--set", s] for s in a.overrides), [])]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - t0
        report = next(Path(work, "exports").glob("*/report.json"))
        rep = json.loads(report.read_text())
    total = rep["total_seconds"]
    print(f"\n{'stage':<12}{'kind':<9}{'seconds':>9}{'share':>8}{'top1 %':>9}")
    for s in rep["stages"]:
        print(f"{s['name']:<12}{s['kind']:<9}{s['seconds']:>9.1f}{100 * s['seconds'] / total:>7.1f}%"
              f"{s['top1'] if s['top1'] is not None else '':>9}")
    print(f"{'stages':<21}{total:>9.1f}\nwall (process, incl. start-up and data) {wall:.1f} s")
    stages = {s["name"]: s for s in rep["stages"]}
    ref = next((e for e in rep["exports"] if e["model"] == rep["reference"] and e["format"] == "onnx-fp32"), None)
    int8 = [e for e in rep["exports"] if e["format"] == "onnx-int8"]
    if not (ref and int8):
        return 0
    q = int8[-1]
    params_ratio = stages[q["model"]]["params"] / stages[ref["model"]]["params"]
    file_ratio = q["bytes"] / ref["bytes"]
    print(f"\nINT8 student '{q['path']}' vs teacher '{ref['path']}' (same run, onnxruntime CPU):")
    print(f"  top1          {q['top1']:.2f}% vs {ref['top1']:.2f}%")
    print(f"  params        {params_ratio:.4f}x")
    print(f"  file size     {file_ratio:.4f}x ({q['bytes']} vs {ref['bytes']} bytes)")
    for b in ("b1", "b64"):
        print(f"  latency {b:<5} {q['latency_ms'][b] / ref['latency_ms'][b]:.3f}x "
              f"({q['latency_ms'][b]:.3f} vs {ref['latency_ms'][b]:.3f} ms)")
    if a.recipe.endswith("vgg_prune_kd.yaml") and not a.overrides:
        checks = [("wall <= 8 min", wall <= GOALS["wall_seconds"]),
                  ("INT8 top1 >= 92.5%", q["top1"] >= GOALS["int8_top1"]),
                  ("params <= 10% of teacher", params_ratio <= GOALS["params_ratio"]),
                  ("INT8 file <= 4% of teacher FP32 file", file_ratio <= GOALS["file_ratio"])]
        print("\ngoals: " + ", ".join(f"{n}: {'yes' if ok else 'NO'}" for n, ok in checks))
        return 0 if all(ok for _, ok in checks) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
