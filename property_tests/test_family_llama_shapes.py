"""Forward-shape contract of the Llama-style family: a meta-built layer keeps [batch, seq, hidden].

Random small valid configs of every model type; the layer is built under ``torch.device("meta")``
and called through ``probe_context`` + ``call_layer`` on meta tensors (shapes only, no data).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from nexus_sli.families.llama import LlamaFamily

FAMILY = LlamaFamily()
MODEL_TYPES = sorted(FAMILY.model_types)
META = torch.device("meta")


@st.composite
def configs(draw: st.DrawFn, model_type: str) -> Any:
    """A small valid config of ``model_type`` (hidden size a multiple of the head count)."""
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    heads = kv_heads * draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    hidden = heads * head_dim * draw(st.sampled_from([1, 2]))
    layers = draw(st.integers(1, 3))
    kwargs: dict[str, Any] = {
        "vocab_size": 64,
        "hidden_size": hidden,
        "intermediate_size": draw(st.integers(4, 64)),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "num_hidden_layers": layers,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if model_type != "phi3":  # phi3 derives head_dim = hidden // heads
        kwargs["head_dim"] = head_dim
    window = draw(st.integers(1, 8))
    if model_type in ("mistral", "mixtral", "phi3"):
        kwargs["sliding_window"] = draw(st.none() | st.just(window))
    elif model_type in ("qwen2", "qwen3"):
        kwargs["use_sliding_window"] = draw(st.booleans())
        kwargs["sliding_window"] = window
        kwargs["max_window_layers"] = draw(st.integers(0, layers))
    elif model_type == "gemma2":
        kwargs["sliding_window"] = window
        kwargs["query_pre_attn_scalar"] = head_dim
    if model_type == "mixtral":
        experts = draw(st.integers(1, 4))
        kwargs["num_local_experts"] = experts
        kwargs["num_experts_per_tok"] = draw(st.integers(1, experts))
    elif model_type == "qwen2_moe":
        experts = draw(st.integers(1, 4))
        kwargs["num_experts"] = experts
        kwargs["num_experts_per_tok"] = draw(st.integers(1, experts))
        kwargs["moe_intermediate_size"] = draw(st.integers(2, 32))
        kwargs["shared_expert_intermediate_size"] = draw(st.integers(2, 32))
        kwargs["decoder_sparse_step"] = draw(st.integers(1, 2))
        kwargs["mlp_only_layers"] = draw(st.lists(st.integers(0, layers - 1), unique=True))
    return CONFIG_MAPPING[model_type](**kwargs)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_meta_layer_preserves_shape(model_type: str) -> None:
    @settings(max_examples=15, deadline=None)
    @given(
        config=configs(model_type),
        batch=st.integers(1, 3),
        seq=st.integers(1, 9),
        pick=st.integers(0, 2),
    )
    def check(config: Any, batch: int, seq: int, pick: int) -> None:
        idx = pick % FAMILY.num_layers(config)
        with torch.device("meta"):
            layer = FAMILY.create_layer(config, idx)
        assert all(p.is_meta for p in layer.parameters())
        hidden = FAMILY.hidden_size(config)
        context = FAMILY.probe_context(config, batch, seq, device=META, dtype=torch.float32)
        inputs = torch.empty(batch, seq, hidden, device=META)
        out = FAMILY.call_layer(config, layer, inputs, context, idx)
        assert out.is_meta
        assert tuple(out.shape) == (batch, seq, hidden)
        assert out.dtype == torch.float32

    check()
