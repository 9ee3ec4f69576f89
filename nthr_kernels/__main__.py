"""Command line: ``python -m nthr_kernels demo [--quick] [--out DIR] [--json PATH]``.

``demo`` first checks every available backend against the float64 reference on a synthetic rollout
batch shaped like a GRPO step (table: time, agreement, fraction selected), then runs the LLD study on
the embedded default model (``nthr_kernels.grpo``) over several seeds, writes its plots, HTML and JSON
report (the backend table included), and ends with a verdict in plain words.
``backends`` runs only the synthetic backend table.
"""
from __future__ import annotations

import argparse
import os
import sys


def _output_problem(path: str, folder: bool) -> str | None:
    """Why an output path cannot be written (None when it can), checked before the study runs for minutes."""
    if not path:
        return "an empty path"
    if folder:
        return f"{path!r} exists and is not a folder" if os.path.lexists(path) and not os.path.isdir(path) else None
    if os.path.isdir(path) and not os.path.islink(path):
        return f"{path!r} is a folder"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # created on write, like the --out folder
        parent = os.path.dirname(parent)
    return None if os.path.isdir(parent) else f"{parent!r} (a parent of {path!r}) is not a folder"


# what the LLD study imports beyond the package's own dependencies: the dev extra has them (make setup)
DEMO_MODULES = ("transformers", "safetensors", "matplotlib")


def _missing_modules(names) -> list[str]:
    """The modules of ``names`` that cannot be imported here (found without importing them)."""
    import importlib.util

    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
            found = False
        if not found:
            missing.append(name)
    return missing


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nthr_kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="backend check on a synthetic batch, then the LLD study on the embedded model")
    d.add_argument("--quick", action="store_true", help="2 seeds x 8 questions (well under a minute), for tests and CI")
    d.add_argument("--out", default="nthr_results", help="folder for plots, HTML and the JSON report")
    d.add_argument("--json", default=None, help="also write the JSON report (the same as OUT/report.json) to this path")
    d.add_argument("--skip-lld", action="store_true", help="only the synthetic backend table")
    b = sub.add_parser("backends", help="only the synthetic backend table")
    b.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "demo":
        if args.skip_lld and args.json is not None:
            ap.error("--json: the JSON report is the LLD study's; it is not written with --skip-lld")
        for flag, path, folder in (("--out", args.out, True), ("--json", args.json, False)):
            problem = None if path is None else _output_problem(path, folder)
            if problem:
                ap.error(f"{flag}: cannot write there: {problem}")
        missing = [] if args.skip_lld else _missing_modules(DEMO_MODULES)
        if missing:  # said before the backend table, not as a traceback after it
            print(f"python -m nthr_kernels demo: the LLD study needs {', '.join(missing)}, not installed here. "
                  "Install the dev extra (in a checkout: make setup, or pip install -e \".[dev]\"), or "
                  f"pip install {' '.join(missing)}; --skip-lld runs the backend table alone.", file=sys.stderr)
            return 1

    from .demo_synthetic import run_backend_table

    table = run_backend_table(quick=args.quick)
    if args.cmd == "backends" or args.skip_lld:
        return 0
    from .grpo.demo import run_demo

    run_demo(args.out, quick=args.quick, json_path=args.json, backend_table=table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
