"""The attack battery: does an erased concept STAY erased (METHOD.md section 4)?

Each attack is a module with a frozen ``Config`` dataclass and
``run(ctx: AttackContext, config) -> dict``; it runs on the original and the erased model
side by side and returns accuracies on TEST questions as {value, low, high} intervals.
Modules load lazily so `obliviate --help` stays fast.

    from obliviate import attacks
    attacks.get("relearn")          # the module
    attacks.parse_names("relearn,probe")
"""
from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import ObliviateError
from .common import AttackContext

_REGISTRY: dict[str, str] = {}


def register(name: str, module: str) -> None:
    """Add an attack; names are unique, lowercase words joined by '-'."""
    if name != name.lower() or not name.replace("-", "").isalnum():
        raise ValueError(f"Attack name {name!r} must be lowercase letters, digits and '-'.")
    if name in _REGISTRY:
        raise ValueError(f"Attack {name!r} is already registered (by {_REGISTRY[name]}).")
    _REGISTRY[name] = module


register("relearn", "obliviate.attacks.relearning")
register("in-context", "obliviate.attacks.in_context")
register("adversarial", "obliviate.attacks.adversarial")
register("probe", "obliviate.attacks.probe")


def available() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> ModuleType:
    if name not in _REGISTRY:
        raise ObliviateError(f"Unknown attack {name!r}. Valid attacks: {', '.join(available())}.")
    return importlib.import_module(_REGISTRY[name])


def parse_names(spec: str | list[str] | None) -> list[str]:
    """'relearn,probe' -> ['relearn', 'probe'] (checked); None or 'all' -> every attack."""
    if spec is None or spec == "all":
        return available()
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if not names:
        raise ObliviateError(f"--attacks is empty. Valid attacks: {', '.join(available())}.")
    for name in names:
        get(name)
    return list(dict.fromkeys(names))


def make_config(name: str, settings: dict | None = None):
    """The attack's Config from {field: value} (strings from the CLI are converted)."""
    from ..config import build_section

    return build_section(get(name).Config, dict(settings or {}), f"attacks.{name}")


def run(name: str, ctx: AttackContext, settings: dict | None = None) -> dict:
    return get(name).run(ctx, make_config(name, settings))


__all__ = ["AttackContext", "available", "get", "make_config", "parse_names", "register", "run"]
