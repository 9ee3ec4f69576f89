"""Command line: ``python -m nthr_kernels demo [--quick] [--out DIR] [--json PATH]``.

``demo`` first checks every available backend against the float64 reference on a synthetic rollout
batch shaped like a GRPO step (table: time, agreement, fraction selected), then runs the LLD study on
the embedded default model (``nthr_kernels.grpo``) over several seeds, writes its plots, HTML and JSON
report (the backend table included), and ends with a verdict in plain words.
``backends`` runs only the synthetic backend table.
"""
from __future__ import annotations

import argparse
import sys


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

    from .demo_synthetic import run_backend_table

    table = run_backend_table(quick=args.quick)
    if args.cmd == "backends" or args.skip_lld:
        return 0
    from .grpo.demo import run_demo

    run_demo(args.out, quick=args.quick, json_path=args.json, backend_table=table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
