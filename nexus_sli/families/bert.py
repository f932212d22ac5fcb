"""BERT and RoBERTa encoders: layers at ``encoder.layer.{i}``, post-LN, no final norm.

=========  ======================  ===================================  =========================
type       model prefix            stem (``embeddings.*``)              masked-LM head (root)
=========  ======================  ===================================  =========================
bert       ``bert.``               ``BertEmbeddings``                   ``cls.predictions.*``
roberta    ``roberta.``            ``RobertaEmbeddings`` (positions     ``lm_head.*``
                                   count from ``pad_token_id + 1``)
=========  ======================  ===================================  =========================

The stem is the model's own embeddings module, called like ``BertModel.forward`` calls it:
no ``token_type_ids`` (the all-zeros buffer is used) and default position ids (RoBERTa derives
them from ``input_ids`` and ``pad_token_id``). The attention mask comes from
:func:`transformers.masking_utils.create_bidirectional_mask` (``create_causal_mask`` when
``config.is_decoder``), exactly as the model forward builds it. There is no final norm:
:meth:`finish` is the identity and :meth:`final_norm_tensor_names` is empty.

Logits are those of ``BertForMaskedLM`` / ``RobertaForMaskedLM``. With ``tie_word_embeddings``
(the default) the decoder weight is the word-embedding matrix and the decoder bias is the
head's ``bias`` parameter (``cls.predictions.bias`` / ``lm_head.bias``); untied, the checkpoint's
own ``decoder.weight`` and ``decoder.bias`` are used, as transformers does.

Checkpoint tensors the streamed outputs never read are listed in :attr:`unused_tensor_patterns`
(the pooler of ``BertModel``, the NSP head, task heads); legacy tensors transformers ignores on
load are in :attr:`ignored_tensor_patterns`. Both are regexes over full checkpoint names,
anchored with ``^...$`` (``re.search`` and ``re.fullmatch`` agree on them).
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from .._family import ArchitectureFamily, LayerContext
from ._lazy import lazy_module

if TYPE_CHECKING:
    from transformers import activations, masking_utils
    from transformers.models.bert import modeling_bert
    from transformers.models.roberta import modeling_roberta
else:
    activations = lazy_module("transformers.activations")
    masking_utils = lazy_module("transformers.masking_utils")
    modeling_bert = lazy_module("transformers.models.bert.modeling_bert")
    modeling_roberta = lazy_module("transformers.models.roberta.modeling_roberta")

__all__ = ["FAMILIES", "BertFamily", "RobertaFamily"]

_EMBEDDING_KEYS = (
    "word_embeddings.weight",
    "position_embeddings.weight",
    "token_type_embeddings.weight",
    "LayerNorm.weight",
    "LayerNorm.bias",
)


def _attn_config(config: Any) -> Any:
    """``config`` with the attention implementation ``from_pretrained`` would pick.

    A config read with ``AutoConfig.from_pretrained`` has ``_attn_implementation`` ``None``;
    BERT and RoBERTa support SDPA, so the in-memory model runs with ``"sdpa"``. Layers and masks
    must agree on it (an SDPA boolean mask is not an eager additive mask), so a copy with
    ``"sdpa"`` is returned; the caller's config is left untouched.
    """
    if getattr(config, "_attn_implementation", None) is not None:
        return config
    resolved = copy.deepcopy(config)
    resolved._attn_implementation = "sdpa"
    return resolved


def _legacy_name(name: str, available: Collection[str]) -> str:
    """``name``, or its pre-2019 ``LayerNorm.gamma``/``.beta`` spelling if only that exists.

    transformers renames ``LayerNorm.gamma``/``LayerNorm.beta`` to ``.weight``/``.bias`` on load
    (its "legacy" conversion); the stem and the head follow it.
    """
    if name in available:
        return name
    for new, old in (
        (".LayerNorm.weight", ".LayerNorm.gamma"),
        (".LayerNorm.bias", ".LayerNorm.beta"),
    ):
        if name.endswith(new):
            legacy = name[: -len(new)] + old
            if legacy in available:
                return legacy
    return name


class _Stem(nn.Module):
    """Holds the model's embeddings module under ``embeddings`` (keys ``embeddings.*``)."""

    def __init__(self, embeddings: nn.Module) -> None:
        super().__init__()
        self.embeddings = embeddings


class _BertMaskedLMHead(nn.Module):
    """``BertForMaskedLM``'s head under ``cls`` (keys relative to the checkpoint root).

    Tied: the decoder has no bias of its own, ``cls.predictions.bias`` is added (transformers
    ties ``decoder.bias`` to it). Untied: ``cls.predictions.bias`` is dropped (transformers does
    not use it then) and ``decoder.bias`` is used.
    """

    def __init__(self, config: Any, *, tied: bool) -> None:
        super().__init__()
        self.cls = modeling_bert.BertOnlyMLMHead(config)  # type: ignore[no-untyped-call]
        predictions = self.cls.predictions
        if tied:
            predictions.decoder.register_parameter("bias", None)
        else:
            del predictions.bias

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        predictions = self.cls.predictions
        transformed = predictions.transform(hidden_states)
        bias = (
            predictions.decoder.bias if predictions.decoder.bias is not None else predictions.bias
        )
        return F.linear(transformed, predictions.decoder.weight, bias)


class _RobertaMaskedLMHead(nn.Module):
    """``RobertaForMaskedLM``'s head under ``lm_head``; biases as in :class:`_BertMaskedLMHead`."""

    def __init__(self, config: Any, *, tied: bool) -> None:
        super().__init__()
        self.lm_head = modeling_roberta.RobertaLMHead(config)  # type: ignore[no-untyped-call]
        if tied:
            self.lm_head.decoder.register_parameter("bias", None)
        else:
            del self.lm_head.bias

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        head = self.lm_head
        # RobertaLMHead.forward: dense -> gelu -> layer_norm -> decoder (+ bias).
        x = head.layer_norm(activations.gelu(head.dense(hidden_states)))
        bias = head.decoder.bias if head.decoder.bias is not None else head.bias
        return F.linear(x, head.decoder.weight, bias)


class _BertLikeFamily(ArchitectureFamily):
    """What BERT and RoBERTa share: ``encoder.layer.{i}``, ``embeddings.*``, post-LN layers.

    Roles: ``layer`` is the layer itself, ``attention`` is ``attention`` (self-attention plus
    its output projection, residual and LayerNorm). BERT's feed-forward is split in two
    siblings, ``intermediate`` (dense + activation) and ``output`` (dense + residual +
    LayerNorm); no single submodule holds it, so ``mlp`` maps to ``intermediate`` (its output
    is the FFN activation) and ``mlp_output`` to ``output``. A module replacing ``mlp`` must
    therefore map ``hidden_size`` to ``intermediate_size`` (``output`` still projects back,
    adds the residual and normalizes). With ``add_cross_attention``, ``cross_attention`` maps
    to ``crossattention``.
    """

    layer_paths: ClassVar[Mapping[str, str]] = {"encoder": "encoder.layer.{idx}"}

    def _embeddings_cls(self) -> type[nn.Module]:
        return modeling_bert.BertEmbeddings

    def _layer_cls(self) -> type[nn.Module]:
        return modeling_bert.BertLayer

    # ------------------------------------------------------------------ seed API
    def create_layer(self, config: Any, layer_idx: int, layer_type: str = "encoder") -> nn.Module:
        self.get_layer_prefix(layer_idx, layer_type)  # validates layer_type
        return self._layer_cls()(_attn_config(config), layer_idx=layer_idx)

    def get_layer_prefix(
        self, layer_idx: int, layer_type: str = "encoder", *, model_prefix: str | None = None
    ) -> str:
        return super().get_layer_prefix(layer_idx, layer_type, model_prefix=model_prefix)

    # ------------------------------------------------------------------ structure
    def num_layers(self, config: Any, layer_type: str = "encoder") -> int:
        return int(config.num_hidden_layers)

    def layer_stages(self, config: Any, layer_type: str = "encoder") -> tuple[tuple[str, ...], ...]:
        return (("attention", "crossattention"), ("intermediate", "output"))

    def layer_roles(self, config: Any, layer_type: str = "encoder") -> Mapping[str, str]:
        roles = {
            "layer": "",
            "attention": "attention",
            "mlp": "intermediate",
            "mlp_output": "output",
        }
        if getattr(config, "add_cross_attention", False):
            roles["cross_attention"] = "crossattention"
        return roles

    def embedding_tensor_names(
        self, config: Any, *, model_prefix: str | None = None
    ) -> tuple[str, ...]:
        prefix = self._model_prefix(model_prefix) + "embeddings."
        return tuple(prefix + key for key in _EMBEDDING_KEYS)

    def final_norm_tensor_names(
        self, config: Any, *, model_prefix: str | None = None
    ) -> tuple[str, ...]:
        return ()

    def _word_embeddings(self, model_prefix: str) -> str:
        return model_prefix + "embeddings.word_embeddings.weight"

    # ------------------------------------------------------------------ streaming hooks
    def build_stem(self, config: Any, layer_type: str = "encoder") -> nn.Module:
        # eval(): the embeddings end in a dropout, which must be the identity as in the
        # in-memory model (run_in_memory puts only the layers in eval mode).
        return _Stem(self._embeddings_cls()(config)).eval()

    def stem_tensor_names(
        self,
        config: Any,
        stem_keys: Collection[str],
        *,
        model_prefix: str,
        available: Collection[str],
        layer_type: str = "encoder",
    ) -> dict[str, str]:
        return {key: _legacy_name(model_prefix + key, available) for key in stem_keys}

    def embed(
        self,
        config: Any,
        stem: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        layer_type: str = "encoder",
    ) -> tuple[torch.Tensor, LayerContext]:
        assert isinstance(stem, _Stem)
        hidden: torch.Tensor = stem.embeddings(input_ids=input_ids)
        return hidden, {"attention_mask": self._mask(config, hidden, attention_mask)}

    def _mask(
        self, config: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> Any:
        """``BertModel._create_attention_masks`` for the self-attention mask."""
        mask_config = _attn_config(config)
        if getattr(config, "is_decoder", False):
            return masking_utils.create_causal_mask(
                config=mask_config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=None,
                position_ids=None,
            )
        return masking_utils.create_bidirectional_mask(
            config=mask_config, inputs_embeds=inputs_embeds, attention_mask=attention_mask
        )

    def max_sequence_length(self, config: Any) -> int | None:
        """The learned position table; RoBERTa's positions start after ``padding_idx``."""
        size = int(config.max_position_embeddings)
        if getattr(config, "model_type", "") == "roberta":
            return size - int(config.pad_token_id) - 1
        return size

    def attention_is_causal(self, config: Any, layer_type: str = "encoder") -> bool:
        """Causal only for a BERT configured as a decoder (``is_decoder=True``)."""
        return bool(getattr(config, "is_decoder", False))

    def call_layer(
        self,
        config: Any,
        layer: nn.Module,
        hidden_states: torch.Tensor,
        context: LayerContext,
        layer_idx: int,
        layer_type: str = "encoder",
    ) -> torch.Tensor:
        out = layer(hidden_states, attention_mask=context["attention_mask"])
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
        # All positions valid: the model's mask functions return None (no mask) for SDPA;
        # decoder-style configs then rely on the attention's is_causal flag.
        return {"attention_mask": None}

    def build_final(self, config: Any, layer_type: str = "encoder") -> nn.Module:
        return nn.Identity()

    def finish(
        self,
        config: Any,
        final: nn.Module,
        hidden_states: torch.Tensor,
        context: LayerContext,
        layer_type: str = "encoder",
    ) -> torch.Tensor:
        return hidden_states


class BertFamily(_BertLikeFamily):
    """BERT (``model_type`` ``bert``): ``BertModel`` and the ``BertFor*`` heads under ``bert.``.

    Logits: ``BertForMaskedLM`` (``cls.predictions.*``). A base (``BertModel``) checkpoint has
    no masked-LM head: :meth:`lm_head_tensor_names` is empty for ``model_prefix=""``.
    """

    family_id: ClassVar[str] = "bert"
    family_name: ClassVar[str] = "BERT encoders"
    model_types: ClassVar[Collection[str]] = ("bert",)
    architectures: ClassVar[Collection[str]] = (
        "BertModel",
        "BertForMaskedLM",
        "BertForPreTraining",
        "BertLMHeadModel",
        "BertForNextSentencePrediction",
        "BertForSequenceClassification",
        "BertForMultipleChoice",
        "BertForTokenClassification",
        "BertForQuestionAnswering",
    )
    base_model_prefix: ClassVar[str] = "bert"
    ignored_tensor_patterns: ClassVar[Collection[str]] = (
        # old checkpoints saved the (now non-persistent) position_ids buffer
        r"^(?:bert\.)?embeddings\.position_ids$",
    )
    unused_tensor_patterns: ClassVar[Collection[str]] = (
        r"^(?:bert\.)?pooler\.dense\.(?:weight|bias)$",  # BertModel / BertForPreTraining pooler
        r"^cls\.seq_relationship\.(?:weight|bias)$",  # next-sentence-prediction head
        # decoder copies of tied tensors in old checkpoints (read only when untied)
        r"^cls\.predictions\.decoder\.(?:weight|bias)$",
        r"^cls\.predictions\.bias$",  # read only when tied
        r"^classifier\.(?:weight|bias)$",  # sequence / token classification heads
        r"^qa_outputs\.(?:weight|bias)$",  # question answering head
    )

    def lm_head_tensor_names(
        self, config: Any, *, model_prefix: str | None = None
    ) -> tuple[str, ...]:
        prefix = self._model_prefix(model_prefix)
        if not prefix:
            return ()
        head = "cls.predictions."
        names = [
            head + "transform.dense.weight",
            head + "transform.dense.bias",
            head + "transform.LayerNorm.weight",
            head + "transform.LayerNorm.bias",
        ]
        if self.is_tied(config):
            names += [self._word_embeddings(prefix), head + "bias"]
        else:
            names += [head + "decoder.weight", head + "decoder.bias"]
        return tuple(names)

    def build_lm_head(self, config: Any) -> nn.Module | None:
        return _BertMaskedLMHead(config, tied=self.is_tied(config)).eval()

    def lm_head_tensor_map(
        self,
        config: Any,
        head_keys: Collection[str],
        *,
        model_prefix: str,
        available: Collection[str],
    ) -> dict[str, str]:
        tied = self.is_tied(config)
        mapping: dict[str, str] = {}
        for key in head_keys:
            name = key
            if tied and key == "cls.predictions.decoder.weight":
                name = self._word_embeddings(model_prefix)
            mapping[key] = _legacy_name(name, available)
        return mapping


class RobertaFamily(_BertLikeFamily):
    """RoBERTa (``model_type`` ``roberta``): ``RobertaModel`` and heads under ``roberta.``.

    Position ids start after ``pad_token_id`` and skip padding tokens (computed by
    ``RobertaEmbeddings`` from ``input_ids``). Logits: ``RobertaForMaskedLM`` (``lm_head.*``).
    A base checkpoint has no head: :meth:`lm_head_tensor_names` is empty for ``model_prefix=""``.
    """

    family_id: ClassVar[str] = "roberta"
    family_name: ClassVar[str] = "RoBERTa encoders"
    model_types: ClassVar[Collection[str]] = ("roberta",)
    architectures: ClassVar[Collection[str]] = (
        "RobertaModel",
        "RobertaForMaskedLM",
        "RobertaForCausalLM",
        "RobertaForSequenceClassification",
        "RobertaForMultipleChoice",
        "RobertaForTokenClassification",
        "RobertaForQuestionAnswering",
    )
    base_model_prefix: ClassVar[str] = "roberta"
    ignored_tensor_patterns: ClassVar[Collection[str]] = (
        r"^(?:roberta\.)?embeddings\.position_ids$",
    )
    unused_tensor_patterns: ClassVar[Collection[str]] = (
        r"^(?:roberta\.)?pooler\.dense\.(?:weight|bias)$",  # RobertaModel pooler
        r"^lm_head\.decoder\.(?:weight|bias)$",  # copies of tied tensors (read only when untied)
        r"^lm_head\.bias$",  # read only when tied
        r"^classifier\.(?:dense|out_proj)\.(?:weight|bias)$",  # sequence classification head
        r"^classifier\.(?:weight|bias)$",  # token classification / multiple choice heads
        r"^qa_outputs\.(?:weight|bias)$",  # question answering head
    )

    def _embeddings_cls(self) -> type[nn.Module]:
        return modeling_roberta.RobertaEmbeddings

    def _layer_cls(self) -> type[nn.Module]:
        return modeling_roberta.RobertaLayer

    def lm_head_tensor_names(
        self, config: Any, *, model_prefix: str | None = None
    ) -> tuple[str, ...]:
        prefix = self._model_prefix(model_prefix)
        if not prefix:
            return ()
        names = [
            "lm_head.dense.weight",
            "lm_head.dense.bias",
            "lm_head.layer_norm.weight",
            "lm_head.layer_norm.bias",
        ]
        if self.is_tied(config):
            names += [self._word_embeddings(prefix), "lm_head.bias"]
        else:
            names += ["lm_head.decoder.weight", "lm_head.decoder.bias"]
        return tuple(names)

    def build_lm_head(self, config: Any) -> nn.Module | None:
        return _RobertaMaskedLMHead(config, tied=self.is_tied(config)).eval()

    def lm_head_tensor_map(
        self,
        config: Any,
        head_keys: Collection[str],
        *,
        model_prefix: str,
        available: Collection[str],
    ) -> dict[str, str]:
        tied = self.is_tied(config)
        return {
            key: (
                self._word_embeddings(model_prefix)
                if tied and key == "lm_head.decoder.weight"
                else key
            )
            for key in head_keys
        }


FAMILIES = (BertFamily, RobertaFamily)
