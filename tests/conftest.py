"""Shared fixtures: every test works inside a registry scope, never on the global state."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nexus_sli import ArchitectureRegistry, get_registry


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
