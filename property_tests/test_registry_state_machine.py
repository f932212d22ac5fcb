"""Model-based tests: the registry beside a plain dict, invariants after every step."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from torch import nn

from nexus_sli import (
    ArchitectureRegistry,
    DuplicateLayerError,
    InvalidLayerNameError,
    UnknownLayerError,
)
from nexus_sli._validation import is_valid_layer_name

from .strategies import any_names, valid_layer_names

_RULE = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)+")


def _make_factory(tag: int) -> Any:
    def factory(config: Any, layer_idx: int) -> nn.Module:
        return nn.Linear(config.hidden_size, config.hidden_size)

    factory.tag = tag  # type: ignore[attr-defined]
    return factory


FACTORIES = [_make_factory(i) for i in range(4)]
factories = st.sampled_from(FACTORIES)
names = (
    st.sampled_from(["llama_attn", "moe_expert", "generic_norm", "gpt_block", "bert_ffn"])
    | valid_layer_names
)


class RegistryMachine(RuleBasedStateMachine):
    """Drives an isolated registry and a dict model with the same operations."""

    def __init__(self) -> None:
        super().__init__()
        self.registry = ArchitectureRegistry.isolated()
        self.model: dict[str, Any] = {}
        # A stack of (scope context manager, saved model) for scoped operations.
        self.scopes: list[tuple[Any, dict[str, Any]]] = []

    @rule(name=names, factory=factories)
    def register(self, name: str, factory: Any) -> None:
        existing = self.model.get(name)
        if existing is not None and existing is not factory:
            try:
                self.registry.register_custom_layer(name, factory, validate=False)
            except DuplicateLayerError:
                return
            raise AssertionError("duplicate accepted")
        self.registry.register_custom_layer(name, factory, validate=False)
        self.model.setdefault(name, factory)

    @rule(name=names, factory=factories)
    def replace(self, name: str, factory: Any) -> None:
        self.registry.register_custom_layer(name, factory, replace=True, validate=False)
        self.model[name] = factory

    @rule(name=names)
    def unregister(self, name: str) -> None:
        assert self.registry.unregister_custom_layer(name) == (name in self.model)
        self.model.pop(name, None)

    @rule(name=names)
    def lookup(self, name: str) -> None:
        if name in self.model:
            assert self.registry.get_layer_factory(name) is self.model[name]
        else:
            try:
                self.registry.get_layer_factory(name)
            except UnknownLayerError:
                return
            raise AssertionError("lookup of unknown name succeeded")

    @rule(name=any_names, factory=factories)
    def register_any_name(self, name: str, factory: Any) -> None:
        assume(name not in self.model)
        try:
            self.registry.register_custom_layer(name, factory, validate=False)
        except InvalidLayerNameError:
            assert not _RULE.fullmatch(name)
            return
        assert _RULE.fullmatch(name)
        self.model[name] = factory

    @rule()
    def clear(self) -> None:
        self.registry.clear_custom_layers()
        self.model.clear()

    @precondition(lambda self: len(self.scopes) < 3)
    @rule()
    def enter_scope(self) -> None:
        scope = self.registry.scoped()
        scope.__enter__()
        self.scopes.append((scope, dict(self.model)))

    @precondition(lambda self: bool(self.scopes))
    @rule()
    def exit_scope(self) -> None:
        scope, saved = self.scopes.pop()
        scope.__exit__(None, None, None)
        self.model = saved

    @invariant()
    def same_contents_and_order(self) -> None:
        assert self.registry.list_custom_layers() == list(self.model)

    def teardown(self) -> None:
        while self.scopes:
            scope, _ = self.scopes.pop()
            scope.__exit__(None, None, None)


TestRegistryMachine = RegistryMachine.TestCase
TestRegistryMachine.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@settings(max_examples=2000, deadline=None)
@given(any_names)
def test_name_accepted_exactly_when_it_follows_the_rule(name: str) -> None:
    assert is_valid_layer_name(name) == bool(_RULE.fullmatch(name))
    registry = ArchitectureRegistry.isolated()
    try:
        registry.register_custom_layer(name, FACTORIES[0], validate=False)
    except InvalidLayerNameError as exc:
        assert not _RULE.fullmatch(name)
        assert "<family>_<layer_type>" in str(exc)
    else:
        assert _RULE.fullmatch(name)


@settings(max_examples=300, deadline=None)
@given(valid_layer_names)
def test_valid_names_always_accepted(name: str) -> None:
    registry = ArchitectureRegistry.isolated()
    registry.register_custom_layer(name, FACTORIES[1], validate=False)
    assert registry.get_layer_factory(name) is FACTORIES[1]
