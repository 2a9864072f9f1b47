"""Fit time of SNMF and PISCES on the embedded Gemma 3 270M, and the share of a full
`erase --method snmf|pisces` spent in evaluation.

    OMP_NUM_THREADS=2 python bench/bench_snmf_pisces.py [--concept Gambling] [--data DIR] [--no-erase]

Fits each method with its default settings (PISCES twice: training its dictionary afresh,
then from the cache), then runs one whole erase per method in memory (no files) and splits
its wall time into model loading, the fit, evaluation (the grid on train questions, the
coherence of the best cells and the test numbers) and the rest. Prints markdown tables.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import obliviate
from obliviate.data.concepts import load_benchmark_concept
from obliviate.methods import pisces, snmf
from obliviate.models.loading import load_model

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ember-benchmark"


def fit_times(concept: str, data_dir: str) -> list[tuple[str, float, str]]:
    lm = load_model()
    data = load_benchmark_concept(concept, data_dir)
    rows = []
    clock = time.perf_counter()
    fitted = snmf.fit(lm, data, snmf.Config(), 42)
    report = fitted.report()
    rows.append(("snmf", time.perf_counter() - clock,
                 f"{report['selected_feature_count']} features; {report['timings']}"))
    with tempfile.TemporaryDirectory() as cache:
        for label in ("pisces (dictionary trained)", "pisces (dictionary cached)"):
            clock = time.perf_counter()
            fitted = pisces.fit(lm, data, pisces.Config(cache_dir=cache), 42)
            report = fitted.report()
            rows.append((label, time.perf_counter() - clock,
                         f"{len(report['features'])} features; error {report['dictionary']['relative_error']}; "
                         f"{report['timings']}"))
    return rows


def erase_split(method: str, concept: str, data_dir: str) -> dict[str, float]:
    clock = time.perf_counter()
    result = obliviate.erase(concept, data=data_dir, method=method, save_model=False, progress=False)
    total = time.perf_counter() - clock
    timings = result.results["timings"]
    fit = sum(float(v) for k, v in timings.items() if k.startswith(f"{method}_"))  # the fit's own parts
    grid = float(timings.get("method_grid", 0.0))
    test = float(timings.get("test_evaluation", 0.0))
    load = float(timings.get("load", 0.0))
    evaluation = max(grid - fit, 0.0) + test
    return {"total": total, "load": load, "fit": fit, "evaluation": evaluation, "other": total - load - fit - evaluation}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="Gambling")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--no-erase", action="store_true", help="fit times only")
    args = parser.parse_args(argv)
    print(f"torch threads: {torch.get_num_threads()}", file=sys.stderr)
    rows = fit_times(args.concept, args.data)
    print(f"| fit on {args.concept} | seconds | notes |")
    print("| --- | --- | --- |")
    for name, seconds, notes in rows:
        print(f"| {name} | {seconds:.1f} | {notes} |")
    if args.no_erase:
        return 0
    print()
    print("| erase | total s | load | fit | evaluation | other | evaluation share |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for method in ("snmf", "pisces"):
        split = erase_split(method, args.concept, args.data)
        print(f"| {method} | {split['total']:.0f} | {split['load']:.0f} | {split['fit']:.0f} | "
              f"{split['evaluation']:.0f} | {split['other']:.0f} | {split['evaluation'] / split['total']:.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
