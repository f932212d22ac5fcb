"""nexus_sli: a typed, strictly validated layer registry and Sequential Layer Ingestion (SLI).

Register layer factories under ``<family>_<layer_type>`` names, detect Hugging Face
architectures, and stream checkpoints too large for memory one layer at a time with exactly
the outputs transformers gives.
"""

from __future__ import annotations

from ._protocols import LayerConfig as LayerConfig
from ._protocols import LayerFactory as LayerFactory
from ._protocols import ShapeContract as ShapeContract
from .architecture_registry import PLUGIN_GROUP as PLUGIN_GROUP
from .architecture_registry import ArchitectureFamily as ArchitectureFamily
from .architecture_registry import ArchitectureRegistry as ArchitectureRegistry
from .architecture_registry import DetectionExplanation as DetectionExplanation
from .architecture_registry import FamilyRegistration as FamilyRegistration
from .architecture_registry import LayerContext as LayerContext
from .architecture_registry import LayerRegistration as LayerRegistration
from .architecture_registry import get_registry as get_registry
from .architecture_registry import register_layer as register_layer
from .errors import ActivationStoreError as ActivationStoreError
from .errors import ArgumentTypeError as ArgumentTypeError
from .errors import CheckpointError as CheckpointError
from .errors import DuplicateFamilyError as DuplicateFamilyError
from .errors import DuplicateLayerError as DuplicateLayerError
from .errors import FactoryContractError as FactoryContractError
from .errors import FactoryNotCallableError as FactoryNotCallableError
from .errors import FactorySignatureError as FactorySignatureError
from .errors import InputError as InputError
from .errors import InvalidFamilyError as InvalidFamilyError
from .errors import InvalidLayerNameError as InvalidLayerNameError
from .errors import LookupFailedError as LookupFailedError
from .errors import NexusSLIError as NexusSLIError
from .errors import PluginLoadError as PluginLoadError
from .errors import RegistrationError as RegistrationError
from .errors import RemoteCodeError as RemoteCodeError
from .errors import ResumeMismatchError as ResumeMismatchError
from .errors import StreamingError as StreamingError
from .errors import TensorMismatchError as TensorMismatchError
from .errors import UnknownFamilyError as UnknownFamilyError
from .errors import UnknownLayerError as UnknownLayerError
from .errors import UnsupportedArchitectureError as UnsupportedArchitectureError
from .universal_sli import SLIResult as SLIResult
from .universal_sli import UniversalSLIProcessor as UniversalSLIProcessor

__version__ = "0.1.0"

__all__ = [
    "PLUGIN_GROUP",
    "ActivationStoreError",
    "ArchitectureFamily",
    "ArchitectureRegistry",
    "ArgumentTypeError",
    "CheckpointError",
    "DetectionExplanation",
    "DuplicateFamilyError",
    "DuplicateLayerError",
    "FactoryContractError",
    "FactoryNotCallableError",
    "FactorySignatureError",
    "FamilyRegistration",
    "InputError",
    "InvalidFamilyError",
    "InvalidLayerNameError",
    "LayerConfig",
    "LayerContext",
    "LayerFactory",
    "LayerRegistration",
    "LookupFailedError",
    "NexusSLIError",
    "PluginLoadError",
    "RegistrationError",
    "RemoteCodeError",
    "ResumeMismatchError",
    "SLIResult",
    "ShapeContract",
    "StreamingError",
    "TensorMismatchError",
    "UniversalSLIProcessor",
    "UnknownFamilyError",
    "UnknownLayerError",
    "UnsupportedArchitectureError",
    "__version__",
    "get_registry",
    "register_layer",
]
