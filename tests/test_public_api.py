"""The public surface: __all__ is exactly the public names, and seed module paths work."""

from __future__ import annotations

import types

import nexus_sli
import nexus_sli.architecture_registry as architecture_registry
import nexus_sli.errors as errors
import nexus_sli.universal_sli as universal_sli


def _public(module: object) -> set[str]:
    """Every name a user can reach without an underscore, except submodules."""
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and name != "annotations"  # from __future__
    }


def test_all_is_exactly_the_public_names() -> None:
    exported = set(nexus_sli.__all__)
    assert exported - {"__version__"} == _public(nexus_sli)
    assert len(nexus_sli.__all__) == len(exported)


def test_seed_module_paths() -> None:
    assert architecture_registry.ArchitectureRegistry is nexus_sli.ArchitectureRegistry
    assert architecture_registry.ArchitectureFamily is nexus_sli.ArchitectureFamily
    assert architecture_registry.get_registry is nexus_sli.get_registry
    assert universal_sli.UniversalSLIProcessor is nexus_sli.UniversalSLIProcessor
    assert universal_sli.SLIResult is nexus_sli.SLIResult
    assert set(errors.__all__) <= set(nexus_sli.__all__)
