"""Registration checks: name rule, callability, signature, meta-device test build, shape contract.

Each check raises one specific error of :mod:`nexus_sli.errors`; the registry runs them in the
order the documentation gives and commits nothing until every check passed.
"""

from __future__ import annotations

import functools
import inspect
import re
import threading
from typing import Any

import torch
from torch import nn

from ._protocols import ShapeContract
from .errors import (
    FactoryContractError,
    FactoryNotCallableError,
    FactorySignatureError,
    InvalidFamilyError,
    InvalidLayerNameError,
)

__all__ = [
    "LAYER_NAME_PATTERN",
    "check_callable",
    "check_family_id",
    "check_layer_name",
    "check_signature",
    "default_probe_config",
    "describe_callable",
    "instantiate_on_meta",
    "is_valid_layer_name",
]

#: ``<family>_<layer_type>``: lowercase snake_case, at least two parts, starting with a letter.
LAYER_NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)+")
_FAMILY_ID_PATTERN = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
_IMPORT_LOCK = threading.Lock()
_VALID_EXAMPLES = "'llama_custom_attn', 'moe_expert_layer', 'generic_rms_norm'"


def is_valid_layer_name(name: str) -> bool:
    """Whether ``name`` follows the ``<family>_<layer_type>`` rule."""
    return LAYER_NAME_PATTERN.fullmatch(name) is not None


def _snake_case(name: str) -> str:
    text = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name)
    text = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()
    text = re.sub(r"_+", "_", text)
    if not text or not text[0].isalpha():
        text = "custom_" + text if text else "custom_layer"
    if "_" not in text:
        text = f"generic_{text}"
    return text


def _why_invalid(name: str) -> str:
    if not name:
        return "it is empty"
    if name != name.strip():
        return "it has leading or trailing whitespace"
    if any(c.isupper() for c in name):
        return "it has uppercase letters (names are lowercase snake_case)"
    if "-" in name:
        return "it has hyphens (use underscores, not hyphens)"
    bad = sorted({c for c in name if not (c.isascii() and (c.isalnum() or c == "_"))})
    if bad:
        return f"it has characters other than a-z, 0-9 and '_': {''.join(bad)!r}"
    if not name[0].isalpha():
        return "it does not start with a letter"
    if "__" in name or name.endswith("_"):
        return "it has an empty part (double or trailing underscore)"
    return "it has only one part (too generic: name it <family>_<layer_type>)"


def check_layer_name(name: str) -> None:
    """Raise :class:`InvalidLayerNameError` unless ``name`` is ``<family>_<layer_type>``."""
    if is_valid_layer_name(name):
        return
    raise InvalidLayerNameError(
        f"invalid layer name {name!r}: {_why_invalid(name)}. Layer names follow "
        f"'<family>_<layer_type>' in lowercase snake_case with at least two parts, e.g. "
        f"{_snake_case(name)!r} (others: {_VALID_EXAMPLES})"
    )


def check_family_id(family_id: str) -> None:
    """Raise :class:`InvalidFamilyError` unless ``family_id`` is a lowercase snake_case id."""
    if _FAMILY_ID_PATTERN.fullmatch(family_id) is None:
        raise InvalidFamilyError(
            f"invalid family id {family_id!r}: family ids are lowercase snake_case identifiers "
            f"starting with a letter, e.g. 'llama', 'custom_transformer'"
        )


def describe_callable(obj: object) -> str:
    """Where a callable was defined: ``module.qualname (file:line)`` when it can be told."""
    target: Any = obj
    if isinstance(target, functools.partial):
        return f"functools.partial of {describe_callable(target.func)}"
    if inspect.ismethod(target):
        target = target.__func__
    elif not (inspect.isfunction(target) or inspect.isclass(target)) and callable(target):
        target = type(target)
    qualname = getattr(target, "__qualname__", type(target).__qualname__)
    module = getattr(target, "__module__", None) or "?"
    try:
        path = inspect.getsourcefile(target) or "?"
        line = inspect.getsourcelines(target)[1]
        where = f" ({path}:{line})"
    except (OSError, TypeError):
        where = ""
    return f"{module}.{qualname}{where}"


def check_callable(name: str, factory: object) -> None:
    """Raise :class:`FactoryNotCallableError` unless ``factory`` is callable."""
    if not callable(factory):
        raise FactoryNotCallableError(
            f"layer factory for {name!r} is not callable: got {type(factory).__name__} "
            f"{factory!r:.80}. Pass a class, function, lambda, functools.partial, bound method or "
            f"object with __call__, callable as factory(config, layer_idx) -> nn.Module"
        )


def _signature(factory: Any) -> inspect.Signature:
    try:
        return inspect.signature(factory, eval_str=True)
    except (NameError, SyntaxError, AttributeError):
        return inspect.signature(factory)


def check_signature(name: str, factory: object) -> inspect.Signature:
    """Raise :class:`FactorySignatureError` unless ``factory(config, layer_idx)`` binds positionally."""
    try:
        signature = _signature(factory)
    except (TypeError, ValueError) as exc:
        raise FactorySignatureError(
            f"cannot read the signature of the layer factory for {name!r} "
            f"({describe_callable(factory)}): {exc}. Wrap it in a function "
            f"'def factory(config, layer_idx): ...'"
        ) from exc
    try:
        signature.bind(object(), 0)
    except TypeError as exc:
        raise FactorySignatureError(
            f"layer factory for {name!r} ({describe_callable(factory)}) has signature "
            f"{signature} and cannot be called as factory(config, layer_idx): {exc}. "
            f"Factories take exactly (config, layer_idx) positionally; extra parameters need "
            f"defaults (bind them with functools.partial or a closure)"
        ) from exc
    return signature


def default_probe_config() -> Any:
    """A small config with the common attributes, used to test-build factories on meta.

    A transformers ``LlamaConfig`` (so transformers' own layers build from it too) with
    hidden_size 64, 4 attention heads, 2 key/value heads, intermediate_size 128,
    max_position_embeddings 128, vocab_size 256, and the usual extras (layer-norm eps,
    activation, dropout, expert counts, ...).
    """
    with _IMPORT_LOCK:  # transformers' lazy first import is not thread-safe
        from transformers.models.llama.configuration_llama import LlamaConfig

    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=128,
        vocab_size=256,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    extras: dict[str, Any] = {
        "layer_norm_eps": 1e-5,
        "layer_norm_epsilon": 1e-5,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "dropout": 0.0,
        "activation_function": "gelu",
        "num_experts": 4,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "n_embd": 64,
        "n_head": 4,
        "n_layer": 2,
        "n_positions": 128,
        "d_model": 64,
        "d_ff": 128,
        "d_kv": 16,
        "num_heads": 4,
        "type_vocab_size": 2,
    }
    for key, value in extras.items():
        setattr(config, key, value)
    config._attn_implementation = "sdpa"
    return config


def _first_tensor(output: object) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _check_shape_contract(name: str, module: nn.Module, config: Any) -> None:
    if not isinstance(module, ShapeContract):
        return
    hidden = int(getattr(config, "hidden_size", 64))
    shape = (2, 8, hidden)
    try:
        expected = tuple(module.expected_output_shape(shape))
        with torch.device("meta"):
            output = module(torch.empty(shape, device="meta"))
    except Exception as exc:
        raise FactoryContractError(
            f"layer {name!r} declares a forward-shape contract (expected_output_shape) but its "
            f"forward on a meta input of shape {list(shape)} failed: {type(exc).__name__}: {exc}"
        ) from exc
    tensor = _first_tensor(output)
    if tensor is None or tuple(tensor.shape) != expected:
        got = list(tensor.shape) if tensor is not None else type(output).__name__
        raise FactoryContractError(
            f"layer {name!r} breaks its forward-shape contract: input {list(shape)} gave "
            f"{got}, expected_output_shape says {list(expected)}"
        )


def instantiate_on_meta(name: str, factory: Any, probe_config: Any | None = None) -> nn.Module:
    """Call ``factory(probe_config, 0)`` under ``torch.device("meta")`` and check the result.

    The result must be an ``nn.Module`` whose parameters and buffers are all on the meta
    device (so validation allocates no real memory). Layers that define
    ``expected_output_shape`` are also run forward on a meta input to check that contract.
    """
    config = default_probe_config() if probe_config is None else probe_config
    try:
        with torch.device("meta"):
            module = factory(config, 0)
    except Exception as exc:
        raise FactoryContractError(
            f"layer factory for {name!r} ({describe_callable(factory)}) failed its test build "
            f"factory(probe_config, 0) on the meta device: {type(exc).__name__}: {exc}. "
            f"If it needs config attributes the default probe lacks, pass probe_config=; if "
            f"calling it has side effects, pass validate=False"
        ) from exc
    if not isinstance(module, nn.Module):
        raise FactoryContractError(
            f"layer factory for {name!r} ({describe_callable(factory)}) returned "
            f"{type(module).__name__}, expected a torch.nn.Module"
        )
    off_meta = [
        f"{label} on {tensor.device}"
        for label, tensor in [*module.named_parameters(), *module.named_buffers()]
        if not tensor.is_meta
    ]
    if off_meta:
        raise FactoryContractError(
            f"layer factory for {name!r} ({describe_callable(factory)}) allocated real memory "
            f"under torch.device('meta'): {', '.join(off_meta[:5])}. Create tensors without an "
            f"explicit device so the meta test build (and streaming) can place them"
        )
    _check_shape_contract(name, module, config)
    return module
