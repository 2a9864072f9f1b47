"""obliviate: robust concept erasure for language models.

EMBER embedding edits, trained erasure methods (RMU, ELM, gradient difference, NPO), ECO,
and the evaluation that tests whether an erased concept stays erased. Heavy modules load
lazily so `import obliviate` and `obliviate --help` are fast.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "erase": "obliviate.api",
    "make_config": "obliviate.api",
    "apply_patch": "obliviate.api",
    "revert_patch": "obliviate.api",
    "load_model": "obliviate.models.loading",
    "RunConfig": "obliviate.config",
    "ObliviateError": "obliviate.errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'obliviate' has no attribute {name!r}")


__all__ = sorted(_LAZY)
