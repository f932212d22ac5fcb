"""The architecture registry (seed module path ``architecture_registry``).

``ArchitectureRegistry()`` is one shared instance holding custom layers and architecture
families; :func:`get_registry` returns it. See the README for the full contract.
"""

from __future__ import annotations

from ._family import ArchitectureFamily as ArchitectureFamily
from ._family import LayerContext as LayerContext
from ._registry import PLUGIN_GROUP as PLUGIN_GROUP
from ._registry import ArchitectureRegistry as ArchitectureRegistry
from ._registry import DetectionExplanation as DetectionExplanation
from ._registry import FamilyRegistration as FamilyRegistration
from ._registry import LayerRegistration as LayerRegistration
from ._registry import get_registry as get_registry
from ._registry import register_layer as register_layer

__all__ = [
    "PLUGIN_GROUP",
    "ArchitectureFamily",
    "ArchitectureRegistry",
    "DetectionExplanation",
    "FamilyRegistration",
    "LayerContext",
    "LayerRegistration",
    "get_registry",
    "register_layer",
]
