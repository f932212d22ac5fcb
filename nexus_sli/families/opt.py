"""OPT decoders: layers at ``model.decoder.layers.{i}``.

The base model (``OPTModel``) wraps an ``OPTDecoder`` under ``decoder``, so the model prefix is
``model.`` (head checkpoints) or empty (base checkpoints) and layer paths are
``decoder.layers.{i}``. The stem holds ``decoder.embed_tokens``, the learned
``decoder.embed_positions`` (OPT's offset of 2, positions counted from the attention mask so
left padding works) and, when ``word_embed_proj_dim != hidden_size``, ``decoder.project_in``.
The final module holds ``decoder.final_layer_norm`` (when ``do_layer_norm_before`` and not
``_remove_final_layer_norm``) and ``decoder.project_out`` (with the projections); in that case
``last_hidden_state`` has width ``word_embed_proj_dim``, exactly as in transformers.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .._family import ArchitectureFamily, LayerContext
from ._lazy import lazy_module
from .gpt import LMHead, attn_config, check_model_type, sub

if TYPE_CHECKING:
    from transformers import masking_utils
    from transformers.models.opt import modeling_opt
else:
    masking_utils = lazy_module("transformers.masking_utils")
    modeling_opt = lazy_module("transformers.models.opt.modeling_opt")

__all__ = ["FAMILIES", "OPTFamily"]


def _has_projections(config: Any) -> bool:
    return int(config.word_embed_proj_dim) != int(config.hidden_size)


def _has_final_norm(config: Any) -> bool:
    return bool(config.do_layer_norm_before) and not bool(
        getattr(config, "_remove_final_layer_norm", False)
    )


class OPTFamily(ArchitectureFamily):
    """OPT decoders.

    Roles: ``layer`` (the layer), ``attention`` (``self_attn``), ``mlp_in`` (``fc1``) and
    ``mlp_out`` (``fc2``). There is no ``mlp`` role: OPT's feed-forward network is not a
    submodule (``fc1``, the activation and ``fc2`` sit directly in the layer, which flattens
    tokens to ``[batch * seq, features]`` before them), so no single module takes the MLP's
    input and returns its output; mapping ``mlp`` to ``fc1`` or ``fc2`` would hand a replacement
    MLP the wrong tensor.
    """

    family_id: ClassVar[str] = "opt"
    family_name: ClassVar[str] = "OPT decoders"
    model_types: ClassVar[Collection[str]] = ("opt",)
    architectures: ClassVar[Collection[str]] = ("OPTModel", "OPTForCausalLM")
    base_model_prefix: ClassVar[str] = "model"
    layer_paths: ClassVar[Mapping[str, str]] = {"decoder": "decoder.layers.{idx}"}
    ignored_tensor_patterns: ClassVar[Collection[str]] = ()
    #: Regexes over full checkpoint names, anchored (``re.search`` and ``re.fullmatch`` agree).
    unused_tensor_patterns: ClassVar[Collection[str]] = (
        # tied checkpoints that still store the head; heads of other OPT task classes
        r"^lm_head\.weight$",
        r"^(?:score|qa_outputs)\..+$",
    )

    def _attn(self, config: Any) -> Any:
        check_model_type(self, config)
        return attn_config(config, "sdpa")

    # ------------------------------------------------------------------ seed API
    def create_layer(self, config: Any, layer_idx: int, layer_type: str = "decoder") -> nn.Module:
        self.get_layer_prefix(layer_idx, layer_type)  # validates layer_type
        return modeling_opt.OPTDecoderLayer(self._attn(config), layer_idx=layer_idx)

    # ------------------------------------------------------------------ structure
    def layer_stages(self, config: Any, layer_type: str = "decoder") -> tuple[tuple[str, ...], ...]:
        # With do_layer_norm_before=False the attention norm runs after attention: still stage 0.
        return (("self_attn_layer_norm", "self_attn"), ("final_layer_norm", "fc1", "fc2"))

    def layer_roles(self, config: Any, layer_type: str = "decoder") -> Mapping[str, str]:
        return {"layer": "", "attention": "self_attn", "mlp_in": "fc1", "mlp_out": "fc2"}

    def max_sequence_length(self, config: Any) -> int | None:
        """OPT's learned positions (offset by 2) cover ``max_position_embeddings`` tokens."""
        return int(config.max_position_embeddings)

    def embedding_tensor_names(
        self, config: Any, *, model_prefix: str | None = None
    ) -> tuple[str, ...]:
        """``embed_tokens``, ``embed_positions`` and ``project_in`` (when present)."""
        prefix = self._model_prefix(model_prefix) + "decoder."
        names = [prefix + "embed_tokens.weight", prefix + "embed_positions.weight"]
        if _has_projections(config):
            names.append(prefix + "project_in.weight")
        return tuple(names)

    def final_norm_tensor_names(
        self, config: Any, *, model_prefix: str | None = None
    ) -> tuple[str, ...]:
        """The final layer norm (when present, with affine params) and ``project_out``."""
        prefix = self._model_prefix(model_prefix) + "decoder."
        names: list[str] = []
        if _has_final_norm(config) and config.layer_norm_elementwise_affine:
            names += [prefix + "final_layer_norm.weight", prefix + "final_layer_norm.bias"]
        if _has_projections(config):
            names.append(prefix + "project_out.weight")
        return tuple(names)

    def lm_head_tensor_names(
        self, config: Any, *, model_prefix: str | None = None
    ) -> tuple[str, ...]:
        if self.is_tied(config):
            return (self._model_prefix(model_prefix) + "decoder.embed_tokens.weight",)
        return ("lm_head.weight",)

    # ------------------------------------------------------------------ streaming hooks
    def build_stem(self, config: Any, layer_type: str = "decoder") -> nn.Module:
        check_model_type(self, config)
        decoder = nn.Module()
        decoder.embed_tokens = nn.Embedding(
            int(config.vocab_size), int(config.word_embed_proj_dim), config.pad_token_id
        )
        decoder.embed_positions = modeling_opt.OPTLearnedPositionalEmbedding(
            int(config.max_position_embeddings), int(config.hidden_size)
        )
        if _has_projections(config):
            decoder.project_in = nn.Linear(
                int(config.word_embed_proj_dim), int(config.hidden_size), bias=False
            )
        stem = nn.Module()
        stem.decoder = decoder
        return stem

    def embed(
        self,
        config: Any,
        stem: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        layer_type: str = "decoder",
    ) -> tuple[torch.Tensor, LayerContext]:
        decoder = sub(stem, "decoder")
        inputs_embeds: torch.Tensor = sub(decoder, "embed_tokens")(input_ids)
        # OPTDecoder.forward without cache: positions counted over the attended tokens.
        position_ids = torch.cumsum(attention_mask, dim=1)
        position_ids = (position_ids * attention_mask - 1).long()
        mask = masking_utils.create_causal_mask(
            config=self._attn(config),
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=None,
        )
        pos_embeds = sub(decoder, "embed_positions")(attention_mask, 0, position_ids=position_ids)
        if _has_projections(config):
            inputs_embeds = sub(decoder, "project_in")(inputs_embeds)
        hidden = inputs_embeds + pos_embeds.to(inputs_embeds.device)
        return hidden, {"attention_mask": mask, "position_ids": position_ids}

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
        position_ids = torch.arange(seq, device=device).unsqueeze(0).expand(batch, -1)
        mask = masking_utils.create_causal_mask(
            config=self._attn(config), inputs_embeds=dummy, attention_mask=None, cache=None
        )
        return {"attention_mask": mask, "position_ids": position_ids}

    def build_final(self, config: Any, layer_type: str = "decoder") -> nn.Module:
        decoder = nn.Module()
        if _has_final_norm(config):
            decoder.final_layer_norm = nn.LayerNorm(
                int(config.hidden_size), elementwise_affine=config.layer_norm_elementwise_affine
            )
        if _has_projections(config):
            decoder.project_out = nn.Linear(
                int(config.hidden_size), int(config.word_embed_proj_dim), bias=False
            )
        final = nn.Module()
        final.decoder = decoder
        return final

    def finish(
        self,
        config: Any,
        final: nn.Module,
        hidden_states: torch.Tensor,
        context: LayerContext,
        layer_type: str = "decoder",
    ) -> torch.Tensor:
        decoder = sub(final, "decoder")
        if _has_final_norm(config):
            hidden_states = sub(decoder, "final_layer_norm")(hidden_states)
        if _has_projections(config):
            hidden_states = sub(decoder, "project_out")(hidden_states)
        return hidden_states

    def build_lm_head(self, config: Any) -> nn.Module | None:
        return LMHead(int(config.word_embed_proj_dim), int(config.vocab_size), bias=False)

    def lm_head_tensor_map(
        self,
        config: Any,
        head_keys: Collection[str],
        *,
        model_prefix: str,
        available: Collection[str],
    ) -> dict[str, str]:
        if self.is_tied(config):
            name = model_prefix + "decoder.embed_tokens.weight"
            return {key: name for key in head_keys}
        return {key: key for key in head_keys}


FAMILIES = (OPTFamily,)
