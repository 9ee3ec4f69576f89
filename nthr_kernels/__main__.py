"""Command line: ``python -m nthr_kernels demo [--quick] [--out DIR] [--json PATH]``.

``demo`` first checks every available backend against the float64 reference on a synthetic rollout
batch shaped like a GRPO step (table: time, agreement, fraction selected), then runs the LLD study on
the embedded default model (``nthr_kernels.grpo``) and writes its plots, HTML and JSON report.
``backends`` runs only the synthetic backend table.
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nthr_kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="backend check on a synthetic batch, then the LLD study on the embedded model")
    d.add_argument("--quick", action="store_true", help="small and fast (under a minute), for tests and CI")
    d.add_argument("--out", default="nthr_results", help="folder for plots, HTML and the JSON report")
    d.add_argument("--json", default=None, help="also write the JSON report to this path")
    d.add_argument("--skip-lld", action="store_true", help="only the synthetic backend table")
    b = sub.add_parser("backends", help="only the synthetic backend table")
    b.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)

    from .demo_synthetic import run_backend_table

    table = run_backend_table(quick=args.quick)
    if args.cmd == "backends" or args.skip_lld:
        return 0
    from .grpo.demo import run_demo

    report = run_demo(args.out, quick=args.quick, json_path=None)
    report["backend_table"] = table
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
        print(f"report written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
