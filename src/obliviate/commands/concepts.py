"""`obliviate concepts`: the concepts a run can erase, with how much data each has.

    obliviate concepts                 # the EMBER benchmark shipped with obliviate
    obliviate concepts --data DIR      # another copy, or a folder of your own in its format

No model is loaded, so it answers in well under a second. The original model's accuracy per
concept is not shown: the results cache keys every entry by a sha256 of the loaded
weights and of the tokenized questions (evaluation/cache.py), which only a loaded model gives.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from obliviate.data import benchmark_dir
from obliviate.data.concepts import ConceptSizes, concept_sizes

HEADERS = ("concept", "sentences", "QA train", "QA test", "open questions (train+test)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, metavar="DIR", help="a benchmark folder in the EMBER format "
                        "(default: the EMBER benchmark shipped with obliviate)")


def run(args: argparse.Namespace) -> int:
    folder = Path(args.data) if args.data else benchmark_dir()
    sizes = sorted(concept_sizes(folder), key=lambda s: s.concept.casefold())
    where = f"--data {folder}" if args.data else f"the EMBER benchmark shipped with obliviate ({folder})"
    print(f"{len(sizes)} concepts in {where}:\n")
    print(table([row(s) for s in sizes]))
    example = sizes[0].concept if sizes else "NAME"
    print(f"\nErase one with `obliviate erase --concept {example.casefold()!r}` (names match without regard to case).")
    print("QA train questions choose the edit; QA test questions give the reported numbers. `obliviate erase`\n"
          "reports the original model's accuracy on them; where it is within noise of chance (25%), nothing is\n"
          "erased: no edit could be shown to work.")
    return 0


def row(sizes: ConceptSizes) -> tuple[str, ...]:
    opened = "-" if sizes.open_questions is None else str(sizes.open_questions)
    return sizes.concept, str(sizes.sentences), str(sizes.qa_train), str(sizes.qa_test), opened


def table(rows: list[tuple[str, ...]]) -> str:
    """Plain aligned columns (no rich table: the output is read in terminals and in pipes)."""
    widths = [max(len(r[i]) for r in [HEADERS, *rows]) for i in range(len(HEADERS))]

    def line(cells: tuple[str, ...]) -> str:  # names to the left, numbers to the right
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(HEADERS), line(tuple("-" * w for w in widths)), *map(line, rows)])
