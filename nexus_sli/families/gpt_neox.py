"""GPT-NeoX (Pythia, GPT-NeoX-20B): layers at ``gpt_neox.layers.{i}``.

The stem is ``embed_in`` plus the model-level rotary embedding (``rotary_emb``, non-persistent
``inv_freq``); the final norm is ``final_layer_norm``. transformers 5 calls the head
``lm_head`` but saves (and most hub checkpoints store) it as root-level ``embed_out.weight``;
both names are accepted.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .._family import ArchitectureFamily, LayerContext
from ._lazy import lazy_module
from .gpt import LMHead, arange_positions, attn_config, check_model_type, sub

if TYPE_CHECKING:
    from transformers import masking_utils
    from transformers.models.gpt_neox import modeling_gpt_neox
else:
    masking_utils = lazy_module("transformers.masking_utils")
    modeling_gpt_neox = lazy_module("transformers.models.gpt_neox.modeling_gpt_neox")

__all__ = ["FAMILIES", "GPTNeoXFamily"]

_HEAD_NAMES = ("embed_out.weight", "lm_head.weight")


class GPTNeoXFamily(ArchitectureFamily):
    """GPT-NeoX decoders. Roles: ``layer`` (the layer), ``attention`` (``attention``), ``mlp``."""

    family_id: ClassVar[str] = "gpt_neox"
    family_name: ClassVar[str] = "GPT-NeoX decoders"
    model_types: ClassVar[Collection[str]] = ("gpt_neox",)
    architectures: ClassVar[Collection[str]] = ("GPTNeoXModel", "GPTNeoXForCausalLM")
    base_model_prefix: ClassVar[str] = "gpt_neox"
    layer_paths: ClassVar[Mapping[str, str]] = {"decoder": "layers.{idx}"}
    #: Regexes over full checkpoint names, anchored (``re.search`` and ``re.fullmatch`` agree).
    ignored_tensor_patterns: ClassVar[Collection[str]] = (
        r"^(?:.*\.)?layers\.\d+\.attention\.(?:bias|masked_bias)$",
        r"^(?:.*\.)?rotary_emb\.inv_freq$",
    )
    unused_tensor_patterns: ClassVar[Collection[str]] = (
        # tied checkpoints that still store the head; heads of other GPT-NeoX task classes
        r"^(?:embed_out|lm_head)\.weight$",
        r"^(?:score|qa_outputs|classifier)\..+$",
    )

    def _attn(self, config: Any) -> Any:
        check_model_type(self, config)
        return attn_config(config, "sdpa")

    # ------------------------------------------------------------------ seed API
    def create_layer(self, config: Any, layer_idx: int, layer_type: str = "decoder") -> nn.Module:
        self.get_layer_prefix(layer_idx, layer_type)  # validates layer_type
        layer_cls: Any = modeling_gpt_neox.GPTNeoXLayer  # untyped __init__
        layer: nn.Module = layer_cls(self._attn(config), layer_idx)
        return layer

    # ------------------------------------------------------------------ structure
    def layer_stages(self, config: Any, layer_type: str = "decoder") -> tuple[tuple[str, ...], ...]:
        return (("input_layernorm", "attention"), ("post_attention_layernorm", "mlp"))

    def layer_roles(self, config: Any, layer_type: str = "decoder") -> Mapping[str, str]:
        return {"layer": "", "attention": "attention", "mlp": "mlp"}

    def embedding_tensor_names(
        self, config: Any, *, model_prefix: str | None = None
    ) -> tuple[str, ...]:
        return (self._model_prefix(model_prefix) + "embed_in.weight",)

    def final_norm_tensor_names(
        self, config: Any, *, model_prefix: str | None = None
    ) -> tuple[str, ...]:
        prefix = self._model_prefix(model_prefix)
        return (prefix + "final_layer_norm.weight", prefix + "final_layer_norm.bias")

    def lm_head_tensor_names(
        self, config: Any, *, model_prefix: str | None = None
    ) -> tuple[str, ...]:
        if self.is_tied(config):
            return (self._model_prefix(model_prefix) + "embed_in.weight",)
        return ("embed_out.weight",)

    # ------------------------------------------------------------------ streaming hooks
    def build_stem(self, config: Any, layer_type: str = "decoder") -> nn.Module:
        check_model_type(self, config)
        stem = nn.Module()
        stem.embed_in = nn.Embedding(int(config.vocab_size), int(config.hidden_size))
        stem.rotary_emb = modeling_gpt_neox.GPTNeoXRotaryEmbedding(config=config)
        return stem

    def embed(
        self,
        config: Any,
        stem: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        layer_type: str = "decoder",
    ) -> tuple[torch.Tensor, LayerContext]:
        inputs_embeds: torch.Tensor = sub(stem, "embed_in")(input_ids)
        position_ids = arange_positions(inputs_embeds.shape[1], inputs_embeds.device)
        mask = masking_utils.create_causal_mask(
            config=self._attn(config),
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=None,
            position_ids=position_ids,
        )
        position_embeddings = sub(stem, "rotary_emb")(inputs_embeds, position_ids=position_ids)
        return inputs_embeds, {
            "attention_mask": mask,
            "position_ids": position_ids,
            "position_embeddings": position_embeddings,
        }

    def call_layer(
        self,
        config: Any,
        layer: nn.Module,
        hidden_states: torch.Tensor,
        context: LayerContext,
        layer_idx: int,
        layer_type: str = "decoder",
    ) -> torch.Tensor:
        out = layer(
            hidden_states,
            attention_mask=context["attention_mask"],
            position_ids=context["position_ids"],
            position_embeddings=context["position_embeddings"],
        )
        assert isinstance(out, torch.Tensor)
        return out

    def probe_context(
        self,
        config: Any,
        batch: int,
        seq: int,
        *,
        device: torch.device,
        dtype: torch.dtype,
        layer_type: str = "decoder",
    ) -> LayerContext:
        dummy = torch.empty((batch, seq, int(config.hidden_size)), device=device, dtype=dtype)
        position_ids = arange_positions(seq, device)
        with torch.device(device):
            rotary = modeling_gpt_neox.GPTNeoXRotaryEmbedding(config=config)
        mask = masking_utils.create_causal_mask(
            config=self._attn(config), inputs_embeds=dummy, attention_mask=None, cache=None
        )
        return {
            "attention_mask": mask,
            "position_ids": position_ids,
            "position_embeddings": rotary(dummy, position_ids=position_ids),
        }

    def build_final(self, config: Any, layer_type: str = "decoder") -> nn.Module:
        final = nn.Module()
        final.final_layer_norm = nn.LayerNorm(int(config.hidden_size), eps=config.layer_norm_eps)
        return final

    def finish(
        self,
        config: Any,
        final: nn.Module,
        hidden_states: torch.Tensor,
        context: LayerContext,
        layer_type: str = "decoder",
    ) -> torch.Tensor:
        out: torch.Tensor = sub(final, "final_layer_norm")(hidden_states)
        return out

    def build_lm_head(self, config: Any) -> nn.Module | None:
        return LMHead(int(config.hidden_size), int(config.vocab_size), bias=False)

    def lm_head_tensor_map(
        self,
        config: Any,
        head_keys: Collection[str],
        *,
        model_prefix: str,
        available: Collection[str],
    ) -> dict[str, str]:
        if self.is_tied(config):
            name = model_prefix + "embed_in.weight"
        else:
            # Saved as embed_out.weight (transformers' save-time rename); lm_head.weight is
            # accepted too. Missing both: report the canonical name.
            name = next((n for n in _HEAD_NAMES if n in available), _HEAD_NAMES[0])
        return {key: name for key in head_keys}


FAMILIES = (GPTNeoXFamily,)
