"""Time of each attack on the embedded model (issue 4), CPU, 2 threads by default.

    python bench/bench_attacks.py --data ../shared/data/ember-benchmark \
        [--erased runs/hp] [--attacks relearn,in-context,adversarial,probe] \
        [--relearn-paragraphs 5 --epochs 1] [--questions 50] [--threads 2]

Each attack runs on the original and on the erased model (the embedded model itself when
--erased is not given), as `obliviate attack` does. With --steps, the relearning step on the
erased model is timed four ways on the same paragraphs, as ratios in one run: the plain
loop (AdamW over every embedding row, autograd's fresh output-layer gradient each step),
lazy rows, lazy rows with the output layer's gradient in a kept buffer (the default: the
same weights) and bf16 products on top (bf16_autocast: not the reference arithmetic). Relearning is timed on a few
paragraphs and extrapolated to the reference attack (100 paragraphs x 2 epochs): its
training cost is linear in paragraphs x epochs; its evaluation cost (test questions after
each epoch) is measured separately. Prints a Markdown table with the machine's name.
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager, nullcontext
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from obliviate import attacks
from obliviate.attacks import relearning
from obliviate.training import sparse_rows
from obliviate.attacks.common import AttackContext
from obliviate.pipeline.pair import erase_run_info, load_erased
from obliviate.data.concepts import load_benchmark_concept, load_relearn_paragraphs
from obliviate.models.loading import load_model


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    with open("/proc/loadavg") as handle:
        load = handle.read().split()[0]
    return f"{platform.node()} ({cpu}, {torch.get_num_threads()} threads, load average {load})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--concept", default="Harry Potter")
    parser.add_argument("--erased", default=None, help="an erase run folder or model folder (default: embedded)")
    parser.add_argument("--attacks", default="relearn,in-context,adversarial,probe")
    parser.add_argument("--relearn-paragraphs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--questions", type=int, default=50, help="test questions used (50 = all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", action="store_true",
                        help="also time the relearning step: plain loop, lazy rows, kept head gradient, bf16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = load_benchmark_concept(args.concept, args.data, general_questions=8)
    data.questions["qa_test"] = data.questions["qa_test"][: args.questions]
    original = load_model()
    erased = load_erased(*erase_run_info(args.erased)) if args.erased else original
    settings = {"relearn": {"paragraphs": args.relearn_paragraphs, "epochs": args.epochs, "max_length": args.max_length}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ctx = AttackContext(models={"original": original, "erased": erased}, data=data, data_dir=Path(args.data),
                            bootstrap=200, out=Path(tmp), progress=False)
        for name in attacks.parse_names(args.attacks) if args.attacks else []:
            clock = time.perf_counter()
            result = attacks.run(name, ctx, settings.get(name))
            seconds = time.perf_counter() - clock
            note = ""
            if name == "relearn":
                train = sum(sum(result[r]["train_seconds"]) for r in ("original", "erased"))
                steps = 2 * args.relearn_paragraphs * args.epochs
                full = train / steps * (2 * 100 * 2) + (seconds - train) / (args.epochs + 1) * 3
                note = (f"{train / steps:.2f} s/paragraph step; reference attack (100 x 2 epochs, both models) "
                        f"extrapolated to {full / 60:.1f} min")
            after = {r: result[r]["after"]["value"] for r in ("original", "erased") if r in result}
            rows.append((name, seconds, after, note))
    if args.steps:
        rows += step_rows(erased, data, Path(args.data), args)
    print(f"\nAttacks on {args.concept!r}, {args.questions} test questions; {machine()}\n")
    print("| attack | seconds (both models) | accuracy after (original / erased) | note |")
    print("| --- | --- | --- | --- |")
    for name, seconds, after, note in rows:
        values = " / ".join(f"{v:.3f}" for v in after.values()) if after else "n/a"
        print(f"| {name} | {seconds:.1f} | {values} | {note} |")


def step_rows(lm, data, data_dir: Path, args) -> list[tuple]:
    """Seconds a relearning step on ``lm`` (the erased model when given: untied, so its input
    embedding takes the lazy rows), same paragraphs, as ratios in one run: the plain loop
    (dense AdamW on every row, autograd's fresh output-layer gradient), lazy rows, lazy rows
    with the output layer's gradient in a kept buffer (the default; the same weights), and
    bf16 products on top (not the reference arithmetic)."""
    paragraphs = load_relearn_paragraphs(data_dir, data.concept, args.relearn_paragraphs)
    variants = {"plain loop": (False, False, False), "lazy rows": (True, False, False),
                "lazy rows + kept head gradient (default)": (True, True, False),
                "lazy rows + kept head gradient + bf16": (True, True, True)}
    seconds = {}
    for name, (lazy, kept, bf16) in variants.items():
        config = relearning.Config(paragraphs=args.relearn_paragraphs, epochs=args.epochs, max_length=args.max_length,
                                   bf16_autocast=bf16)
        with _shortcuts(lazy, kept):
            epochs = relearning.relearn(lm, paragraphs, config, lambda m: np.zeros(1), progress=False)
        seconds[name] = sum(e["train_seconds"] for e in epochs) / (len(paragraphs) * args.epochs)
    base = seconds["plain loop"]
    return [(f"relearn step, {name}", value * len(paragraphs) * args.epochs, {},
             f"{value:.2f} s a paragraph, {base / value:.2f}x the plain loop's step") for name, value in seconds.items()]


@contextmanager
def _shortcuts(lazy: bool, kept: bool):
    """Turn off the exact shortcuts the relearning step takes: the lazy rows (dense AdamW on
    every row) and the kept output-layer gradient (autograd's fresh tensor each step)."""
    plain_rows, plain_head = sparse_rows.sparse_input_rows, relearning.kept_head_gradient
    if not lazy:
        sparse_rows.sparse_input_rows = lambda model: None
    if not kept:
        relearning.kept_head_gradient = lambda model: nullcontext()
    try:
        yield
    finally:
        sparse_rows.sparse_input_rows, relearning.kept_head_gradient = plain_rows, plain_head


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
