"""Every code example of the seed documentation, run as written (import prefix ``nexus_sli``).

Classes the documentation elides (RMSNorm, SwiGLUFFN, FlashAttention, ...) are supplied here.
Examples whose documented output counts factory calls use ``validate=False``, because the
meta-device validation call would otherwise be counted too.
"""

from __future__ import annotations

import atexit
import math
from typing import Any

import pytest
import torch
import torch.nn as nn

from nexus_sli.architecture_registry import ArchitectureRegistry, get_registry


def make_config(**values: Any) -> Any:
    return type("Config", (), values)()


CONFIG = make_config(
    hidden_size=64, num_attention_heads=4, intermediate_size=128, max_position_embeddings=128
)


# ---------------------------------------------------------------- classes the doc elides
class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLUFFN(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down(nn.functional.silu(self.gate(x)) * self.up(x))
        return out


class GELUFFN(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(config.hidden_size, config.intermediate_size),
            nn.GELU(),
            nn.Linear(config.intermediate_size, config.hidden_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.net(x))


class ReLUUFFN(GELUFFN):
    pass


class _SelfAttention(nn.Module):
    def __init__(self, config: Any, layer_idx: int = 0) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(
            config.hidden_size, config.num_attention_heads, batch_first=True
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.attn(x, x, x)[0]
        return out


FlashAttention = MemoryEfficientAttention = StandardAttention = SparseAttention = _SelfAttention
CustomAttention = ExperimentalLayer = _SelfAttention


class CustomFFN(GELUFFN):
    def __init__(self, config: Any, layer_idx: int = 0) -> None:
        super().__init__(config)


class StandardLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)


class ModifiedLayer(StandardLayer):
    pass


# ---------------------------------------------------------------- Quick Start
def test_basic_registration() -> None:
    registry = ArchitectureRegistry()

    def my_custom_layer_factory(config: Any, layer_idx: int) -> nn.Module:
        """Create a custom layer."""
        return nn.Linear(config.hidden_size, config.hidden_size)

    registry.register_custom_layer(
        layer_name="my_custom_linear", layer_factory=my_custom_layer_factory
    )
    factory = registry.get_layer_factory("my_custom_linear")
    layer = factory(CONFIG, layer_idx=0)  # type: ignore[call-arg]
    assert isinstance(layer, nn.Linear)
    assert layer.in_features == CONFIG.hidden_size


class CustomAttentionLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.attention = nn.MultiheadAttention(
            embed_dim=config.hidden_size, num_heads=config.num_attention_heads
        )

    def forward(self, x: torch.Tensor) -> Any:
        return self.attention(x, x, x)


def test_class_factory() -> None:
    registry = ArchitectureRegistry()
    registry.register_custom_layer("custom_attention", CustomAttentionLayer)
    factory = registry.get_layer_factory("custom_attention")
    layer = factory(CONFIG, layer_idx=0)  # type: ignore[call-arg]
    assert isinstance(layer, CustomAttentionLayer)
    assert layer.layer_idx == 0


def test_lambda_factory() -> None:
    registry = ArchitectureRegistry()
    registry.register_custom_layer(
        "quick_linear", lambda config, idx: nn.Linear(config.hidden_size, config.intermediate_size)
    )
    layer = registry.get_layer_factory("quick_linear")(CONFIG, 0)
    assert isinstance(layer, nn.Linear)
    assert layer.out_features == CONFIG.intermediate_size


class RotaryEmbeddingWithScaling(nn.Module):
    """RoPE with learned position scaling."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.dim = config.hidden_size // config.num_attention_heads
        self.max_position = config.max_position_embeddings
        self.scaling = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor, seq_len: int) -> torch.Tensor:
        positions = torch.arange(seq_len, device=x.device)
        freqs = torch.exp(
            -torch.arange(0, self.dim, 2).float() * (torch.log(torch.tensor(10000.0)) / self.dim)
        )
        return positions.unsqueeze(1) * freqs.unsqueeze(0) * self.scaling


def test_full_example_rotary(capsys: pytest.CaptureFixture[str]) -> None:
    registry = get_registry()
    registry.register_custom_layer("llama_rotary_with_scaling", RotaryEmbeddingWithScaling)
    config = make_config(hidden_size=4096, num_attention_heads=32, max_position_embeddings=8192)
    factory = registry.get_layer_factory("llama_rotary_with_scaling")
    rope_layer = factory(config, layer_idx=0)  # type: ignore[call-arg]
    print(f"Created: {type(rope_layer).__name__}")
    assert capsys.readouterr().out == "Created: RotaryEmbeddingWithScaling\n"
    angles = rope_layer(torch.zeros(1), seq_len=4)
    assert angles.shape == (4, 64)


# ---------------------------------------------------------------- API reference
def test_api_reference_register_lambda() -> None:
    class RotaryFromConfig(RotaryEmbeddingWithScaling):
        def __init__(self, config: Any, layer_idx: int = 0) -> None:
            super().__init__(config, layer_idx)

    registry = ArchitectureRegistry()
    registry.register_custom_layer(
        "llama_rotary_with_scaling", lambda config, idx: RotaryFromConfig(config)
    )
    assert "llama_rotary_with_scaling" in registry.list_custom_layers()


def test_api_reference_get_layer_factory() -> None:
    registry = ArchitectureRegistry()
    registry.register_custom_layer("llama_custom_attn", CustomAttentionLayer)
    factory = registry.get_layer_factory("llama_custom_attn")
    layer = factory(CONFIG, layer_idx=0)  # type: ignore[call-arg]
    assert isinstance(layer, CustomAttentionLayer)


def test_api_reference_get_layer_factory_missing_lists_available() -> None:
    registry = ArchitectureRegistry()
    registry.register_custom_layer("llama_custom_attn", CustomAttentionLayer)
    with pytest.raises(KeyError, match=r"Available custom layers: 'llama_custom_attn'"):
        registry.get_layer_factory("llama_custom_attention_v2")


def test_api_reference_unregister(capsys: pytest.CaptureFixture[str]) -> None:
    registry = ArchitectureRegistry()
    registry.register_custom_layer("old_custom_layer", CustomAttentionLayer)
    removed = registry.unregister_custom_layer("old_custom_layer")
    print(f"Removed: {removed}")
    removed = registry.unregister_custom_layer("old_custom_layer")
    print(f"Removed: {removed}")
    assert capsys.readouterr().out == "Removed: True\nRemoved: False\n"


def test_api_reference_list(capsys: pytest.CaptureFixture[str]) -> None:
    registry = ArchitectureRegistry()
    registry.clear_custom_layers()
    registry.register_custom_layer("llama_rotary_scaling", RotaryEmbeddingWithScaling)
    registry.register_custom_layer("moe_expert_layer", CustomFFN)
    custom_layers = registry.list_custom_layers()
    print(f"Custom layers: {custom_layers}")
    assert (
        capsys.readouterr().out == "Custom layers: ['llama_rotary_scaling', 'moe_expert_layer']\n"
    )


def test_api_reference_clear() -> None:
    registry = ArchitectureRegistry()
    registry.register_custom_layer("llama_rotary_scaling", RotaryEmbeddingWithScaling)
    registry.clear_custom_layers()
    assert len(registry.list_custom_layers()) == 0


def test_get_registry_same_instance() -> None:
    registry = get_registry()
    assert registry is get_registry() is ArchitectureRegistry()


# ---------------------------------------------------------------- Advanced usage
class ComplexTransformerBlock(nn.Module):
    """Custom transformer block with configurable components."""

    def __init__(
        self,
        config: Any,
        layer_idx: int,
        attention_impl: str = "flash",
        norm_type: str = "rms",
        activation: str = "swiglu",
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attn: nn.Module
        if attention_impl == "flash":
            self.attn = FlashAttention(config)
        elif attention_impl == "memory_efficient":
            self.attn = MemoryEfficientAttention(config)
        else:
            self.attn = StandardAttention(config)
        self.norm1: nn.Module
        self.norm2: nn.Module
        if norm_type == "rms":
            self.norm1 = RMSNorm(config.hidden_size)
            self.norm2 = RMSNorm(config.hidden_size)
        else:
            self.norm1 = nn.LayerNorm(config.hidden_size)
            self.norm2 = nn.LayerNorm(config.hidden_size)
        self.ffn = self._create_ffn(config, activation)

    def _create_ffn(self, config: Any, activation: str) -> nn.Module:
        if activation == "swiglu":
            return SwiGLUFFN(config)
        elif activation == "gelu":
            return GELUFFN(config)
        else:
            return ReLUUFFN(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.ffn(self.norm2(x))
        return x


def create_complex_block_factory(attention_impl: str = "flash", norm_type: str = "rms") -> Any:
    """Create a factory for complex transformer blocks."""

    def factory(config: Any, layer_idx: int) -> ComplexTransformerBlock:
        return ComplexTransformerBlock(
            config, layer_idx, attention_impl=attention_impl, norm_type=norm_type
        )

    return factory


def test_complex_layer_factories() -> None:
    registry = ArchitectureRegistry()
    registry.register_custom_layer(
        "transformer_flash_rms", create_complex_block_factory("flash", "rms")
    )
    registry.register_custom_layer(
        "transformer_memory_layernorm",
        create_complex_block_factory("memory_efficient", "layernorm"),
    )
    block = registry.get_layer_factory("transformer_memory_layernorm")(CONFIG, 3)
    assert isinstance(block, ComplexTransformerBlock)
    assert isinstance(block.norm1, nn.LayerNorm)
    x = torch.randn(2, 5, CONFIG.hidden_size)
    assert block(x).shape == x.shape


class StatefulLayerFactory:
    """Factory that tracks created layers."""

    def __init__(self, layer_type: str = "standard") -> None:
        self.layer_type = layer_type
        self.created_count = 0
        self.layer_indices: list[int] = []

    def __call__(self, config: Any, layer_idx: int) -> nn.Module:
        self.created_count += 1
        self.layer_indices.append(layer_idx)
        if self.layer_type == "standard":
            return StandardLayer(config, layer_idx)
        return ModifiedLayer(config, layer_idx)

    def get_stats(self) -> dict[str, Any]:
        return {"total_created": self.created_count, "indices": self.layer_indices}


def test_factory_with_state(capsys: pytest.CaptureFixture[str]) -> None:
    registry = ArchitectureRegistry()
    factory = StatefulLayerFactory("modified")
    registry.register_custom_layer("stateful_modified", factory, validate=False)
    for i in range(5):
        registry.get_layer_factory("stateful_modified")(CONFIG, i)
    print(factory.get_stats())
    assert capsys.readouterr().out == "{'total_created': 5, 'indices': [0, 1, 2, 3, 4]}\n"


def test_factory_with_state_validated_counts_the_meta_build() -> None:
    registry = ArchitectureRegistry()
    factory = StatefulLayerFactory("modified")
    registry.register_custom_layer("stateful_modified", factory)
    assert factory.get_stats() == {"total_created": 1, "indices": [0]}


class ConfigurableLayerFactory:
    """Callable object that creates layers."""

    def __init__(self, use_bias: bool = True, dropout: float = 0.1) -> None:
        self.use_bias = use_bias
        self.dropout = dropout

    def __call__(self, config: Any, layer_idx: int) -> nn.Module:
        layers: list[nn.Module] = [
            nn.Linear(config.hidden_size, config.intermediate_size, bias=self.use_bias),
            nn.GELU(),
        ]
        if self.dropout > 0:
            layers.append(nn.Dropout(self.dropout))
        layers.append(nn.Linear(config.intermediate_size, config.hidden_size, bias=self.use_bias))
        return nn.Sequential(*layers)


def test_callable_objects_as_factories() -> None:
    registry = ArchitectureRegistry()
    no_bias_factory = ConfigurableLayerFactory(use_bias=False, dropout=0.0)
    registry.register_custom_layer("ffn_no_bias", no_bias_factory)
    regular_factory = ConfigurableLayerFactory(use_bias=True, dropout=0.1)
    registry.register_custom_layer("ffn_regular", regular_factory)
    no_bias = registry.get_layer_factory("ffn_no_bias")(CONFIG, 0)
    regular = registry.get_layer_factory("ffn_regular")(CONFIG, 0)
    assert isinstance(no_bias, nn.Sequential) and len(no_bias) == 3
    assert isinstance(regular, nn.Sequential) and len(regular) == 4


class LayerFactoryManager:
    """Manager class that creates different layer types."""

    def __init__(self, default_activation: str = "gelu") -> None:
        self.default_activation = default_activation
        self.created_layers: list[tuple[str, int]] = []

    def create_attention(self, config: Any, layer_idx: int) -> nn.Module:
        layer = nn.MultiheadAttention(
            embed_dim=config.hidden_size, num_heads=config.num_attention_heads
        )
        self.created_layers.append(("attention", layer_idx))
        return layer

    def create_ffn(self, config: Any, layer_idx: int) -> nn.Module:
        layer = nn.Sequential(
            nn.Linear(config.hidden_size, config.intermediate_size),
            nn.GELU() if self.default_activation == "gelu" else nn.ReLU(),
            nn.Linear(config.intermediate_size, config.hidden_size),
        )
        self.created_layers.append(("ffn", layer_idx))
        return layer


def test_bound_methods_as_factories(capsys: pytest.CaptureFixture[str]) -> None:
    registry = ArchitectureRegistry()
    manager = LayerFactoryManager()
    # validate=False: the documented output counts calls, and validation is a call.
    registry.register_custom_layer("managed_attention", manager.create_attention, validate=False)
    registry.register_custom_layer("managed_ffn", manager.create_ffn, validate=False)
    registry.get_layer_factory("managed_attention")(CONFIG, 0)
    registry.get_layer_factory("managed_ffn")(CONFIG, 0)
    print(manager.created_layers)
    assert capsys.readouterr().out == "[('attention', 0), ('ffn', 0)]\n"


def test_bound_methods_validated() -> None:
    registry = ArchitectureRegistry()
    manager = LayerFactoryManager()
    registry.register_custom_layer("managed_attention", manager.create_attention)
    # Re-registering the same bound method is a no-op, not a duplicate.
    registry.register_custom_layer("managed_attention", manager.create_attention)
    assert registry.list_custom_layers().count("managed_attention") == 1


# ---------------------------------------------------------------- Best practices
@pytest.mark.parametrize(
    "name",
    [
        "llama_rotary_with_scaling",
        "moe_sparse_expert",
        "gpt_neox_parallel_attn",
        "bert_alibi_position",
    ],
)
def test_good_names(name: str) -> None:
    ArchitectureRegistry().register_custom_layer(name, CustomAttentionLayer)
    assert name in ArchitectureRegistry().list_custom_layers()


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("layer1", "only one part"),
        ("custom", "only one part"),
        ("MyLayer", "uppercase"),
        ("transformer-block", "hyphens"),
    ],
)
def test_names_to_avoid(name: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        ArchitectureRegistry().register_custom_layer(name, CustomAttentionLayer)


def test_error_handling_safe_register(capsys: pytest.CaptureFixture[str]) -> None:
    registry = ArchitectureRegistry()

    def safe_register(layer_name: str, factory: Any) -> bool:
        """Safely register with error handling."""
        try:
            registry.register_custom_layer(layer_name, factory)
            print(f"✓ Registered: {layer_name}")
            return True
        except ValueError as e:
            if "already registered" in str(e):
                print(f"⚠ {layer_name} already exists, skipping")
                return False
            raise
        except TypeError as e:
            print(f"✗ Invalid factory for {layer_name}: {e}")
            return False

    assert safe_register("my_layer", lambda c, i: nn.Linear(c.hidden_size, c.hidden_size))
    assert not safe_register("my_layer", lambda c, i: nn.Linear(c.hidden_size, c.hidden_size))
    assert not safe_register("other_layer", "not a factory")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "✓ Registered: my_layer"
    assert lines[1] == "⚠ my_layer already exists, skipping"
    assert lines[2].startswith("✗ Invalid factory for other_layer: ")


def test_organization_register_all_layers() -> None:
    def register_all_layers() -> None:
        registry = get_registry()
        registry.register_custom_layer("flash_attn", FlashAttention)
        registry.register_custom_layer("sparse_attn", SparseAttention)
        registry.register_custom_layer("rms_norm", lambda c, i: RMSNorm(c.hidden_size))

    register_all_layers()
    assert get_registry().list_custom_layers()[-3:] == ["flash_attn", "sparse_attn", "rms_norm"]


class TestCustomLayer:
    """The documentation's test suite for custom layers, run against a registered layer."""

    @pytest.fixture(autouse=True)
    def _register(self) -> None:
        get_registry().register_custom_layer(
            "my_custom_layer", lambda c, i: nn.Linear(c.hidden_size, c.hidden_size)
        )

    @pytest.fixture
    def mock_config(self) -> Any:
        return type(
            "Config", (), {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072}
        )()

    def test_custom_layer_creation(self, mock_config: Any) -> None:
        factory = get_registry().get_layer_factory("my_custom_layer")
        layer = factory(mock_config, 0)
        assert layer is not None

    def test_custom_layer_forward(self, mock_config: Any) -> None:
        layer = get_registry().get_layer_factory("my_custom_layer")(mock_config, 0)
        x = torch.randn(2, 10, 768)
        assert layer(x).shape == x.shape

    def test_custom_layer_device(self, mock_config: Any) -> None:
        if not torch.cuda.is_available():
            pytest.skip("CUDA not available")
        layer = get_registry().get_layer_factory("my_custom_layer")(mock_config, 0).cuda()
        x = torch.randn(2, 10, 768).cuda()
        assert layer(x).is_cuda


# ---------------------------------------------------------------- Examples
class TaskSpecificExpert(nn.Module):
    """Expert layer specialized for different tasks."""

    def __init__(self, config: Any, layer_idx: int, task_type: str = "general") -> None:
        super().__init__()
        self.task_type = task_type
        self.layer_idx = layer_idx
        h, i = config.hidden_size, config.intermediate_size
        if task_type == "reasoning":
            self.ffn = nn.Sequential(
                nn.Linear(h, i * 2), nn.GELU(), nn.Linear(i * 2, i), nn.GELU(), nn.Linear(i, h)
            )
        elif task_type == "factual":
            self.ffn = nn.Sequential(nn.Linear(h, i * 4), nn.GELU(), nn.Linear(i * 4, h))
        else:
            self.ffn = nn.Sequential(nn.Linear(h, i), nn.GELU(), nn.Linear(i, h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.ffn(x)
        return out


def test_example_1_moe_expert() -> None:
    def create_expert_factory(task_type: str = "general") -> Any:
        def factory(config: Any, layer_idx: int) -> TaskSpecificExpert:
            return TaskSpecificExpert(config, layer_idx, task_type)

        return factory

    registry = get_registry()
    registry.register_custom_layer("moe_expert_reasoning", create_expert_factory("reasoning"))
    registry.register_custom_layer("moe_expert_factual", create_expert_factory("factual"))
    registry.register_custom_layer("moe_expert_general", create_expert_factory("general"))

    class MoELayer(nn.Module):
        def __init__(self, config: Any) -> None:
            super().__init__()
            self.num_experts = config.num_experts
            self.experts = nn.ModuleList(
                [
                    registry.get_layer_factory("moe_expert_general")(config, i)
                    for i in range(self.num_experts)
                ]
            )
            self.router = nn.Linear(config.hidden_size, self.num_experts)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            weights = torch.softmax(self.router(x), dim=-1)
            output: torch.Tensor = sum(
                w.unsqueeze(-1) * expert(x)
                for w, expert in zip(weights.unbind(-1), self.experts, strict=True)
            )
            return output

    config = make_config(hidden_size=32, intermediate_size=64, num_experts=3)
    moe = MoELayer(config)
    x = torch.randn(2, 4, 32)
    assert moe(x).shape == x.shape
    assert all(e.task_type == "general" for e in moe.experts)


class MultiQueryAttention(nn.Module):
    """Multi-Query Attention for efficient inference."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(self.hidden_size, self.hidden_size)
        self.k_proj = nn.Linear(self.hidden_size, self.head_dim)
        self.v_proj = nn.Linear(self.hidden_size, self.head_dim)
        self.o_proj = nn.Linear(self.hidden_size, self.hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        batch_size, seq_len, _ = hidden_states.shape
        q = self.q_proj(hidden_states)
        k = self.k_proj(hidden_states)
        v = self.v_proj(hidden_states)
        q = q.view(batch_size, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.unsqueeze(1).expand(-1, self.num_heads, -1, -1)
        v = v.unsqueeze(1).expand(-1, self.num_heads, -1, -1)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        if attention_mask is not None:
            scores += attention_mask
        attn = torch.softmax(scores, dim=-1)
        output = torch.matmul(attn, v)
        output = output.transpose(1, 2).contiguous().view(batch_size, seq_len, self.hidden_size)
        out: torch.Tensor = self.o_proj(output)
        return out


class GroupedQueryAttention(nn.Module):
    """Grouped Query Attention - balance between MHA and MQA."""

    def __init__(self, config: Any, layer_idx: int, num_kv_groups: int = 4) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_groups = num_kv_groups
        self.head_dim = self.hidden_size // self.num_heads
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(self.hidden_size, self.hidden_size)
        self.k_proj = nn.Linear(self.hidden_size, self.head_dim * num_kv_groups)
        self.v_proj = nn.Linear(self.hidden_size, self.head_dim * num_kv_groups)
        self.o_proj = nn.Linear(self.hidden_size, self.hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        batch_size, seq_len, _ = hidden_states.shape
        q = self.q_proj(hidden_states)
        k = self.k_proj(hidden_states)
        v = self.v_proj(hidden_states)
        q = q.view(batch_size, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch_size, seq_len, self.num_kv_groups, self.head_dim).transpose(1, 2)
        v = v.view(batch_size, seq_len, self.num_kv_groups, self.head_dim).transpose(1, 2)
        k = k.repeat_interleave(self.num_heads // self.num_kv_groups, dim=1)
        v = v.repeat_interleave(self.num_heads // self.num_kv_groups, dim=1)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        if attention_mask is not None:
            scores += attention_mask
        attn = torch.softmax(scores, dim=-1)
        output = torch.matmul(attn, v)
        output = output.transpose(1, 2).contiguous().view(batch_size, seq_len, self.hidden_size)
        out: torch.Tensor = self.o_proj(output)
        return out


def test_example_2_attention_variants(capsys: pytest.CaptureFixture[str]) -> None:
    registry = get_registry()
    registry.register_custom_layer("multi_query_attention", MultiQueryAttention)
    registry.register_custom_layer("grouped_query_attention", GroupedQueryAttention)
    config = make_config(hidden_size=4096, num_attention_heads=32)
    with torch.device("meta"):  # the sizes of the documented example, without allocating them
        mqa_layer = registry.get_layer_factory("multi_query_attention")(config, 0)
        gqa_layer = registry.get_layer_factory("grouped_query_attention")(config, 0)
    print(f"MQA parameters: {sum(p.numel() for p in mqa_layer.parameters()):,}")
    print(f"GQA parameters: {sum(p.numel() for p in gqa_layer.parameters()):,}")
    assert capsys.readouterr().out == "MQA parameters: 34,611,456\nGQA parameters: 37,757,952\n"
    small = make_config(hidden_size=64, num_attention_heads=8)
    x = torch.randn(2, 5, 64)
    assert registry.get_layer_factory("grouped_query_attention")(small, 0)(x).shape == x.shape
    assert registry.get_layer_factory("multi_query_attention")(small, 0)(x).shape == x.shape


def test_example_4_lifecycle(capsys: pytest.CaptureFixture[str]) -> None:
    class LayerRegistryManager:
        """Manage custom layer lifecycle."""

        def __init__(self) -> None:
            self.registry = ArchitectureRegistry()
            self.registered_layers: list[str] = []
            atexit.register(self.cleanup)

        def register(self, name: str, factory: Any, temporary: bool = False) -> str:
            self.registry.register_custom_layer(name, factory)
            if not temporary:
                self.registered_layers.append(name)
            print(f"Registered {'temporary ' if temporary else ''}layer: {name}")
            return name

        def get(self, name: str) -> Any:
            return self.registry.get_layer_factory(name)

        def unregister(self, name: str) -> bool:
            success = self.registry.unregister_custom_layer(name)
            if success and name in self.registered_layers:
                self.registered_layers.remove(name)
            return success

        def cleanup(self) -> None:
            print(f"Cleaning up {len(self.registered_layers)} layers...")
            for name in list(self.registered_layers):
                self.unregister(name)
            print("Cleanup complete")

    manager = LayerRegistryManager()
    try:
        manager.register("permanent_attention", CustomAttention)
        manager.register("permanent_ffn", CustomFFN)
        manager.register("temp_experimental", ExperimentalLayer, temporary=True)
        layer = manager.get("permanent_attention")(CONFIG, 0)
        assert isinstance(layer, CustomAttention)
        manager.cleanup()  # what atexit would run at interpreter exit
    finally:
        atexit.unregister(manager.cleanup)
    assert capsys.readouterr().out.splitlines() == [
        "Registered layer: permanent_attention",
        "Registered layer: permanent_ffn",
        "Registered temporary layer: temp_experimental",
        "Cleaning up 2 layers...",
        "Cleanup complete",
    ]
    assert manager.registry.list_custom_layers()[-1:] == ["temp_experimental"]
    assert "permanent_attention" not in manager.registry.list_custom_layers()
