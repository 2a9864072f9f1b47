"""`obliviate erase`: erase a concept and write results, model, patch and report."""
from __future__ import annotations

import argparse
from contextlib import nullcontext

from obliviate import methods
from obliviate.errors import ObliviateError
from obliviate.commands.arguments import (add_dataclass_arguments, add_run_arguments, add_set_argument, announce_out,
                                          collect_overrides, default_out, parse_settings)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from obliviate.methods.ember import Config as EmberConfig

    add_run_arguments(parser, several=True)
    parser.add_argument("--method", dest="run__method", default=None, metavar="NAME",
                        help=f"erasure method: {', '.join(methods.available())} (default ember)")
    parser.add_argument("--ember", dest="run__with_ember", action="store_true", default=None,
                        help="apply the EMBER edit first, then the base method")
    add_set_argument(parser, "METHOD", "rmu.steps=10; the method name may be left out: --set lr=1e-4")
    parser.add_argument("--revertible-patch", dest="run__revertible_patch", default=None, metavar="PATH",
                        help="also write a patch that can undo the erasure (it holds the original rows) to PATH, "
                             "which must be outside --out: never ship it with the model")
    parser.add_argument("--optimizer", default=None, metavar="NAME",
                        help="the trained method's optimizer: auto, adamw, adamw-fp32, adamw-sr, adamw8bit, adamw8bit-bnb "
                             "(default auto: plain AdamW for float32 weights; README, GPUs)")
    parser.add_argument("--train-only", dest="run__train_only", action="store_true", default=None,
                        help="train the method's grid into OUT/checkpoints and stop (run it under accelerate launch "
                             "for several GPUs; the same command without it then evaluates and saves)")
    parser.add_argument("--push-to-hub", dest="run__push_to_hub", default=None, metavar="OWNER/NAME",
                        help="upload model/ with its model card (or the edit files) to this Hub repository at the end")
    parser.add_argument("--private", dest="run__private", action="store_true", default=None,
                        help="create the pushed repository as private")
    add_dataclass_arguments(parser, EmberConfig, "ember", title="EMBER")


def run(args: argparse.Namespace) -> int:
    from obliviate.api import make_config
    from obliviate.io import exclusive_output
    from obliviate.pipeline.erase import describe_plan, erase
    from obliviate.evaluation.results import RunResults
    from obliviate.reports.markdown import fmt, no_candidate_chosen, print_summary

    overrides = collect_overrides(args)
    overrides.setdefault("out", default_out(overrides, "erase"))
    config = make_config(args.config_file, **overrides)
    settings = parse_settings(args.settings, default_owner=config.method)
    if args.optimizer is not None:
        if config.method == "ember":
            raise ObliviateError("--optimizer sets a trained method's optimizer (--method rmu, elm, grad_diff, npo): "
                                 "EMBER is not trained.")
        settings.setdefault(config.method, {})["optimizer"] = args.optimizer
    if settings:
        from obliviate.config import merge

        config = merge(config, {"methods": settings})
    if not config.concept:
        raise ObliviateError("Name the concept to erase with --concept (e.g. --concept 'Harry Potter').")
    if config.train_only:
        return run_training(config)
    if config.out:
        announce_out(config.out)
    print(describe_plan(config), flush=True)
    with exclusive_output(config.out) if config.out else nullcontext():
        result = erase(config, progress=args.progress)
    r = RunResults.from_dict(result.results)
    print(f"\n{r.concept} erased with {r.method} -> {config.out}")
    print_summary(r, "edited")
    for name, entry in r.parts.get("concepts", {}).items():
        print(f"  {name}: QA {fmt(entry['qa_test']['base'])} -> {fmt(entry['qa_test']['edited'])}, "
              f"efficacy {fmt(entry.get('efficacy'))}")
    if r.parts.get("delta") is not None:
        print(f"  delta {r.parts['delta']}, {r.parts['edited_token_count']} tokens edited, "
              f"{len(r.parts['features'])} features")
    nothing_chosen = no_candidate_chosen(r)
    if nothing_chosen:
        print(f"  {nothing_chosen}")
    if config.out:
        print(f"\nnext: obliviate report {config.out}    (an HTML page of the run)\n"
              f"      obliviate attack --model {config.out} --attacks cheap    (does it stay erased?)")
    return 0


def run_training(config) -> int:
    """`erase --train-only`: every process trains (the loop shards the model over them);
    the first one holds the output folder's lock and says what it trained."""
    from obliviate.io import exclusive_output
    from obliviate.pipeline.erase import train_only
    from obliviate.training.sharding import world

    rank, processes = world()  # opens the process group under accelerate launch, before any model loads
    with exclusive_output(config.out) if rank == 0 else nullcontext():
        trained = train_only(config)
    if rank == 0:
        print(f"\n{len(trained['trained'])} candidate(s) of {config.method} trained on {processes} process(es) -> "
              f"{trained['checkpoints']}; run the same command without --train-only to evaluate and save.")
    return 0
