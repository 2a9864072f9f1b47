"""Seconds per training step of each trained method on the embedded Gemma 3 270M.

    OMP_NUM_THREADS=2 python bench/bench_methods.py --steps 3 [--methods rmu,npo] [--data DIR]

Each method runs its default settings (batch 4, max length 64) for ``--steps`` optimizer
steps of its first grid point; the first step (warm-up, allocation) is excluded from the
mean. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from obliviate import methods
from obliviate.settings import build_section
from obliviate.data.concepts import load_benchmark_concept
from obliviate.methods import MethodContext
from obliviate.models.loading import load_model, untie_output_embeddings

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ember-benchmark"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="rmu,grad_diff,npo,elm")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--concept", default="Harry Potter")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    args = parser.parse_args(argv)
    lm = load_model()
    untie_output_embeddings(lm.model)
    data = load_benchmark_concept(args.concept, args.data)
    rows = []
    for name in args.methods.split(","):
        module = methods.get(name)
        defaults = build_section(module.Config, {"steps": args.steps}, name)
        first = {f: (v[:1] if isinstance(v, tuple) and f in ("lr", "alpha", "steering", "beta", "retain_weight") else v)
                 for f, v in defaults.__dict__.items()}
        config = build_section(module.Config, first, name)
        clock = time.perf_counter()
        fitted = module.fit(lm, data, config, 42, MethodContext(progress=False))
        _, edit = next(fitted.candidates())
        total = time.perf_counter() - clock
        log = fitted.report()["candidates"][0]
        per_step = log["seconds"] / max(1, log["steps"])
        rows.append((name, torch.get_num_threads(), args.steps, per_step, total, log["first_loss"], log["last_loss"]))
        print(f"{name}: {per_step:.2f} s/step", file=sys.stderr, flush=True)
    print("| method | threads | steps | s/step | fit+train s | first loss | last loss |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, threads, steps, per_step, total, first, last in rows:
        fl = {k: round(v, 3) for k, v in first.items()}
        ll = {k: round(v, 3) for k, v in last.items()}
        print(f"| {name} | {threads} | {steps} | {per_step:.2f} | {total:.1f} | {fl} | {ll} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
