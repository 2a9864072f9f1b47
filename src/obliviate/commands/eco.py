"""`obliviate eco`: fit a prompt classifier + sigma, generate behind the hook, evaluate.

    obliviate eco fit --concept "Harry Potter" --data ../shared/data/ember-benchmark --out runs/eco-hp
    obliviate eco generate --eco runs/eco-hp --prompt "Who teaches potions at Hogwarts?" --compare
    obliviate eco evaluate --eco runs/eco-hp --data ../shared/data/ember-benchmark --out runs/eco-hp/eval \\
        [--ember runs/hp]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from obliviate.commands.arguments import add_dataclass_arguments, add_run_arguments, collect_overrides
from obliviate.errors import ObliviateError


ECO_NEGATIVES = 300  # eco fit: other concepts' questions per split (the classifier's negatives)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from obliviate.config import ModelConfig
    from obliviate.methods.eco.config import EcoConfig

    sub = parser.add_subparsers(dest="eco_command", metavar="ACTION", required=True)
    fit = sub.add_parser("fit", help="train the classifier, calibrate the threshold, learn sigma",
                         description=f"Fit ECO's artifact (--general-questions defaults to {ECO_NEGATIVES} here: "
                                     "the classifier's negatives). `erase --method eco` fits and evaluates it in one run.")
    add_run_arguments(fit)
    # ECO's seed and multiple-choice scoring are the run's (--seed, --scoring)
    add_dataclass_arguments(fit, EcoConfig, "eco", title="ECO", skip=("seed", "scoring"))
    for action in fit._actions:  # the negatives' count differs from the other commands' default
        if action.dest == "data__general_questions":
            action.help = f"other concepts' questions per split: the classifier's negatives (default: {ECO_NEGATIVES})"

    gen_help = "generate with the ECO hook (flagged prompts are corrupted)"
    gen = sub.add_parser("generate", help=gen_help, description=gen_help[0].upper() + gen_help[1:] + ".")
    gen.add_argument("--eco", required=True, metavar="DIR", help="artifact folder from `eco fit`")
    add_dataclass_arguments(gen, ModelConfig, "model", rename={"name": "model"}, title="model (default: the artifact's)")
    gen.add_argument("--prompt", action="append", required=True, metavar="TEXT", help="a prompt (repeatable)")
    gen.add_argument("--max-new-tokens", type=int, default=48, metavar="N", help="greedy tokens to generate (default: 48)")
    gen.add_argument("--ember", default=None, metavar="PATH", help="EMBER patch file or run folder to apply under the hook")
    gen.add_argument("--compare", action="store_true", help="also print the plain model's continuation")

    ev_help = "efficacy / specificity / coherence on TEST questions, the model with the ECO hook against the original"
    ev = sub.add_parser("evaluate", help=ev_help, description=ev_help[0].upper() + ev_help[1:] + ".")
    ev.add_argument("--eco", required=True, metavar="DIR", help="artifact folder from `eco fit`")
    ev.add_argument("--ember", default=None, metavar="PATH",
                    help="EMBER patch file or run folder: also report EMBER and EMBER+ECO")
    add_run_arguments(ev)


def _config(args: argparse.Namespace, artifact=None, **defaults):
    """The run configuration from --config, the flags, and what the artifact recorded (its
    model and concept) for whatever the user did not give."""
    from obliviate.api import make_config

    overrides = collect_overrides(args)
    if artifact is not None:
        overrides.setdefault("model", {}).setdefault("name", artifact.model_name)
        overrides.setdefault("concept", artifact.info.get("concept", ""))
    for section, values in defaults.items():
        for key, value in values.items():
            overrides.setdefault(section, {}).setdefault(key, value)
    eco_settings = overrides.pop("eco", {})
    config = make_config(getattr(args, "config_file", None), **overrides)
    if eco_settings:
        from obliviate.config import merge

        config = merge(config, {"methods": {"eco": eco_settings}})
    if not config.concept:
        raise ObliviateError("Name the concept with --concept (e.g. --concept 'Harry Potter').")
    return config


def _load_lm(config):
    from obliviate.models.loading import load_model

    m = config.model
    return load_model(m.name, m.device, m.dtype, m.device_map, allow_pickle=m.allow_pickle)


def run_fit(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from obliviate.io import exclusive_output
    from obliviate.methods.eco.fitting import fit
    from obliviate.pipeline.eco import save_fitted
    from obliviate.pipeline.inputs import load_concept_data

    config = _config(args, data={"general_questions": ECO_NEGATIVES})
    if not args.run__out:
        raise ObliviateError("Name the artifact folder to write with --out DIR.")
    out = Path(config.out)
    with exclusive_output(out):
        if (out / "config.json").exists() and not config.overwrite:
            raise ObliviateError(f"{out} already holds an ECO artifact: pass --overwrite to replace it, or another --out.")
        data = load_concept_data(config)
        lm = _load_lm(config)
        eco_config = replace(config.method_config("eco"), seed=config.seed, scoring=config.evaluation.scoring)
        fitted = fit(lm, data, eco_config, progress=(lambda m: print(m, flush=True)) if args.progress else None)
        save_fitted(fitted, out)
    artifact = fitted.artifact
    report = artifact.info["classifier_report"]
    print(f"\nECO for {data.concept!r} -> {out}")
    print(f"  classifier layer {report['layer']}, threshold {report['threshold']:.4f} ({report['calibration']})")
    print(f"  held-out FPR {report['heldout']['fpr']:.3f}  FNR {report['heldout']['fnr']:.3f}")
    print(f"  sigma {artifact.corruption.strength:.4g} ({artifact.info['sigma_search']['stopped']})")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from obliviate.api import apply_patch, make_config
    from obliviate.methods import eco
    from obliviate.pipeline.eco import resolve_patch
    from obliviate.methods.eco.hook import prompt_length

    artifact = eco.load(args.eco)
    overrides = collect_overrides(args).get("model", {})
    lm = _load_lm(make_config(model={"name": artifact.model_name, **overrides}))
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
    from obliviate.io import exclusive_output, write_json
    from obliviate.methods import eco
    from obliviate.pipeline.eco import evaluate
    from obliviate.pipeline.inputs import load_concept_data

    artifact = eco.load(args.eco)
    config = _config(args, artifact)
    out = Path(args.run__out or Path(args.eco) / "eval")
    with exclusive_output(out):
        data = load_concept_data(config)
        lm = _load_lm(config)
        results = evaluate(lm, data, artifact, config.evaluation, args.ember, config.seed,
                           progress=(lambda m: print(m, flush=True)) if args.progress else None)
        write_json(out / "results.json", results)
    print(f"\n{data.concept}: test split -> {out / 'results.json'}")
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
