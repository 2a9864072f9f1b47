"""ECO speed: classifier latency per prompt and generation overhead versus the plain model.

    python bench/bench_eco.py --eco runs/eco-ww2 --data ../shared/data/ember-benchmark

Prompts: the concept's TEST questions (mostly flagged) and SimDom/other concepts' test
questions that the classifier does not flag. For unflagged prompts the hook's whole
cost is the classifier's early-exit pass at prefill; the target is < 5% of generation
time. Prints a Markdown table (medians over --repeats runs, one prompt at a time).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from obliviate.methods import eco
from obliviate.data.concepts import load_benchmark_concept
from obliviate.methods.eco.fitting import encode
from obliviate.methods.eco.fitting import scoring_prompt
from obliviate.methods.eco.hook import prompt_length
from obliviate.models.loading import load_model


def timed(fn, repeats: int) -> float:
    values = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        values.append(time.perf_counter() - start)
    return statistics.median(values)


def generate(lm, ids, new_tokens: int):
    with torch.no_grad():
        return lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eco", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    artifact = eco.load(args.eco)
    lm = load_model(args.model or artifact.model_name, args.device)
    data = load_benchmark_concept(artifact.info["concept"], args.data, general_questions=50)
    hook = eco.make_hook(artifact)
    questions = [scoring_prompt(q.question) for q in data.questions["qa_test"]]
    others = [scoring_prompt(q.question) for q in data.questions["simdom_test"] + data.general["test"]]
    ids = encode(lm, questions + others)
    prompts = [tuple(i[: prompt_length(i, hook.marker_ids)]) for i in ids]
    flags = hook.prompt_scores(lm.model, prompts) >= hook.classifier.threshold
    flagged = [torch.tensor([i]) for i, f in zip(ids, flags) if f][: args.prompts]
    unflagged = [torch.tensor([i]) for i, f in zip(ids, flags) if not f][: args.prompts]

    def classify_one():
        for p in prompts[: args.prompts]:
            hook._scores.clear()
            hook.prompt_scores(lm.model, [p])

    per_prompt = timed(classify_one, args.repeats) / args.prompts
    rows = [("classifier, one prompt (ms)", f"{1000 * per_prompt:.1f}")]
    for name, group in (("unflagged", unflagged), ("flagged", flagged)):
        if not group:
            continue
        plain = timed(lambda: [generate(lm, i, args.new_tokens) for i in group], args.repeats)
        eco.wrap(lm, artifact)
        try:
            hooked = timed(lambda: [(eco.hook_of(lm)._scores.clear(), generate(lm, i, args.new_tokens)) for i in group],
                           args.repeats)
        finally:
            eco.unwrap(lm)
        rows.append((f"generate {args.new_tokens} tokens, {name} ({len(group)} prompts): plain / eco (s)",
                     f"{plain:.2f} / {hooked:.2f} (overhead {100 * (hooked / plain - 1):+.1f}%)"))
    print(f"\nECO bench: {artifact.info['concept']} on {lm.name} ({args.device}, {torch.get_num_threads()} threads)\n")
    print("| measure | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
