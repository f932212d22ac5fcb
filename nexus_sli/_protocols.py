"""Small runtime-checkable Protocols: the extension points of nexus_sli.

``isinstance`` against a Protocol only checks that the members exist; the registry checks
signatures separately with :mod:`inspect` (see ``_validation``).
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar, runtime_checkable

from torch import nn

__all__ = ["LayerConfig", "LayerFactory", "ShapeContract", "TLayerFactory"]


@runtime_checkable
class LayerConfig(Protocol):
    """What a layer factory may read from its config: the common transformer sizes.

    A transformers ``PretrainedConfig`` of a decoder model satisfies it, and so does the
    probe config used for validation. Factories may read any other attribute too; they
    then need a config that has it (pass ``probe_config=`` when registering).
    """

    hidden_size: int
    num_attention_heads: int


@runtime_checkable
class LayerFactory(Protocol):
    """Builds one layer: ``factory(config, layer_idx) -> nn.Module``.

    Classes whose ``__init__`` takes ``(config, layer_idx)``, functions, lambdas,
    ``functools.partial`` objects, bound methods and callable objects all qualify.
    ``config`` is typed ``Any`` so that factories annotated with ``PretrainedConfig``,
    :class:`LayerConfig` or nothing are all accepted.
    """

    def __call__(self, config: Any, layer_idx: int, /) -> nn.Module: ...


@runtime_checkable
class ShapeContract(Protocol):
    """A layer that declares its forward-shape contract.

    ``expected_output_shape(input_shape)`` returns the output shape for an input of
    ``input_shape`` (``[batch, seq, hidden]``); the registry checks it on the meta device.
    Layers that do not define it are not shape-checked.
    """

    def expected_output_shape(self, input_shape: tuple[int, ...], /) -> tuple[int, ...]: ...


TLayerFactory = TypeVar("TLayerFactory", bound=LayerFactory)
