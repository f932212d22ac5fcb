"""A zoo of tiny random checkpoints, one per built-in model type, and their transformers oracles.

For every zoo name (a transformers ``model_type``, or a config variant of one) this module
knows a tiny config (hidden size 32-48, 2 layers, vocabulary of 120 with special token ids
inside it), the head class the checkpoint is saved from (``*ForCausalLM``, ``*ForMaskedLM``,
``T5ForConditionalGeneration``, ``MambaForCausalLM``) and the base class (what ``AutoModel``
builds). :func:`save_model` writes a seeded random model with ``save_pretrained`` (single file
or sharded); :func:`oracle` loads a saved checkpoint back into transformers and returns its
outputs in nexus_sli's conventions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import transformers
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    BloomConfig,
    FalconConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    MambaConfig,
    OPTConfig,
    PretrainedConfig,
    RobertaConfig,
    T5Config,
    T5EncoderModel,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_MAPPING_NAMES,
)

__all__ = [
    "MAX_LEN",
    "SHARDED_INDEX",
    "VOCAB",
    "ZOO",
    "ZOO_NAMES",
    "Oracle",
    "ZooModel",
    "base_class",
    "head_class",
    "inputs",
    "make_config",
    "oracle",
    "save_model",
]

VOCAB = 120
PAD, BOS, EOS = 0, 1, 2
#: Length of the padded test batches; sliding windows below are shorter.
MAX_LEN = 9
LENGTHS = (MAX_LEN, 6, 3, 8)
SHARDED_INDEX = "model.safetensors.index.json"

#: ``"causal_lm"``: the oracle is ``AutoModelForCausalLM`` (``AutoModel`` for a base checkpoint);
#: ``"masked_lm"``: ``AutoModelForMaskedLM`` (``AutoModel``); ``"t5_encoder"``: the encoder stack
#: (``T5EncoderModel``), no logits.
OracleKind = Literal["causal_lm", "masked_lm", "t5_encoder"]
#: ``"standard"``: transformers' hidden_states already are (embeddings, every layer's output, the
#: last one after the final norm). ``"mamba"``: transformers gives (every layer's output, the
#: final norm of the last) with no embeddings; see :func:`oracle`.
HiddenConvention = Literal["standard", "mamba"]

_TOKENS: dict[str, Any] = {
    "vocab_size": VOCAB,
    "pad_token_id": PAD,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
}
_LLAMA_COMMON: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "max_position_embeddings": 64,
    **_TOKENS,
}


def _llama_like(model_type: str, **extra: Any) -> Callable[[], PretrainedConfig]:
    def make() -> PretrainedConfig:
        config: PretrainedConfig = CONFIG_MAPPING[model_type](**{**_LLAMA_COMMON, **extra})
        return config

    return make


def _gpt2() -> PretrainedConfig:
    return GPT2Config(n_embd=32, n_head=4, n_layer=2, n_positions=64, **_TOKENS)


def _gptj() -> PretrainedConfig:
    return GPTJConfig(n_embd=32, n_head=4, n_layer=2, n_positions=64, rotary_dim=4, **_TOKENS)


def _gpt_neox() -> PretrainedConfig:
    extra: dict[str, Any] = {"rotary_pct": 0.5, **_TOKENS}
    return GPTNeoXConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=64,
        max_position_embeddings=64,
        **extra,
    )


def _falcon() -> PretrainedConfig:
    return FalconConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, **_TOKENS)


def _falcon_new_arch() -> PretrainedConfig:
    return FalconConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_kv_heads=2,
        num_hidden_layers=2,
        new_decoder_architecture=True,
        **_TOKENS,
    )


def _falcon_alibi() -> PretrainedConfig:
    # 6 heads: not a power of two, so ALiBi needs its extra slopes.
    return FalconConfig(
        hidden_size=48,
        num_attention_heads=6,
        num_hidden_layers=2,
        alibi=True,
        multi_query=False,
        parallel_attn=False,
        bias=True,
        **_TOKENS,
    )


def _falcon_new_arch_alibi() -> PretrainedConfig:
    return FalconConfig(
        hidden_size=48,
        num_attention_heads=6,
        num_kv_heads=3,
        num_hidden_layers=2,
        new_decoder_architecture=True,
        alibi=True,
        **_TOKENS,
    )


def _opt() -> PretrainedConfig:
    return OPTConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=2,
        ffn_dim=64,
        max_position_embeddings=64,
        **_TOKENS,
    )


def _opt_proj() -> PretrainedConfig:
    # word_embed_proj_dim != hidden_size: project_in / project_out around the decoder.
    return OPTConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=2,
        ffn_dim=64,
        max_position_embeddings=64,
        word_embed_proj_dim=16,
        **_TOKENS,
    )


def _bloom() -> PretrainedConfig:
    return BloomConfig(hidden_size=32, n_head=4, n_layer=2, **_TOKENS)


def _bert() -> PretrainedConfig:
    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        type_vocab_size=2,
        pad_token_id=PAD,
    )


def _roberta() -> PretrainedConfig:
    # RoBERTa's pad id is 1 (positions count from pad_token_id + 1).
    return RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )


def _t5() -> PretrainedConfig:
    return T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        pad_token_id=PAD,
        eos_token_id=1,
    )


def _mamba() -> PretrainedConfig:
    return MambaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        state_size=8,
        expand=2,
        conv_kernel=3,
        **_TOKENS,
    )


@dataclass(frozen=True)
class ZooModel:
    """One model type (or config variant) of the zoo."""

    name: str
    model_type: str
    make_config: Callable[[], PretrainedConfig]
    oracle_kind: OracleKind
    pad_token_id: int = PAD
    hidden_convention: HiddenConvention = "standard"

    @property
    def has_lm_head(self) -> bool:
        """Whether nexus_sli streams logits for this model (T5: the encoder stack only)."""
        return self.oracle_kind != "t5_encoder"


def _zoo(*models: ZooModel) -> dict[str, ZooModel]:
    return {model.name: model for model in models}


ZOO: Mapping[str, ZooModel] = _zoo(
    # Llama-style decoders (sliding windows of 4 < MAX_LEN)
    ZooModel("llama", "llama", _llama_like("llama", attention_bias=True), "causal_lm"),
    ZooModel(
        "mistral", "mistral", _llama_like("mistral", sliding_window=4, head_dim=8), "causal_lm"
    ),
    ZooModel(
        "qwen2",
        "qwen2",
        _llama_like("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1),
        "causal_lm",
    ),
    ZooModel(
        "qwen3", "qwen3", _llama_like("qwen3", head_dim=8, tie_word_embeddings=True), "causal_lm"
    ),
    ZooModel("gemma", "gemma", _llama_like("gemma", head_dim=8), "causal_lm"),
    ZooModel(
        "gemma2",
        "gemma2",
        _llama_like("gemma2", head_dim=8, sliding_window=4, query_pre_attn_scalar=8),
        "causal_lm",
    ),
    ZooModel("phi3", "phi3", _llama_like("phi3"), "causal_lm"),
    ZooModel(
        "mixtral",
        "mixtral",
        _llama_like("mixtral", num_local_experts=4, num_experts_per_tok=2),
        "causal_lm",
    ),
    ZooModel(
        "qwen2_moe",
        "qwen2_moe",
        _llama_like(
            "qwen2_moe",
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            mlp_only_layers=[1],
        ),
        "causal_lm",
    ),
    # GPT-style decoders
    ZooModel("gpt2", "gpt2", _gpt2, "causal_lm"),
    ZooModel("gpt_neox", "gpt_neox", _gpt_neox, "causal_lm"),
    ZooModel("gptj", "gptj", _gptj, "causal_lm"),
    ZooModel("falcon", "falcon", _falcon, "causal_lm"),
    ZooModel("falcon_new_arch", "falcon", _falcon_new_arch, "causal_lm"),
    ZooModel("falcon_alibi", "falcon", _falcon_alibi, "causal_lm"),
    ZooModel("falcon_new_arch_alibi", "falcon", _falcon_new_arch_alibi, "causal_lm"),
    ZooModel("opt", "opt", _opt, "causal_lm"),
    ZooModel("opt_proj", "opt", _opt_proj, "causal_lm"),
    ZooModel("bloom", "bloom", _bloom, "causal_lm"),
    # encoders, T5's encoder stack, Mamba
    ZooModel("bert", "bert", _bert, "masked_lm"),
    ZooModel("roberta", "roberta", _roberta, "masked_lm", pad_token_id=1),
    ZooModel("t5", "t5", _t5, "t5_encoder"),
    ZooModel("mamba", "mamba", _mamba, "causal_lm", hidden_convention="mamba"),
)
ZOO_NAMES: tuple[str, ...] = tuple(ZOO)


def make_config(name: str) -> PretrainedConfig:
    """A fresh tiny config for zoo entry ``name``."""
    config = ZOO[name].make_config()
    assert config.model_type == ZOO[name].model_type, (name, config.model_type)
    return config


def _model_class(class_names: Mapping[str, str | Sequence[str]], name: str) -> type[nn.Module]:
    found = class_names[ZOO[name].model_type]
    cls: type[nn.Module] = getattr(transformers, found if isinstance(found, str) else found[0])
    return cls


def head_class(name: str) -> type[nn.Module]:
    """The class a head checkpoint of ``name`` is saved from: what ``AutoModelForCausalLM``
    (``AutoModelForMaskedLM`` for BERT and RoBERTa) builds; ``T5ForConditionalGeneration``."""
    kind = ZOO[name].oracle_kind
    if kind == "t5_encoder":
        return transformers.T5ForConditionalGeneration
    if kind == "masked_lm":
        return _model_class(MODEL_FOR_MASKED_LM_MAPPING_NAMES, name)
    return _model_class(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, name)


def base_class(name: str) -> type[nn.Module]:
    """The base model class of ``name``: what ``AutoModel`` builds (``T5Model`` for t5)."""
    return _model_class(MODEL_MAPPING_NAMES, name)


def _is_norm(module: nn.Module) -> bool:
    kind = type(module).__name__
    return isinstance(module, nn.LayerNorm) or kind.endswith(("RMSNorm", "LayerNorm"))


def _randomize(model: nn.Module) -> None:
    """Weights far from transformers' tiny default init (std 0.02), so that any masking or
    position mistake moves the outputs by much more than the test tolerance."""
    with torch.no_grad():
        norm_params = {
            id(p) for module in model.modules() if _is_norm(module) for p in module.parameters()
        }
        for name, param in model.named_parameters():
            if id(param) in norm_params and name.endswith("weight"):
                param.uniform_(0.5, 1.5)
            elif param.dim() < 2:
                param.normal_(0.0, 0.1)
            else:
                param.normal_(0.0, 0.2)


def _shard_bytes(model: nn.Module) -> int:
    """A shard size that splits the model's checkpoint into several files (about 4)."""
    total = sum(int(t.numel()) * int(t.element_size()) for t in model.state_dict().values())
    return max(total // 4, 1)


def save_model(model_type: str, path: Path, *, head: bool, sharded: bool, seed: int = 0) -> Path:
    """Save a seeded random ``model_type`` model with ``save_pretrained`` into ``path``.

    ``head=True`` saves the head class (:func:`head_class`), ``head=False`` the base class
    (:func:`base_class`). ``sharded=True`` splits the safetensors into several files with a
    ``model.safetensors.index.json``. The same seed gives the same weights either way.
    """
    config = make_config(model_type)
    cls: Any = head_class(model_type) if head else base_class(model_type)
    torch.manual_seed(seed)
    model: nn.Module = cls(config)
    _randomize(model)
    model.eval()
    saver: Any = model
    if sharded:
        saver.save_pretrained(path, max_shard_size=_shard_bytes(model))
        index = path / SHARDED_INDEX
        assert index.is_file(), f"save_pretrained wrote no {SHARDED_INDEX} in {path}"
        files = set(json.loads(index.read_text())["weight_map"].values())
        assert len(files) >= 2, files
        assert not (path / "model.safetensors").exists()
    else:
        saver.save_pretrained(path)
        assert (path / "model.safetensors").is_file()
        assert not (path / SHARDED_INDEX).exists()
    return path


def inputs(model_type: str, *, left: bool, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``[4, MAX_LEN]`` batch of ragged sequences (lengths ``LENGTHS``), padded on the left
    or the right with the model's pad id; real tokens are never special tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(LENGTHS), MAX_LEN), generator=generator)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(LENGTHS):
        if left:
            mask[row, MAX_LEN - length :] = 1
        else:
            mask[row, :length] = 1
    ids = ids.masked_fill(mask == 0, ZOO[model_type].pad_token_id)
    return ids, mask


class Oracle(NamedTuple):
    """transformers' outputs for one checkpoint and batch, in nexus_sli's conventions."""

    #: (embeddings, output of every layer but the last, last_hidden_state)
    hidden_states: tuple[torch.Tensor, ...]
    #: the LM head's logits (None for base checkpoints and T5's encoder stack)
    logits: torch.Tensor | None

    @property
    def last_hidden_state(self) -> torch.Tensor:
        return self.hidden_states[-1]


def _saved_with_head(model_type: str, path: Path) -> bool:
    architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    return bool(architectures) and architectures[0] == head_class(model_type).__name__


def oracle(model_type: str, path: Path, ids: torch.Tensor, mask: torch.Tensor) -> Oracle:
    """Load the checkpoint at ``path`` into transformers and run ``ids``/``mask`` through it.

    A head checkpoint runs through ``AutoModelForCausalLM`` (``AutoModelForMaskedLM`` for BERT
    and RoBERTa), giving hidden states and logits; a base checkpoint through ``AutoModel``
    (no logits). For T5 both run the encoder stack (``T5EncoderModel``) and give no logits.
    Mamba's hidden states are realigned to nexus_sli's convention: transformers gives
    ``(out_0, ..., out_{N-1}, norm_f(out_{N-1}))``; nexus_sli gives
    ``(embeddings, out_0, ..., out_{N-2}, norm_f(out_{N-1}))``.
    """
    entry = ZOO[model_type]
    with_head = _saved_with_head(model_type, path)
    loader: Any
    if entry.oracle_kind == "t5_encoder":
        loader = T5EncoderModel
    elif not with_head:
        loader = AutoModel
    else:
        loader = AutoModelForCausalLM if entry.oracle_kind == "causal_lm" else AutoModelForMaskedLM
    model: Any = loader.from_pretrained(path)
    model.eval()
    with torch.no_grad():
        output = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        states = tuple(output.hidden_states)
        if entry.hidden_convention == "mamba":
            embeddings = model.get_input_embeddings()(ids)
            states = (embeddings, *states[:-2], states[-1])
    logits = output.logits if with_head and entry.has_lm_head else None
    return Oracle(states, logits)
