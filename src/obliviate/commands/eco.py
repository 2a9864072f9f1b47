"""`obliviate eco`: fit a prompt classifier + sigma, generate behind the hook, evaluate.

    obliviate eco fit --concept "Harry Potter" --data ../shared/data/ember-benchmark --out runs/eco-hp
    obliviate eco generate --eco runs/eco-hp --prompt "Who teaches potions at Hogwarts?" --compare
    obliviate eco evaluate --eco runs/eco-hp --data ../shared/data/ember-benchmark --out runs/eco-hp/eval \\
        [--ember runs/hp]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from obliviate.cli import add_dataclass_arguments, collect_overrides


def _model_arguments(parser: argparse.ArgumentParser, default_help: str) -> None:
    parser.add_argument("--model", default=None, help=f"model name, folder, hub id or .gguf ({default_help})")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default cpu)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: by device)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="also load pickle weights (.bin/.pt/.pth), which can run code: trusted folders only")


def _data_arguments(parser: argparse.ArgumentParser, general: int) -> None:
    parser.add_argument("--concept", default=None, help="the concept, e.g. 'Harry Potter'")
    parser.add_argument("--data", default=None, help="the EMBER benchmark folder")
    parser.add_argument("--concept-sentences", default=None, help="a custom concept's sentences (one a line or JSON)")
    parser.add_argument("--questions", default=None, help="a custom concept's MC questions (benchmark schema)")
    parser.add_argument("--general-questions", type=int, default=general,
                        help=f"other concepts' questions per split (negatives / general knowledge; default {general})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from obliviate.config import EvalConfig
    from obliviate.methods.eco.config import EcoConfig

    sub = parser.add_subparsers(dest="eco_command", metavar="ACTION", required=True)
    fit = sub.add_parser("fit", help="train the classifier, calibrate the threshold, learn sigma")
    _model_arguments(fit, "default: the embedded model")
    _data_arguments(fit, 300)
    fit.add_argument("--out", required=True, help="artifact folder to write")
    fit.add_argument("--overwrite", action="store_true", help="replace an existing artifact in --out")
    add_dataclass_arguments(fit, EcoConfig, "eco", title="ECO")

    gen = sub.add_parser("generate", help="generate with the ECO hook (flagged prompts are corrupted)")
    gen.add_argument("--eco", required=True, help="artifact folder from `eco fit`")
    _model_arguments(gen, "default: the artifact's model")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    gen.add_argument("--max-new-tokens", type=int, default=48)
    gen.add_argument("--ember", default=None, help="EMBER patch file or run folder to apply under the hook")
    gen.add_argument("--compare", action="store_true", help="also print the plain model's continuation")

    ev = sub.add_parser("evaluate", help="efficacy / specificity / coherence on TEST questions")
    ev.add_argument("--eco", required=True, help="artifact folder from `eco fit`")
    _model_arguments(ev, "default: the artifact's model")
    _data_arguments(ev, 100)
    ev.add_argument("--out", required=True, help="folder for results.json")
    ev.add_argument("--ember", default=None, help="EMBER patch file or run folder: also report EMBER and EMBER+ECO")
    ev.add_argument("--seed", type=int, default=42)
    add_dataclass_arguments(ev, EvalConfig, "evaluation", title="evaluation")


def _load_data(args: argparse.Namespace, concept: str | None):
    from obliviate.data.concepts import load_benchmark_concept, load_user_concept
    from obliviate.errors import ObliviateError

    if not concept:
        raise ObliviateError("Name the concept with --concept (e.g. --concept 'Harry Potter').")
    if args.concept_sentences:
        return load_user_concept(concept, args.concept_sentences, data_dir=args.data, questions=args.questions,
                                 general_questions=args.general_questions)
    if not args.data:
        raise ObliviateError("Pass --data with the EMBER benchmark folder (or --concept-sentences FILE).")
    return load_benchmark_concept(concept, args.data, general_questions=args.general_questions)


def _load_lm(args: argparse.Namespace, fallback: str | None = None):
    from obliviate.models.loading import load_model

    return load_model(args.model or fallback, args.device, args.dtype, allow_pickle=args.allow_pickle)


def run_fit(args: argparse.Namespace) -> int:
    from obliviate.config import build_section
    from obliviate.methods.eco import fit
    from obliviate.methods.eco.config import EcoConfig
    from obliviate.errors import ObliviateError
    from obliviate.io import exclusive_output

    config = build_section(EcoConfig, collect_overrides(args).get("eco", {}), "eco")
    out = Path(args.out)
    with exclusive_output(out):
        if (out / "config.json").exists() and not args.overwrite:
            raise ObliviateError(f"{out} already holds an ECO artifact: pass --overwrite to replace it, or another --out.")
        data = _load_data(args, args.concept)
        lm = _load_lm(args)
        artifact = fit(lm, data, config, out, progress=lambda m: print(m, flush=True))
    report = artifact.info["classifier_report"]
    print(f"\nECO for {data.concept!r} -> {out}")
    print(f"  classifier layer {report['layer']}, threshold {report['threshold']:.4f} ({report['calibration']})")
    print(f"  held-out FPR {report['heldout']['fpr']:.3f}  FNR {report['heldout']['fnr']:.3f}")
    print(f"  sigma {artifact.corruption.strength:.4g} ({artifact.info['sigma_search']['stopped']})")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from obliviate.methods import eco
    from obliviate.api import apply_patch
    from obliviate.pipeline.eco import resolve_patch
    from obliviate.methods.eco.hook import prompt_length

    artifact = eco.load(args.eco)
    lm = _load_lm(args, artifact.model_name)
    artifact.check_model(lm.model, f"{lm.name} ({lm.source})")
    if args.ember:
        apply_patch(lm, resolve_patch(args.ember))
    for prompt in args.prompt:
        ids = lm.tokenizer(prompt, return_tensors="pt").to(lm.device)
        kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
        with torch.no_grad():
            plain = lm.model.generate(**ids, **kwargs)[0, ids.input_ids.shape[1]:] if args.compare else None
            eco.wrap(lm, artifact)
            try:
                hooked = lm.model.generate(**ids, **kwargs)[0, ids.input_ids.shape[1]:]
                hook = eco.hook_of(lm)
                flagged = bool(hook.last_flags[0])
                tokens = ids.input_ids[0].tolist()
                score = float(hook.prompt_scores(lm.model, [tuple(tokens[: prompt_length(tokens, hook.marker_ids)])])[0])
            finally:
                eco.unwrap(lm)
        print(f"prompt: {prompt!r}\n  flagged: {flagged} (p={score:.4f}, threshold {artifact.classifier.threshold:.4f})")
        print(f"  eco:   {lm.tokenizer.decode(hooked, skip_special_tokens=True)!r}")
        if plain is not None:
            print(f"  plain: {lm.tokenizer.decode(plain, skip_special_tokens=True)!r}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from obliviate.methods import eco
    from obliviate.config import EvalConfig, build_section
    from obliviate.pipeline.eco import evaluate
    from obliviate.io import exclusive_output, write_json

    artifact = eco.load(args.eco)
    eval_config = build_section(EvalConfig, collect_overrides(args).get("evaluation", {}), "evaluation")
    with exclusive_output(args.out):
        data = _load_data(args, args.concept or artifact.info.get("concept"))
        lm = _load_lm(args, artifact.model_name)
        results = evaluate(lm, data, artifact, eval_config, args.ember, args.seed,
                           progress=lambda m: print(m, flush=True))
        write_json(Path(args.out) / "results.json", results)
    print(f"\n{data.concept}: test split -> {Path(args.out) / 'results.json'}")
    for name in ("eco", "ember", "ember+eco"):
        if name in results:
            r = results[name]
            cells = "  ".join(f"{k} {r[k]['value']:.3f}" for k in ("qa_edited", "efficacy", "specificity", "coherence") if k in r)
            print(f"  {name:10s} {cells}")
    c = results["classifier"]
    print(f"  classifier recall {c['recall_test_questions']:.3f} (adversarial prefix {c['recall_adversarial_prefix']:.3f}, "
          f"attack templates {c['recall_attack_templates']:.3f}), "
          f"FPR simdom {c['fpr_simdom_test']:.3f}, other concepts {c['fpr_other_concepts_test']:.3f}")
    s = results["side_effects"]
    print(f"  unflagged prompts identical: {s['unflagged_identical']}/{s['unflagged']} (max diff {s['max_abs_difference']})")
    return 0


def run(args: argparse.Namespace) -> int:
    return {"fit": run_fit, "generate": run_generate, "evaluate": run_evaluate}[args.eco_command](args)
