"""GPT-style decoders saved under ``transformer.h.{i}``: GPT-2, GPT-J, Falcon and BLOOM.

The four model types share one checkpoint layout (``transformer.h.{i}.``, ``transformer.ln_f``,
root-level ``lm_head``) and differ in their embeddings and position handling:

=========  ==========================================  ==============================================
type       embeddings (stem)                           positions
=========  ==========================================  ==============================================
gpt2       ``wte`` + learned ``wpe``                   ``arange(seq)`` into ``wpe``
gptj       ``wte``                                     rotary: ``rotary_emb.embed_positions`` buffer
falcon     ``word_embeddings``                         rotary (``rotary_emb``) or ALiBi (``alibi``)
bloom      ``word_embeddings`` + ``..._layernorm``     ALiBi built from the attention mask
=========  ==========================================  ==============================================

Every hook reproduces the corresponding ``*Model.forward`` of transformers step by step
(masks from :mod:`transformers.masking_utils`, ALiBi from the model's own helper), so a
layer-major run equals the in-memory model.

The module also holds small helpers shared by the ``gpt_neox`` and ``opt`` families.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .._family import ArchitectureFamily, LayerContext
from ..errors import UnsupportedArchitectureError
from ._lazy import lazy_module

if TYPE_CHECKING:
    from transformers import masking_utils
    from transformers.models.bloom import modeling_bloom
    from transformers.models.falcon import modeling_falcon
    from transformers.models.gpt2 import modeling_gpt2
    from transformers.models.gptj import modeling_gptj
else:
    masking_utils = lazy_module("transformers.masking_utils")
    modeling_bloom = lazy_module("transformers.models.bloom.modeling_bloom")
    modeling_falcon = lazy_module("transformers.models.falcon.modeling_falcon")
    modeling_gpt2 = lazy_module("transformers.models.gpt2.modeling_gpt2")
    modeling_gptj = lazy_module("transformers.models.gptj.modeling_gptj")

__all__ = ["FAMILIES", "GPTFamily"]


# ---------------------------------------------------------------------------- shared helpers
def attn_config(config: Any, default: str, *, force: bool = False) -> Any:
    """``config`` with an attention implementation set, as ``from_pretrained`` would set it.

    A config read with ``AutoConfig.from_pretrained`` has ``_attn_implementation`` ``None``;
    the in-memory model then uses ``default`` (``"sdpa"``, or ``"eager"`` for models without
    SDPA support). ``None`` would make ``create_causal_mask`` return no mask at all, so a
    shallow copy with ``default`` set is returned (the caller's config is left untouched).
    With ``force``, ``default`` replaces any other value too (for models whose attention only
    works with one kind of mask).
    """
    current = getattr(config, "_attn_implementation", None)
    if current == default or (current is not None and not force):
        return config
    resolved = copy.copy(config)
    resolved._attn_implementation = default
    return resolved


class LMHead(nn.Module):
    """An LM head whose state-dict keys are relative to the checkpoint root (``lm_head.*``)."""

    def __init__(self, in_features: int, vocab_size: int, *, bias: bool) -> None:
        super().__init__()
        self.lm_head = nn.Linear(in_features, vocab_size, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lm_head(hidden_states)
        return out


def sub(module: nn.Module, name: str) -> nn.Module:
    """Submodule ``name`` of ``module`` (typed, unlike attribute access on ``nn.Module``)."""
    return module.get_submodule(name)


def arange_positions(seq: int, device: torch.device) -> torch.Tensor:
    """``position_ids`` the way GPT-2/GPT-J/Falcon/GPT-NeoX build them without a cache."""
    return torch.arange(seq, device=device).unsqueeze(0)


#: Layer children in the order each block's forward first calls them (see
#: ``ArchitectureFamily.layer_stages``): attention, then the MLP.
_STAGES: dict[str, tuple[tuple[str, ...], ...]] = {
    "gpt2": (("ln_1", "attn"), ("ln_cross_attn", "crossattention", "ln_2", "mlp")),
    "gptj": (("ln_1", "attn"), ("mlp",)),
    "bloom": (("input_layernorm", "self_attention"), ("post_attention_layernorm", "mlp")),
    "falcon": (
        ("input_layernorm", "ln_attn", "ln_mlp", "self_attention"),
        ("post_attention_layernorm", "mlp"),
    ),
}


def check_model_type(family: ArchitectureFamily, config: Any) -> str:
    """``config.model_type`` if ``family`` claims it, else :class:`UnsupportedArchitectureError`."""
    model_type = str(getattr(config, "model_type", ""))
    if model_type not in family.model_types:
        raise UnsupportedArchitectureError(
            f"family {family.family_id!r} does not handle model_type {model_type!r}; "
            f"it handles {sorted(family.model_types)}"
        )
    return model_type


# ---------------------------------------------------------------------------- per-type table
@dataclass(frozen=True)
class _TypeSpec:
    """What differs between the model types of :class:`GPTFamily`."""

    layer_cls: Callable[[], type[nn.Module]]  # resolved on use: the modelling code loads lazily
    attention: str
    token_embedding: str
    embeddings: tuple[str, ...]
    attn_default: str
    lm_head_bias: bool
    attn_forced: bool = False


_SPECS: dict[str, _TypeSpec] = {
    "gpt2": _TypeSpec(
        layer_cls=lambda: modeling_gpt2.GPT2Block,
        attention="attn",
        token_embedding="wte.weight",
        embeddings=("wte.weight", "wpe.weight"),
        attn_default="sdpa",
        lm_head_bias=False,
    ),
    "gptj": _TypeSpec(
        layer_cls=lambda: modeling_gptj.GPTJBlock,
        attention="attn",
        token_embedding="wte.weight",
        embeddings=("wte.weight",),
        attn_default="sdpa",
        lm_head_bias=True,
    ),
    "falcon": _TypeSpec(
        layer_cls=lambda: modeling_falcon.FalconDecoderLayer,
        attention="self_attention",
        token_embedding="word_embeddings.weight",
        embeddings=("word_embeddings.weight",),
        attn_default="sdpa",
        lm_head_bias=False,
    ),
    "bloom": _TypeSpec(
        layer_cls=lambda: modeling_bloom.BloomBlock,
        attention="self_attention",
        token_embedding="word_embeddings.weight",
        embeddings=(
            "word_embeddings.weight",
            "word_embeddings_layernorm.weight",
            "word_embeddings_layernorm.bias",
        ),
        # BloomAttention never dispatches on the attention implementation: it always adds the
        # mask to its scores, so only the eager (additive float, never skipped) mask is right,
        # whatever the config says (from_pretrained picks "eager": no SDPA support).
        attn_default="eager",
        lm_head_bias=False,
        attn_forced=True,
    ),
}


class GPTFamily(ArchitectureFamily):
    """GPT-2, GPT-J, Falcon and BLOOM: layers at ``transformer.h.{i}``.

    Roles: ``layer`` is the block itself, ``attention`` is ``attn`` (gpt2, gptj) or
    ``self_attention`` (falcon, bloom), ``mlp`` is ``mlp``.

    BLOOM's ``self_attention(hidden, residual, ...)`` and ``mlp(hidden, residual)`` add the
    residual themselves (they return ``residual + output``); a custom module replacing one of
    them returns only its own output, and the engine adds the residual (:meth:`adds_residual`).
    """

    family_id: ClassVar[str] = "gpt"
    family_name: ClassVar[str] = "GPT-style decoders (GPT-2, GPT-J, Falcon, BLOOM)"
    model_types: ClassVar[Collection[str]] = tuple(_SPECS)
    architectures: ClassVar[Collection[str]] = (
        "GPT2Model",
        "GPT2LMHeadModel",
        "GPTJModel",
        "GPTJForCausalLM",
        "FalconModel",
        "FalconForCausalLM",
        "BloomModel",
        "BloomForCausalLM",
    )
    base_model_prefix: ClassVar[str] = "transformer"
    layer_paths: ClassVar[Mapping[str, str]] = {"decoder": "h.{idx}"}
    #: Regexes over full checkpoint names, anchored (``re.search`` and ``re.fullmatch`` agree).
    ignored_tensor_patterns: ClassVar[Collection[str]] = (
        # gpt2 / gptj: causal-mask buffers of old checkpoints (transformers ignores them on load)
        r"^(?:.*\.)?h\.\d+\.attn\.(?:bias|masked_bias)$",
        r"^(?:.*\.)?h\.\d+\.crossattention\.(?:bias|masked_bias)$",
        # rotary buffers of old checkpoints (transformers ignores them for models with rotary_emb)
        r"^(?:.*\.)?rotary_emb\.inv_freq$",
    )
    unused_tensor_patterns: ClassVar[Collection[str]] = (
        # tied checkpoints that still store the head; heads of other task classes
        # (sequence/token classification, question answering, GPT-2 double heads)
        r"^lm_head\.weight$",
        r"^(?:score|classifier|qa_outputs|multiple_choice_head)\..+$",
    )

    def _spec(self, config: Any) -> _TypeSpec:
        return _SPECS[check_model_type(self, config)]

    def _attn(self, config: Any) -> Any:
        spec = self._spec(config)
        return attn_config(config, spec.attn_default, force=spec.attn_forced)

    # ------------------------------------------------------------------ seed API
    def create_layer(self, config: Any, layer_idx: int, layer_type: str = "decoder") -> nn.Module:
        self.get_layer_prefix(layer_idx, layer_type)  # validates layer_type
        spec = self._spec(config)
        return spec.layer_cls()(self._attn(config), layer_idx=layer_idx)

    # ------------------------------------------------------------------ structure
    def layer_stages(self, config: Any, layer_type: str = "decoder") -> tuple[tuple[str, ...], ...]:
        # Falcon's new architecture applies ln_mlp before attention: it belongs to stage 0.
        return _STAGES[check_model_type(self, config)]

    def layer_roles(self, config: Any, layer_type: str = "decoder") -> Mapping[str, str]:
        return {"layer": "", "attention": self._spec(config).attention, "mlp": "mlp"}

    def max_sequence_length(self, config: Any) -> int | None:
        """GPT-2's learned ``wpe`` and GPT-J's sin/cos table end at ``max_position_embeddings``."""
        if check_model_type(self, config) in ("gpt2", "gptj"):
            return int(config.max_position_embeddings)
        return None

    def adds_residual(self, config: Any, role: str) -> bool:
        """BLOOM's attention and MLP take the residual and add it themselves."""
        return check_model_type(self, config) == "bloom" and role in ("attention", "mlp")

    def embedding_tensor_names(
        self, config: Any, *, model_prefix: str | None = None
    ) -> tuple[str, ...]:
        prefix = self._model_prefix(model_prefix)
        return tuple(prefix + name for name in self._spec(config).embeddings)

    def final_norm_tensor_names(
        self, config: Any, *, model_prefix: str | None = None
    ) -> tuple[str, ...]:
        prefix = self._model_prefix(model_prefix)
        return (prefix + "ln_f.weight", prefix + "ln_f.bias")

    def lm_head_tensor_names(
        self, config: Any, *, model_prefix: str | None = None
    ) -> tuple[str, ...]:
        spec = self._spec(config)
        weight = (
            self._model_prefix(model_prefix) + spec.token_embedding
            if self.is_tied(config)
            else "lm_head.weight"
        )
        return (weight, "lm_head.bias") if spec.lm_head_bias else (weight,)

    # ------------------------------------------------------------------ streaming hooks
    def build_stem(self, config: Any, layer_type: str = "decoder") -> nn.Module:
        model_type = check_model_type(self, config)
        hidden = int(config.hidden_size)
        stem = nn.Module()  # attributes named as in the base model, so keys match checkpoints
        if model_type in ("gpt2", "gptj"):
            stem.wte = nn.Embedding(config.vocab_size, hidden)
        else:
            stem.word_embeddings = nn.Embedding(config.vocab_size, hidden)
        if model_type == "gpt2":
            stem.wpe = nn.Embedding(config.max_position_embeddings, hidden)
        elif model_type == "gptj":
            stem.rotary_emb = modeling_gptj.GPTJRotaryEmbedding(config)
        elif model_type == "falcon":
            if not config.alibi:
                stem.rotary_emb = modeling_falcon.FalconRotaryEmbedding(config=config)
        else:
            stem.word_embeddings_layernorm = nn.LayerNorm(hidden, eps=config.layer_norm_epsilon)
        return stem

    def embed(
        self,
        config: Any,
        stem: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        layer_type: str = "decoder",
    ) -> tuple[torch.Tensor, LayerContext]:
        model_type = check_model_type(self, config)
        mask_config = self._attn(config)
        token_embedding = sub(stem, "wte" if model_type in ("gpt2", "gptj") else "word_embeddings")
        inputs_embeds = token_embedding(input_ids)
        batch, seq = input_ids.shape
        if model_type == "bloom":
            # BloomModel.forward: layernorm on the embeddings, ALiBi from the 2D mask.
            hidden = sub(stem, "word_embeddings_layernorm")(inputs_embeds)
            alibi = modeling_bloom.build_alibi_tensor(
                attention_mask.to(hidden.device), config.n_head, dtype=hidden.dtype
            )
            mask = masking_utils.create_causal_mask(
                config=mask_config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=None,
            )
            return hidden, {"attention_mask": mask, "alibi": alibi}
        position_ids = arange_positions(seq, inputs_embeds.device)
        if model_type == "gpt2":
            hidden = inputs_embeds + sub(stem, "wpe")(position_ids).to(inputs_embeds.device)
            mask = masking_utils.create_causal_mask(
                config=mask_config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask.view(batch, -1),
                cache=None,
                position_ids=position_ids,
            )
            return hidden, {"attention_mask": mask, "position_ids": position_ids}
        if model_type == "gptj":
            mask = masking_utils.create_causal_mask(
                config=mask_config,
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
        mask = self._falcon_mask(config, mask_config, inputs_embeds, attention_mask, position_ids)
        position_embeddings = (
            None
            if config.alibi
            else sub(stem, "rotary_emb")(inputs_embeds, position_ids=position_ids)
        )
        return inputs_embeds, {
            "attention_mask": mask,
            "position_ids": position_ids,
            "position_embeddings": position_embeddings,
        }

    def _falcon_mask(
        self,
        config: Any,
        mask_config: Any,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """FalconModel.forward's mask: causal (never skipped), plus ALiBi when ``config.alibi``."""
        batch, seq = inputs_embeds.shape[:2]
        causal_mask: torch.Tensor | None = masking_utils.create_causal_mask(
            config=mask_config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=None,
            position_ids=position_ids,
            allow_is_causal_skip=False,
        )
        if not config.alibi:
            return causal_mask
        num_heads = int(config.num_attention_heads)
        alibi_mask = (
            torch.ones((batch, seq), device=inputs_embeds.device, dtype=torch.long)
            if attention_mask is None
            else attention_mask
        )
        alibi = modeling_falcon.build_alibi_tensor(alibi_mask, num_heads, dtype=inputs_embeds.dtype)
        assert isinstance(causal_mask, torch.Tensor)
        min_dtype = torch.finfo(inputs_embeds.dtype).min
        if causal_mask.dtype == torch.bool:
            causal_mask = torch.where(
                causal_mask,
                torch.full((), 0.0, device=causal_mask.device, dtype=inputs_embeds.dtype),
                min_dtype,
            )
        alibi = alibi.reshape(batch, -1, *alibi.shape[1:])
        return torch.masked_fill(
            alibi / math.sqrt(int(config.hidden_size) // num_heads),
            causal_mask < -1,
            min_dtype,
        )

    def call_layer(
        self,
        config: Any,
        layer: nn.Module,
        hidden_states: torch.Tensor,
        context: LayerContext,
        layer_idx: int,
        layer_type: str = "decoder",
    ) -> torch.Tensor:
        model_type = check_model_type(self, config)
        if model_type == "bloom":
            out = layer(
                hidden_states, alibi=context["alibi"], attention_mask=context["attention_mask"]
            )
        elif model_type == "gpt2":
            out = layer(
                hidden_states,
                attention_mask=context["attention_mask"],
                position_ids=context["position_ids"],
            )
        else:
            out = layer(
                hidden_states,
                attention_mask=context["attention_mask"],
                position_ids=context["position_ids"],
                position_embeddings=context["position_embeddings"],
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
        layer_type: str = "decoder",
    ) -> LayerContext:
        model_type = check_model_type(self, config)
        mask_config = self._attn(config)
        dummy = torch.empty((batch, seq, int(config.hidden_size)), device=device, dtype=dtype)
        if model_type == "bloom":
            ones = torch.ones((batch, seq), device=device, dtype=torch.long)
            alibi = modeling_bloom.build_alibi_tensor(ones, config.n_head, dtype=dtype)
            mask = masking_utils.create_causal_mask(
                config=mask_config, inputs_embeds=dummy, attention_mask=None, cache=None
            )
            return {"attention_mask": mask, "alibi": alibi}
        position_ids = arange_positions(seq, device)
        context: LayerContext = {"position_ids": position_ids}
        if model_type == "falcon":
            context["attention_mask"] = self._falcon_mask(config, mask_config, dummy, None, None)
        else:
            context["attention_mask"] = masking_utils.create_causal_mask(
                config=mask_config, inputs_embeds=dummy, attention_mask=None, cache=None
            )
        if model_type == "gptj" or (model_type == "falcon" and not config.alibi):
            with torch.device(device):
                rotary: nn.Module = (
                    modeling_gptj.GPTJRotaryEmbedding(config)
                    if model_type == "gptj"
                    else modeling_falcon.FalconRotaryEmbedding(config=config)
                )
            context["position_embeddings"] = rotary(dummy, position_ids=position_ids)
        elif model_type == "falcon":
            context["position_embeddings"] = None
        return context

    def build_final(self, config: Any, layer_type: str = "decoder") -> nn.Module:
        final = nn.Module()
        final.ln_f = nn.LayerNorm(int(config.hidden_size), eps=config.layer_norm_epsilon)
        return final

    def finish(
        self,
        config: Any,
        final: nn.Module,
        hidden_states: torch.Tensor,
        context: LayerContext,
        layer_type: str = "decoder",
    ) -> torch.Tensor:
        out: torch.Tensor = sub(final, "ln_f")(hidden_states)
        return out

    def build_lm_head(self, config: Any) -> nn.Module | None:
        spec = self._spec(config)
        return LMHead(int(config.hidden_size), int(config.vocab_size), bias=spec.lm_head_bias)

    def lm_head_tensor_map(
        self,
        config: Any,
        head_keys: Collection[str],
        *,
        model_prefix: str,
        available: Collection[str],
    ) -> dict[str, str]:
        spec = self._spec(config)
        mapping = {key: key for key in head_keys}
        if self.is_tied(config):
            mapping["lm_head.weight"] = model_prefix + spec.token_embedding
        return mapping


FAMILIES = (GPTFamily,)
