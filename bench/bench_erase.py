"""Speed of EMBER's stages on the embedded model (targets from issue 3).

    python bench/bench_erase.py [--stages factorization,scoring,erase,cache,nothing,eval]

- factorization: the plain reference schedule vs our solver on the same A, same seed
  (target: >= 10x faster at equal or lower loss);
- scoring: multiple-choice tokens/s, batched (ours) vs one option at a time with full
  logits (target >= 5x), and as a fraction of this machine's measured matmul FLOP rate;
- erase: a full `erase` of one concept, per-stage seconds (target <= 5 minutes);
- cache: the same `erase` twice on an empty results cache, cold then warm (issue 17:
  warm <= 2 minutes on 2 cores; the same results), and the warm grid's candidates/s;
- nothing: a cold `erase` of a concept the model does not know (--nothing-concept): when
  "nothing to erase" is known (loading and the TRAIN QA decision; target <= 30 s), and the
  TEST record after it;
- eval: a cold erase (delta 50), then `eval` of it in the results cache it filled (target
  <= 90 s) and on an empty cache, as an embedding patch and as two models (target
  <= 180 s; the same answers);
- attack: a cold erase (delta 50, patch only), then the cheap attack battery on it in the
  results cache it filled (`obliviate attack --attacks cheap`): per attack seconds and the
  share of the original's knowledge it brought back.
Prints a Markdown table with the machine's name.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

import obliviate
from obliviate.data import benchmark_dir
from obliviate.data.concepts import load_benchmark_concept
from obliviate.evaluation.multiple_choice import option_scores, prepare
from obliviate.methods.factorization import FactorizationConfig, factorize, reference_factorize
from obliviate.methods.features import build_token_set
from obliviate.methods.ember import embedding_matrix


PAGE_INTRO = ("Each stage is described in `bench/bench_erase.py`. \"cold\" means an empty results cache (the "
              "original model's answers, continuations and output states computed and written); \"warm\" reads them "
              "back. The same numbers (chosen delta, answers) are checked on both sides of every comparison. On a "
              "shared machine wall seconds vary by up to a quarter from run to run: compare rows of one page, or runs "
              "made back to back.")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return f"{platform.node()} ({cpu}, {torch.get_num_threads()} threads)"


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def bench_factorization(lm, data) -> list[tuple[str, str]]:
    token_set = build_token_set(lm.tokenizer, data.concept_sentences, data.neutral_sentences, data.contrast_sentences)
    A = embedding_matrix(lm, token_set.ids).cpu()
    config = FactorizationConfig()
    start = time.perf_counter()
    plain = reference_factorize(A, config)
    plain_s = time.perf_counter() - start
    start = time.perf_counter()
    fast = factorize(A, config)
    fast_s = time.perf_counter() - start
    shape = f"A {tuple(A.shape)}, K={config.k}"
    return [
        ("factorization, plain reference", f"{plain_s:.2f} s, {plain.iterations} it ({1000 * plain_s / plain.iterations:.1f} ms/it), loss {plain.loss:,.0f}; {shape}"),
        ("factorization, ours", f"{fast_s:.2f} s, {fast.iterations} it + polish, loss {fast.loss:,.0f}"),
        ("factorization speed-up / loss ratio", f"{plain_s / fast_s:.1f}x, ours/plain loss = {fast.loss / plain.loss:.4f}"),
    ]


@torch.no_grad()
def naive_scoring(lm, prepared) -> None:
    """One option at a time, logits at every position (how a plain loop is usually written)."""
    for context, continuation in prepared.items:
        ids = torch.tensor([context + continuation])
        logprobs = torch.log_softmax(lm.model(input_ids=ids).logits[0], dim=-1)
        sum(float(logprobs[len(context) - 1 + t, tok]) for t, tok in enumerate(continuation))


def scoring_flops(lm, prepared) -> float:
    """Forward FLOPs the batched scorer needs: 2 x non-embedding params per token (each
    question's shared context once, each option's tokens), plus the vocabulary projection
    at the positions that predict option tokens only."""
    emb = lm.model.get_input_embeddings().weight
    head = lm.model.get_output_embeddings().weight
    body = sum(p.numel() for p in lm.model.parameters()) - emb.numel() - (0 if head is emb else head.numel())
    contexts = {tuple(c) for c, _ in prepared.items}
    option_tokens = sum(len(x) for _, x in prepared.items)
    tokens = sum(len(c) for c in contexts) + option_tokens
    return 2 * body * tokens + 2 * head.numel() * option_tokens


def bench_scoring(lm, data, questions: int) -> list[tuple[str, str]]:
    prepared = prepare(lm, data.questions["qa_train"][:questions], "loglik")
    tokens = sum(len(c) + len(x) for c, x in prepared.items)
    option_scores(lm, prepared)  # warm-up
    start = time.perf_counter()
    option_scores(lm, prepared)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    naive_scoring(lm, prepared)
    naive = time.perf_counter() - start
    peak = matmul_flops()
    achieved = scoring_flops(lm, prepared) / ours
    return [
        ("MC scoring, one option at a time", f"{tokens / naive:,.0f} tokens/s ({questions} questions, {naive:.1f} s)"),
        ("MC scoring, ours (batched)", f"{tokens / ours:,.0f} tokens/s ({ours:.1f} s)"),
        ("MC scoring speed-up", f"{naive / ours:.1f}x"),
        ("MC scoring vs matmul peak", f"{achieved / 1e9:.1f} GFLOP/s of {peak / 1e9:.1f} GFLOP/s measured = {achieved / peak:.0%}"),
    ]


def bench_erase(concept: str, data_dir: str | None) -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = obliviate.erase(concept, out=Path(tmp) / "run", save_model=True, **({"data": data_dir} if data_dir else {}))
        wall = time.perf_counter() - start
    rows = [(f"erase {concept!r}: wall", f"{wall:.0f} s ({wall / 60:.1f} min; target <= 5 min)")]
    rows += [(f"  stage {stage}", f"{seconds:.1f} s") for stage, seconds in result.results["timings"].items()]
    return rows


@contextmanager
def empty_results_cache() -> Iterator[Path]:
    """A fresh, empty results cache for the block (the original's answers computed anew)."""
    from obliviate.evaluation.cache import ENV_FOLDER

    previous = os.environ.get(ENV_FOLDER)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[ENV_FOLDER] = str(Path(tmp) / "cache")
        try:
            yield Path(tmp)
        finally:
            os.environ.pop(ENV_FOLDER) if previous is None else os.environ.__setitem__(ENV_FOLDER, previous)


def bench_nothing(concept: str, data_dir: str | None) -> list[tuple[str, str]]:
    """A cold erase of a concept at chance: the decision is known once the model is loaded
    and the original's TRAIN QA is scored; TEST is evaluated once, for the record."""
    with empty_results_cache() as tmp:
        start = time.perf_counter()
        result = obliviate.erase(concept, out=tmp / "run", save_model=False, **({"data": data_dir} if data_dir else {}))
        wall = time.perf_counter() - start
    timings, applied = result.results["timings"], bool(result.results.get("delta"))
    known = timings["load"] + timings["ember_grid"]
    return [(f"erase {concept!r}, cold: nothing to erase known after",
             f"{known:.0f} s (load {timings['load']:.0f} s + TRAIN QA {timings['ember_grid']:.0f} s; target <= 30 s)"),
            ("  then TEST evaluated once (the original only)", f"{timings['test_evaluation']:.0f} s; wall {wall:.0f} s; "
                                                                 f"an edit applied: {applied}")]


def untimed(sweep: list[dict]) -> list[dict]:
    """A grid's candidates without their seconds (a warm candidate is faster, not different)."""
    return [{key: value for key, value in candidate.items() if key != "seconds"} for candidate in sweep]


def bench_cache(concept: str, data_dir: str) -> list[tuple[str, str]]:
    """The same `erase` twice on an empty results cache: cold (the original model's answers,
    continuations and output states computed and written), then warm (read back). Per-stage
    seconds side by side; the results must be equal."""
    runs = []
    with empty_results_cache() as tmp:
        for name in ("cold", "warm"):
            start = time.perf_counter()
            result = obliviate.erase(concept, out=tmp / name, save_model=True, **({"data": data_dir} if data_dir else {}))
            runs.append((time.perf_counter() - start, result.results))
    (cold, cold_results), (warm, warm_results) = runs
    same = all(cold_results.get(k) == warm_results.get(k) for k in ("delta", "per_question", "per_prompt")) and \
        untimed(cold_results["delta_sweep"]) == untimed(warm_results["delta_sweep"])
    candidates, grid = len(warm_results["delta_sweep"]), warm_results["timings"]["ember_grid"]
    rows = [(f"erase {concept!r}, cold cache / warm cache",
             f"{cold:.0f} s / {warm:.0f} s ({cold / warm:.1f}x; target warm <= 120 s); same results: {same}"),
            ("  EMBER's grid, warm (the candidates' own work)", f"{candidates} candidates in {grid:.1f} s: "
                                                                f"{candidates / grid:.3f} candidates/s")]
    for stage, seconds in cold_results["timings"].items():
        rows.append((f"  stage {stage}", f"{seconds:.1f} s / {warm_results['timings'].get(stage, float('nan')):.1f} s"))
    return rows


def bench_eval(concept: str, data_dir: str | None) -> list[tuple[str, str]]:
    """`eval` of an erase run (EMBER at delta 50, patch only): after the erase, in the
    results cache it filled (the original's answers cached; target <= 90 s), then on an
    empty results cache (questions never scored before; target <= 180 s) as an embedding
    patch on the original (only inputs holding an edited token run on the erased weights)
    and as two models (every input on both). Wall seconds side by side; the answers must
    be the same."""
    from obliviate.cli import main as cli
    from obliviate.pipeline import evaluate

    data = ["--data", data_dir] if data_dir else []
    seconds, results, shortcut = {}, {}, evaluate.erased_as_edit
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "erase"

        def timed_eval(name: str) -> None:
            start = time.perf_counter()
            assert cli(["eval", "--model", str(run), *data, "--no-progress", "--out", str(Path(tmp) / name)]) == 0
            seconds[name] = time.perf_counter() - start
            results[name] = json.loads((Path(tmp) / name / "results.json").read_text())

        with empty_results_cache():
            start = time.perf_counter()
            obliviate.erase(concept, out=run, save_model=False, ember={"delta": 50.0}, progress=False,
                            **({"data": data_dir} if data_dir else {}))
            seconds["erase"] = time.perf_counter() - start
            timed_eval("cached")
        for name, as_patch in (("as a patch", shortcut), ("as two models", lambda pair: None)):
            evaluate.erased_as_edit = as_patch
            with empty_results_cache():
                timed_eval(name)
        evaluate.erased_as_edit = shortcut
    full = results["as two models"]
    same = all(results[name]["per_question"][s][k] == full["per_question"][s][k] for name in ("cached", "as a patch")
               for s in full["per_question"] for k in full["per_question"][s] if k.endswith("correct"))
    return [(f"cold erase of {concept!r} (delta 50, patch only, empty results cache)", f"{seconds['erase']:.0f} s"),
            (f"eval of that erase run, in the results cache it filled", f"{seconds['cached']:.0f} s "
             f"(target <= 90 s; {results['cached']['timings']})"),
            (f"eval of the same run, empty results cache: as a patch / as two models",
             f"{seconds['as a patch']:.0f} s / {seconds['as two models']:.0f} s "
             f"({seconds['as two models'] / seconds['as a patch']:.1f}x; target <= 180 s); same answers: {same}"),
            ("  evaluated as", results["as a patch"]["evaluated_as"])]


def bench_attack(concept: str, data_dir: str | None) -> list[tuple[str, str]]:
    """The cheap attack battery on a fresh erase run, as a user runs it after `erase`."""
    from obliviate.cli import main as cli

    data = ["--data", data_dir] if data_dir else []
    with empty_results_cache() as tmp:
        run, out = tmp / "erase", tmp / "attack"
        obliviate.erase(concept, out=run, save_model=False, ember={"delta": 50.0}, progress=False,
                        **({"data": data_dir} if data_dir else {}))
        start = time.perf_counter()
        assert cli(["attack", "--model", str(run), *data, "--attacks", "cheap", "--no-progress", "--out", str(out)]) == 0
        wall = time.perf_counter() - start
        results = json.loads((out / "results.json").read_text())
    rows = [(f"attack battery (cheap) on an erase of {concept!r} (delta 50), in the results cache the erase filled",
             f"{wall:.0f} s; worst case recovered {_recovered(results['worst_case_recovered'])} "
             f"({results['worst_case_recovered']['attack']})")]
    for name, seconds in results["timings"].items():
        rows.append((f"  attack {name}", f"{seconds:.1f} s; recovered {_recovered(results[name].get('recovered_frac'))}"))
    return rows


def _recovered(interval: dict | None) -> str:
    if not interval or interval.get("value") is None:
        return "-"
    return f"{interval['value']:.4f} [{interval['low']:.4f}, {interval['high']:.4f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="the benchmark folder (default: the one the package ships)")
    parser.add_argument("--concept", default="Harry Potter")
    parser.add_argument("--nothing-concept", default="Valentine's Day", help="a concept the model does not know")
    parser.add_argument("--stages", default="factorization,scoring,erase")
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--write", type=Path, default=None, help="also write the table to this page")
    args = parser.parse_args()
    stages = args.stages.split(",")
    lm = obliviate.load_model()
    data = load_benchmark_concept(args.concept, args.data or str(benchmark_dir()))
    rows = [("machine", machine())]
    if "factorization" in stages:
        rows += bench_factorization(lm, data)
    if "scoring" in stages:
        rows += bench_scoring(lm, data, args.questions)
    if "erase" in stages:
        rows += bench_erase(args.concept, args.data)
    if "cache" in stages:
        rows += bench_cache(args.concept, args.data)
    if "nothing" in stages:
        rows += bench_nothing(args.nothing_concept, args.data)
    if "eval" in stages:
        rows += bench_eval(args.concept, args.data)
    if "attack" in stages:
        rows += bench_attack(args.concept, args.data)
    table = ["| measurement | result |", "| --- | --- |", *(f"| {name} | {value} |" for name, value in rows)]
    print("\n".join(table))
    if args.write:
        command = " ".join(["python bench/bench_erase.py", f"--concept '{args.concept}'", f"--stages {args.stages}",
                            f"--write {args.write}"])
        args.write.write_text("\n".join([
            f"Written by `{command}` on {datetime.date.today()} (the embedded Gemma 3 270M, one process alone on "
            "the machine named below; wall seconds).", "", "# Where a user waits: erase, eval, the cache", "",
            PAGE_INTRO, "", *table]) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
