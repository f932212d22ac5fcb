"""Unit tests of the custom layer registry: every validation rule and every message."""

from __future__ import annotations

import functools
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import nexus_sli
from nexus_sli import (
    ArchitectureRegistry,
    ArgumentTypeError,
    DuplicateLayerError,
    FactoryContractError,
    FactoryNotCallableError,
    FactorySignatureError,
    InvalidLayerNameError,
    NexusSLIError,
    RegistrationError,
    UnknownLayerError,
    get_registry,
    register_layer,
)
from nexus_sli._validation import default_probe_config


def linear(config: Any, layer_idx: int) -> nn.Module:
    return nn.Linear(config.hidden_size, config.hidden_size)


class Block(nn.Module):
    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_idx = layer_idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj(x)
        return out


# ---------------------------------------------------------------- step 1: names
@pytest.mark.parametrize(
    "name",
    [
        "llama_custom_attn",
        "moe_expert_layer",
        "generic_rms_norm",
        "experimental_new_attn",
        "a_b",
        "gpt2_block_v2",
    ],
)
def test_valid_names(registry: ArchitectureRegistry, name: str) -> None:
    registry.register_custom_layer(name, linear)
    assert registry.get_layer_factory(name) is linear


@pytest.mark.parametrize(
    ("name", "reason", "suggestion"),
    [
        ("layer1", "only one part", "'generic_layer1'"),
        ("custom", "only one part", "'generic_custom'"),
        ("MyLayer", "uppercase", "'my_layer'"),
        ("transformer-block", "hyphens", "'transformer_block'"),
        ("", "empty", None),
        ("llama__attn", "empty part", None),
        ("llama_attn_", "empty part", None),
        ("1_llama", "start with a letter", None),
        ("llama attn", "characters other than", None),
        (" llama_attn", "whitespace", None),
    ],
)
def test_invalid_names(
    registry: ArchitectureRegistry, name: str, reason: str, suggestion: str | None
) -> None:
    with pytest.raises(InvalidLayerNameError, match=reason) as info:
        registry.register_custom_layer(name, linear)
    assert isinstance(info.value, ValueError)
    assert "<family>_<layer_type>" in str(info.value)
    if suggestion is not None:
        assert f"e.g. {suggestion}" in str(info.value)


def test_name_checked_before_factory(registry: ArchitectureRegistry) -> None:
    with pytest.raises(InvalidLayerNameError):
        registry.register_custom_layer("custom", 42)  # type: ignore[arg-type]


# ---------------------------------------------------------------- step 2: duplicates
def test_duplicate_names_both_origins(registry: ArchitectureRegistry) -> None:
    registry.register_custom_layer("llama_block", linear)
    first_line = test_duplicate_names_both_origins.__code__.co_firstlineno + 1
    with pytest.raises(DuplicateLayerError, match="already registered") as info:
        registry.register_custom_layer("llama_block", Block)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert (
        f"tests.test_registry:{first_line}" in message or f"test_registry:{first_line}" in message
    )
    assert f"test_registry:{first_line + 3}" in message
    assert "replace=True" in message
    assert "linear" in message and "Block" in message


def test_duplicate_checked_before_callability(registry: ArchitectureRegistry) -> None:
    registry.register_custom_layer("llama_block", linear)
    with pytest.raises(DuplicateLayerError):
        registry.register_custom_layer("llama_block", 42)  # type: ignore[arg-type]


def test_reregistering_identical_object_is_noop(registry: ArchitectureRegistry) -> None:
    registry.register_custom_layer("llama_block", linear)
    registry.register_custom_layer("llama_block", linear)
    assert registry.list_custom_layers().count("llama_block") == 1


def test_replace_keeps_order(registry: ArchitectureRegistry) -> None:
    registry.clear_custom_layers()
    registry.register_custom_layer("llama_a", linear)
    registry.register_custom_layer("llama_b", linear)
    registry.register_custom_layer("llama_a", Block, replace=True)
    assert registry.list_custom_layers() == ["llama_a", "llama_b"]
    assert registry.get_layer_factory("llama_a") is Block


# ---------------------------------------------------------------- step 3: callability
@pytest.mark.parametrize("factory", [42, "nn.Linear", None, [linear]])
def test_not_callable(registry: ArchitectureRegistry, factory: object) -> None:
    with pytest.raises(FactoryNotCallableError, match="is not callable") as info:
        registry.register_custom_layer("llama_block", factory)  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError)


# ---------------------------------------------------------------- step 4: signatures
class CallableFactory:
    def __call__(self, config: Any, layer_idx: int) -> nn.Module:
        return Block(config, layer_idx)


class Manager:
    def make(self, config: Any, layer_idx: int) -> nn.Module:
        return Block(config, layer_idx)


def with_extra(config: Any, layer_idx: int, width: int) -> nn.Module:
    return nn.Linear(config.hidden_size, width)


def variadic(*args: Any) -> nn.Module:
    return Block(args[0], args[1])


@pytest.mark.parametrize(
    "factory",
    [
        Block,
        linear,
        lambda config, idx: Block(config, idx),
        functools.partial(with_extra, width=8),
        Manager().make,
        CallableFactory(),
        variadic,
    ],
    ids=["class", "function", "lambda", "partial", "bound-method", "callable-object", "varargs"],
)
def test_factory_forms_accepted(registry: ArchitectureRegistry, factory: Any) -> None:
    registry.register_custom_layer("generic_form", factory)
    assert registry.get_layer_factory("generic_form") is factory


@pytest.mark.parametrize(
    ("factory", "shown"),
    [
        (lambda config: nn.Identity(), "(config)"),
        (lambda: nn.Identity(), "()"),
        (with_extra, "layer_idx: int, width: int)"),
        (lambda config, layer_idx, *, width: nn.Identity(), "(config, layer_idx, *, width)"),
        (lambda *, config, layer_idx: nn.Identity(), "(*, config, layer_idx)"),
    ],
)
def test_bad_signatures(registry: ArchitectureRegistry, factory: Any, shown: str) -> None:
    with pytest.raises(FactorySignatureError, match="cannot be called as factory") as info:
        registry.register_custom_layer("generic_bad", factory)
    assert shown in str(info.value)
    assert isinstance(info.value, TypeError)


# ---------------------------------------------------------------- step 5: meta instantiation
def test_meta_build_allocates_nothing(registry: ArchitectureRegistry) -> None:
    seen: list[nn.Module] = []

    def spy(config: Any, layer_idx: int) -> nn.Module:
        module = nn.Linear(config.hidden_size, config.intermediate_size)
        seen.append(module)
        return module

    registry.register_custom_layer("generic_spy", spy)
    assert len(seen) == 1
    assert all(p.is_meta for p in seen[0].parameters())


def test_meta_build_failure_is_chained(registry: ArchitectureRegistry) -> None:
    def broken(config: Any, layer_idx: int) -> nn.Module:
        return nn.Linear(config.no_such_attribute, 4)

    with pytest.raises(FactoryContractError, match="failed its test build") as info:
        registry.register_custom_layer("generic_broken", broken)
    assert isinstance(info.value.__cause__, AttributeError)
    assert "probe_config=" in str(info.value)


def test_meta_build_must_return_module(registry: ArchitectureRegistry) -> None:
    with pytest.raises(
        FactoryContractError, match=r"returned Tensor, expected a torch\.nn\.Module"
    ):
        registry.register_custom_layer("generic_tensor", lambda c, i: torch.zeros(2))  # type: ignore[arg-type]


def test_meta_build_must_stay_on_meta(registry: ArchitectureRegistry) -> None:
    def pinned(config: Any, layer_idx: int) -> nn.Module:
        return nn.Linear(4, 4, device="cpu")

    with pytest.raises(FactoryContractError, match="allocated real memory") as info:
        registry.register_custom_layer("generic_pinned", pinned)
    assert "weight on cpu" in str(info.value)


def test_probe_config_is_used(registry: ArchitectureRegistry) -> None:
    probe = type("Probe", (), {"width": 12})()
    registry.register_custom_layer(
        "generic_wide", lambda c, i: nn.Linear(c.width, c.width), probe_config=probe
    )
    with pytest.raises(FactoryContractError):
        registry.register_custom_layer("generic_wider", lambda c, i: nn.Linear(c.width, c.width))


def test_default_probe_has_common_attributes() -> None:
    probe = default_probe_config()
    for attr in (
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "max_position_embeddings",
        "vocab_size",
    ):
        assert isinstance(getattr(probe, attr), int)
    assert isinstance(probe, nexus_sli.LayerConfig)


def test_validate_false_skips_the_call(registry: ArchitectureRegistry) -> None:
    calls: list[int] = []

    def counting(config: Any, layer_idx: int) -> nn.Module:
        calls.append(layer_idx)
        return nn.Identity()

    registry.register_custom_layer("generic_counting", counting, validate=False)
    assert calls == []
    with pytest.raises(FactorySignatureError):
        registry.register_custom_layer("generic_bad", lambda c: nn.Identity(), validate=False)  # type: ignore[arg-type]


def test_transformers_layer_registers_from_probe(registry: ArchitectureRegistry) -> None:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    registry.register_custom_layer("llama_stock_layer", LlamaDecoderLayer)


class ShapeKeeper(nn.Module):
    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def expected_output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return input_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj(x)
        return out


class ShapeLiar(ShapeKeeper):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :1]


def test_shape_contract_checked(registry: ArchitectureRegistry) -> None:
    registry.register_custom_layer("generic_keeper", ShapeKeeper)
    with pytest.raises(FactoryContractError, match="breaks its forward-shape contract"):
        registry.register_custom_layer("generic_liar", ShapeLiar)


# ---------------------------------------------------------------- atomicity
@pytest.mark.parametrize(
    ("name", "factory"),
    [
        ("bad-name", linear),
        ("generic_taken", Block),
        ("generic_new", 3),
        ("generic_new", lambda c: c),
        ("generic_new", lambda c, i: 3),
    ],
)
def test_failed_registration_changes_nothing(
    registry: ArchitectureRegistry, name: str, factory: Any
) -> None:
    registry.register_custom_layer("generic_taken", linear)
    before = registry.list_custom_layers()
    with pytest.raises(RegistrationError):
        registry.register_custom_layer(name, factory)
    assert registry.list_custom_layers() == before
    assert registry.get_layer_factory("generic_taken") is linear


# ---------------------------------------------------------------- lookups, listing
def test_lookup_miss_suggests(registry: ArchitectureRegistry) -> None:
    registry.register_custom_layer("grouped_query_attention", Block)
    with pytest.raises(KeyError, match="Did you mean 'grouped_query_attention'") as info:
        registry.get_layer_factory("grouped_query_atention")
    assert isinstance(info.value, UnknownLayerError)
    assert str(info.value).startswith("no custom layer registered as 'grouped_query_atention'")


def test_list_in_registration_order_and_pattern(registry: ArchitectureRegistry) -> None:
    registry.clear_custom_layers()
    for name in ["moe_b", "llama_a", "moe_a"]:
        registry.register_custom_layer(name, linear)
    assert registry.list_custom_layers() == ["moe_b", "llama_a", "moe_a"]
    assert registry.list_custom_layers("moe_*") == ["moe_b", "moe_a"]


def test_registration_record(registry: ArchitectureRegistry) -> None:
    registry.register_custom_layer("generic_rec", Block)
    record = registry.get_layer_registration("generic_rec")
    assert record.factory is Block
    assert record.module.endswith("test_registry")
    assert record.origin == "call"
    assert "Block" in record.defined_at


def test_register_layer_decorator_keeps_type(registry: ArchitectureRegistry) -> None:
    @register_layer("generic_decorated")
    class Decorated(Block):
        pass

    @register_layer("generic_decorated_fn")
    def decorated_fn(config: Any, layer_idx: int) -> nn.Module:
        return Block(config, layer_idx)

    assert isinstance(Decorated, type) and issubclass(Decorated, Block)
    assert registry.get_layer_factory("generic_decorated") is Decorated
    assert registry.get_layer_registration("generic_decorated_fn").origin == "decorator"
    assert decorated_fn.__name__ == "decorated_fn"


# ---------------------------------------------------------------- run-time types
@pytest.mark.parametrize(
    "call",
    [
        lambda r: r.register_custom_layer(3, linear),
        lambda r: r.register_custom_layer("generic_x", linear, replace="yes"),
        lambda r: r.get_layer_factory(None),
        lambda r: r.unregister_custom_layer(b"generic_x"),
        lambda r: r.list_custom_layers(5),
    ],
)
def test_wrong_argument_types_raise_typeerror(registry: ArchitectureRegistry, call: Any) -> None:
    with pytest.raises(TypeError) as info:
        call(registry)
    assert isinstance(info.value, ArgumentTypeError)
    assert isinstance(info.value, NexusSLIError)


# ---------------------------------------------------------------- scopes
def test_scopes_nest_and_restore(registry: ArchitectureRegistry) -> None:
    registry.register_custom_layer("generic_outer", linear)
    with registry.scoped({"generic_inner": Block}):
        assert registry.list_custom_layers()[-2:] == ["generic_outer", "generic_inner"]
        with registry.scoped({"generic_outer": Block}, replace=True):
            assert registry.get_layer_factory("generic_outer") is Block
            registry.unregister_custom_layer("generic_inner")
            assert "generic_inner" not in registry.list_custom_layers()
        assert registry.get_layer_factory("generic_outer") is linear
        assert registry.get_layer_factory("generic_inner") is Block
        registry.clear_custom_layers()
        assert registry.list_custom_layers() == []
    assert registry.get_layer_factory("generic_outer") is linear
    assert "generic_inner" not in registry.list_custom_layers()


def test_scope_restored_after_error(registry: ArchitectureRegistry) -> None:
    with pytest.raises(RuntimeError), registry.scoped({"generic_tmp": Block}):
        raise RuntimeError("boom")
    assert "generic_tmp" not in registry.list_custom_layers()


def test_scope_invisible_to_other_threads(registry: ArchitectureRegistry) -> None:
    seen: list[bool] = []
    with registry.scoped({"generic_private": Block}):
        thread = threading.Thread(
            target=lambda: seen.append("generic_private" in get_registry().list_custom_layers())
        )
        thread.start()
        thread.join()
    assert seen == [False]


# ---------------------------------------------------------------- threads
def test_concurrent_registration_loses_nothing() -> None:
    registry = ArchitectureRegistry.isolated()
    n_threads, per_thread = 8, 40
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_threads)

    def work(t: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                registry.register_custom_layer(f"thread{t}_layer{i}", linear, validate=False)
                registry.register_custom_layer(f"thread{t}_tmp{i}", linear, validate=False)
                assert registry.get_layer_factory(f"thread{t}_layer{i}") is linear
                assert registry.unregister_custom_layer(f"thread{t}_tmp{i}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    names = registry.list_custom_layers()
    assert sorted(names) == sorted(
        f"thread{t}_layer{i}" for t in range(n_threads) for i in range(per_thread)
    )


def test_concurrent_duplicates_one_winner() -> None:
    registry = ArchitectureRegistry.isolated()
    outcomes: list[str] = []
    factories = [Block, linear, CallableFactory(), Manager().make]
    barrier = threading.Barrier(len(factories))

    def work(factory: Any) -> None:
        barrier.wait()
        try:
            registry.register_custom_layer("generic_race", factory)
            outcomes.append("won")
        except DuplicateLayerError:
            outcomes.append("lost")

    threads = [threading.Thread(target=work, args=(f,)) for f in factories]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["lost", "lost", "lost", "won"]


def test_isolated_registry_is_separate() -> None:
    other = ArchitectureRegistry.isolated()
    other.register_custom_layer("generic_elsewhere", linear)
    assert "generic_elsewhere" not in get_registry().list_custom_layers()
    assert other is not get_registry()
    assert ArchitectureRegistry() is get_registry()


# ---------------------------------------------------------------- plugins
def _install_fake_distribution(tmp_path: Path, entry_points: str, modules: dict[str, str]) -> None:
    dist = tmp_path / "fake_layers-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-layers\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    for name, source in modules.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))


def test_plugins_loaded_lazily_and_failures_isolated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_fake_distribution(
        tmp_path,
        """
        [nexus_sli.layers]
        fake_good_layer = fake_plugin_good:make
        fake_bad_name = fake_plugin_bad:make
        fake_module = fake_plugin_module
        fake_broken_import = fake_plugin_missing:make
        """,
        {
            "fake_plugin_good": """
                from torch import nn
                def make(config, layer_idx):
                    return nn.Linear(config.hidden_size, config.hidden_size)
                """,
            "fake_plugin_bad": """
                def make(config):
                    return None
                """,
            "fake_plugin_module": """
                from torch import nn
                from nexus_sli import get_registry
                get_registry().register_custom_layer("fake_from_module", lambda c, i: nn.Identity())
                """,
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = ArchitectureRegistry.isolated()
    assert "fake_good_layer" not in registry.list_custom_layers()  # lazy: nothing loaded yet
    assert "fake_plugin_good" not in sys.modules
    factory = registry.get_layer_factory("fake_good_layer")
    assert callable(factory)
    assert registry.get_layer_registration("fake_good_layer").origin.startswith("entry point")
    report = registry.load_plugins()
    failed = {label: err for label, err in report.items() if err is not None}
    assert len(failed) == 2
    assert any("fake_bad_name" in label and "fake-layers" in label for label in failed)
    assert any("fake_broken_import" in label for label in failed)
    for err in failed.values():
        assert isinstance(err, ImportError) and isinstance(err, RegistrationError)


def test_exception_tree() -> None:
    assert issubclass(nexus_sli.InvalidLayerNameError, ValueError)
    assert issubclass(nexus_sli.DuplicateLayerError, ValueError)
    assert issubclass(nexus_sli.FactoryNotCallableError, TypeError)
    assert issubclass(nexus_sli.FactorySignatureError, TypeError)
    assert issubclass(nexus_sli.FactoryContractError, TypeError)
    assert issubclass(nexus_sli.UnknownLayerError, KeyError)
    assert issubclass(nexus_sli.UnknownFamilyError, KeyError)
    assert issubclass(nexus_sli.UnsupportedArchitectureError, ValueError)
    for name in nexus_sli.errors.__all__:
        assert issubclass(getattr(nexus_sli.errors, name), NexusSLIError)
