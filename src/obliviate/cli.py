"""The `obliviate` command: a thin front end over the Python API.

Subcommands live in ``obliviate.commands.<name>`` (each: ``add_arguments(parser)`` and
``run(args) -> int``) and are imported only when used, so `obliviate --help` is fast.
Every user error becomes one paragraph on stderr and exit code 2, without a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import typing
from typing import Sequence

from obliviate.errors import ObliviateError

COMMANDS = {
    "erase": "erase a concept from a model (EMBER by default; --method for the others)",
    "eval": "evaluate any model against the original on a concept",
    "attack": "run the attack battery (relearning, in-context, adversarial, probe)",
    "report": "write an HTML report and summary.csv for one or more runs",
    "compare": "run methods with and without EMBER on several concepts",
    "summarize": "pooled, paired statistics over erase/compare runs",
    "eco": "ECO: fit a prompt classifier and corrupt flagged prompts at inference",
    "lm-eval-tasks": "write the EMBER benchmark as an lm-evaluation-harness task folder (--include_path)",
}


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, dest_prefix: str,
                            rename: dict[str, str] | None = None, title: str | None = None) -> None:
    """One flag per dataclass field (--field-name), stored as ``{dest_prefix}__{field}``.

    Defaults stay None so that only what the user typed overrides the YAML and defaults.
    """
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        flag = "--" + (rename or {}).get(field.name, field.name).replace("_", "-")
        dest = f"{dest_prefix}__{field.name}"
        annotation = hints[field.name]
        help_text = f"default: {field.default if field.default is not dataclasses.MISSING else '(see docs)'}"
        if annotation is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = "comma-separated list" if typing.get_origin(annotation) is tuple else None
            group.add_argument(flag, dest=dest, default=None, metavar=kind or field.name.upper(), help=help_text)


def collect_overrides(args: argparse.Namespace) -> dict:
    """{section: {field: value}} and {field: value} from the flags the user gave."""
    overrides: dict = {}
    for dest, value in vars(args).items():
        if value is None or "__" not in dest:
            continue
        section, name = dest.split("__", 1)
        if section == "run":
            overrides[name] = value
        else:
            overrides.setdefault(section, {})[name] = value
    return overrides


def add_run_arguments(parser: argparse.ArgumentParser, one_concept: bool = True) -> None:
    """Model, data, evaluation and run flags shared by the commands that run models
    (``one_concept=False``: a command that takes its own list of concepts)."""
    from obliviate.config import DataConfig, EvalConfig, ModelConfig

    parser.add_argument("--config", dest="config_file", default=None, help="YAML file of settings (flags override it)")
    if one_concept:
        parser.add_argument("--concept", dest="run__concept", default=None, help="the concept to erase, e.g. 'Harry Potter'")
    parser.add_argument("--out", dest="run__out", default=None, help="output folder")
    parser.add_argument("--seed", dest="run__seed", default=None, help="random seed (default 42)")
    parser.add_argument("--overwrite", dest="run__overwrite", action="store_true", default=None,
                        help="replace an output folder that holds a different run")
    parser.add_argument("--no-save-model", dest="run__save_model", action="store_false", default=None,
                        help="do not write model/ (the patch, results and report are still written)")
    add_dataclass_arguments(parser, ModelConfig, "model", rename={"name": "model"}, title="model")
    add_dataclass_arguments(parser, DataConfig, "data", title="data")
    add_dataclass_arguments(parser, EvalConfig, "evaluation", title="evaluation")


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="obliviate", description="Robust concept erasure for language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            _command_module(name).add_arguments(sub_parser)
    return parser


def _command_module(name: str):
    return importlib.import_module(f"obliviate.commands.{name}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in COMMANDS:
        print(f"error: unknown command {command!r}. Commands: {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(_command_module(args.command).run(args) or 0)
    except ObliviateError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished stages are kept; run the same command again to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
