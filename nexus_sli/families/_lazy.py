"""Import transformers' modelling modules on first use, not when the registry is built.

Building the registry instantiates every built-in family; importing every family's modelling
code then would cost seconds of start-up for a command that uses one family (or none).
A :func:`lazy_module` stands in for the module and imports it normally (``import_module``)
on first attribute access; nothing is put in ``sys.modules`` ahead of time, so transformers'
own (circular) imports are never disturbed.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

__all__ = ["lazy_module"]


class _Deferred(types.ModuleType):
    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self.__name__), attr)

    def __repr__(self) -> str:
        return f"<deferred module {self.__name__!r}>"


def lazy_module(name: str) -> types.ModuleType:
    """A stand-in for module ``name`` that imports it on first attribute access."""
    return _Deferred(name)
