"""ECO speed: classifier latency per prompt and generation overhead versus the plain model;
ECO quality: a table of `erase --method eco` runs with the classifier's recall under the
attack suite's forms.

    python bench/bench_eco.py --eco runs/eco-ww2 --data ../shared/data/ember-benchmark
    python bench/bench_eco.py --runs runs/eco-gambling runs/eco-golf --data ../shared/data/ember-benchmark

Quality (--runs, folders of `obliviate erase --method eco`): per concept, test QA base ->
erased, efficacy, specificity, coherence, concept fluency (95% intervals from results.json),
seconds, sigma and how its search stopped, the fit's recall on TEST questions (plain, in
its held-out forms) and held-out FPR, and recall under the attack suite's adversarial
templates and `eco evaluate`'s topic-hiding prefixes, which the classifier never trained
on (forms.py), with 95% intervals over questions.

Prompts: the concept's TEST questions (mostly flagged) and SimDom/other concepts' test
questions that the classifier does not flag. For unflagged prompts the hook's whole
cost is the classifier's early-exit pass at prefill; the target is < 5% of generation
time. Prints a Markdown table (medians over --repeats runs, one prompt at a time).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from obliviate.methods import eco
from obliviate.data.concepts import load_benchmark_concept
from obliviate.attacks.adversarial import TEMPLATES
from obliviate.methods.eco.artifact import EcoArtifact
from obliviate.methods.eco.fitting import encode
from obliviate.methods.eco.fitting import prompt_ids
from obliviate.methods.eco.fitting import scoring_prompt
from obliviate.methods.eco.forms import every_form
from obliviate.methods.eco.hook import prompt_length
from obliviate.methods.eco.recall import describe, rate_interval
from obliviate.models.loading import load_model
from obliviate.pipeline.eco import ADVERSARIAL_PREFIXES


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


def attack_form_recall(lm, artifact: EcoArtifact, questions: list[str], concept: str) -> dict[str, dict]:
    """Recall on TEST questions under the attack suite's templates and the topic-hiding
    prefixes (both positions of each), with 95% intervals over questions."""
    suites = {"attack_templates": TEMPLATES,
              "topic_prefixes": {f"prefix{i}": p for i, p in enumerate(ADVERSARIAL_PREFIXES)}}
    out = {}
    for name, templates in suites.items():
        units = [[w.text for w in unit] for unit in every_form(questions, concept, templates)]
        flags = artifact.classifier.flags(lm.model, prompt_ids(lm, [t for u in units for t in u], artifact.marker_ids))
        size = len(units[0])
        out[name] = rate_interval([flags[i * size:(i + 1) * size] for i in range(len(units))], seed=0)
    return out


def run_seconds(folder: Path) -> float:
    """The run's wall time, from results.json's timings (their total, if recorded)."""
    results = json.loads((folder / "results.json").read_text())
    timings = results.get("timings", {})
    return float(timings.get("total", sum(v for v in timings.values() if isinstance(v, (int, float)))))


def quality_row(lm, folder: Path, data_dir: str) -> dict:
    results = json.loads((folder / "results.json").read_text())
    artifact = EcoArtifact.load(folder / "eco")
    data = load_benchmark_concept(artifact.info["concept"], data_dir, general_questions=50)
    questions = [q.question for q in data.questions["qa_test"]]
    fit = artifact.info["classifier_report"]
    search = artifact.info["sigma_search"]
    test = results["test"]["metrics"]
    return {
        "concept": data.concept, "seconds": run_seconds(folder),
        **{k: test[k] for k in ("qa_base", "qa_edited", "efficacy", "specificity", "coherence", "concept_fluency") if k in test},
        "recall_plain": fit["recall"]["test_questions"], "recall_held_out_forms": fit["recall"].get("test_held_out_forms"),
        **{f"recall_{k}": v for k, v in attack_form_recall(lm, artifact, questions, data.concept).items()},
        "fpr_heldout": fit["heldout_fpr"]["all"], "sigma": artifact.corruption.strength, "sigma_stop": search["stopped"],
    }


def quality(args: argparse.Namespace) -> None:
    lm = load_model(args.model, args.device)
    rows = [quality_row(lm, Path(folder), args.data) for folder in args.runs]
    columns = [k for k in rows[0] if k not in ("concept", "seconds", "sigma", "sigma_stop")]
    print("| concept | " + " | ".join(columns) + " | sigma | seconds |")
    print("|" + " --- |" * (len(columns) + 3))
    for row in rows:
        cells = [describe(row[c]) if isinstance(row.get(c), dict) else "-" for c in columns]
        print(f"| {row['concept']} | " + " | ".join(cells) + f" | {row['sigma']:.4g} ({row['sigma_stop']}) | {row['seconds']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eco", help="an artifact folder: time the classifier and the hook")
    parser.add_argument("--runs", nargs="+", metavar="DIR", help="`erase --method eco` folders: the quality table")
    parser.add_argument("--json", default=None, help="also write the quality rows as JSON here")
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.runs:
        quality(args)
    elif args.eco:
        speed(args)
    else:
        parser.error("give --eco DIR (speed) or --runs DIR... (quality)")


def speed(args: argparse.Namespace) -> None:
    artifact = eco.load(args.eco)
    lm = load_model(args.model or artifact.model_name, args.device)
    data = load_benchmark_concept(artifact.info["concept"], args.data, general_questions=50)
    hook = artifact.hook()
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
