"""The attack battery: does an erased concept STAY erased (METHOD.md section 4)?

Each attack is a module with a frozen ``Config`` dataclass and
``run(ctx: AttackContext, config) -> dict``; it runs on the original and the erased model
side by side and returns accuracies on TEST questions as {value, low, high} intervals.
Modules load lazily so `obliviate --help` stays fast.

    from obliviate import attacks
    attacks.get("relearn")          # the module
    attacks.parse_names("relearn,probe")   # or "cheap", "all"
"""
from __future__ import annotations

from obliviate.errors import ObliviateError
from obliviate.registry import LazyRegistry
from obliviate.attacks.common import AttackContext
from obliviate.settings import build_section

_REGISTRY = LazyRegistry("attack", "-", "Valid attacks")
register, available = _REGISTRY.register, _REGISTRY.available

register("relearn", "obliviate.attacks.relearning")
register("relearn-strong", "obliviate.attacks.relearning")
register("in-context", "obliviate.attacks.in_context")
register("adversarial", "obliviate.attacks.adversarial")
register("probe", "obliviate.attacks.probe")
register("tied-restore", "obliviate.attacks.white_box")
register("embedding-repair", "obliviate.attacks.white_box")
register("repair-relearn", "obliviate.attacks.white_box")
register("weights-only", "obliviate.attacks.white_box")
register("gcg", "obliviate.attacks.gcg")
register("respell", "obliviate.attacks.respell")
register("quantize", "obliviate.attacks.quantize")
register("finetune-unrelated", "obliviate.attacks.relearning")
register("finetune-retain", "obliviate.attacks.relearning")
register("relearn-sweep", "obliviate.attacks.relearning")
register("ablate-direction", "obliviate.attacks.activations")
register("logit-lens", "obliviate.attacks.activations")

# No training (forward passes only): `--attacks cheap`, minutes each on the embedded model on 2 CPU cores.
CHEAP = ("respell", "quantize", "in-context", "probe", "tied-restore", "embedding-repair", "weights-only",
         "ablate-direction", "logit-lens")
DEFAULT = "relearn,in-context,adversarial,probe"


def get(name: str):
    """The attack (its ``Config`` and ``run``): its module, or the entry of that module's
    ``ATTACKS`` when one module holds several attacks."""
    module = _REGISTRY.get(name)
    return getattr(module, "ATTACKS", {}).get(name, module)


def parse_names(spec: str | list[str] | None) -> list[str]:
    """'relearn,probe' -> ['relearn', 'probe'] (checked); None or 'all' -> every attack;
    'cheap' -> the attacks that need no training (CHEAP)."""
    if spec is None or spec == "all":
        return available()
    if spec == "cheap":
        return list(CHEAP)
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if not names:
        raise ObliviateError(f"--attacks is empty. Valid attacks: {', '.join(available())}.")
    for name in names:
        get(name)
    return list(dict.fromkeys(names))


def make_config(name: str, settings: dict | None = None):
    """The attack's Config from {field: value} (strings from the CLI are converted)."""
    return build_section(get(name).Config, dict(settings or {}), f"attacks.{name}")


def run(name: str, ctx: AttackContext, settings: dict | None = None) -> dict:
    return get(name).run(ctx, make_config(name, settings))


__all__ = ["CHEAP", "DEFAULT", "AttackContext", "available", "get", "make_config", "parse_names", "register", "run"]
