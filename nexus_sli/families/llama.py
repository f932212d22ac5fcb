"""Llama-style decoders: ``model.embed_tokens`` -> ``model.layers.{i}`` -> ``model.norm`` -> ``lm_head``.

One family covers every model type whose decoder is a stack of pre-norm rotary attention
layers in transformers' Llama layout: llama, mistral, qwen2, qwen3, gemma, gemma2, phi3,
mixtral and qwen2_moe. The per-model-type differences live in the small table ``_SPECS``:

* the transformers classes (decoder layer, rotary embedding, RMS norm, scaled embedding);
* the attention pattern: always causal (llama, gemma), sliding for every layer when
  ``config.sliding_window`` is set (mistral, phi3, mixtral), or per layer from
  ``config.layer_types`` (qwen2, qwen3, gemma2's sliding/global alternation, qwen2_moe);
* gemma's embedding normalizer ``sqrt(hidden_size)`` (applied in the embedding dtype by
  transformers' own ``*TextScaledWordEmbedding``);
* gemma2's ``final_logit_softcapping`` of the logits (its attention logit softcapping lives
  in the attention module itself);
* the mixture-of-experts checkpoint layout of mixtral and qwen2_moe.

Masks are built with ``transformers.masking_utils`` exactly as the model forwards build them
(``cache=None``, ``position_ids = arange(seq)`` for every row, also with left padding), and
the attention implementation is resolved like ``from_pretrained`` resolves it (``sdpa`` when
the model supports it, ``eager`` for gemma2 even when ``sdpa`` is asked for, since its
attention softcapping has no sdpa path; ``grouped_mm`` experts for MoE types) unless the
config already names one.

Mixture-of-experts layout: transformers 5 keeps each layer's experts fused in 3-D parameters
(``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``) but converts them from (and
``save_pretrained`` writes them back to) the per-expert layout every checkpoint uses:
mixtral ``block_sparse_moe.experts.{e}.w1/w3/w2.weight``, qwen2_moe
``mlp.experts.{e}.gate_proj/up_proj/down_proj.weight``. Layers built by
:meth:`LlamaFamily.create_layer` carry state-dict hooks so that their ``state_dict()`` lists
the checkpoint names (per-expert views of the fused parameters) and ``load_state_dict`` fuses
per-expert tensors back (a state dict in the fused layout loads too). Mixtral's MLP role
(module ``mlp``) is named ``block_sparse_moe`` in the checkpoint, also for a custom module put
in its place. A checkpoint stored in the fused layout is not planned for (none is written by
transformers).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
from collections.abc import Collection, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast

import torch
from torch import nn

from .._family import ArchitectureFamily, LayerContext
from ..errors import InvalidFamilyError

__all__ = ["FAMILIES", "LlamaFamily"]

_FULL = "full_attention"
_SLIDING = "sliding_attention"

AttentionPattern = Literal["causal", "sliding_if_set", "layer_types"]
MoeLayout = Literal["none", "mixtral", "qwen2_moe"]


@dataclass(frozen=True)
class _TypeSpec:
    """What differs between the model types of the family."""

    #: transformers package under ``transformers.models`` (``"qwen2_moe"``).
    package: str
    #: Class name prefix in that package (``"Qwen2Moe"``).
    prefix: str
    #: How layers pick their mask (see the module docstring).
    attention: AttentionPattern
    #: Whether the embedding output is scaled by ``sqrt(hidden_size)`` (gemma, gemma2).
    scaled_embedding: bool = False
    #: Whether the head applies ``config.final_logit_softcapping`` (gemma2).
    final_logit_softcapping: bool = False
    #: Checkpoint layout of the experts (mixtral, qwen2_moe).
    moe: MoeLayout = "none"

    def cls(self, suffix: str) -> Any:
        name = f"transformers.models.{self.package}.modeling_{self.package}"
        module = importlib.import_module(name)
        return getattr(module, self.prefix + suffix)


_SPECS: dict[str, _TypeSpec] = {
    "llama": _TypeSpec("llama", "Llama", "causal"),
    "mistral": _TypeSpec("mistral", "Mistral", "sliding_if_set"),
    "qwen2": _TypeSpec("qwen2", "Qwen2", "layer_types"),
    "qwen3": _TypeSpec("qwen3", "Qwen3", "layer_types"),
    "gemma": _TypeSpec("gemma", "Gemma", "causal", scaled_embedding=True),
    "gemma2": _TypeSpec(
        "gemma2", "Gemma2", "layer_types", scaled_embedding=True, final_logit_softcapping=True
    ),
    "phi3": _TypeSpec("phi3", "Phi3", "sliding_if_set"),
    "mixtral": _TypeSpec("mixtral", "Mixtral", "sliding_if_set", moe="mixtral"),
    "qwen2_moe": _TypeSpec("qwen2_moe", "Qwen2Moe", "layer_types", moe="qwen2_moe"),
}


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# ---------------------------------------------------------------------- MoE checkpoint layout
def _expert_names(layout: MoeLayout) -> tuple[str, str, str, str]:
    """``(block name in the checkpoint, gate name, up name, down name)`` of one expert."""
    if layout == "mixtral":
        return "block_sparse_moe", "w1", "w3", "w2"
    return "mlp", "gate_proj", "up_proj", "down_proj"


def _install_expert_layout(layer: nn.Module, layout: MoeLayout) -> None:
    """Make ``layer.state_dict()`` use the per-expert checkpoint names, and loading fuse them."""
    experts = getattr(getattr(layer, "mlp", None), "experts", None)
    if layout == "none" or experts is None:
        return
    block, gate, up, down = _expert_names(layout)
    num_experts = int(experts.num_experts)
    inter = int(experts.intermediate_dim)

    def is_original(module: nn.Module) -> bool:
        # A custom module put in place of the MLP (a role override) keeps its own names.
        return getattr(getattr(module, "mlp", None), "experts", None) is experts

    def to_checkpoint(
        module: nn.Module, state_dict: MutableMapping[str, Any], prefix: str, local_metadata: Any
    ) -> None:
        fused_gate_up = fused_down = None
        if is_original(module):
            fused_gate_up = state_dict.pop(f"{prefix}mlp.experts.gate_up_proj", None)
            fused_down = state_dict.pop(f"{prefix}mlp.experts.down_proj", None)
        if block != "mlp":
            for key in [k for k in state_dict if k.startswith(f"{prefix}mlp.")]:
                state_dict[f"{prefix}{block}." + key[len(f"{prefix}mlp.") :]] = state_dict.pop(key)
        base = f"{prefix}{block}.experts."
        for e in range(num_experts):
            if fused_gate_up is not None:
                tensor = fused_gate_up.detach()
                state_dict[f"{base}{e}.{gate}.weight"] = tensor[e, :inter]
                state_dict[f"{base}{e}.{up}.weight"] = tensor[e, inter:]
            if fused_down is not None:
                state_dict[f"{base}{e}.{down}.weight"] = fused_down.detach()[e]

    def from_checkpoint(
        module: nn.Module,
        state_dict: MutableMapping[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        if block != "mlp":
            for key in [k for k in state_dict if k.startswith(f"{prefix}{block}.")]:
                state_dict[f"{prefix}mlp." + key[len(f"{prefix}{block}.") :]] = state_dict.pop(key)
        if not is_original(module):
            return
        base = f"{prefix}mlp.experts."
        gates = [f"{base}{e}.{gate}.weight" for e in range(num_experts)]
        ups = [f"{base}{e}.{up}.weight" for e in range(num_experts)]
        downs = [f"{base}{e}.{down}.weight" for e in range(num_experts)]
        if all(k in state_dict for k in (*gates, *ups)):
            gate_t = torch.stack([state_dict.pop(k) for k in gates])
            up_t = torch.stack([state_dict.pop(k) for k in ups])
            state_dict[f"{base}gate_up_proj"] = torch.cat([gate_t, up_t], dim=1)
        if all(k in state_dict for k in downs):
            state_dict[f"{base}down_proj"] = torch.stack([state_dict.pop(k) for k in downs])

    layer.register_state_dict_post_hook(to_checkpoint)  # type: ignore[no-untyped-call]
    layer.register_load_state_dict_pre_hook(from_checkpoint)  # type: ignore[no-untyped-call]


@contextlib.contextmanager
def _shape_only_experts(layer: nn.Module, experts_cls: Any) -> Iterator[None]:
    """On the meta device, route experts through ``batched_mm`` (data-independent shapes).

    The default implementations select experts with ``nonzero`` (eager) or call a kernel that
    has no float32 meta implementation (grouped_mm); the result shape is the same.
    """
    swapped: list[tuple[nn.Module, Any]] = []
    for sub in layer.modules():
        if isinstance(sub, experts_cls):
            original = sub.config
            shape_config = copy.copy(original)
            shape_config._experts_implementation = "batched_mm"
            sub.config = shape_config
            swapped.append((sub, original))
    try:
        yield
    finally:
        for sub, original in swapped:
            sub.config = original


# ---------------------------------------------------------------------- the family
class LlamaFamily(ArchitectureFamily):
    """Llama-style decoders (layers at ``model.layers.{i}``), see the module docstring.

    Roles inside a layer: ``layer``, ``attention`` (``self_attn``), ``mlp`` (the MLP, or for a
    sparse layer the sparse MoE block, also named ``mlp`` in transformers 5), the norms, and for
    MoE configs whose every layer is sparse ``router`` (``mlp.gate``) and ``experts``
    (``mlp.experts``); qwen2_moe configs mixing dense and sparse layers omit the last two.
    """

    family_id: ClassVar[str] = "llama"
    family_name: ClassVar[str] = "Llama-style decoders"
    model_types: ClassVar[Collection[str]] = tuple(_SPECS)
    architectures: ClassVar[Collection[str]] = tuple(
        f"{spec.prefix}{suffix}" for spec in _SPECS.values() for suffix in ("ForCausalLM", "Model")
    )
    base_model_prefix: ClassVar[str] = "model"
    layer_paths: ClassVar[Mapping[str, str]] = {"decoder": "layers.{idx}"}
    #: Old checkpoints stored a rotary ``inv_freq`` buffer per layer; transformers ignores it.
    ignored_tensor_patterns: ClassVar[Collection[str]] = (r"(^|\.)rotary_emb\.inv_freq$",)

    # ------------------------------------------------------------------ helpers
    def _spec(self, config: Any) -> _TypeSpec:
        model_type = getattr(config, "model_type", None)
        try:
            return _SPECS[str(model_type)]
        except KeyError:
            raise InvalidFamilyError(
                f"family {self.family_id!r} does not handle model type {model_type!r}; "
                f"valid model types: {sorted(_SPECS)}"
            ) from None

    def _runtime_config(self, config: Any) -> Any:
        """``config``, or a shallow copy with the attention/experts implementation that
        ``from_pretrained`` would pick when the config names none (the caller's config is
        never modified). ``sdpa`` on a model type without sdpa support becomes ``eager``."""
        spec = self._spec(config)
        attn = getattr(config, "_attn_implementation", None)
        experts = getattr(config, "_experts_implementation", None)
        want_attn = attn
        if attn is None or attn == "sdpa":
            # sdpa when the model supports it (gemma2 does not: its attention softcapping
            # needs eager, and transformers' sdpa path raises on it).
            supports_sdpa = bool(getattr(spec.cls("PreTrainedModel"), "_supports_sdpa", False))
            want_attn = "sdpa" if supports_sdpa else "eager"
        want_experts = experts
        if want_experts is None and spec.moe != "none":
            want_experts = "grouped_mm"
        if want_attn == attn and want_experts == experts:
            return config
        resolved = copy.copy(config)
        resolved._attn_implementation = want_attn
        if want_experts != experts:
            resolved._experts_implementation = want_experts
        return resolved

    def _layer_kind(self, config: Any, layer_idx: int) -> str:
        """``"full_attention"`` or ``"sliding_attention"``: which mask layer ``layer_idx`` uses."""
        pattern = self._spec(config).attention
        if pattern == "causal":
            return _FULL
        if pattern == "sliding_if_set":
            return _FULL if getattr(config, "sliding_window", None) is None else _SLIDING
        kind = str(config.layer_types[layer_idx])
        if kind not in (_FULL, _SLIDING):
            raise InvalidFamilyError(
                f"family {self.family_id!r}: layer {layer_idx} has unsupported layer type {kind!r}"
            )
        return kind

    def _masks(
        self,
        config: Any,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> dict[str, Any]:
        from transformers.masking_utils import (
            create_causal_mask,
            create_sliding_window_causal_mask,
        )

        kinds = {self._layer_kind(config, i) for i in range(self.num_layers(config))}
        makers = {_FULL: create_causal_mask, _SLIDING: create_sliding_window_causal_mask}
        return {
            kind: makers[kind](
                config=config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=None,
                position_ids=position_ids,
            )
            for kind in sorted(kinds)
        }

    def _sparse_layers(self, config: Any) -> list[bool]:
        """Per layer: whether its ``mlp`` is a sparse MoE block (as the layer classes decide)."""
        spec = self._spec(config)
        n = self.num_layers(config)
        if spec.moe == "mixtral":
            return [_positive_int(getattr(config, "num_local_experts", None))] * n
        if spec.moe == "qwen2_moe":
            if not _positive_int(getattr(config, "num_experts", None)):
                return [False] * n
            only_dense = set(getattr(config, "mlp_only_layers", None) or ())
            step = int(getattr(config, "decoder_sparse_step", 1) or 1)
            return [i not in only_dense and (i + 1) % step == 0 for i in range(n)]
        return [False] * n

    # ------------------------------------------------------------------ seed API
    def create_layer(self, config: Any, layer_idx: int, layer_type: str = "decoder") -> nn.Module:
        self.get_layer_prefix(layer_idx, layer_type)  # validates layer_type
        n = self.num_layers(config)
        if not 0 <= layer_idx < n:
            raise InvalidFamilyError(
                f"layer index {layer_idx} out of range for a model with {n} layers"
            )
        spec = self._spec(config)
        layer = cast(nn.Module, spec.cls("DecoderLayer")(self._runtime_config(config), layer_idx))
        _install_expert_layout(layer, spec.moe)
        return layer

    # ------------------------------------------------------------------ structure
    def layer_stages(self, config: Any, layer_type: str = "decoder") -> tuple[tuple[str, ...], ...]:
        return (
            ("input_layernorm", "self_attn"),
            (
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "mlp",
                "block_sparse_moe",  # mixtral's checkpoint name of ``mlp``
                "post_feedforward_layernorm",
            ),
        )

    def layer_roles(self, config: Any, layer_type: str = "decoder") -> Mapping[str, str]:
        roles = {
            "layer": "",
            "attention": "self_attn",
            "mlp": "mlp",
            "input_norm": "input_layernorm",
            "post_attention_norm": "post_attention_layernorm",
        }
        if self._spec(config).package == "gemma2":
            roles["pre_feedforward_norm"] = "pre_feedforward_layernorm"
            roles["post_feedforward_norm"] = "post_feedforward_layernorm"
        sparse = self._sparse_layers(config)
        if sparse and all(sparse):
            roles["router"] = "mlp.gate"
            roles["experts"] = "mlp.experts"
        return roles

    def is_moe(self, config: Any) -> bool:
        spec = self._spec(config)
        if spec.moe == "none":
            return super().is_moe(config)
        return any(self._sparse_layers(config))

    def embedding_tensor_names(
        self, config: Any, *, model_prefix: str | None = None
    ) -> tuple[str, ...]:
        return (self._model_prefix(model_prefix) + "embed_tokens.weight",)

    def final_norm_tensor_names(
        self, config: Any, *, model_prefix: str | None = None
    ) -> tuple[str, ...]:
        return (self._model_prefix(model_prefix) + "norm.weight",)

    def lm_head_tensor_names(
        self, config: Any, *, model_prefix: str | None = None
    ) -> tuple[str, ...]:
        if self.is_tied(config):
            return self.embedding_tensor_names(config, model_prefix=model_prefix)
        return ("lm_head.weight",)

    # ------------------------------------------------------------------ streaming hooks
    def build_stem(self, config: Any, layer_type: str = "decoder") -> nn.Module:
        spec = self._spec(config)
        rc = self._runtime_config(config)
        pad = getattr(rc, "pad_token_id", None)
        embed: nn.Module
        if spec.scaled_embedding:
            embed = spec.cls("TextScaledWordEmbedding")(
                rc.vocab_size, rc.hidden_size, pad, embed_scale=rc.hidden_size**0.5
            )
        else:
            embed = nn.Embedding(rc.vocab_size, rc.hidden_size, pad)
        rotary = cast(nn.Module, spec.cls("RotaryEmbedding")(rc))
        return nn.ModuleDict({"embed_tokens": embed, "rotary_emb": rotary})

    def embed(
        self,
        config: Any,
        stem: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        layer_type: str = "decoder",
    ) -> tuple[torch.Tensor, LayerContext]:
        assert isinstance(stem, nn.ModuleDict)
        rc = self._runtime_config(config)
        hidden = stem["embed_tokens"](input_ids)
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        masks = self._masks(rc, hidden, attention_mask, position_ids)
        cos, sin = stem["rotary_emb"](hidden, position_ids)
        context: LayerContext = {
            "attention_mask": attention_mask,
            "masks": masks,
            "position_ids": position_ids,
            "position_embeddings": (cos, sin),
        }
        return hidden, context

    def call_layer(
        self,
        config: Any,
        layer: nn.Module,
        hidden_states: torch.Tensor,
        context: LayerContext,
        layer_idx: int,
        layer_type: str = "decoder",
    ) -> torch.Tensor:
        spec = self._spec(config)
        kwargs = {
            "attention_mask": context["masks"][self._layer_kind(config, layer_idx)],
            "position_ids": context["position_ids"],
            "position_embeddings": context["position_embeddings"],
        }
        guard: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if hidden_states.is_meta and spec.moe != "none":
            guard = _shape_only_experts(layer, spec.cls("Experts"))
        with guard:
            out = layer(hidden_states, **kwargs)
        if isinstance(out, tuple):
            out = out[0]
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
        spec = self._spec(config)
        rc = self._runtime_config(config)
        with torch.device("cpu"), torch.no_grad():
            rotary = spec.cls("RotaryEmbedding")(rc)
            positions = torch.arange(seq).unsqueeze(0)
            cos, sin = rotary(torch.zeros((), dtype=dtype), positions)
        probe = torch.empty(batch, seq, self.hidden_size(rc), device=device, dtype=dtype)
        return {
            "attention_mask": None,
            "masks": self._masks(rc, probe, None, None),
            "position_ids": positions.to(device),
            "position_embeddings": (cos.to(device), sin.to(device)),
        }

    def build_final(self, config: Any, layer_type: str = "decoder") -> nn.Module:
        spec = self._spec(config)
        norm = spec.cls("RMSNorm")(config.hidden_size, eps=config.rms_norm_eps)
        return nn.ModuleDict({"norm": norm})

    def finish(
        self,
        config: Any,
        final: nn.Module,
        hidden_states: torch.Tensor,
        context: LayerContext,
        layer_type: str = "decoder",
    ) -> torch.Tensor:
        assert isinstance(final, nn.ModuleDict)
        out = final["norm"](hidden_states)
        assert isinstance(out, torch.Tensor)
        return out

    def build_lm_head(self, config: Any) -> nn.Module | None:
        return nn.ModuleDict(
            {"lm_head": nn.Linear(config.hidden_size, config.vocab_size, bias=False)}
        )

    def lm_head_tensor_map(
        self,
        config: Any,
        head_keys: Collection[str],
        *,
        model_prefix: str,
        available: Collection[str],
    ) -> dict[str, str]:
        """``lm_head.weight`` when the checkpoint stores it, else (tied) the embedding matrix.

        Like ``from_pretrained``: a tied config whose checkpoint also stores a (different)
        ``lm_head.weight`` is not tied, the stored head is used.
        """
        if "lm_head.weight" in available:
            name = "lm_head.weight"
        else:
            name = self.lm_head_tensor_names(config, model_prefix=model_prefix)[0]
        unknown = set(head_keys) - {"lm_head.weight"}
        if unknown:
            raise InvalidFamilyError(f"unexpected LM head keys {sorted(unknown)}")
        return {key: name for key in head_keys}

    def compute_logits(
        self, config: Any, lm_head: nn.Module, last_hidden_state: torch.Tensor
    ) -> torch.Tensor:
        assert isinstance(lm_head, nn.ModuleDict)
        logits = lm_head["lm_head"](last_hidden_state)
        assert isinstance(logits, torch.Tensor)
        cap = getattr(config, "final_logit_softcapping", None)
        if self._spec(config).final_logit_softcapping and cap is not None:
            # The same three operations as Gemma2ForCausalLM.forward.
            logits = torch.tanh(logits / float(cap)) * float(cap)
        return logits


FAMILIES = (LlamaFamily,)
