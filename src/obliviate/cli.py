"""The `obliviate` command: a thin front end over the Python API.

Subcommands live in ``obliviate.commands.<name>`` (each: ``add_arguments(parser)`` and
``run(args) -> int``; shared flags in commands/arguments.py) and are imported only when
used, so `obliviate --help` is fast. To add a command: its module and one line in COMMANDS.
Every user error becomes one paragraph on stderr and exit code 2, without a traceback.
`obliviate --version` prints the installed version.
"""
from __future__ import annotations

import argparse
import logging
import importlib
import sys
from importlib import metadata
from typing import Sequence

from obliviate.errors import ObliviateError

COMMANDS = {
    "concepts": "list the benchmark's concepts (shipped with obliviate, or --data DIR) with their sizes",
    "erase": "erase a concept from a model (EMBER by default; --method for the others)",
    "eval": "evaluate any model against the original on a concept",
    "attack": "run the attack battery (relearning, in-context, adversarial, probe)",
    "report": "write an HTML report and summary.csv for one or more runs",
    "compare": "run methods with and without EMBER on several concepts",
    "summarize": "pooled, paired statistics over erase/compare runs",
    "eco": "ECO: fit a prompt classifier and corrupt flagged prompts at inference",
    "lm-eval-tasks": "write the EMBER benchmark as an lm-evaluation-harness task folder (--include_path)",
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="obliviate", description="Robust concept erasure for language models.")
    parser.add_argument("--version", action="version", version=f"obliviate {version()}")
    parser.add_argument("--verbose", action="store_true", help="show third-party libraries' start-up warnings")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            _command_module(name).add_arguments(sub_parser)
    return parser


# Start-up noise of libraries we load (optional CUDA kernels a CPU build lacks, torch's
# deprecation notes on their enums): nothing a user can act on.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_start() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def version() -> str:
    """The installed distribution's version (the one pip reports), not a copy in the code."""
    try:
        return metadata.version("obliviate")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _command_module(name: str):
    return importlib.import_module(f"obliviate.commands.{name.replace('-', '_')}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in COMMANDS:
        print(f"error: unknown command {command!r}. Commands: {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not args.verbose:
        quiet_start()
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
