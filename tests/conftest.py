"""Shared fixtures: every test works inside a registry scope, never on the global state."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from beartype import BeartypeConf
from beartype.claw import beartype_package

# The whole suite runs with beartype checking every annotated function of the package (before
# the package is imported), not only the public API that is always checked.
beartype_package("nexus_sli", conf=BeartypeConf(claw_skip_package_names=("nexus_sli.demo",)))

from nexus_sli import ArchitectureRegistry, get_registry  # noqa: E402


@pytest.fixture
def registry() -> Iterator[ArchitectureRegistry]:
    """The shared registry inside a fresh scope: changes vanish when the test ends."""
    with get_registry().scoped() as scoped:
        yield scoped


@pytest.fixture(autouse=True)
def _isolate_registry() -> Iterator[None]:
    # Seed examples call ArchitectureRegistry() / get_registry() directly; a scope around
    # every test keeps their registrations out of the shared state.
    with get_registry().scoped():
        yield
