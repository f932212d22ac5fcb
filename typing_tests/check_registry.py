"""Typing tests: mypy checks this file (nobody runs it).

Lines that must type-check use ``assert_type``; lines that must fail carry
``# type: ignore[code]``, which ``warn_unused_ignores`` turns into an error if mypy accepts them.
"""

from __future__ import annotations

import functools
from typing import Any, assert_type

from torch import nn
from transformers import PretrainedConfig

from nexus_sli import LayerConfig, LayerFactory, get_registry, register_layer

registry = get_registry()


# ---------------------------------------------------------------- accepted factory forms
class Untyped(nn.Module):
    def __init__(self, config, layer_idx):  # type: ignore[no-untyped-def]
        super().__init__()


class TypedWithPretrained(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int) -> None:
        super().__init__()


class TypedWithProtocol(nn.Module):
    def __init__(self, config: LayerConfig, layer_idx: int) -> None:
        super().__init__()
        self.width = config.hidden_size


def function_factory(config: Any, layer_idx: int) -> nn.Linear:
    return nn.Linear(config.hidden_size, config.hidden_size)


def with_option(config: Any, layer_idx: int, width: int = 4) -> nn.Module:
    return nn.Linear(config.hidden_size, width)


class Manager:
    def make(self, config: Any, layer_idx: int) -> nn.Module:
        return nn.Identity()


class CallableFactory:
    def __call__(self, config: Any, layer_idx: int) -> nn.Module:
        return nn.Identity()


registry.register_custom_layer("typed_untyped", Untyped)
registry.register_custom_layer("typed_pretrained", TypedWithPretrained)
registry.register_custom_layer("typed_protocol", TypedWithProtocol)
registry.register_custom_layer("typed_function", function_factory)
registry.register_custom_layer("typed_lambda", lambda config, idx: nn.Linear(4, 4))
registry.register_custom_layer("typed_partial", functools.partial(with_option, width=8))
registry.register_custom_layer("typed_method", Manager().make)
registry.register_custom_layer("typed_object", CallableFactory())
registry.register_custom_layer("typed_replace", function_factory, replace=True, validate=False)

assert_type(registry.get_layer_factory("typed_function"), LayerFactory)
assert_type(registry.unregister_custom_layer("typed_function"), bool)
assert_type(registry.list_custom_layers(), list[str])


# ---------------------------------------------------------------- the decorator keeps types
@register_layer("typed_decorated_class")
class Decorated(nn.Module):
    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()


@register_layer("typed_decorated_function")
def decorated(config: Any, layer_idx: int) -> nn.Linear:
    return nn.Linear(4, 4)


assert_type(Decorated, type[Decorated])
assert_type(Decorated(None, 0), Decorated)
assert_type(decorated(None, 0), nn.Linear)


# ---------------------------------------------------------------- rejected factories
registry.register_custom_layer("typed_one_arg", lambda c: nn.Identity())  # type: ignore[arg-type]
registry.register_custom_layer("typed_no_args", lambda: nn.Identity())  # type: ignore[arg-type]
registry.register_custom_layer("typed_not_callable", 42)  # type: ignore[arg-type]
registry.register_custom_layer("typed_not_module", lambda c, i: 3)  # type: ignore[arg-type]


def wrong_index_type(config: Any, layer_idx: str) -> nn.Module:
    return nn.Identity()


def extra_required(config: Any, layer_idx: int, width: int) -> nn.Module:
    return nn.Identity()


class OnlyConfig(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()


registry.register_custom_layer("typed_wrong_index", wrong_index_type)  # type: ignore[arg-type]
registry.register_custom_layer("typed_extra", extra_required)  # type: ignore[arg-type]
registry.register_custom_layer("typed_only_config", OnlyConfig)  # type: ignore[arg-type]
registry.register_custom_layer(3, function_factory)  # type: ignore[arg-type]


@register_layer("typed_bad_decorated")
class BadDecorated(nn.Module):  # type: ignore[type-var]
    def __init__(self, config: Any) -> None:
        super().__init__()
