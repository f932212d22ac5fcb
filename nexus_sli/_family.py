"""The architecture family base class: what a family knows about a model type.

A family answers three kinds of questions about a Hugging Face config:

* the seed's: ``get_layer_prefix(layer_idx, layer_type)`` and ``create_layer(config, layer_idx, layer_type)``;
* structure: layer types (stacks), layer counts, hidden size, named roles inside a layer,
  the tensor names of embeddings, final norm and LM head (tied embeddings handled), MoE;
* streaming: how to build the modules around the layers (the *stem* before them, the *final*
  norm after them, the LM head), how to embed a micro-batch, how to call one layer, how to
  finish and how to compute logits. The streaming engine only ever talks to a family
  through these hooks, so adding a model type means adding (or extending) one family file.

Module-building hooks are called inside ``torch.device("meta")`` (or a context that puts
parameters on meta); they must create every parameter through normal ``nn.Module``
construction so that the engine can assign checkpoint tensors into them.

Names: ``get_layer_prefix`` and the ``*_tensor_names`` methods return names in the layout of a
checkpoint saved from a *head* model (``LlamaForCausalLM``: ``model.layers.0.``). A checkpoint
saved from the base model (``LlamaModel``: ``layers.0.``) has no model prefix; pass
``model_prefix=""`` (or the value of :meth:`ArchitectureFamily.resolve_model_prefix`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from .errors import CheckpointError, InvalidFamilyError

__all__ = ["ArchitectureFamily", "LayerContext"]

#: Per-micro-batch values an ``embed`` hook computes once and every layer call reuses
#: (attention masks, position ids, rotary ``(cos, sin)``, position bias, ...).
LayerContext = dict[str, Any]


class ArchitectureFamily:
    """Base class of an architecture family (a group of model types sharing one layout).

    Subclasses set the class attributes and override the hooks. The seed's minimal custom
    family (``get_layer_prefix`` + ``create_layer``) is enough for detection and layer
    building; streaming needs the hooks of the "streaming" section too.
    """

    #: snake_case id the family is registered under (``"llama"``).
    family_id: ClassVar[str] = ""
    #: Human-readable name (``"Llama-style decoders"``).
    family_name: ClassVar[str] = ""
    #: transformers ``config.model_type`` values this family claims.
    model_types: ClassVar[Collection[str]] = ()
    #: Exact ``config.architectures`` entries this family claims.
    architectures: ClassVar[Collection[str]] = ()
    #: Attribute name of the base model inside head models (``"model"`` in ``LlamaForCausalLM``);
    #: ``""`` when head and base checkpoints share names (T5).
    base_model_prefix: ClassVar[str] = ""
    #: ``{layer_type: path of layer idx relative to the base model}``, ``{idx}`` is the index.
    layer_paths: ClassVar[Mapping[str, str]] = {}
    #: Regexes of checkpoint tensor names transformers itself ignores when loading (legacy buffers).
    ignored_tensor_patterns: ClassVar[Collection[str]] = ()
    #: Regexes of checkpoint tensors that are legitimately present but that the streamed outputs
    #: never read (a pooler, the heads of other tasks, the decoder stack of an encoder run).
    #: Anything neither used, ignored nor listed here is an unexpected tensor: an error.
    unused_tensor_patterns: ClassVar[Collection[str]] = ()

    def __init__(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{type(self).__name__} family_id={self.family_id!r}>"

    # ------------------------------------------------------------------ seed API
    def get_layer_prefix(
        self, layer_idx: int, layer_type: str = "decoder", *, model_prefix: str | None = None
    ) -> str:
        """Checkpoint name prefix of layer ``layer_idx`` of stack ``layer_type`` (ends with ``.``)."""
        try:
            path = self.layer_paths[layer_type]
        except KeyError:
            raise InvalidFamilyError(
                f"family {self.family_id!r} has no layer type {layer_type!r}; "
                f"valid layer types: {sorted(self.layer_paths)}"
            ) from None
        return self._model_prefix(model_prefix) + path.format(idx=layer_idx) + "."

    def create_layer(self, config: Any, layer_idx: int, layer_type: str = "decoder") -> nn.Module:
        """Build layer ``layer_idx`` of stack ``layer_type`` from transformers' own classes.

        Call it under ``torch.device("meta")`` to allocate nothing.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement create_layer")

    # ------------------------------------------------------------------ structure
    def layer_types(self, config: Any) -> tuple[str, ...]:
        """The stacks of layers, in the order they run (``("decoder",)``; T5: encoder, decoder)."""
        return tuple(self.layer_paths) or ("decoder",)

    def num_layers(self, config: Any, layer_type: str = "decoder") -> int:
        """Number of layers of stack ``layer_type``."""
        return int(config.num_hidden_layers)

    def hidden_size(self, config: Any) -> int:
        """Width of the residual stream."""
        return int(config.hidden_size)

    def layer_roles(self, config: Any, layer_type: str = "decoder") -> Mapping[str, str]:
        """Named roles inside one layer mapped to submodule paths (``""`` is the layer itself).

        Built-in families map ``layer`` and ``attention`` (Mamba: the sequence mixer), and
        ``mlp`` wherever the layer holds its feed-forward in one submodule (not OPT, whose
        ``fc1``/``fc2`` are the roles ``mlp_in``/``mlp_out``; not Mamba, which has none).
        """
        return {"layer": ""}

    def is_moe(self, config: Any) -> bool:
        """Whether the config describes a mixture-of-experts model (positive expert counts)."""
        for attr in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
            value = getattr(config, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return True
        return False

    def embedding_tensor_names(
        self, config: Any, *, model_prefix: str | None = None
    ) -> tuple[str, ...]:
        """Checkpoint names of the embedding tensors (token, position, ...)."""
        return ()

    def final_norm_tensor_names(
        self, config: Any, *, model_prefix: str | None = None
    ) -> tuple[str, ...]:
        """Checkpoint names of the final norm after the last layer (empty when there is none)."""
        return ()

    def lm_head_tensor_names(
        self, config: Any, *, model_prefix: str | None = None
    ) -> tuple[str, ...]:
        """Checkpoint names of the LM head; with tied embeddings, the embedding matrix's name."""
        return ()

    def is_tied(self, config: Any) -> bool:
        """Whether the LM head shares the input embedding matrix."""
        return bool(getattr(config, "tie_word_embeddings", False))

    def resolve_model_prefix(self, config: Any, tensor_names: Collection[str]) -> str:
        """The model prefix of a checkpoint: ``base_model_prefix + "."`` or ``""`` (base model).

        Decided from the name of the first layer's tensors; raises :class:`CheckpointError`
        when neither layout matches.
        """
        layer_type = self.layer_types(config)[0]
        candidates = [self._model_prefix(None)]
        if candidates[0]:
            candidates.append("")
        for prefix in candidates:
            first = self.get_layer_prefix(0, layer_type, model_prefix=prefix)
            if any(name.startswith(first) for name in tensor_names):
                return prefix
        expected = [self.get_layer_prefix(0, layer_type, model_prefix=p) for p in candidates]
        raise CheckpointError(
            f"no tensor of layer 0 found for family {self.family_id!r}: expected names starting "
            f"with one of {expected}; is this checkpoint of another architecture?"
        )

    def _model_prefix(self, model_prefix: str | None) -> str:
        if model_prefix is not None:
            return model_prefix
        return f"{self.base_model_prefix}." if self.base_model_prefix else ""

    # ------------------------------------------------------------------ streaming hooks
    def build_stem(self, config: Any, layer_type: str = "decoder") -> nn.Module:
        """Modules before the first layer (embeddings, ...), keys relative to the model prefix.

        Non-persistent buffers (rotary ``inv_freq``) may be created for real: they are small.
        """
        raise NotImplementedError(f"{type(self).__name__} does not support streaming")

    def stem_tensor_names(
        self,
        config: Any,
        stem_keys: Collection[str],
        *,
        model_prefix: str,
        available: Collection[str],
        layer_type: str = "decoder",
    ) -> dict[str, str]:
        """Map each stem state-dict key to the checkpoint tensor that fills it."""
        return {key: model_prefix + key for key in stem_keys}

    def embed(
        self,
        config: Any,
        stem: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        layer_type: str = "decoder",
    ) -> tuple[torch.Tensor, LayerContext]:
        """Embed one micro-batch; return hidden states and the context every layer call needs."""
        raise NotImplementedError(f"{type(self).__name__} does not support streaming")

    def call_layer(
        self,
        config: Any,
        layer: nn.Module,
        hidden_states: torch.Tensor,
        context: LayerContext,
        layer_idx: int,
        layer_type: str = "decoder",
    ) -> torch.Tensor:
        """Run one layer on one micro-batch and return its output hidden states."""
        raise NotImplementedError(f"{type(self).__name__} does not support streaming")

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
        """A context for calling a layer on ``[batch, seq, hidden]`` dummy inputs, all positions
        valid, without a stem: used for forward-shape contract checks on the meta device."""
        raise NotImplementedError(f"{type(self).__name__} does not provide a probe context")

    def custom_output(self, config: Any, role: str, output: torch.Tensor) -> Any:
        """What a custom module replacing ``role`` must hand back to the family's layer.

        Custom modules return a tensor; transformers' attention modules return a tuple that
        their layer unpacks. The default gives ``(output, None)`` for ``attention`` (the
        ``attn_output, attn_weights`` pair of most decoder layers) and the tensor otherwise.
        """
        return (output, None) if role == "attention" else output

    def max_sequence_length(self, config: Any) -> int | None:
        """Longest sequence the checkpoint can embed (a learned position table), else None."""
        return None

    def adds_residual(self, config: Any, role: str) -> bool:
        """Whether the family's module for ``role`` adds the residual itself.

        Such modules are called as ``module(hidden_states, residual, ...)`` (BLOOM's attention
        and MLP); a custom module replacing them returns only its own output and the engine
        adds the residual.
        """
        return False

    def layer_stages(self, config: Any, layer_type: str = "decoder") -> tuple[tuple[str, ...], ...]:
        """A layer's direct children grouped in the order its forward first calls them.

        Streaming reads and frees a layer stage by stage (the attention part of the next
        layer is read while this layer's MLP runs), so only about one layer's weights are
        held at a time. Children a layer does not have are ignored; parameters of children
        named in no stage (and the layer's own) are read with the first stage. The default,
        ``()``, reads each layer whole (the next one is read while it runs).
        """
        return ()

    def attention_is_causal(self, config: Any, layer_type: str = "decoder") -> bool:
        """Whether attention in stack ``layer_type`` is causal (for custom layers' masks)."""
        return layer_type != "encoder"

    def build_final(self, config: Any, layer_type: str = "decoder") -> nn.Module:
        """Modules after the last layer (final norm), keys relative to the model prefix."""
        return nn.Identity()

    def finish(
        self,
        config: Any,
        final: nn.Module,
        hidden_states: torch.Tensor,
        context: LayerContext,
        layer_type: str = "decoder",
    ) -> torch.Tensor:
        """Turn the last layer's output into ``last_hidden_state`` (apply the final norm)."""
        return hidden_states

    def build_lm_head(self, config: Any) -> nn.Module | None:
        """The LM head (keys relative to the checkpoint root), or None when there is none."""
        return None

    def lm_head_tensor_map(
        self,
        config: Any,
        head_keys: Collection[str],
        *,
        model_prefix: str,
        available: Collection[str],
    ) -> dict[str, str]:
        """Map each LM-head state-dict key to the checkpoint tensor that fills it (tied: embeddings)."""
        return dict(zip(head_keys, head_keys, strict=True))

    def compute_logits(
        self, config: Any, lm_head: nn.Module, last_hidden_state: torch.Tensor
    ) -> torch.Tensor:
        """Logits from ``last_hidden_state`` exactly as the transformers head model computes them."""
        out = lm_head(last_hidden_state)
        assert isinstance(out, torch.Tensor)
        return out
