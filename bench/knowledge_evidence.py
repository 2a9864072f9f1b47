"""Does the embedded model know a concept? Accuracy against the correct option's probability.

    python bench/knowledge_evidence.py [--model SPEC] [--write docs/results/knowledge-evidence.md]

For every benchmark concept, the ORIGINAL model's QA accuracy and the mean normalized
probability of the correct option (evaluation/multiple_choice.correct_probability: every
option taken at the question's mean option length, so it ranks as the accuracy does), on the
TRAIN and the TEST questions, each with its 95% interval (the lower end: Wilson for accuracy,
normal for the mean probability), and whether each measure is within noise of chance. `erase` decides
"nothing to erase" from TRAIN only; TEST is here to show whether that decision carried.
Prints a Markdown table (and writes it to --write).
"""
from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import numpy as np

from obliviate.cli import quiet_start
from obliviate.data import benchmark_dir
from obliviate.data.concepts import list_concepts, load_benchmark_concept
from obliviate.evaluation.metrics import chance_level, mean_low, near_chance, probability_near_chance, wilson_low
from obliviate.evaluation.multiple_choice import correct_from_scores, correct_probability, option_scores, prepare
from obliviate.models.loading import load_model

SEED = 42


def measure(lm, questions) -> dict:
    prepared = prepare(lm, questions, "auto", SEED)
    scores = option_scores(lm, prepared)
    correct = correct_from_scores(prepared, scores)
    probability = correct_probability(prepared, scores)
    chance = chance_level([len(q.options) for q in questions])
    return {"n": len(questions), "chance": chance, "accuracy": float(correct.mean()),
            "accuracy_low": wilson_low(correct), "probability": float(probability.mean()),
            "probability_low": mean_low(probability),
            "accuracy_near_chance": near_chance(float(correct.mean()), len(correct), chance),
            "probability_near_chance": probability_near_chance(probability, chance)}


def cell(m: dict) -> str:
    near = [name for name in ("accuracy", "probability") if m[f"{name}_near_chance"]]
    return (f"{m['accuracy']:.2f} (low {m['accuracy_low']:.2f}) | {m['probability']:.2f} (low {m['probability_low']:.2f}) | "
            f"{', '.join(near) or '-'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model spec (default: the embedded model)")
    parser.add_argument("--write", type=Path, default=None, help="also write the page here")
    args = parser.parse_args()
    quiet_start()
    lm = load_model(args.model)
    rows = []
    for concept in list_concepts(benchmark_dir()):
        data = load_benchmark_concept(concept, benchmark_dir(), seed=SEED)
        train, test = measure(lm, data.questions["qa_train"]), measure(lm, data.questions["qa_test"])
        rows.append(f"| {concept} | {cell(train)} | {cell(test)} |")
        print(rows[-1], flush=True)
    lines = [
        f"Written by `python bench/knowledge_evidence.py --write docs/results/knowledge-evidence.md` on "
        f"{datetime.date.today()} (the embedded Gemma 3 270M, seed {SEED}).",
        "",
        "# Does the model know the concept? Accuracy and the correct option's probability",
        "",
        "The original model only; 50 questions a split, the lower end (\"low\") of each 95% interval: Wilson for "
        "accuracy, normal for the mean probability of the correct option among the options (each option taken at the "
        "question's mean option length, so the measure ranks as the accuracy does). \"near chance\" names the "
        "measures that show no knowledge: accuracy whose interval reaches chance (1 / options), probability whose "
        "interval reaches chance plus one question's worth (1 / n). `erase` finds nothing to erase only when both "
        "are near chance on TRAIN; a set at chance by accuracy alone is judged on the probability. Pornography is "
        "the case: TRAIN accuracy near chance, its probability not, and TEST shows the knowledge.",
        "",
        "| concept | TRAIN accuracy | TRAIN P(correct) | TRAIN near chance | TEST accuracy | TEST P(correct) | TEST near chance |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ]
    if args.write:
        args.write.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
