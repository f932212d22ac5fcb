"""The layer-major loop: build a module on meta, fill it from a tensor source, run, free.

The loop is independent of where tensors come from: :class:`TensorSource` is a small Protocol,
implemented by the safetensors checkpoint reader (``_checkpoint``) and by :class:`DictSource`
(an in-memory state dict, used by family tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ._family import ArchitectureFamily
from .errors import CheckpointError, TensorMismatchError

__all__ = [
    "DictSource",
    "EngineOutput",
    "TensorSource",
    "buffers_to",
    "check_loaded",
    "check_tensors",
    "fill_module",
    "params_on_meta",
    "prepare_tensor",
    "run_in_memory",
]


@runtime_checkable
class TensorSource(Protocol):
    """Where tensors come from, by checkpoint name."""

    def names(self) -> Collection[str]:
        """Every tensor name in the checkpoint."""
        ...

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (the only read of it in a run)."""
        ...

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a tensor, without reading it."""
        ...

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of a tensor, without reading it."""
        ...

    def where(self, name: str) -> str:
        """The file a tensor lives in, for error messages."""
        ...


class DictSource:
    """A :class:`TensorSource` over an in-memory ``{name: tensor}`` mapping."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], label: str = "<state dict>") -> None:
        self._tensors = dict(tensors)
        self._label = label

    def names(self) -> Collection[str]:
        return self._tensors.keys()

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def where(self, name: str) -> str:
        return self._label


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Create parameters on the meta device while buffers are created for real.

    Parameters are what a checkpoint fills; non-persistent buffers (rotary ``inv_freq``,
    position id ranges) are computed in ``__init__`` and must hold real values.
    """
    original = nn.Module.register_parameter

    def register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and not param.is_meta:
            kwargs = {"requires_grad": param.requires_grad}
            self._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def check_tensors(
    module: nn.Module, key_to_name: Mapping[str, str], source: TensorSource, what: str
) -> None:
    """Check, from the checkpoint's headers alone, that ``module`` can be filled from it.

    Every state-dict key must be mapped to a tensor that exists, has the same shape and the
    same kind of dtype (floating point or not); otherwise :class:`TensorMismatchError` names
    the tensor and its file.
    """
    names = source.names()
    for key, target in module.state_dict(keep_vars=True).items():
        name = key_to_name.get(key)
        if name is None:
            raise TensorMismatchError(
                f"{what}: no checkpoint name planned for {key!r} (a family bug)"
            )
        if name not in names:
            raise TensorMismatchError(
                f"{what}: tensor {name!r} is missing from the checkpoint; the model expects it "
                f"with shape {list(target.shape)}"
            )
        if tuple(source.shape(name)) != tuple(target.shape):
            raise TensorMismatchError(
                f"{what}: tensor {name!r} in {source.where(name)} has shape "
                f"{list(source.shape(name))}, expected {list(target.shape)}"
            )
        stored = source.dtype(name)
        if stored.is_floating_point != target.dtype.is_floating_point:
            kind = "floating point" if target.dtype.is_floating_point else "integer"
            raise TensorMismatchError(
                f"{what}: tensor {name!r} in {source.where(name)} has dtype {stored}, "
                f"expected a {kind} tensor"
            )


def fill_module(
    module: nn.Module,
    key_to_name: Mapping[str, str],
    source: TensorSource,
    *,
    dtype: torch.dtype | None,
    device: torch.device,
    what: str,
    tensors: Mapping[str, torch.Tensor] | None = None,
    lazy: Collection[str] = (),
) -> None:
    """Assign checkpoint tensors into ``module`` (built with parameters on meta), strictly.

    ``key_to_name`` maps every state-dict key of ``module`` to its checkpoint name; the
    mapping is checked (:func:`check_tensors`) before anything is read. Keys in ``lazy`` are
    checked but left on meta: the caller fills them when they are needed.
    """
    check_tensors(module, key_to_name, source, what)
    loaded: dict[str, torch.Tensor] = {}
    for key, name in key_to_name.items():
        if key in lazy:
            continue
        tensor = tensors[name] if tensors is not None else source.get(name)
        loaded[key] = prepare_tensor(tensor, dtype=dtype, device=device)
    # strict=False only so that the lazy keys may stay out; everything else is checked: no
    # tensor without a place, and nothing but the lazy keys left on meta.
    missing, unexpected = module.load_state_dict(loaded, strict=False, assign=True)
    if unexpected or set(missing) != set(lazy):
        raise CheckpointError(
            f"{what}: tensors without a place {sorted(unexpected)}, keys not loaded "
            f"{sorted(set(missing) - set(lazy))}"
        )
    lazy_ids = {id(t) for k, t in module.state_dict(keep_vars=True).items() if k in lazy}
    check_loaded(module, what, skip=lazy_ids)
    buffers_to(module, device)


def check_loaded(module: nn.Module, what: str, *, skip: Collection[int] = ()) -> None:
    """Every parameter and buffer of ``module`` holds values (none left on meta), except the
    tensors whose ``id`` is in ``skip``."""
    for label, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_meta and id(tensor) not in skip:
            raise CheckpointError(f"{what}: {label!r} is still on the meta device after loading")


def prepare_tensor(
    tensor: torch.Tensor, *, dtype: torch.dtype | None, device: torch.device
) -> torch.Tensor:
    """A checkpoint tensor on the run's device, floating tensors in the run's dtype."""
    want = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
    return tensor.to(device=device, dtype=want)


def buffers_to(module: nn.Module, device: torch.device) -> None:
    """Move buffers computed in ``__init__`` (rotary ``inv_freq``) to ``device``."""
    for sub in module.modules():
        for bname, buf in list(sub._buffers.items()):
            if buf is not None and not buf.is_meta and buf.device != device:
                sub._buffers[bname] = buf.to(device)


@dataclass
class EngineOutput:
    """What one layer-major pass produced (batch dimension in input order)."""

    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None
    logits: torch.Tensor | None


def run_in_memory(
    family: ArchitectureFamily,
    config: Any,
    state_dict: Mapping[str, torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    batch_size: int = 8,
    output_hidden_states: bool = False,
    output_logits: bool = False,
    layer_type: str | None = None,
) -> EngineOutput:
    """Run the family hooks layer-major over an in-memory state dict (for family tests).

    The same loop as streaming (planning and strict checks included), over tensors already in
    memory and without an activation store. ``state_dict`` uses checkpoint names (what
    ``save_pretrained`` wrote), so both head and base layouts work.
    """
    from ._stream import run_layer_major

    out = run_layer_major(
        family,
        config,
        DictSource(state_dict),
        input_ids,
        torch.ones_like(input_ids) if attention_mask is None else attention_mask,
        batch_size=batch_size,
        output_hidden_states=output_hidden_states,
        output_logits=output_logits,
        dtype=None,
        device=torch.device("cpu"),
        stack=layer_type,
    )
    return EngineOutput(out.last_hidden_state, out.hidden_states, out.logits)
