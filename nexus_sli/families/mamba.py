"""Mamba (selective state-space) models: layers at ``layers.{i}``, prefix ``backbone.``.

``MambaModel`` saves ``embeddings.weight``, ``layers.{i}.norm.weight``, ``layers.{i}.mixer.*``
and ``norm_f.weight``; ``MambaForCausalLM`` puts them under ``backbone.`` and adds
``lm_head.weight`` (dropped when tied to the embeddings, the default).

Each layer is transformers' ``MambaBlock``, called like ``MambaModel.forward`` calls it: no
cache, and the 2D ``attention_mask`` passed through unchanged (the mixer zeroes padded positions
with it; there is no 4D mask). The mixer runs its pure-torch path (``mamba_inner_fn`` only has a
fused kernel in training, and the convolution/scan helpers fall back to torch when no hub
kernel is installed), the same path the in-memory model takes on CPU.

Hidden states: ``MambaModel`` returns ``(out_0, ..., out_{N-1}, norm_f(out_{N-1}))`` with no
embedding output, while the streaming engine returns ``(embeddings, out_0, ..., out_{N-2},
norm_f(out_{N-1}))``; both end with ``last_hidden_state``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .._family import ArchitectureFamily, LayerContext
from ._lazy import lazy_module

if TYPE_CHECKING:
    from transformers.models.mamba import modeling_mamba
else:
    modeling_mamba = lazy_module("transformers.models.mamba.modeling_mamba")

__all__ = ["FAMILIES", "MambaFamily"]


class _Stem(nn.Module):
    """``embeddings`` (keys relative to the model prefix)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)


class _Final(nn.Module):
    """``norm_f`` (keys relative to the model prefix)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.norm_f = modeling_mamba.MambaRMSNorm(  # type: ignore[no-untyped-call]
            config.hidden_size, eps=config.layer_norm_epsilon
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.norm_f(hidden_states)
        return out


class _LMHead(nn.Module):
    """``lm_head`` (keys relative to the checkpoint root); float32 logits like the model."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # MambaForCausalLM.forward: lm_head(hidden.to(lm_head dtype)).float()
        return self.lm_head(hidden_states.to(self.lm_head.weight.dtype)).float()  # type: ignore[no-any-return]


class MambaFamily(ArchitectureFamily):
    """Mamba (``model_type`` ``mamba``): ``MambaBlock`` layers, ``norm_f``, tied LM head.

    Roles: ``layer`` is the block, ``norm`` its pre-norm. Mamba has no attention: the sequence
    mixer (``mixer``, the selective SSM with its gated projections) takes attention's place
    in the block, so ``attention`` (and ``mixer``) map to ``mixer``. There is no separate MLP
    (the mixer's gated in/out projections are its only feed-forward part), so there is no
    ``mlp`` role.
    """

    family_id: ClassVar[str] = "mamba"
    family_name: ClassVar[str] = "Mamba state-space models"
    model_types: ClassVar[Collection[str]] = ("mamba",)
    architectures: ClassVar[Collection[str]] = ("MambaModel", "MambaForCausalLM")
    base_model_prefix: ClassVar[str] = "backbone"
    layer_paths: ClassVar[Mapping[str, str]] = {"decoder": "layers.{idx}"}

    # ------------------------------------------------------------------ seed API
    def create_layer(self, config: Any, layer_idx: int, layer_type: str = "decoder") -> nn.Module:
        self.get_layer_prefix(layer_idx, layer_type)  # validates layer_type
        return modeling_mamba.MambaBlock(config, layer_idx=layer_idx)  # type: ignore[no-untyped-call]

    # ------------------------------------------------------------------ structure
    def custom_output(self, config: Any, role: str, output: torch.Tensor) -> Any:
        """A custom mixer (``attention``/``mixer`` role) returns a tensor, as Mamba's mixer does."""
        return output

    def layer_roles(self, config: Any, layer_type: str = "decoder") -> Mapping[str, str]:
        return {"layer": "", "attention": "mixer", "mixer": "mixer", "norm": "norm"}

    def embedding_tensor_names(
        self, config: Any, *, model_prefix: str | None = None
    ) -> tuple[str, ...]:
        return (self._model_prefix(model_prefix) + "embeddings.weight",)

    def final_norm_tensor_names(
        self, config: Any, *, model_prefix: str | None = None
    ) -> tuple[str, ...]:
        return (self._model_prefix(model_prefix) + "norm_f.weight",)

    def lm_head_tensor_names(
        self, config: Any, *, model_prefix: str | None = None
    ) -> tuple[str, ...]:
        """Tied: the embedding matrix. Untied: ``lm_head.weight``, which a base (``MambaModel``,
        ``model_prefix=""``) checkpoint does not have (then empty)."""
        prefix = self._model_prefix(model_prefix)
        if self.is_tied(config):
            return (prefix + "embeddings.weight",)
        return ("lm_head.weight",) if prefix else ()

    # ------------------------------------------------------------------ streaming hooks
    def build_stem(self, config: Any, layer_type: str = "decoder") -> nn.Module:
        return _Stem(config)

    @staticmethod
    def _embedding_name(model_prefix: str, available: Collection[str]) -> str:
        # MambaModel.load_hook renames the old "embedding." spelling to "embeddings.".
        name = model_prefix + "embeddings.weight"
        legacy = model_prefix + "embedding.weight"
        return legacy if name not in available and legacy in available else name

    def stem_tensor_names(
        self,
        config: Any,
        stem_keys: Collection[str],
        *,
        model_prefix: str,
        available: Collection[str],
        layer_type: str = "decoder",
    ) -> dict[str, str]:
        return {
            key: (
                self._embedding_name(model_prefix, available)
                if key == "embeddings.weight"
                else model_prefix + key
            )
            for key in stem_keys
        }

    def embed(
        self,
        config: Any,
        stem: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        layer_type: str = "decoder",
    ) -> tuple[torch.Tensor, LayerContext]:
        assert isinstance(stem, _Stem)
        hidden: torch.Tensor = stem.embeddings(input_ids)
        return hidden, {"attention_mask": attention_mask}

    def call_layer(
        self,
        config: Any,
        layer: nn.Module,
        hidden_states: torch.Tensor,
        context: LayerContext,
        layer_idx: int,
        layer_type: str = "decoder",
    ) -> torch.Tensor:
        out = layer(hidden_states, cache=None, attention_mask=context.get("attention_mask"))
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
        return {"attention_mask": None}

    def build_final(self, config: Any, layer_type: str = "decoder") -> nn.Module:
        return _Final(config)

    def finish(
        self,
        config: Any,
        final: nn.Module,
        hidden_states: torch.Tensor,
        context: LayerContext,
        layer_type: str = "decoder",
    ) -> torch.Tensor:
        out: torch.Tensor = final(hidden_states)
        return out

    def build_lm_head(self, config: Any) -> nn.Module | None:
        return _LMHead(config)

    def lm_head_tensor_map(
        self,
        config: Any,
        head_keys: Collection[str],
        *,
        model_prefix: str,
        available: Collection[str],
    ) -> dict[str, str]:
        if self.is_tied(config):
            embedding = self._embedding_name(model_prefix, available)
            return {key: embedding for key in head_keys}
        return {key: key for key in head_keys}


FAMILIES = (MambaFamily,)
