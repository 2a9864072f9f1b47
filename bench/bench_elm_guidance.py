"""Does ELM's guidance carry a knowledge difference on this model?

    python bench/bench_elm_guidance.py --data ../shared/data/ember-benchmark \
        --concepts Gambling,Gun,Cannabis,Golf [--model embedded] [--templates 2]

``erase --method elm`` runs the same check per concept before training
(``guidance_templates``). ELM's erase target is the original's next-token distribution re-weighted by
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
from obliviate.evaluation.metrics import bootstrap
from obliviate.methods.elm import accuracy_under, guidance_difference, persona_accuracy
from obliviate.models.loading import load_model
from obliviate.pipeline.inputs import load_concept_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/ember-benchmark")
    parser.add_argument("--concepts", default="Gambling,Gun,Cannabis,Golf")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--templates", type=int, default=2, help="expert and novice templates each (of 10)")
    args = parser.parse_args()
    lm = load_model(args.model, "cpu", "float32", None)
    rows, differences = [], {}
    for concept in args.concepts.split(","):
        data = load_concept_data(make_config(None, concept=concept, data={"data": args.data}))
        questions = data.questions["qa_train"]
        plain = accuracy_under(lm, questions, "")
        expert, novice = persona_accuracy(lm, questions, concept, args.templates)
        differences[concept] = (novice - expert,)
        d = guidance_difference(expert, novice)
        rows.append(f"| {concept} | {len(questions)} | {plain.mean():.2f} | {expert.mean():.2f} | {novice.mean():.2f} | "
                    f"{d.value:+.3f} [{d.low:+.3f}, {d.high:+.3f}] |")
    pooled = bootstrap(lambda s: {"d": float(np.mean([a[0].mean() for a in s.values()]))}, differences, 2000, 0)["d"]
    print(f"| concept | TRAIN questions | no prefix | expert prefix ({args.templates}) | novice prefix ({args.templates}) | "
          "novice - expert [95% CI] |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print(f"| pooled ({len(differences)} concepts) | | | | | {pooled.value:+.3f} [{pooled.low:+.3f}, {pooled.high:+.3f}] |")


if __name__ == "__main__":
    main()
