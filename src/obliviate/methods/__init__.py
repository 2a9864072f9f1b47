"""Erasure methods: one module each, behind one small protocol, in a registry that refuses
mistakes.

A method module (``methods/<name>.py``, or a package for a large one like ``eco/``) is a
``Method``: it has
  ``Config``  a frozen dataclass of its settings (defaults = the reference's), validated in
              ``__post_init__`` when the run configuration is built, before any model loads;
  ``fit(lm, data, config, seed, context) -> Fitted``  where ``Fitted.candidates()`` yields
              ``(params, edit)`` for the grid the pipeline evaluates on TRAIN questions (each
              an ``Edit``, edits/protocol.py: applied, evaluated, reverted, saved and verified
              the same way whatever its kind) and ``Fitted.report()`` describes the fit.
EMBER is one method among them; "EMBER as a plug-in" is composition (the pipeline fits the
base method with EMBER's chosen edit applied, unless the module sets ``FITS_BEFORE_PLUG_IN
= True``: a method that reads the concept's features off the model's activations then reads
them as the model had them, and its edits still stack on EMBER's; every module says which). Modules load lazily so
`obliviate --help` stays fast. To add a method: write its module and register it below.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

from obliviate.registry import LazyRegistry


@dataclass(frozen=True)
class MethodContext:
    """What the pipeline hands a method beyond model, data, settings and seed."""

    progress: bool = True  # show progress bars
    checkpoint_dir: Path | None = None  # a folder for resumable training state
    log: Callable[[str], None] = lambda _message: None  # one-line progress messages
    judge: Any = None  # a loaded judge model for EMBER's ``selection: judge`` (else loaded from the config)
    # With a plug-in edit applied first: the output embedding as it was before it. The tied
    # default gives the edited tokens the mean output row (leak-free outputs), so a method
    # that finds concept features through the vocabulary (PISCES) reads this one instead,
    # as it reads the untied reference's kept output rows.
    vocabulary: Any = None


class Fitted(Protocol):
    def candidates(self) -> Iterator[tuple[dict, Any]]: ...
    def report(self) -> dict: ...


@runtime_checkable
class Method(Protocol):
    Config: type
    # True: fitted on the model as it was before the plug-in's edit (it reads the concept's
    # features off the activations); its edits still stack on the plug-in's.
    FITS_BEFORE_PLUG_IN: bool

    def fit(self, lm: Any, data: Any, config: Any, seed: int, context: MethodContext) -> Fitted: ...


_REGISTRY = LazyRegistry("method", "_", "Available methods", sort=True, protocol=Method)
register, available, get = _REGISTRY.register, _REGISTRY.available, _REGISTRY.get

PLUG_IN = "ember"  # the method that can run first under any other
register(PLUG_IN, "obliviate.methods.ember")
register("rmu", "obliviate.methods.rmu")
register("elm", "obliviate.methods.elm")
register("grad_diff", "obliviate.methods.grad_diff")
register("npo", "obliviate.methods.npo")
register("eco", "obliviate.methods.eco")
register("snmf", "obliviate.methods.snmf")
register("pisces", "obliviate.methods.pisces")
