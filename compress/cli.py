"""Command line: ``compress run RECIPE`` and ``compress validate RECIPE``; ``eval``, ``bench``,
``compare`` and ``report`` live in :mod:`compress.commands`."""

import argparse
import os
import sys

from .errors import CompressError

MAX_MESSAGE = 500   # characters of an error line; a name or value quoted in it may be huge


def one_line(text):
    """`text` on one line of at most MAX_MESSAGE characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 3] + "..."


def _parser():
    p = argparse.ArgumentParser(prog="compress", description="Train, prune, distill, quantize and export "
                                "a verified INT8 ONNX student, as ordered stages of one YAML recipe.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("recipe", help="path to a recipe YAML file")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                        help="override a recipe field, stages by name: --set stages.teacher.epochs=1")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    common.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="MODULE",
                        help="import MODULE (or a .py file) first, so it can register models, loss terms, "
                        "datasets or stage kinds; nothing else a recipe names is ever imported")
    r = sub.add_parser("run", parents=[common], help="run a recipe (reusing unchanged stored stages)")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    r.add_argument("--fresh", action="store_true", help="ignore stored stage results")
    r.add_argument("--workdir", default=".", help="where runs/ and exports/ go (default: .)")
    sub.add_parser("validate", parents=[common], help="check a recipe without training")
    from .sweep import add_arguments

    add_arguments(sub.add_parser("sweep", parents=[common], help="run the recipe once per configuration "
                                 "(Ray Tune) to a Pareto front; needs pip install -e '.[sweep]'"))
    from .commands import add_subcommands

    add_subcommands(sub)   # eval, bench, compare, report: measure files, re-read stored results
    return p


def _quiet_thread_oserror(default):
    """threading.excepthook that leaves an OSError in a background writer (TensorBoard's
    event thread on a full disk) to the main thread, which re-raises it on its next write and
    reports it in one line; anything else keeps the default traceback."""
    def hook(a):
        if not isinstance(a.exc_value, OSError):
            default(a)
    return hook


def _remember_interrupts():
    """Install a Ctrl-C handler that raises KeyboardInterrupt, as Python's does, and also
    records it: a library that imports an optional package under a bare ``except:`` (as
    torch-pruning does with timm) swallows the KeyboardInterrupt and leaves that package half
    imported, so the run must stop when the import returns. Returns (the record, a function
    that puts the previous handler back)."""
    import signal

    seen = []

    def on_sigint(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:   # not the main thread: leave the handler as it is
        return seen, lambda: None
    return seen, lambda: signal.signal(signal.SIGINT, previous)


def _torchrun_rank():
    """True in a rank of a torchrun run that imported the process-group module."""
    distributed = sys.modules.get(f"{__package__}.distributed")
    return distributed is not None and distributed.launched()


def main(argv=None):
    try:
        code = _main(argv)
    except Exception:
        if not _torchrun_rank():
            raise
        # a bug, not a recipe error: its traceback and exit status 1, as Python gives them,
        # but through the exit below (finalization may abort instead)
        import traceback

        traceback.print_exc()
        code = 1
    if _torchrun_rank():
        # A torchrun rank leaves without Python's finalization (everything it writes is already
        # written whole and closed). gloo's worker threads outlive destroy_process_group, and
        # one may still be freeing the last collective's tensors, which takes the GIL; during
        # finalization Python ends such a thread, through a C++ destructor that may not throw,
        # and the rank aborts ("terminate called without an active exception", SIGABRT) after
        # a complete run: 5 of 75 two-process runs of the tiny recipe (tests/test_distributed.py)
        # ended so before this exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    return code


def _main(argv):
    args = _parser().parse_args(argv)
    import threading

    hook = threading.excepthook
    if not args.debug:
        threading.excepthook = _quiet_thread_oserror(hook)
    interrupts, restore_sigint = _remember_interrupts()

    def stop_if_interrupted():
        if interrupts:
            raise KeyboardInterrupt

    try:
        from .config import load_recipe
        from .plugins import load_plugins

        stop_if_interrupted()
        load_plugins(getattr(args, "plugins", []))
        stop_if_interrupted()
        if hasattr(args, "handler"):   # a command of compress/commands.py; no recipe
            return args.handler(args)
        recipe = load_recipe(args.recipe, args.overrides)   # sweep: the base recipe checked first
        stop_if_interrupted()   # the registries' imports (torch, torch-pruning) are done
        if args.command == "validate":
            from .pipeline import validate_recipe

            print("\n".join(validate_recipe(recipe)))
        elif args.command == "sweep":
            from .sweep import run_sweep

            run_sweep(args)
        else:
            from .pipeline import run_recipe

            run_recipe(recipe, workdir=args.workdir, device=args.device, fresh=args.fresh)
        return 0
    except CompressError as e:
        if args.debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # full disk, read-only or unwritable folder: the environment, not a bug
        if args.debug:
            raise
        where = f"{e.filename}: " if e.filename else (
            f"writing under {args.workdir}: " if getattr(args, "workdir", None) else "")
        kept = "; completed stages are stored and will be reused" if args.command == "run" else ""
        print(f"error: {one_line(f'{where}{e.strerror or e}{kept}')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; completed stages are stored and will be reused", file=sys.stderr)
        return 130
    finally:
        threading.excepthook = hook
        restore_sigint()
        # torchrun: leave the process group (a no-op in one process). Only when the module was
        # imported: after a Ctrl-C during `import torch`, importing it again would crash.
        distributed = sys.modules.get(f"{__package__}.distributed")
        if args.command == "run" and distributed is not None:
            distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
