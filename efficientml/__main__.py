"""Command line: ``python -m efficientml run EXPERIMENT [--profile quick|full] [--out DIR]``."""
from __future__ import annotations

import argparse
import ast
import sys

from .experiments import EXPERIMENTS, run_experiment


def _parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a plain string


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m efficientml", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the experiments")
    r = sub.add_parser("run", help="run an experiment and write its JSON result")
    r.add_argument("experiment", choices=sorted(EXPERIMENTS))
    r.add_argument("--profile", default=None, help="quick (default, or $EFFICIENTML_PROFILE) or full")
    r.add_argument("--out", default="results", help="folder for the JSON result and checkpoints")
    r.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    r.add_argument("--set", dest="overrides", action="append", type=_parse_override, default=[],
                   metavar="KEY=VALUE", help="change one setting, e.g. --set epochs=1")
    r.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)
    if args.command == "list":
        for name, exp in sorted(EXPERIMENTS.items()):
            print(f"{name:12s} {exp.description}")
        return 0
    try:
        path = run_experiment(args.experiment, args.profile, args.out, dict(args.overrides), args.device,
                              progress=False if args.no_progress else None)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
