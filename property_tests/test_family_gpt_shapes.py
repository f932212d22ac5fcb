"""Forward-shape contract of the GPT-style families: a meta-built layer keeps [batch, seq, hidden].

Random small valid configs of gpt2, gptj, falcon (every attention/layernorm variant, rotary or
ALiBi), bloom, gpt_neox and opt; the layer is built under ``torch.device("meta")`` and called
through ``probe_context`` + ``call_layer`` on meta tensors (shapes only, no data).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from nexus_sli._family import ArchitectureFamily
from nexus_sli.families.gpt import GPTFamily
from nexus_sli.families.gpt_neox import GPTNeoXFamily
from nexus_sli.families.opt import OPTFamily

META = torch.device("meta")
FAMILIES: dict[str, ArchitectureFamily] = {
    "gpt2": GPTFamily(),
    "gptj": GPTFamily(),
    "falcon": GPTFamily(),
    "bloom": GPTFamily(),
    "gpt_neox": GPTNeoXFamily(),
    "opt": OPTFamily(),
}
EXAMPLES = {"falcon": 15}
SPECIAL: dict[str, Any] = {
    "vocab_size": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
ACTIVATIONS = st.sampled_from(["gelu", "gelu_new", "relu"])


@st.composite
def configs(draw: st.DrawFn, model_type: str) -> Any:
    """A small valid config of ``model_type`` (hidden size = heads * head_dim)."""
    heads = draw(st.sampled_from([1, 2, 3, 4, 6]))
    head_dim = draw(st.sampled_from([4, 8, 16]))  # even: rotary halves it
    hidden = heads * head_dim
    layers = draw(st.integers(1, 3))
    kwargs: dict[str, Any] = dict(SPECIAL)
    if model_type in ("gpt2", "gptj"):
        kwargs.update(
            n_embd=hidden,
            n_head=heads,
            n_layer=layers,
            n_positions=64,
            n_inner=draw(st.none() | st.integers(4, 64)),
            activation_function=draw(ACTIVATIONS),
        )
        if model_type == "gpt2":
            kwargs["scale_attn_by_inverse_layer_idx"] = draw(st.booleans())
            kwargs["add_cross_attention"] = draw(st.booleans())
        else:
            # an even number of rotated dims per head, at most the head size
            kwargs["rotary_dim"] = draw(st.sampled_from(sorted({2, 4, head_dim})))
    elif model_type == "falcon":
        new_arch = draw(st.booleans())
        kwargs.update(
            hidden_size=hidden,
            num_attention_heads=heads,
            num_hidden_layers=layers,
            max_position_embeddings=64,
            new_decoder_architecture=new_arch,
            multi_query=draw(st.booleans()),
            # new-architecture checkpoints are always parallel (their ln_attn/ln_mlp need it)
            parallel_attn=True if new_arch else draw(st.booleans()),
            alibi=draw(st.booleans()),
            bias=draw(st.booleans()),
            ffn_hidden_size=draw(st.integers(4, 64)),
        )
        if new_arch:
            kwargs["num_kv_heads"] = draw(st.sampled_from([d for d in (1, 2, 3) if heads % d == 0]))
            kwargs["num_ln_in_parallel_attn"] = draw(st.sampled_from([None, 1, 2]))
    elif model_type == "bloom":
        tp = draw(st.sampled_from([1, 2]))
        kwargs.update(
            hidden_size=hidden,
            n_head=heads,
            n_layer=layers,
            apply_residual_connection_post_layernorm=draw(st.booleans()),
            pretraining_tp=tp,
            slow_but_exact=draw(st.booleans()),
        )
    elif model_type == "gpt_neox":
        kwargs.update(
            hidden_size=hidden,
            num_attention_heads=heads,
            num_hidden_layers=layers,
            intermediate_size=draw(st.integers(4, 64)),
            max_position_embeddings=64,
            rotary_pct=draw(st.sampled_from([0.5, 1.0] if head_dim == 4 else [0.25, 0.5, 1.0])),
            use_parallel_residual=draw(st.booleans()),
            attention_bias=draw(st.booleans()),
        )
    else:
        kwargs.update(
            hidden_size=hidden,
            num_attention_heads=heads,
            num_hidden_layers=layers,
            ffn_dim=draw(st.integers(4, 64)),
            max_position_embeddings=64,
            word_embed_proj_dim=draw(st.sampled_from([hidden, 8])),
            do_layer_norm_before=draw(st.booleans()),
            enable_bias=draw(st.booleans()),
            layer_norm_elementwise_affine=draw(st.booleans()),
            activation_function=draw(ACTIVATIONS),
        )
    return CONFIG_MAPPING[model_type](**kwargs)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_meta_layer_preserves_shape(model_type: str) -> None:
    family = FAMILIES[model_type]
    assert model_type in family.model_types

    @settings(max_examples=EXAMPLES.get(model_type, 12), deadline=None)
    @given(
        config=configs(model_type),
        batch=st.integers(1, 3),
        seq=st.integers(1, 9),
        pick=st.integers(0, 2),
    )
    def check(config: Any, batch: int, seq: int, pick: int) -> None:
        idx = pick % family.num_layers(config)
        with torch.device("meta"):
            layer = family.create_layer(config, idx)
        assert all(t.is_meta for t in [*layer.parameters(), *layer.buffers()])
        for path in family.layer_roles(config).values():
            layer.get_submodule(path)
        hidden = family.hidden_size(config)
        context = family.probe_context(config, batch, seq, device=META, dtype=torch.float32)
        inputs = torch.empty(batch, seq, hidden, device=META)
        out = family.call_layer(config, layer, inputs, context, idx)
        assert out.is_meta
        assert tuple(out.shape) == (batch, seq, hidden)
        assert out.dtype == torch.float32

    check()
