"""Fit time of SNMF and PISCES on the embedded Gemma 3 270M, and the share of a full
`erase --method snmf|pisces` spent in evaluation.

    OMP_NUM_THREADS=2 python bench/bench_snmf_pisces.py [--concept Gambling] [--data DIR] [--no-erase]
    python bench/bench_snmf_pisces.py --runs DIR   # the split of finished runs (e.g. a compare --out)

Fits each method with its default settings (PISCES twice: training its dictionary afresh,
then from the cache), then runs one whole erase per method in memory (no files) and splits
its wall time into model loading, the fit, evaluation (the grid on train questions, the
coherence of the best cells and the test numbers) and the rest. ``--runs`` reads the same
split from the timings in every snmf/pisces results.json under DIR (with and without
EMBER first) instead of running anything. Prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
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


FITTED = ("snmf", "pisces", "ember")  # the stages whose fit parts the timings name "<stage>_<part>"


def split_timings(timings: dict, total: float) -> dict[str, float]:
    """A run's wall time as load, fit (each stage's own parts), evaluation (the grids' cells
    and the test numbers) and the rest."""
    fit = sum(float(v) for k, v in timings.items() if k.split("_")[0] in FITTED and not k.endswith("_grid"))
    grids = float(timings.get("ember_grid", 0.0)) + float(timings.get("method_grid", 0.0))  # include the fits
    evaluation = (max(grids - fit, 0.0) + float(timings.get("test_evaluation", 0.0))
                  + float(timings.get("resumed_grid", 0.0)))  # an interrupted run's grid points, read back
    load = float(timings.get("load", 0.0))
    return {"total": total, "load": load, "fit": fit, "evaluation": evaluation,
            "other": max(total - load - fit - evaluation, 0.0)}


def erase_split(method: str, concept: str, data_dir: str) -> dict[str, float]:
    clock = time.perf_counter()
    result = obliviate.erase(concept, data=data_dir, method=method, save_model=False, progress=False)
    return split_timings(result.results["timings"], time.perf_counter() - clock)


def finished_splits(root: Path) -> list[tuple[str, dict[str, float]]]:
    """(label, split) of every finished snmf/pisces run in ``root`` (an erase folder, a folder
    of them, or a compare folder; links followed) that fitted its method; a run's total is
    the sum of its recorded stages (loading, the grids with their fits, the test numbers, saving)."""
    rows = []
    for path in sorted({*root.glob("results.json"), *root.glob("*/results.json"), *root.glob("*/*/results.json")}):
        results = json.loads(path.read_text())
        if results.get("method", "").split("+")[0] not in ("snmf", "pisces"):
            continue
        if any(isinstance(stage, dict) and stage.get("skipped") for stage in results.get("details", {}).values()):
            continue  # not fitted (the original at chance): seconds of loading, nothing to split
        timings = results.get("timings", {})
        total = sum(float(timings.get(k, 0.0)) for k in ("load", "ember_grid", "method_grid", "test_evaluation", "save",
                                                        "resumed_grid"))
        rows.append((f"{results['concept']} / {results['method']}", split_timings(timings, total)))
    return rows


def print_splits(rows: list[tuple[str, dict[str, float]]]) -> None:
    print("| erase | total s | load | fit | evaluation | other | evaluation share |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, split in rows:
        share = split["evaluation"] / split["total"] if split["total"] else float("nan")
        print(f"| {label} | {split['total']:.0f} | {split['load']:.0f} | {split['fit']:.0f} | "
              f"{split['evaluation']:.0f} | {split['other']:.0f} | {share:.0%} |", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="Gambling")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--no-erase", action="store_true", help="fit times only")
    parser.add_argument("--runs", type=Path, help="report the split of the finished runs under this folder instead")
    args = parser.parse_args(argv)
    if args.runs is not None:
        rows = finished_splits(args.runs)
        print_splits(rows)
        for method in ("snmf", "pisces"):
            shares = [s["evaluation"] / s["total"] for label, s in rows if label.split(" / ")[1].startswith(method)]
            if shares:
                print(f"\n{method}: evaluation share median {np.median(shares):.0%} "
                      f"(range {min(shares):.0%}-{max(shares):.0%}, {len(shares)} runs)")
        return 0
    print(f"torch threads: {torch.get_num_threads()}", file=sys.stderr)
    rows = fit_times(args.concept, args.data)
    print(f"| fit on {args.concept} | seconds | notes |")
    print("| --- | --- | --- |")
    for name, seconds, notes in rows:
        print(f"| {name} | {seconds:.1f} | {notes} |")
    if args.no_erase:
        return 0
    print()
    print_splits([(method, erase_split(method, args.concept, args.data)) for method in ("snmf", "pisces")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
