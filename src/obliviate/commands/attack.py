"""`obliviate attack`: the attack battery on the original and the erased model."""
from __future__ import annotations

import argparse

from obliviate.attacks import CHEAP, DEFAULT, available
from obliviate.commands.arguments import (add_run_arguments, add_set_argument, announce_out, collect_overrides, default_out,
                                         guard_out, parse_settings)

# Shortcut flags -> (attack, setting). Everything else: --set ATTACK.KEY=VALUE.
SHORTCUTS = {
    "relearn_paragraphs": ("relearn", "paragraphs"),
    "epochs": ("relearn", "epochs"),
    "max_length": ("relearn", "max_length"),
    "lr": ("relearn", "lr"),
    "in_context_paragraphs": ("in-context", "k"),
    "probe_sentences": ("probe", "sentences"),
    "repair_z": ("embedding-repair", "z_threshold"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, grid=False)
    group = parser.add_argument_group("attacks")
    group.add_argument("--base", default=None, help="the original model (default: the one the erase run recorded, else embedded)")
    group.add_argument("--attacks", default=DEFAULT,
                       help=f"comma-separated attack names, 'cheap' (no training: {', '.join(CHEAP)}) or 'all' "
                            f"({', '.join(available())}); default: {DEFAULT}")
    group.add_argument("--relearn-paragraphs", type=int, default=None, help="relearning paragraphs (default 100)")
    group.add_argument("--epochs", type=int, default=None, help="relearning epochs (default 2)")
    group.add_argument("--max-length", type=int, default=None, help="relearning tokens per paragraph (default 256)")
    group.add_argument("--lr", type=float, default=None, help="relearning AdamW learning rate (default 1e-5)")
    group.add_argument("--in-context-paragraphs", type=int, default=None, metavar="N",
                       help="in-context: concept paragraphs before each question (default 3)")
    group.add_argument("--probe-sentences", type=int, default=None, help="probe sentences per class (default 150)")
    group.add_argument("--repair-z", type=float, default=None,
                       help="embedding-repair: flag rows whose robust norm/direction z exceeds this (default 6)")
    group.add_argument("--optimizer", default=None, metavar="NAME",
                       help="the optimizer of every relearning attack: auto, adamw, adamw-fp32, adamw-sr, adamw8bit, "
                            "adamw8bit-bnb (default auto: plain AdamW for float32 weights; README, GPUs)")
    add_set_argument(group, "ATTACK", "relearn.weight_decay=0")


def attack_settings(args: argparse.Namespace, names: list[str]) -> dict[str, dict]:
    from dataclasses import fields

    from obliviate import attacks

    settings: dict[str, dict] = {}
    for flag, (attack, key) in SHORTCUTS.items():
        if getattr(args, flag, None) is not None:
            settings.setdefault(attack, {})[key] = getattr(args, flag)
    if args.optimizer is not None:  # every attack that trains (relearn, relearn-strong, repair-relearn)
        for name in names:
            if "optimizer" in {f.name for f in fields(attacks.get(name).Config)}:
                settings.setdefault(name, {})["optimizer"] = args.optimizer
    for attack, values in parse_settings(args.settings).items():
        settings.setdefault(attack, {}).update(values)
    return settings


def run(args: argparse.Namespace) -> int:
    from obliviate import attacks
    from obliviate.api import make_config
    from obliviate.pipeline.attack import run_attacks
    from obliviate.errors import ObliviateError
    from obliviate.io import exclusive_output

    names = attacks.parse_names(args.attacks)
    settings = attack_settings(args, names)
    unknown = set(settings) - set(names)
    if unknown:
        raise ObliviateError(f"Settings given for attack(s) not run: {', '.join(sorted(unknown))}. Running: {', '.join(names)}.")
    overrides = collect_overrides(args)
    overrides.setdefault("out", default_out(overrides, "attack"))
    config = make_config(args.config_file, **overrides)
    guard_out(config.out, config.model.name)
    announce_out(config.out)
    with exclusive_output(config.out):
        results = run_attacks(config, names, settings, base=args.base, progress=args.progress)
    print(f"\nattacks on {results['concept']!r}: {results['model']} vs {results['base']} -> {config.out}")
    for name in names:
        r = results[name]
        row = "  ".join(f"{role} " + (f"{r[role]['before']['value']:.3f}->" if "before" in r[role] else "")
                        + f"{r[role]['after']['value']:.3f}" for role in ("original", "erased") if role in r)
        recovered = r.get("recovered_frac")
        regained = f"  recovered {_interval(recovered)}" if recovered else ""
        print(f"  {name:18s} {row}{regained}  ({r['seconds']:.0f} s)")
    worst = results.get("worst_case_recovered")
    if worst:
        print(f"worst case: {worst['attack']} brings back {_interval(worst)} of the original's above-chance knowledge")
    return 0


def _interval(value: dict) -> str:
    return f"{value['value']:.2f} [{value['low']:.2f}, {value['high']:.2f}]"
