"""Run a command as on an older x86 CPU: the instruction sets above the named kind are hidden
from CPUID and /proc/cpuinfo, so onnxruntime (MLAS), oneDNN and PyTorch pick the kernels they
would pick there.

    python benchmarks/cpu_as.py avx2 -- python benchmarks/recipe_cost.py
    python benchmarks/cpu_as.py avx2 -- compress bench qat-int8.onnx --compare distill-fp32.onnx

Kinds: `avx2` (AVX2 and FMA; no AVX-512, AVX-VNNI or AMX: AMD EPYC Zen 2/3, Intel Haswell to
Comet Lake), `avx512` (no VNNI, BF16 or AMX: Skylake-SP), `avx512_vnni` (no BF16 or AMX:
Cascade Lake, Ice Lake). The hiding is done by `cpu_as.c`, compiled here with `cc` and
preloaded: Linux makes CPUID fault (the CPU must list `cpuid_fault` in /proc/cpuinfo) and
its fault handler returns the real answer with those bits cleared. It changes which kernels
run, not the machine: caches, clocks and the core's microarchitecture stay this CPU's, so
ratios measured under it approximate, and do not replace, the other CPU's.
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

KINDS = ("avx2", "avx512", "avx512_vnni")
SOURCE = Path(__file__).resolve().with_name("cpu_as.c")


def die(message):
    print(f"cpu_as: {message}", file=sys.stderr)
    sys.exit(2)


def flags_of(text):
    """The flags of /proc/cpuinfo-format `text`."""
    return {f for line in text.splitlines() if line.startswith("flags")
            for f in line.split(":", 1)[1].split()}


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """This CPU's flags as /proc/cpuinfo lists them; empty when it cannot be read."""
    try:
        return flags_of(Path(cpuinfo).read_text())
    except OSError:
        return set()


def library():
    """Path of the compiled preload library (built once per source version, in a cache)."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "compress")
    lib = cache / f"cpu_as-{digest}.so"
    if lib.exists():
        return lib
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        die("no C compiler (cc or gcc, or $CC) to build cpu_as.c")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = Path(tmp, lib.name)
        r = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(SOURCE), "-ldl"],
                           capture_output=True, text=True)
        if r.returncode:
            die(f"building {SOURCE.name} with {cc} failed:\n{r.stderr.strip()}")
        out.replace(lib)
    return lib


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=KINDS, help="the CPU kind to run as")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command given (cpu_as.py KIND -- COMMAND ...)")
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        die("needs Linux on x86_64")
    if "cpuid_fault" not in cpu_flags():
        die("this CPU (or its hypervisor) cannot make CPUID fault: no `cpuid_fault` "
                 "in /proc/cpuinfo's flags")
    env = dict(os.environ, COMPRESS_CPU_AS=args.kind)
    env["LD_PRELOAD"] = " ".join(filter(None, [str(library()), os.environ.get("LD_PRELOAD")]))
    try:
        os.execvpe(command[0], command, env)
    except OSError as e:
        die(f"cannot run {command[0]}: {e.strerror}")


if __name__ == "__main__":
    main()
