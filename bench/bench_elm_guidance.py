"""Does ELM's guidance carry a knowledge difference on this model?

    python bench/bench_elm_guidance.py --data ../shared/data/ember-benchmark \
        --concepts Gambling,Gun,Cannabis,Golf [--model embedded] [--templates 2]

ELM's erase target is the original's next-token distribution re-weighted by
(P(x | novice prefix) / P(x | expert prefix))^eta (methods/elm.py). It can teach ignorance
only where the model, told it is a novice, knows less than when told it is an expert. This
measures exactly that, on each concept's TRAIN questions (option log-likelihood, as the
evaluation scores them): accuracy with no prefix, under ELM's expert prefixes and under
its novice prefixes, and the paired novice - expert difference per concept and pooled over
concepts (stratified bootstrap, 95%). A difference within noise of 0 means the target has
nothing to erase toward on this model. Prints a Markdown table.
"""
from __future__ import annotations

import argparse

import numpy as np

from obliviate.api import make_config
from obliviate.data.concepts import MCQuestion
from obliviate.evaluation.metrics import bootstrap
from obliviate.evaluation.multiple_choice import correct_from_scores, option_scores, prepare
from obliviate.methods.elm import EXPERT, NOVICE
from obliviate.models.loading import load_model
from obliviate.pipeline.inputs import load_concept_data


def accuracy_under(lm, questions: list[MCQuestion], prefix: str) -> np.ndarray:
    """Per-question correctness with ``prefix`` before each question (option order is
    irrelevant to log-likelihood scoring, so the prefix changes only the context)."""
    asked = [MCQuestion(f"{prefix} {q.question}".strip(), q.options, q.answer) for q in questions]
    prepared = prepare(lm, asked, "loglik", 42)
    return correct_from_scores(prepared, option_scores(lm, prepared)).astype(float)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/ember-benchmark")
    parser.add_argument("--concepts", default="Gambling,Gun,Cannabis,Golf")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--templates", type=int, default=2, help="expert and novice templates each (of 10)")
    args = parser.parse_args()
    lm = load_model(args.model, "cpu", "float32", None)
    picks = np.linspace(0, len(EXPERT) - 1, args.templates).round().astype(int)
    rows, differences = [], {}
    for concept in args.concepts.split(","):
        data = load_concept_data(make_config(None, concept=concept, data={"data": args.data}))
        questions = data.questions["qa_train"]
        plain = accuracy_under(lm, questions, "")
        expert = np.mean([accuracy_under(lm, questions, EXPERT[i].format(c=concept)) for i in picks], axis=0)
        novice = np.mean([accuracy_under(lm, questions, NOVICE[i].format(c=concept)) for i in picks], axis=0)
        differences[concept] = (novice - expert,)
        d = bootstrap(lambda s: {"d": float(s["d"][0].mean())}, {"d": (novice - expert,)}, 2000, 0)["d"]
        rows.append(f"| {concept} | {len(questions)} | {plain.mean():.2f} | {expert.mean():.2f} | {novice.mean():.2f} | "
                    f"{d.value:+.3f} [{d.low:+.3f}, {d.high:+.3f}] |")
    pooled = bootstrap(lambda s: {"d": float(np.mean([a[0].mean() for a in s.values()]))}, differences, 2000, 0)["d"]
    print(f"| concept | TRAIN questions | no prefix | expert prefix ({len(picks)}) | novice prefix ({len(picks)}) | "
          "novice - expert [95% CI] |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print(f"| pooled ({len(differences)} concepts) | | | | | {pooled.value:+.3f} [{pooled.low:+.3f}, {pooled.high:+.3f}] |")


if __name__ == "__main__":
    main()
