"""T5 encoder-decoders: stacks ``encoder.block.{i}`` and ``decoder.block.{i}``.

``T5Model``, ``T5ForConditionalGeneration`` and ``T5EncoderModel`` save the same names (no model
prefix): ``shared.weight``, ``{encoder,decoder}.block.{i}.layer.*``,
``{encoder,decoder}.final_layer_norm.weight`` (and ``lm_head.weight`` when untied).

Layers of both stacks are built (:meth:`T5Family.create_layer`) from ``T5Block`` with the stack's
config copy, as ``T5Model`` makes it (decoder: ``is_decoder=True``,
``num_layers=num_decoder_layers``); block 0 of each stack owns the relative position bias table.

Streaming covers the **encoder** stack (the outputs of ``T5EncoderModel`` / ``model.encoder``):

* stem: the shared token embedding (``shared.weight``, or ``encoder.embed_tokens.weight`` in
  checkpoints without it) plus block 0's ``relative_attention_bias`` table, so that
  :meth:`T5Family.embed` computes the position bias of the whole micro-batch up front, with the
  padding mask from :func:`transformers.masking_utils.create_bidirectional_mask`;
* every block takes that bias from the context (a run resumed after layer 5 still has it; block 0
  gets it too instead of recomputing the same values);
* :meth:`T5Family.finish` applies ``encoder.final_layer_norm``.

The decoder needs the encoder output for its cross-attention and is not streamed; there is no
LM head for the encoder stream (:meth:`T5Family.build_lm_head` returns ``None``).

Checkpoints saved by ``T5ForSequenceClassification`` / ``...ForQuestionAnswering`` /
``...ForTokenClassification`` put everything under ``transformer.``; they are not claimed.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .._family import ArchitectureFamily, LayerContext
from ._lazy import lazy_module

if TYPE_CHECKING:
    from transformers import masking_utils
    from transformers.models.t5 import modeling_t5
else:
    masking_utils = lazy_module("transformers.masking_utils")
    modeling_t5 = lazy_module("transformers.models.t5.modeling_t5")

__all__ = ["FAMILIES", "T5Family"]

_SELF_ATTENTION_BIAS = "layer.0.SelfAttention.relative_attention_bias.weight"


def _streaming_only_encoder(layer_type: str) -> None:
    if layer_type != "encoder":
        raise NotImplementedError(
            f"T5 streaming covers the encoder stack only (got layer_type={layer_type!r}): the "
            "decoder stack needs the encoder output for its cross-attention"
        )


class _T5EncoderStem(nn.Module):
    """The shared token embedding and block 0's relative position bias table.

    :meth:`compute_bias` is ``T5Attention.compute_bias`` of the encoder's block 0 (bidirectional
    buckets, no cache), so every layer can be given the bias without block 0 being loaded.
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.relative_attention_bias = nn.Embedding(
            config.relative_attention_num_buckets, config.num_heads
        )
        self.relative_attention_num_buckets = int(config.relative_attention_num_buckets)
        self.relative_attention_max_distance = int(config.relative_attention_max_distance)

    def compute_bias(
        self, query_length: int, key_length: int, device: torch.device
    ) -> torch.Tensor:
        """``[1, heads, query_length, key_length]`` relative position bias."""
        context_position = torch.arange(query_length, dtype=torch.long, device=device)[:, None]
        memory_position = torch.arange(key_length, dtype=torch.long, device=device)[None, :]
        relative_position = memory_position - context_position
        bucket = modeling_t5.T5Attention._relative_position_bucket(  # type: ignore[no-untyped-call]
            relative_position,
            bidirectional=True,
            num_buckets=self.relative_attention_num_buckets,
            max_distance=self.relative_attention_max_distance,
        )
        values: torch.Tensor = self.relative_attention_bias(bucket)
        return values.permute([2, 0, 1]).unsqueeze(0)


class _T5Final(nn.Module):
    """``<stack>.final_layer_norm`` (keys relative to the checkpoint root)."""

    def __init__(self, config: Any, stack: str) -> None:
        super().__init__()
        container = nn.Module()
        container.final_layer_norm = modeling_t5.T5LayerNorm(  # type: ignore[no-untyped-call]
            config.d_model, eps=config.layer_norm_epsilon
        )
        self.stack = stack
        self.add_module(stack, container)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        norm = getattr(self, self.stack).final_layer_norm
        out: torch.Tensor = norm(hidden_states)
        return out


class T5Family(ArchitectureFamily):
    """T5 (``model_type`` ``t5``): encoder and decoder stacks, streamed encoder.

    Roles (both stacks): ``layer`` is the block, ``attention`` is ``layer.0.SelfAttention``;
    encoder ``mlp`` is ``layer.1.DenseReluDense``; decoder ``cross_attention`` is
    ``layer.1.EncDecAttention`` and ``mlp`` is ``layer.2.DenseReluDense``.
    """

    family_id: ClassVar[str] = "t5"
    family_name: ClassVar[str] = "T5 encoder-decoders"
    model_types: ClassVar[Collection[str]] = ("t5",)
    architectures: ClassVar[Collection[str]] = (
        "T5Model",
        "T5ForConditionalGeneration",
        "T5EncoderModel",
    )
    base_model_prefix: ClassVar[str] = ""
    layer_paths: ClassVar[Mapping[str, str]] = {
        "encoder": "encoder.block.{idx}",
        "decoder": "decoder.block.{idx}",
    }
    ignored_tensor_patterns: ClassVar[Collection[str]] = (
        # old checkpoints hold a cross-attention bias table transformers ignores on load
        r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$",
    )
    #: Tensors a checkpoint may hold that the encoder stream never reads: the whole decoder
    #: stack, tied copies of ``shared.weight`` and the LM head. ``encoder.embed_tokens.weight``
    #: is read by the stem only when ``shared.weight`` is absent.
    unused_tensor_patterns: ClassVar[Collection[str]] = (
        r"^decoder\.",
        r"^encoder\.embed_tokens\.weight$",
        r"^lm_head\.weight$",
    )

    # ------------------------------------------------------------------ helpers
    def _stack_config(self, config: Any, layer_type: str) -> Any:
        """The config copy ``T5Model`` gives the stack, with the attention implementation
        ``from_pretrained`` picks (``"sdpa"``) when the config has none."""
        self.get_layer_prefix(0, layer_type)  # validates layer_type
        stack = copy.deepcopy(config)
        if layer_type == "encoder":
            stack.is_decoder = False
            stack.use_cache = False
        else:
            stack.is_decoder = True
            stack.num_layers = config.num_decoder_layers
        if getattr(stack, "_attn_implementation", None) is None:
            stack._attn_implementation = "sdpa"
        return stack

    # ------------------------------------------------------------------ seed API
    def get_layer_prefix(
        self, layer_idx: int, layer_type: str = "encoder", *, model_prefix: str | None = None
    ) -> str:
        return super().get_layer_prefix(layer_idx, layer_type, model_prefix=model_prefix)

    def create_layer(self, config: Any, layer_idx: int, layer_type: str = "encoder") -> nn.Module:
        return modeling_t5.T5Block(
            self._stack_config(config, layer_type),
            has_relative_attention_bias=layer_idx == 0,
            layer_idx=layer_idx,
        )

    # ------------------------------------------------------------------ structure
    def layer_types(self, config: Any) -> tuple[str, ...]:
        return ("encoder", "decoder")

    def num_layers(self, config: Any, layer_type: str = "encoder") -> int:
        self.get_layer_prefix(0, layer_type)  # validates layer_type
        if layer_type == "decoder":
            return int(config.num_decoder_layers)
        return int(config.num_layers)

    def hidden_size(self, config: Any) -> int:
        return int(config.d_model)

    def layer_roles(self, config: Any, layer_type: str = "encoder") -> Mapping[str, str]:
        self.get_layer_prefix(0, layer_type)  # validates layer_type
        if layer_type == "decoder":
            return {
                "layer": "",
                "attention": "layer.0.SelfAttention",
                "cross_attention": "layer.1.EncDecAttention",
                "mlp": "layer.2.DenseReluDense",
            }
        return {"layer": "", "attention": "layer.0.SelfAttention", "mlp": "layer.1.DenseReluDense"}

    def embedding_tensor_names(
        self, config: Any, *, model_prefix: str | None = None
    ) -> tuple[str, ...]:
        return (self._model_prefix(model_prefix) + "shared.weight",)

    def final_norm_tensor_names(
        self, config: Any, *, model_prefix: str | None = None
    ) -> tuple[str, ...]:
        """The streamed (encoder) stack's final norm."""
        return (self._model_prefix(model_prefix) + "encoder.final_layer_norm.weight",)

    def lm_head_tensor_names(
        self, config: Any, *, model_prefix: str | None = None
    ) -> tuple[str, ...]:
        """Empty: the LM head belongs to the decoder, which is not streamed."""
        return ()

    # ------------------------------------------------------------------ streaming hooks
    def build_stem(self, config: Any, layer_type: str = "encoder") -> nn.Module:
        _streaming_only_encoder(layer_type)
        return _T5EncoderStem(config)

    def stem_tensor_names(
        self,
        config: Any,
        stem_keys: Collection[str],
        *,
        model_prefix: str,
        available: Collection[str],
        layer_type: str = "encoder",
    ) -> dict[str, str]:
        _streaming_only_encoder(layer_type)
        shared = model_prefix + "shared.weight"
        legacy = model_prefix + "encoder.embed_tokens.weight"
        names = {
            "embed_tokens.weight": shared
            if shared in available or legacy not in available
            else legacy,
            "relative_attention_bias.weight": (
                self.get_layer_prefix(0, "encoder", model_prefix=model_prefix)
                + _SELF_ATTENTION_BIAS
            ),
        }
        return {key: names[key] for key in stem_keys}

    def embed(
        self,
        config: Any,
        stem: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        layer_type: str = "encoder",
    ) -> tuple[torch.Tensor, LayerContext]:
        _streaming_only_encoder(layer_type)
        assert isinstance(stem, _T5EncoderStem)
        inputs_embeds: torch.Tensor = stem.embed_tokens(input_ids)
        mask = masking_utils.create_bidirectional_mask(
            config=self._stack_config(config, "encoder"),
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
        )
        seq = int(input_ids.shape[1])
        position_bias = stem.compute_bias(seq, seq, device=inputs_embeds.device)
        # T5Stack.forward: dropout(inputs_embeds) is the identity in eval mode.
        return inputs_embeds, {"attention_mask": mask, "position_bias": position_bias}

    def custom_output(self, config: Any, role: str, output: torch.Tensor) -> Any:
        """T5's attention returns ``(output, position_bias, weights)``; the bias comes from the
        context, so a custom attention's output is padded with ``None``."""
        if role in ("attention", "cross_attention"):
            return output, None, None
        return output

    def call_layer(
        self,
        config: Any,
        layer: nn.Module,
        hidden_states: torch.Tensor,
        context: LayerContext,
        layer_idx: int,
        layer_type: str = "encoder",
    ) -> torch.Tensor:
        out = layer(
            hidden_states,
            attention_mask=context.get("attention_mask"),
            position_bias=context.get("position_bias"),
            encoder_hidden_states=context.get("encoder_hidden_states"),
            encoder_attention_mask=context.get("encoder_attention_mask"),
            encoder_decoder_position_bias=context.get("encoder_decoder_position_bias"),
        )
        result = out[0] if isinstance(out, tuple) else out
        assert isinstance(result, torch.Tensor)
        return result

    def probe_context(
        self,
        config: Any,
        batch: int,
        seq: int,
        *,
        device: torch.device,
        dtype: torch.dtype,
        layer_type: str = "encoder",
    ) -> LayerContext:
        """All positions valid (no mask) and a zero position bias; the decoder also gets a
        dummy encoder output of the same length so that its cross-attention runs."""
        self.get_layer_prefix(0, layer_type)  # validates layer_type
        heads = int(config.num_heads)
        context: LayerContext = {
            "attention_mask": None,
            "position_bias": torch.zeros((1, heads, seq, seq), device=device, dtype=dtype),
        }
        if layer_type == "decoder":
            context["encoder_hidden_states"] = torch.zeros(
                (batch, seq, int(config.d_model)), device=device, dtype=dtype
            )
            context["encoder_attention_mask"] = None
            context["encoder_decoder_position_bias"] = torch.zeros(
                (1, heads, seq, seq), device=device, dtype=dtype
            )
        return context

    def build_final(self, config: Any, layer_type: str = "encoder") -> nn.Module:
        self.get_layer_prefix(0, layer_type)  # validates layer_type
        return _T5Final(config, layer_type)

    def finish(
        self,
        config: Any,
        final: nn.Module,
        hidden_states: torch.Tensor,
        context: LayerContext,
        layer_type: str = "encoder",
    ) -> torch.Tensor:
        # T5Stack.forward: final_layer_norm, then dropout (identity in eval mode).
        out: torch.Tensor = final(hidden_states)
        return out

    def build_lm_head(self, config: Any) -> nn.Module | None:
        return None


FAMILIES = (T5Family,)
