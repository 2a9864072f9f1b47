"""Erasure methods behind one small interface, and a registry that refuses mistakes.

A method module exposes:
  ``Config``: a frozen dataclass of its settings (defaults = the reference's);
  ``candidates(lm, data, config, seed, context) -> Iterator[(params: dict, edit)]``: the
      grid the pipeline evaluates on TRAIN questions, each an ``Edit`` (edits.py) that the
      pipeline applies, evaluates and reverts. ``context`` is a ``MethodContext``.
Modules load lazily so `obliviate --help` stays fast.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from ..errors import ObliviateError

_REGISTRY: dict[str, str] = {}


def register(name: str, module: str) -> None:
    if name != name.lower() or not name.replace("_", "").isalnum():
        raise ValueError(f"Method names are lowercase identifiers, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"Method {name!r} is already registered ({_REGISTRY[name]})")
    _REGISTRY[name] = module


def available() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> ModuleType:
    if name not in _REGISTRY:
        raise ObliviateError(f"Unknown method {name!r}. Available methods: {', '.join(available())}.")
    return importlib.import_module(_REGISTRY[name])


@dataclass
class MethodContext:
    """What the pipeline hands a method beyond model and data."""

    progress: bool = True
    checkpoint_dir: Any = None  # a folder for resumable training state, or None
    extra: dict = field(default_factory=dict)


register("ember", "obliviate.methods.ember")
register("rmu", "obliviate.methods.rmu")
register("elm", "obliviate.methods.elm")
register("grad_diff", "obliviate.methods.grad_diff")
register("npo", "obliviate.methods.npo")
