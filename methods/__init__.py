"""The method registry: explicit, imported lazily so that listing methods loads nothing heavy.

Public API: ``from methods import get_method, available_methods, default_methods``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util

from benchmark.errors import ConfigError

# name -> (module, class). Order = the order of rows in tables (lower bound first, upper bound last).
_REGISTRY: dict[str, tuple[str, str]] = {
    "finetune": ("methods.finetune", "Finetune"),
    "mib": ("methods.mib", "MiB"),
    "plop": ("methods.plop", "PLOP"),
    "comformer": ("methods.comformer", "CoMFormer"),
    "cisdq": ("methods.cisdq", "CisDQ"),
    "cisdq-kl": ("methods.cisdq", "CisDQKL"),
    "eclipse": ("methods.eclipse", "ECLIPSE"),
    "balconpas": ("methods.balconpas", "BalConpas"),
    "balconpas-r": ("methods.balconpas", "BalConpasR"),
    "joint": ("methods.joint", "Joint"),
}
# Variants run only when named (--methods cisdq-kl), not in the default grid (methods.md: optional).
OPTIONAL = frozenset({"cisdq-kl", "balconpas-r"})


def _importable(name: str) -> bool:
    module, _ = _REGISTRY[name]
    return importlib.util.find_spec(module) is not None


def available_methods() -> list[str]:
    """Registered method names, in table order."""
    return [name for name in _REGISTRY if _importable(name)]


def default_methods() -> list[str]:
    """What ``run_benchmark.py`` runs without ``--methods``: every registered method but the optional variants."""
    return [name for name in available_methods() if name not in OPTIONAL]


def get_method_class(name: str):
    names = available_methods()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}?" if close else f"available methods: {', '.join(names)}"
        raise ConfigError(f"unknown method {name!r}", hint=hint)
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)


def get_method(name: str, protocol_name: str = "", overrides: dict | None = None):
    """A method instance with its defaults, the protocol's overrides (data) and the user's overrides."""
    cls = get_method_class(name)
    try:
        return cls.for_protocol(protocol_name, overrides)
    except KeyError as err:
        raise ConfigError(f"method {name!r}: {err.args[0]}", hint="see --set method.<key>=<value>") from None
