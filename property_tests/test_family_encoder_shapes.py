"""Property: for random small valid configs, a meta-built layer maps [b, s, hidden] to itself.

Families: bert, roberta, t5 (encoder and decoder stacks), mamba. Everything runs on the meta
device (shapes only, nothing allocated), through ``probe_context`` + ``call_layer``.
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import BertConfig, MambaConfig, RobertaConfig, T5Config

from nexus_sli._family import ArchitectureFamily
from nexus_sli.families.bert import BertFamily, RobertaFamily
from nexus_sli.families.mamba import MambaFamily
from nexus_sli.families.t5 import T5Family

META = torch.device("meta")
SETTINGS = settings(max_examples=15, deadline=None)

batches = st.integers(min_value=1, max_value=3)
seqs = st.integers(min_value=1, max_value=9)


def _check(
    family: ArchitectureFamily,
    config: Any,
    layer_idx: int,
    layer_type: str,
    batch: int,
    seq: int,
) -> None:
    hidden_size = family.hidden_size(config)
    with torch.device(META):
        layer = family.create_layer(config, layer_idx, layer_type)
    for name, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
        assert tensor.is_meta, name
    layer.eval()
    context = family.probe_context(
        config, batch, seq, device=META, dtype=torch.float32, layer_type=layer_type
    )
    hidden = torch.empty((batch, seq, hidden_size), device=META)
    with torch.no_grad():
        out = family.call_layer(config, layer, hidden, context, layer_idx, layer_type)
    assert out.is_meta
    assert tuple(out.shape) == (batch, seq, hidden_size)


@st.composite
def bert_like_configs(draw: st.DrawFn, roberta: bool) -> Any:
    heads = draw(st.integers(min_value=1, max_value=4))
    head_dim = draw(st.sampled_from([4, 8]))
    kwargs: dict[str, Any] = {
        "vocab_size": 64,
        "hidden_size": heads * head_dim,
        "num_hidden_layers": 2,
        "num_attention_heads": heads,
        "intermediate_size": draw(st.integers(min_value=4, max_value=64)),
        "hidden_act": draw(st.sampled_from(["gelu", "relu", "silu", "gelu_new"])),
        "max_position_embeddings": 32,
        "type_vocab_size": draw(st.integers(min_value=1, max_value=3)),
        "is_decoder": draw(st.booleans()),
    }
    if roberta:
        return RobertaConfig(pad_token_id=1, **kwargs)
    return BertConfig(pad_token_id=0, **kwargs)


@SETTINGS
@given(config=bert_like_configs(roberta=False), idx=st.integers(0, 1), batch=batches, seq=seqs)
def test_bert_layer_preserves_shape(config: Any, idx: int, batch: int, seq: int) -> None:
    _check(BertFamily(), config, idx, "encoder", batch, seq)


@SETTINGS
@given(config=bert_like_configs(roberta=True), idx=st.integers(0, 1), batch=batches, seq=seqs)
def test_roberta_layer_preserves_shape(config: Any, idx: int, batch: int, seq: int) -> None:
    _check(RobertaFamily(), config, idx, "encoder", batch, seq)


@st.composite
def t5_configs(draw: st.DrawFn) -> Any:
    return T5Config(
        vocab_size=64,
        d_model=draw(st.integers(min_value=4, max_value=48)),
        d_kv=draw(st.sampled_from([2, 4, 8])),
        d_ff=draw(st.integers(min_value=4, max_value=64)),
        num_layers=2,
        num_decoder_layers=draw(st.integers(min_value=1, max_value=3)),
        num_heads=draw(st.integers(min_value=1, max_value=4)),
        relative_attention_num_buckets=draw(st.sampled_from([4, 8, 32])),
        relative_attention_max_distance=draw(st.sampled_from([8, 16, 128])),
        feed_forward_proj=draw(st.sampled_from(["relu", "gated-gelu", "gated-silu"])),
    )


@SETTINGS
@given(
    config=t5_configs(),
    stack=st.sampled_from(["encoder", "decoder"]),
    first=st.booleans(),
    batch=batches,
    seq=seqs,
)
def test_t5_block_preserves_shape(
    config: Any, stack: str, first: bool, batch: int, seq: int
) -> None:
    family = T5Family()
    # block 0 owns the relative position bias table; the last block has none
    idx = 0 if first else family.num_layers(config, stack) - 1
    _check(family, config, idx, stack, batch, seq)


@st.composite
def mamba_configs(draw: st.DrawFn) -> Any:
    return MambaConfig(
        vocab_size=64,
        hidden_size=draw(st.integers(min_value=4, max_value=48)),
        num_hidden_layers=2,
        state_size=draw(st.integers(min_value=1, max_value=16)),
        expand=draw(st.integers(min_value=1, max_value=3)),
        conv_kernel=draw(st.integers(min_value=1, max_value=4)),
        time_step_rank=draw(st.one_of(st.just("auto"), st.integers(min_value=1, max_value=8))),
        use_conv_bias=draw(st.booleans()),
        use_bias=draw(st.booleans()),
        residual_in_fp32=draw(st.booleans()),
    )


@SETTINGS
@given(config=mamba_configs(), idx=st.integers(0, 1), batch=batches, seq=seqs)
def test_mamba_block_preserves_shape(config: Any, idx: int, batch: int, seq: int) -> None:
    _check(MambaFamily(), config, idx, "decoder", batch, seq)
