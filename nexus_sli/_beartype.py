"""Run-time type checking of the public API with beartype.

A wrong argument type surfaces as :class:`~nexus_sli.errors.ArgumentTypeError` (a ``TypeError``),
the error the seed documentation promises, never as a raw beartype exception.
"""

from __future__ import annotations

from beartype import BeartypeConf

from .errors import ArgumentTypeError

__all__ = ["CONF"]

CONF = BeartypeConf(violation_param_type=ArgumentTypeError)
