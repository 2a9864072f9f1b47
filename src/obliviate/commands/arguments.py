"""Flags shared by the commands: one flag per settings field (help from the field's own
comment, so the code and `--help` say the same thing), the run flags every model-running
command takes, and the one ``--set NAME.KEY=VALUE`` syntax for method and attack settings."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from pathlib import Path

from obliviate.errors import ObliviateError

PATH_WORDS = ("file", "path", "dir", "folder", "data", "sentences", "questions", "prompts", "model", "patch")
FOLDER_NAMES = ("data",)  # flags that take a folder, never a file (--data DIR)


def field_comments(cls: type) -> dict[str, str]:
    """{field: its comment}: the comment at the end of the field's line, else the comment
    lines right above it (for every class in the dataclass's inheritance chain)."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass.__module__ == "builtins":
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        comments.update(_comments_in(source))
    return comments


def _comments_in(source: str) -> dict[str, str]:
    found = {}
    lines = source.splitlines()
    for index, line in enumerate(lines):
        match = re.match(r"\s+(\w+)\s*:\s*[^=#(]+(=[^#]*)?(#\s*(.*))?$", line)
        if not match or line.strip().startswith(("def ", "@", "return")):
            continue
        if match.group(4):
            found[match.group(1)] = match.group(4).strip()
            continue
        block, above = [], index - 1
        while above >= 0 and lines[above].strip().startswith("#"):
            block.insert(0, lines[above].strip().lstrip("#").strip())
            above -= 1
        if block:
            found[match.group(1)] = " ".join(block)
    return found


def one_line(text: str, limit: int = 150) -> str:
    """The first sentence of a comment, shortened for --help."""
    sentence = re.split(r"(?<=[a-z0-9)])\. ", text, maxsplit=1)[0].rstrip(".")
    return sentence if len(sentence) <= limit else sentence[: limit - 3].rstrip() + "..."


def metavar_for(name: str, annotation: typing.Any, help_text: str = "") -> str:
    kind = annotation
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if typing.get_origin(kind) is tuple:
        return "LIST"
    if typing.get_origin(kind) is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(kind))) + "}"
    if kind is int:
        return "N"
    if kind is float:
        return "X"
    if name in FOLDER_NAMES:
        return "DIR"
    if any(word in name for word in PATH_WORDS):
        return "PATH"
    return "MODE" if " | " in help_text or " or " in help_text else "TEXT"


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, dest_prefix: str,
                            rename: dict[str, str] | None = None, title: str | None = None,
                            skip: tuple[str, ...] = ()) -> None:
    """One flag per dataclass field (--field-name), stored as ``{dest_prefix}__{field}``;
    ``skip``: fields another flag already sets (e.g. the run's --seed).

    Defaults stay None so that only what the user typed overrides the YAML and defaults.
    """
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        flag = "--" + (rename or {}).get(field.name, field.name).replace("_", "-")
        dest = f"{dest_prefix}__{field.name}"
        default = field.default if field.default is not dataclasses.MISSING else None
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = field.metadata.get("help") or one_line(comments.get(field.name, field.name.replace("_", " ")))
        help_text = f"{help_text} (default: {shown})" if shown not in (None, "") else help_text
        help_text = help_text.replace("%", "%%")
        if hints[field.name] is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            metavar = metavar_for(flag.lstrip("-").replace("-", "_"), hints[field.name], help_text)
            group.add_argument(flag, dest=dest, default=None, metavar=metavar, help=help_text)


def comma_list(value: str | list[str] | None) -> list[str]:
    """The one list syntax of every command: comma-separated names (``--concepts Gun,Golf``);
    a repeated flag adds its names to the list."""
    values = [value] if isinstance(value, str) else list(value or [])
    return [item.strip() for text in values for item in text.split(",") if item.strip()]


def collect_overrides(args: argparse.Namespace) -> dict:
    """{section: {field: value}} and {field: value} from the flags the user gave."""
    overrides: dict = {}
    for dest, value in vars(args).items():
        if value is None or "__" not in dest:
            continue
        section, name = dest.split("__", 1)
        if section == "run" and name == "concept" and isinstance(value, list):  # --concept A,B or --concept A --concept B
            names = comma_list(value)
            overrides["concept"], overrides["concepts"] = (names[0] if names else ""), tuple(names[1:])
        elif section == "run":
            overrides[name] = value
        else:
            overrides.setdefault(section, {})[name] = value
    return overrides


# Evaluation settings only a grid reads (how candidates are gated and chosen): commands
# that evaluate one given model (eval, attack) do not show them.
GRID_SETTINGS = ("gate_concept_fluency", "grid_concept_fluency", "general_gate", "coherence_gate", "coherence_gate_on",
                 "stop_after_incoherent", "method_general_gate", "method_max_qa_frac", "method_coherence_top",
                 "method_coherence_gate", "choice", "fit_at_chance")


def add_run_arguments(parser: argparse.ArgumentParser, one_concept: bool = True, several: bool = False,
                      grid: bool = True) -> None:
    """Model, data, evaluation and run flags shared by the commands that run models
    (``one_concept=False``: a command that takes its own list of concepts; ``several``:
    --concept may be repeated, every concept erased from the same model; ``grid=False``: a
    command that chooses no candidate, without the grid's gates)."""
    from obliviate.config import DataConfig, EvalConfig, ModelConfig

    parser.add_argument("--config", dest="config_file", default=None, metavar="YAML",
                        help="a YAML file of settings (flags override it)")
    if one_concept:
        parser.add_argument("--concept", dest="run__concept", default=None, metavar="NAME",
                            action="append" if several else "store",
                            help="the concept, e.g. Gambling" + (" (several, comma-separated: erased from one model)"
                                                                 if several else ""))
    parser.add_argument("--out", dest="run__out", default=None, metavar="DIR", help="the output folder")
    parser.add_argument("--seed", dest="run__seed", default=None, metavar="N", help="random seed (default: 42)")
    parser.add_argument("--overwrite", dest="run__overwrite", action="store_true", default=None,
                        help="replace an output folder that holds a different run")
    parser.add_argument("--no-save-model", dest="run__save_model", action="store_false", default=None,
                        help="do not write model/ (the edit files, results and report are still written)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars or progress lines (the results are printed all the same)")
    add_dataclass_arguments(parser, ModelConfig, "model", rename={"name": "model"}, title="model")
    add_dataclass_arguments(parser, DataConfig, "data", title="data")
    add_dataclass_arguments(parser, EvalConfig, "evaluation", title="evaluation", skip=() if grid else GRID_SETTINGS)


def add_set_argument(parser: argparse.ArgumentParser, owner: str, example: str) -> None:
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar=f"{owner}.KEY=VALUE",
                        help=f"a setting of one {owner.lower()}, e.g. --set {example} (repeatable)")


def parse_settings(pairs: list[str], default_owner: str | None = None) -> dict[str, dict]:
    """``NAME.KEY=VALUE`` pairs -> {name: {key: value}}; ``KEY=VALUE`` belongs to
    ``default_owner`` (erase's chosen method) when there is one."""
    settings: dict[str, dict] = {}
    for pair in pairs:
        match = re.fullmatch(r"(?:([\w-]+)\.)?([\w-]+)=(.*)", pair.strip())
        owner = match and (match.group(1) or default_owner)
        if not match or not owner:
            raise ObliviateError(f"--set expects NAME.KEY=VALUE (e.g. rmu.steps=10 or relearn.lr=1e-5), got {pair!r}.")
        settings.setdefault(owner, {})[match.group(2).replace("-", "_")] = match.group(3)
    return settings


def default_out(overrides: dict, kind: str) -> str:
    """runs/<concept>-<what>: the folder a command writes when --out is not given (erase:
    the method; eval and attack: the command), the same rule for every command."""
    concept = str(overrides.get("concept") or "run")
    what = overrides.get("method", "ember") if kind == "erase" else kind
    name = re.sub(r"[^0-9a-z]+", "-", f"{concept}-{what}".lower()).strip("-")
    return str(Path("runs") / name)


def announce_out(out: str) -> None:
    print(f"writing to {out}/ (--out DIR to choose)", flush=True)


def guard_out(out: str, model: str | None) -> None:
    """Never let --overwrite delete the model being evaluated."""
    if model and Path(model).exists():
        out_path, model_path = Path(out).resolve(), Path(model).resolve()
        if out_path == model_path or out_path in model_path.parents:
            raise ObliviateError(f"--out {out} would hold the model being evaluated ({model}): choose another folder.")
