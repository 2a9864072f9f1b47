"""A name -> module registry whose modules are imported on first use (so `obliviate
--help` stays fast), refusing duplicate or malformed names, unknown look-ups, and a
module that does not provide the registry's protocol."""
from __future__ import annotations

import importlib
from types import ModuleType

from obliviate.errors import ObliviateError


class LazyRegistry:
    def __init__(self, kind: str, separator: str, listing: str, sort: bool = False, protocol: type | None = None):
        self.kind, self.separator, self.listing, self.sort = kind, separator, listing, sort
        self.protocol = protocol  # a runtime_checkable Protocol every registered module must satisfy
        self._modules: dict[str, str] = {}

    def register(self, name: str, module: str) -> None:
        if name != name.lower() or not name.replace(self.separator, "").isalnum():
            raise ValueError(f"{self.kind.capitalize()} name {name!r} must be lowercase letters, digits and {self.separator!r}.")
        if name in self._modules:
            raise ValueError(f"{self.kind.capitalize()} {name!r} is already registered (by {self._modules[name]}).")
        self._modules[name] = module

    def available(self) -> list[str]:
        return sorted(self._modules) if self.sort else list(self._modules)

    def get(self, name: str) -> ModuleType:
        if name not in self._modules:
            raise ObliviateError(f"Unknown {self.kind} {name!r}. {self.listing}: {', '.join(self.available())}.")
        module = importlib.import_module(self._modules[name])
        if self.protocol is not None and not isinstance(module, self.protocol):
            missing = [m for m in getattr(self.protocol, "__protocol_attrs__", ()) if not hasattr(module, m)]
            raise TypeError(f"{self.kind.capitalize()} module {module.__name__} lacks {', '.join(missing) or 'the protocol'}.")
        return module
