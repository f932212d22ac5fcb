"""Built-in architecture families: one module per group of model types sharing a layout.

Each module defines its family classes and a ``FAMILIES`` tuple of them; :func:`builtin_families`
collects them in a stable order.
"""

from __future__ import annotations

import importlib

from .._family import ArchitectureFamily

__all__ = ["BUILTIN_FAMILY_MODULES", "builtin_families"]

#: Modules (relative to this package) that define built-in families, in detection order.
BUILTIN_FAMILY_MODULES: tuple[str, ...] = ("llama", "gpt", "gpt_neox", "opt", "bert", "t5", "mamba")


def builtin_families() -> tuple[ArchitectureFamily, ...]:
    """One instance of every built-in family."""
    found: list[ArchitectureFamily] = []
    for name in BUILTIN_FAMILY_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        found.extend(cls() for cls in module.FAMILIES)
    return tuple(found)
