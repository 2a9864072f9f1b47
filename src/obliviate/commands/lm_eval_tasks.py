"""`obliviate lm-eval-tasks`: the EMBER benchmark as an lm-evaluation-harness task folder.

    obliviate lm-eval-tasks --data ../shared/data/ember-benchmark --out ember-tasks
    lm_eval --model hf --model_args pretrained=PATH --include_path ember-tasks --tasks ember_qa

The folder holds local JSON files and a small utils.py (no hub downloads); its acc_norm is
obliviate's multiple-choice accuracy (obliviate.evaluation.harness).
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="a benchmark folder in the EMBER format (default: the EMBER benchmark shipped with obliviate)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the task folder to write (lm_eval --include_path)")
    parser.add_argument("--concepts", default=None, metavar="LIST",
                        help="comma-separated concepts (default: every concept of the benchmark)")
    parser.add_argument("--seed", type=int, default=42,
                        help="option shuffle, as in `obliviate erase/eval --seed` (default 42)")


def run(args: argparse.Namespace) -> int:
    from obliviate.commands.arguments import comma_list
    from obliviate.data import benchmark_dir
    from obliviate.evaluation.harness import write_task_folder

    written = write_task_folder(args.data or benchmark_dir(), args.out, comma_list(args.concepts) or None, args.seed)
    print(f"{len(written['tasks'])} tasks in {args.out} (groups: {', '.join(written['groups'])}).")
    print(f"  lm_eval --model hf --model_args pretrained=PATH --include_path {args.out} --tasks {','.join(written['groups'])}")
    return 0
