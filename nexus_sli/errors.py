"""The exception tree of nexus_sli.

Every error is a :class:`NexusSLIError` and also the builtin exception a caller
written against the seed documentation would catch::

    NexusSLIError
    ├── RegistrationError                  raised while registering (layers, families, plugins)
    │   ├── InvalidLayerNameError          (ValueError)  name breaks the <family>_<layer_type> rule
    │   ├── DuplicateLayerError            (ValueError)  "already registered"; says where both came from
    │   ├── FactoryNotCallableError        (TypeError)   the factory is not callable
    │   ├── FactorySignatureError          (TypeError)   cannot be called as factory(config, layer_idx)
    │   ├── FactoryContractError           (TypeError)   meta-device test build failed or broke the contract
    │   ├── InvalidFamilyError             (ValueError)  a family that is malformed or badly named
    │   ├── DuplicateFamilyError           (ValueError)  family id or model_type already claimed
    │   └── PluginLoadError                (ImportError) an entry point failed to load or register
    ├── LookupFailedError                  lookups
    │   ├── UnknownLayerError              (KeyError)    no custom layer by that name
    │   ├── UnknownFamilyError             (KeyError)    no family by that id
    │   └── UnsupportedArchitectureError   (ValueError)  no family claims this config
    ├── ArgumentTypeError                  (TypeError)   a public API received a wrong argument type
    ├── RemoteCodeError                    (ValueError)  a checkpoint needs trust_remote_code=True
    └── StreamingError                     raised while running a checkpoint
        ├── CheckpointError                (ValueError)  missing/damaged files, config, index
        │   └── TensorMismatchError        (ValueError)  missing, unexpected or mis-shaped tensor
        ├── InputError                     (ValueError)  bad input_ids / attention_mask / arguments
        ├── ActivationStoreError           (OSError)     activation dir unusable, full disk, locked
        └── ResumeMismatchError            (ValueError)  resume=True on a directory made for other work
"""

from __future__ import annotations

__all__ = [
    "ActivationStoreError",
    "ArgumentTypeError",
    "CheckpointError",
    "DuplicateFamilyError",
    "DuplicateLayerError",
    "FactoryContractError",
    "FactoryNotCallableError",
    "FactorySignatureError",
    "InputError",
    "InvalidFamilyError",
    "InvalidLayerNameError",
    "LookupFailedError",
    "NexusSLIError",
    "PluginLoadError",
    "RegistrationError",
    "RemoteCodeError",
    "ResumeMismatchError",
    "StreamingError",
    "TensorMismatchError",
    "UnknownFamilyError",
    "UnknownLayerError",
    "UnsupportedArchitectureError",
]


class NexusSLIError(Exception):
    """Base class of every error raised by nexus_sli."""


class RegistrationError(NexusSLIError):
    """An error raised while registering a layer, a family or a plugin."""


class InvalidLayerNameError(RegistrationError, ValueError):
    """The layer name does not follow the ``<family>_<layer_type>`` snake_case rule."""


class DuplicateLayerError(RegistrationError, ValueError):
    """A different factory is already registered under this name."""


class FactoryNotCallableError(RegistrationError, TypeError):
    """The object given as a layer factory is not callable."""


class FactorySignatureError(RegistrationError, TypeError):
    """The factory cannot be called positionally as ``factory(config, layer_idx)``."""


class FactoryContractError(RegistrationError, TypeError):
    """The factory failed its meta-device test build or returned something that is not a layer."""


class InvalidFamilyError(RegistrationError, ValueError):
    """An architecture family is malformed (bad id, no model types, wrong base class)."""


class DuplicateFamilyError(RegistrationError, ValueError):
    """A family id, or a model type claimed by a family, is already registered."""


class PluginLoadError(RegistrationError, ImportError):
    """An entry point of the ``nexus_sli.layers`` group failed to load or to register."""


class LookupFailedError(NexusSLIError):
    """A lookup found nothing."""


class _PlainKeyError(KeyError):
    # KeyError.__str__ shows the repr of its argument (quotes, escaped newlines); show the message.
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownLayerError(LookupFailedError, _PlainKeyError):
    """No custom layer is registered under this name."""


class UnknownFamilyError(LookupFailedError, _PlainKeyError):
    """No architecture family is registered under this id."""


class UnsupportedArchitectureError(LookupFailedError, ValueError):
    """No registered family claims the config's ``model_type`` or ``architectures``.

    A ``ValueError`` (the config holds a value nexus_sli does not support), like transformers'
    own error for an unrecognised model type.
    """


class ArgumentTypeError(NexusSLIError, TypeError):
    """A public function or method received an argument of the wrong type."""


class RemoteCodeError(NexusSLIError, ValueError):
    """The checkpoint needs remote code and ``trust_remote_code=True`` was not passed."""


class StreamingError(NexusSLIError):
    """An error raised while streaming a checkpoint."""


class CheckpointError(StreamingError, ValueError):
    """A checkpoint directory, its config, its index or one of its files is missing or damaged."""


class TensorMismatchError(CheckpointError):
    """A tensor is missing, unexpected, or has the wrong shape or dtype."""


class InputError(StreamingError, ValueError):
    """``input_ids``, ``attention_mask`` or another run argument is invalid."""


class ActivationStoreError(StreamingError, OSError):
    """The activation directory cannot be used: unwritable, full, locked or corrupt."""


class ResumeMismatchError(StreamingError, ValueError):
    """``resume=True`` on an activation directory made for another checkpoint or other inputs."""
