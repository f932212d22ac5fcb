"""Families in the registry: registration rules, detection, explain, remote code, seed examples."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
import torch.nn as nn
from transformers import AutoConfig, PretrainedConfig

from nexus_sli import (
    ArchitectureFamily,
    ArchitectureRegistry,
    DuplicateFamilyError,
    InvalidFamilyError,
    RemoteCodeError,
    UnknownFamilyError,
    UnsupportedArchitectureError,
    get_registry,
)
from nexus_sli.families import builtin_families

BUILTIN_MODEL_TYPES = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "phi3",
    "gpt2",
    "gpt_neox",
    "gptj",
    "falcon",
    "opt",
    "bloom",
    "mixtral",
    "qwen2_moe",
    "bert",
    "roberta",
    "t5",
    "mamba",
]


class ToyFamily(ArchitectureFamily):
    family_id = "toy"
    family_name = "Toy"
    model_types: ClassVar[list[str]] = ["toy"]
    architectures: ClassVar[list[str]] = ["ToyForCausalLM"]

    def get_layer_prefix(
        self, layer_idx: int, layer_type: str = "decoder", *, model_prefix: str | None = None
    ) -> str:
        return f"model.layers.{layer_idx}."

    def create_layer(self, config: Any, layer_idx: int, layer_type: str = "decoder") -> nn.Module:
        return nn.Linear(config.hidden_size, config.hidden_size)


@pytest.mark.parametrize("model_type", BUILTIN_MODEL_TYPES)
def test_every_builtin_model_type_detected(model_type: str) -> None:
    config = AutoConfig.for_model(model_type)
    explanation = get_registry().explain(config)
    assert explanation.rule == "model_type"
    family = get_registry().detect_family(config)
    assert model_type in family.model_types
    assert explanation.family_id == family.family_id


def test_builtin_families_registered() -> None:
    ids = get_registry().list_families()
    assert ids[: len(builtin_families())] == [f.family_id for f in builtin_families()]
    covered = {m for f in builtin_families() for m in f.model_types}
    assert set(BUILTIN_MODEL_TYPES) <= covered
    info = get_registry().get_family_info("llama")
    assert info["family_id"] == "llama"
    assert "mistral" in info["model_types"]


def test_detection_by_exact_architecture() -> None:
    registry = get_registry()
    registry.register("toy", ToyFamily())
    config = {"model_type": "something_else", "architectures": ["ToyForCausalLM"]}
    assert registry.explain(config).rule == "architectures"
    assert registry.detect_family(config).family_id == "toy"


def test_unknown_architecture_never_falls_back() -> None:
    config = {"model_type": "llamaX", "architectures": ["LlamaXForCausalLM"]}
    with pytest.raises(UnsupportedArchitectureError) as info:
        get_registry().detect_family(config)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "'llamaX'" in message and "LlamaXForCausalLM" in message
    assert "Closest supported: llama" in message
    explanation = get_registry().explain(config)
    assert explanation.family_id is None
    assert "llama" in explanation.considered
    assert "matched: nothing" in str(explanation)


def test_no_substring_guessing() -> None:
    with pytest.raises(UnsupportedArchitectureError):
        get_registry().detect_family({"model_type": "my_llama", "architectures": ["MyLlamaModel"]})


def test_register_family_rules() -> None:
    registry = get_registry()
    with pytest.raises(InvalidFamilyError, match="invalid family id"):
        registry.register("Toy-Family", ToyFamily())
    with pytest.raises(InvalidFamilyError, match="declares family_id 'toy'"):
        registry.register("other", ToyFamily())

    class Empty(ToyFamily):
        family_id = "empty"
        model_types: ClassVar[list[str]] = []
        architectures: ClassVar[list[str]] = []

    with pytest.raises(InvalidFamilyError, match="could never be detected"):
        registry.register("empty", Empty())
    registry.register("toy", ToyFamily())
    with pytest.raises(DuplicateFamilyError, match="already registered"):
        registry.register("toy", ToyFamily())

    class Thief(ToyFamily):
        family_id = "thief"
        model_types: ClassVar[list[str]] = ["llama"]
        architectures: ClassVar[list[str]] = []

    before = registry.list_families()
    with pytest.raises(
        DuplicateFamilyError, match="model_type 'llama' is already claimed by family 'llama'"
    ):
        registry.register("thief", Thief())
    assert registry.list_families() == before
    registry.register("thief", Thief(), replace=True)
    assert registry.detect_family({"model_type": "llama"}).family_id == "thief"
    with pytest.raises(UnknownFamilyError, match="Did you mean 'toy'"):
        registry.get_family("tyo")
    assert registry.unregister_family("thief")
    assert not registry.unregister_family("thief")


def test_family_changes_are_scoped() -> None:
    with get_registry().scoped():
        get_registry().register("toy", ToyFamily())
        assert "toy" in get_registry().list_families()
    assert "toy" not in get_registry().list_families()


def test_remote_code_refused_unless_opted_in() -> None:
    config = {"model_type": "llama", "auto_map": {"AutoModel": "modeling_x.XModel"}}
    with pytest.raises(RemoteCodeError, match="trust_remote_code=True"):
        get_registry().detect_family(config)
    assert get_registry().detect_family(config, trust_remote_code=True).family_id == "llama"


@pytest.mark.parametrize(
    ("model_type", "values", "moe"),
    [
        ("mixtral", {"num_local_experts": 4}, True),
        ("qwen2_moe", {"num_experts": 4}, True),
        ("qwen2_moe", {"num_experts": 0}, False),
        ("llama", {}, False),
        ("llama", {"num_experts": 0}, False),
        ("llama", {"num_local_experts": None}, False),
    ],
)
def test_moe_from_values(model_type: str, values: dict[str, Any], moe: bool) -> None:
    config = AutoConfig.for_model(model_type)
    for key, value in values.items():
        setattr(config, key, value)
    assert get_registry().detect_family(config).is_moe(config) is moe


def test_isolated_registry_has_builtins() -> None:
    other = ArchitectureRegistry.isolated()
    assert other.list_families() == get_registry().list_families()[: len(other.list_families())]


# ---------------------------------------------------------------- seed Example 3 and Integration
class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))


class SwiGLUFFN(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)


class GroupedQueryAttention(nn.Module):
    def __init__(self, config: Any, layer_idx: int, num_kv_groups: int = 4) -> None:
        super().__init__()
        head_dim = config.hidden_size // config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, head_dim * num_kv_groups)


class CustomTransformerBlock(nn.Module):
    def __init__(self, config: Any, layer_idx: int, attention: nn.Module) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attention = attention
        registry = ArchitectureRegistry()
        norm_factory = registry.get_layer_factory("rms_norm")
        self.norm1 = norm_factory(config, layer_idx)
        self.norm2 = norm_factory(config, layer_idx)
        self.ffn = registry.get_layer_factory("swiglu_ffn")(config, layer_idx)


class CustomArchitectureHandler(ArchitectureFamily):
    family_id = "custom_transformer"
    family_name = "Custom Transformer Architecture"
    model_types: ClassVar[list[str]] = ["custom_transformer"]
    architectures: ClassVar[list[str]] = ["CustomTransformerForCausalLM"]

    def get_layer_prefix(  # type: ignore[override]
        self, layer_idx: int, layer_type: str = "decoder"
    ) -> str:
        return f"model.layers.{layer_idx}."

    def create_layer(
        self, config: PretrainedConfig, layer_idx: int, layer_type: str = "decoder"
    ) -> nn.Module:
        registry = ArchitectureRegistry()
        attention = registry.get_layer_factory("grouped_query_attention")(config, layer_idx)
        return CustomTransformerBlock(config, layer_idx, attention)


def test_seed_example_3_complete_custom_architecture(capsys: pytest.CaptureFixture[str]) -> None:
    registry = ArchitectureRegistry()
    registry.register_custom_layer("grouped_query_attention", GroupedQueryAttention)
    registry.register_custom_layer("rms_norm", lambda c, i: RMSNorm(c.hidden_size))
    registry.register_custom_layer("swiglu_ffn", lambda c, i: SwiGLUFFN(c))
    registry.register("custom_transformer", CustomArchitectureHandler())
    values: dict[str, Any] = {
        "model_type": "custom_transformer",
        "architectures": ["CustomTransformerForCausalLM"],
        "hidden_size": 2048,
        "num_attention_heads": 16,
        "intermediate_size": 8192,
    }
    config = PretrainedConfig(**values)
    family = registry.detect_family(config)
    print(f"Detected family: {family.family_id}")
    with torch.device("meta"):  # the documented sizes, without allocating them
        layer = family.create_layer(config, 0)
    print(f"Created layer: {type(layer).__name__}")
    assert capsys.readouterr().out == (
        "Detected family: custom_transformer\nCreated layer: CustomTransformerBlock\n"
    )


class StandardTransformerBlock(nn.Module):
    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)


class OptimizedTransformerBlock(StandardTransformerBlock):
    pass


class CustomFamilyWithCustomLayers(ArchitectureFamily):
    family_id = "hybrid"
    family_name = "Hybrid Architecture"
    model_types: ClassVar[list[str]] = ["hybrid"]
    architectures: ClassVar[list[str]] = ["HybridForCausalLM"]

    def __init__(self) -> None:
        super().__init__()
        self.registry = ArchitectureRegistry()

    def get_layer_prefix(  # type: ignore[override]
        self, layer_idx: int, layer_type: str = "decoder"
    ) -> str:
        return f"model.layers.{layer_idx}."

    def create_layer(
        self, config: PretrainedConfig, layer_idx: int, layer_type: str = "decoder"
    ) -> nn.Module:
        custom_layer_type = getattr(config, "custom_layer_type", "default")
        if custom_layer_type == "optimized":
            factory = self.registry.get_layer_factory("optimized_transformer_block")
            return factory(config, layer_idx)
        return StandardTransformerBlock(config, layer_idx)


def test_seed_integration_custom_family_with_custom_layers() -> None:
    def create_optimized_block(config: Any, layer_idx: int) -> nn.Module:
        return OptimizedTransformerBlock(config, layer_idx)

    registry = ArchitectureRegistry()
    registry.register_custom_layer("optimized_transformer_block", create_optimized_block)
    registry.register("hybrid", CustomFamilyWithCustomLayers())
    values: dict[str, Any] = {"hidden_size": 32, "custom_layer_type": "optimized"}
    config = PretrainedConfig(**values)
    setattr(config, "model_type", "hybrid")  # noqa: B010 - a class attribute set on the instance
    family = registry.detect_family(config)
    assert isinstance(family.create_layer(config, 0), OptimizedTransformerBlock)
    config.custom_layer_type = "default"
    assert type(family.create_layer(config, 0)) is StandardTransformerBlock
