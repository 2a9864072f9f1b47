"""Can an edit of token rows cover the respellings? What the token-free rewrites are made of.

    python bench/spelling_coverage.py --runs runs/holds/ember/gambling runs/holds/ember/gun \
        [--write docs/results/spelling-coverage.md]

For each EMBER erase run: its TEST questions rewritten as the `respell` attack rewrites them
(no edited token left), and the tokens those rewrites brought in. An edit that would also
cover the respellings ("EMBER over spellings") has to edit those tokens; the table says how
general they are: the share of the neutral sentences (general text) that contain one, beside
the same share for the run's own edited tokens. Tokenizer only: no model runs.
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from transformers import AutoTokenizer

from obliviate.attacks.respell import Rewriter
from obliviate.cli import quiet_start
from obliviate.data import benchmark_dir
from obliviate.data.concepts import load_benchmark_concept
from obliviate.models.loading import embedded_model_folder
from obliviate.pipeline.pair import edited_token_ids

SEED = 42


def token_ids(tokenizer, text: str) -> set[int]:
    return set(tokenizer(text, add_special_tokens=False).input_ids)


ROUNDS = 4


def coverage(run: Path, tokenizer) -> list[dict]:
    """Round 1 is the attack on the run's edit; each later round adds the tokens the last
    round's rewrites brought in to the edited set (an edit over those spellings too) and
    rewrites again, as an attacker would."""
    results = json.loads((run / "results.json").read_text())
    data = load_benchmark_concept(results["concept"], benchmark_dir(), seed=SEED)
    questions = data.questions["qa_test"]
    neutral = [token_ids(tokenizer, s) for s in data.neutral_sentences]
    plain = [token_ids(tokenizer, " ".join([q.question, *q.options])) for q in questions]
    edited = set(edited_token_ids(str(run)) or [])
    rows = []
    for round_ in range(1, ROUNDS + 1):
        rewriter = Rewriter(tokenizer, frozenset(edited))
        rewritten = [rewriter.question(q, "respell") for q in questions]
        after = [token_ids(tokenizer, " ".join([q.question, *q.options])) for q in rewritten]
        brought_in = set().union(*(a - b for a, b in zip(after, plain))) - edited
        rows.append({"concept": results["concept"], "round": round_, "edited": len(edited),
                     "neutral_edited": sum(bool(n & edited) for n in neutral) / max(len(neutral), 1),
                     "rewritten": sum(q != r for q, r in zip(questions, rewritten)),
                     "still": sum(bool(a & edited) for a in after), "brought_in": len(brought_in),
                     "examples": tokenizer.convert_ids_to_tokens(sorted(brought_in))[:10]})
        if not brought_in:
            break
        edited |= brought_in
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="EMBER erase run folders")
    parser.add_argument("--write", type=Path, default=None, help="also write the page here")
    args = parser.parse_args()
    quiet_start()
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_folder())
    rows = [row for run in args.runs for row in coverage(run, tokenizer)]
    lines = [
        f"Written by `python bench/spelling_coverage.py --runs {' '.join(map(str, args.runs))} --write "
        f"{args.write or 'PAGE'}` on {datetime.date.today()} (the embedded Gemma 3 270M's tokenizer).",
        "",
        "# Can an edit of token rows cover the respellings?",
        "",
        "Each EMBER run's TEST questions rewritten as the `respell` attack does (no edited token left). Round 1 is the "
        "run's own edit; each later round adds the tokens the last round's rewrites brought in to the edited set (an "
        "edit over those spellings too) and lets the attacker respell again. \"neutral touched\": the share of the "
        "neutral sentences (general text) that contain an edited token: what such an edit would disrupt beyond the "
        "concept.",
        "",
        "| concept | round | edited tokens | neutral touched | questions rewritten | still holding an edited token | "
        "tokens brought in | some of them |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *(f"| {r['concept']} | {r['round']} | {r['edited']} | {r['neutral_edited']:.2f} | {r['rewritten']} / 50 | "
          f"{r['still']} | {r['brought_in']} | {' '.join(r['examples'])} |" for r in rows),
    ]
    text = "\n".join(lines) + "\n"
    if args.write:
        args.write.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
