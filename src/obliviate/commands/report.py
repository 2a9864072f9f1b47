"""`obliviate report`: an HTML report and summary.csv for one or more runs."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders written by erase, eval or attack")
    parser.add_argument("--out", default=None,
                        help="where report.html and summary.csv go (default: the run folder, or runs/report for several)")


def run(args: argparse.Namespace) -> int:
    from obliviate.reports.html import report_from_dirs

    path = report_from_dirs(args.runs, args.out)
    print(f"report: {path} (and {path.parent / 'summary.csv'})")
    return 0
