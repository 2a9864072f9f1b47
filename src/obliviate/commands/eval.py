"""`obliviate eval`: evaluate any model against the original on a concept."""
from __future__ import annotations

import argparse

from obliviate.commands.arguments import add_run_arguments, announce_out, collect_overrides, default_out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, grid=False)
    group = parser.add_argument_group("eval")
    group.add_argument("--base", default=None, help="the original model (default: the one the erase run recorded, else embedded)")
    group.add_argument("--eco", default=None, metavar="DIR", help="evaluate the model wrapped by an ECO folder (obliviate eco)")
    group.add_argument("--judge", default=None, metavar="PATH_OR_URL",
                       help="optional open-ended judge: a local model path/hub id or an OpenAI-compatible URL "
                            "(default: normalised answer match only)")
    group.add_argument("--judge-endpoint-model", dest="judge_endpoint_model", default="default", metavar="NAME",
                       help="the model name sent to a --judge URL (an OpenAI-compatible endpoint)")
    group.add_argument("--open-new-tokens", type=int, default=24, metavar="N", help="greedy tokens per open-ended answer")
    group.add_argument("--lm-eval", default=None, metavar="TASKS",
                       help="also run these lm-evaluation-harness tasks (comma-separated; local data only) on both models")
    group.add_argument("--lm-eval-include", default=None, metavar="DIR",
                       help="a folder of harness task files, e.g. one written by `obliviate lm-eval-tasks`")
    group.add_argument("--lm-eval-limit", type=int, default=None, metavar="N", help="at most N documents a task")


def run(args: argparse.Namespace) -> int:
    from obliviate.api import make_config
    from obliviate.pipeline.evaluate import run_eval
    from obliviate.evaluation.results import RunResults
    from obliviate.reports.markdown import fmt, print_summary
    from obliviate.io import exclusive_output
    from obliviate.commands.arguments import guard_out

    overrides = collect_overrides(args)
    overrides.setdefault("out", default_out(overrides, "eval"))
    config = make_config(args.config_file, **overrides)
    guard_out(config.out, config.model.name)
    announce_out(config.out)
    with exclusive_output(config.out):
        harness = {"tasks": args.lm_eval, "include": args.lm_eval_include, "limit": args.lm_eval_limit} if args.lm_eval else None
        r = run_eval(config, base=args.base, eco=args.eco, judge=args.judge, judge_model=args.judge_endpoint_model,
                     open_new_tokens=args.open_new_tokens, harness=harness, progress=args.progress)
    print(f"\n{r['model']} vs {r['base']} on {r['concept']!r} -> {config.out}")
    print_summary(RunResults.from_dict(r), "model")
    for split, entry in r.get("open_ended", {}).items():
        if isinstance(entry, dict) and "base" in entry:
            print(f"  open {split:8s} original {fmt(entry['base']['match'])}  model {fmt(entry['edited']['match'])} (match)")
    for task, metrics in r.get("lm_eval", {}).get("results", {}).items():
        for metric, entry in metrics.items():
            print(f"  lm-eval {task} {metric}: original {fmt(entry['original'])}  model {fmt(entry['erased'])}")
    return 0
