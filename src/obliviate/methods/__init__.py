"""Erasure methods behind one small interface, and a registry that refuses mistakes.

A method module exposes:
  ``Config``: a frozen dataclass of its settings (defaults = the reference's);
  ``fit(lm, data, config, seed, context) -> Fitted``, whose ``candidates()`` yields
      (params: dict, edit) for the grid the pipeline evaluates on TRAIN questions, each an
      ``Edit`` (edits.py) that the pipeline applies, evaluates and reverts, and whose
      ``report()`` describes the fit. ``context`` is a ``MethodContext``.
Modules load lazily so `obliviate --help` stays fast.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from obliviate.registry import LazyRegistry

_REGISTRY = LazyRegistry("method", "_", "Available methods", sort=True)
register, available, get = _REGISTRY.register, _REGISTRY.available, _REGISTRY.get


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
