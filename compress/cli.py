"""Command line: ``compress run RECIPE`` and ``compress validate RECIPE``."""

import argparse
import sys

from .errors import CompressError


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
    r = sub.add_parser("run", parents=[common], help="run a recipe (reusing unchanged stored stages)")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    r.add_argument("--fresh", action="store_true", help="ignore stored stage results")
    r.add_argument("--workdir", default=".", help="where runs/ and exports/ go (default: .)")
    sub.add_parser("validate", parents=[common], help="check a recipe without training")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        from .config import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        if args.command == "validate":
            from .pipeline import validate_recipe

            print("\n".join(validate_recipe(recipe)))
        else:
            from .pipeline import run_recipe

            run_recipe(recipe, workdir=args.workdir, device=args.device, fresh=args.fresh)
        return 0
    except CompressError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; completed stages are stored and will be reused", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
