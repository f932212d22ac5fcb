"""Encoder, T5 and Mamba families: exact names, meta layers, and run_in_memory == transformers.

Every model is tiny, random (seeded) and saved with ``save_pretrained`` into ``tmp_path``; the
oracle is the in-memory transformers model loaded back with ``from_pretrained``.
"""

from __future__ import annotations

import gc
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    BertLMHeadModel,
    BertModel,
    MambaConfig,
    MambaForCausalLM,
    MambaModel,
    PretrainedConfig,
    PreTrainedModel,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaModel,
    T5Config,
    T5EncoderModel,
    T5ForConditionalGeneration,
    T5Model,
)
from transformers.utils import logging as hf_logging

from nexus_sli._engine import EngineOutput, run_in_memory
from nexus_sli._family import ArchitectureFamily
from nexus_sli.families import bert as bert_module
from nexus_sli.families import mamba as mamba_module
from nexus_sli.families import t5 as t5_module
from nexus_sli.families.bert import BertFamily, RobertaFamily
from nexus_sli.families.mamba import MambaFamily
from nexus_sli.families.t5 import T5Family

SEQ = 7
VOCAB = 112
ATOL = 1e-4
RTOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _quiet_transformers() -> Iterator[None]:
    # from_pretrained logs load reports (e.g. BertModel from a BertForMaskedLM checkpoint).
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    yield
    hf_logging.set_verbosity(level)


@pytest.fixture(autouse=True, scope="module")
def _fast_tiny_runs() -> Iterator[None]:
    # The engine runs gc.collect() after every layer; with torch + transformers + pytest
    # loaded, a full collection takes ~0.2 s. Freezing the objects that exist now (modules,
    # classes) keeps collections to what the tests create. One intra-op thread: the tensors
    # are tiny and thread hand-offs only cost time on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- configs
def bert_config(**overrides: Any) -> BertConfig:
    kwargs: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "intermediate_size": 48,
        "max_position_embeddings": 64,
        "type_vocab_size": 2,
        "pad_token_id": 0,
    }
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def roberta_config(**overrides: Any) -> RobertaConfig:
    kwargs: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 40,
        "pad_token_id": 1,
    }
    kwargs.update(overrides)
    return RobertaConfig(**kwargs)


def t5_config(**overrides: Any) -> T5Config:
    kwargs: dict[str, Any] = {
        "vocab_size": VOCAB,
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 48,
        "num_layers": 3,
        "num_decoder_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 16,
        "pad_token_id": 0,
        "decoder_start_token_id": 0,
    }
    kwargs.update(overrides)
    return T5Config(**kwargs)


def mamba_config(**overrides: Any) -> MambaConfig:
    kwargs: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "state_size": 8,
        "expand": 2,
        "conv_kernel": 3,
        "pad_token_id": 0,
    }
    kwargs.update(overrides)
    return MambaConfig(**kwargs)


# ---------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One model type (or config variant) checked against transformers."""

    name: str
    family: ArchitectureFamily
    make_config: Callable[[], PretrainedConfig]
    base_cls: type[PreTrainedModel]
    head_cls: type[PreTrainedModel]
    #: loads the oracle of last_hidden_state / hidden_states from a checkpoint dir
    base_oracle: Callable[[Path], Any]
    #: loads the logits oracle (None: no LM head for this stream)
    head_oracle: Callable[[Path], Any] | None
    pad_id: int
    #: "standard" (embeddings, layer outputs, last) or "mamba" (layer outputs, then last)
    hidden_convention: str = "standard"
    base_prefix: str = ""
    head_prefix: str = field(default="")
    #: run the base checkpoint too (variants that only change the head skip it)
    check_base: bool = True


CASES: list[Case] = [
    Case(
        "bert",
        BertFamily(),
        bert_config,
        BertModel,
        BertForMaskedLM,
        AutoModel.from_pretrained,
        AutoModelForMaskedLM.from_pretrained,
        pad_id=0,
        head_prefix="bert.",
    ),
    Case(
        "bert-untied",
        BertFamily(),
        lambda: bert_config(tie_word_embeddings=False),
        BertModel,
        BertForMaskedLM,
        AutoModel.from_pretrained,
        AutoModelForMaskedLM.from_pretrained,
        pad_id=0,
        head_prefix="bert.",
        check_base=False,
    ),
    Case(
        "bert-decoder",
        BertFamily(),
        lambda: bert_config(is_decoder=True),
        BertModel,
        BertLMHeadModel,
        AutoModel.from_pretrained,
        AutoModelForCausalLM.from_pretrained,
        pad_id=0,
        head_prefix="bert.",
    ),
    Case(
        "roberta",
        RobertaFamily(),
        roberta_config,
        RobertaModel,
        RobertaForMaskedLM,
        AutoModel.from_pretrained,
        AutoModelForMaskedLM.from_pretrained,
        pad_id=1,
        head_prefix="roberta.",
    ),
    Case(
        "roberta-untied",
        RobertaFamily(),
        lambda: roberta_config(tie_word_embeddings=False),
        RobertaModel,
        RobertaForMaskedLM,
        AutoModel.from_pretrained,
        AutoModelForMaskedLM.from_pretrained,
        pad_id=1,
        head_prefix="roberta.",
        check_base=False,
    ),
    Case(
        "t5",
        T5Family(),
        t5_config,
        T5Model,
        T5ForConditionalGeneration,
        T5EncoderModel.from_pretrained,
        None,
        pad_id=0,
    ),
    Case(
        "t5-gated",
        T5Family(),
        lambda: t5_config(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        T5EncoderModel,
        T5ForConditionalGeneration,
        T5EncoderModel.from_pretrained,
        None,
        pad_id=0,
    ),
    Case(
        "mamba",
        MambaFamily(),
        mamba_config,
        MambaModel,
        MambaForCausalLM,
        AutoModel.from_pretrained,
        AutoModelForCausalLM.from_pretrained,
        pad_id=0,
        hidden_convention="mamba",
        head_prefix="backbone.",
    ),
]
CASE_IDS = [case.name for case in CASES]


def _save(model_cls: type[PreTrainedModel], config: PretrainedConfig, path: Path) -> Path:
    torch.manual_seed(0)
    model = model_cls(config)
    model.save_pretrained(path)
    return path


def _names(path: Path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        return set(handle.keys())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """``{(case name, "base" | "head"): checkpoint dir}``, saved once per module."""
    saved: dict[tuple[str, str], Path] = {}
    for case in CASES:
        root = tmp_path_factory.mktemp(case.name)
        saved[case.name, "base"] = _save(case.base_cls, case.make_config(), root / "base")
        saved[case.name, "head"] = _save(case.head_cls, case.make_config(), root / "head")
    return saved


# ---------------------------------------------------------------------------- names
def _assert_all_meta(module: nn.Module) -> None:
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        assert tensor.is_meta, f"{name} was allocated on {tensor.device}"


def _matches(patterns: Any, name: str) -> bool:
    # as the streaming engine matches them (re.search; the patterns are anchored)
    return any(re.search(pattern, name) for pattern in patterns)


@pytest.mark.parametrize("which", ["base", "head"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_names_exact(case: Case, which: str, checkpoints: dict[tuple[str, str], Path]) -> None:
    path = checkpoints[case.name, which]
    names = _names(path)
    config = AutoConfig.from_pretrained(path)
    family = case.family
    expected_prefix = case.base_prefix if which == "base" else case.head_prefix
    assert family.resolve_model_prefix(config, names) == expected_prefix
    mp = "" if which == "base" else None
    accounted: set[str] = set()
    model_cls = case.base_cls if which == "base" else case.head_cls
    stacks = ("encoder",) if model_cls is T5EncoderModel else family.layer_types(config)
    for layer_type in stacks:
        for idx in range(family.num_layers(config, layer_type)):
            with torch.device("meta"):
                layer = family.create_layer(config, idx, layer_type)
            _assert_all_meta(layer)
            prefix = family.get_layer_prefix(idx, layer_type, model_prefix=mp)
            assert prefix == family.get_layer_prefix(idx, layer_type, model_prefix=expected_prefix)
            planned = {prefix + key for key in layer.state_dict()}
            saved = {name for name in names if name.startswith(prefix)}
            assert planned == saved, (layer_type, idx)
            accounted |= planned
            for role, path_in_layer in family.layer_roles(config, layer_type).items():
                assert isinstance(layer.get_submodule(path_in_layer), nn.Module), role
        with torch.device("meta"):
            final = family.build_final(config, layer_type)
        accounted |= {expected_prefix + key for key in final.state_dict()}
    structural = (
        *family.embedding_tensor_names(config, model_prefix=mp),
        *family.final_norm_tensor_names(config, model_prefix=mp),
        *family.lm_head_tensor_names(config, model_prefix=mp),
    )
    missing = [name for name in structural if name not in names]
    assert not missing
    accounted |= set(structural)
    # Every saved tensor is a layer/embedding/norm/head tensor or declared unused.
    patterns = [*family.unused_tensor_patterns, *family.ignored_tensor_patterns]
    leftover = sorted(name for name in names - accounted if not _matches(patterns, name))
    assert not leftover


def test_head_checkpoints_have_lm_head_names(checkpoints: dict[tuple[str, str], Path]) -> None:
    bert = BertFamily()
    config = AutoConfig.from_pretrained(checkpoints["bert", "head"])
    assert "bert.embeddings.word_embeddings.weight" in bert.lm_head_tensor_names(config)
    assert bert.lm_head_tensor_names(config, model_prefix="") == ()
    untied = AutoConfig.from_pretrained(checkpoints["bert-untied", "head"])
    assert "cls.predictions.decoder.weight" in bert.lm_head_tensor_names(untied)
    mamba = MambaFamily()
    mconfig = AutoConfig.from_pretrained(checkpoints["mamba", "head"])
    assert mamba.lm_head_tensor_names(mconfig) == ("backbone.embeddings.weight",)
    assert T5Family().lm_head_tensor_names(t5_config()) == ()


def test_t5_encoder_model_names(tmp_path: Path) -> None:
    path = _save(T5EncoderModel, t5_config(), tmp_path / "enc")
    names = _names(path)
    family = T5Family()
    config = AutoConfig.from_pretrained(path)
    assert family.resolve_model_prefix(config, names) == ""
    assert not any(name.startswith("decoder.") for name in names)
    assert "shared.weight" in names


def test_t5_layers_of_both_stacks() -> None:
    family = T5Family()
    config = t5_config()
    assert family.layer_types(config) == ("encoder", "decoder")
    assert family.num_layers(config, "encoder") == 3
    assert family.num_layers(config, "decoder") == 2
    with torch.device("meta"):
        enc0 = family.create_layer(config, 0, "encoder")
        enc1 = family.create_layer(config, 1, "encoder")
        dec0 = family.create_layer(config, 0, "decoder")
    for layer in (enc0, enc1, dec0):
        _assert_all_meta(layer)
    keys0 = set(enc0.state_dict())
    assert "layer.0.SelfAttention.relative_attention_bias.weight" in keys0
    assert "layer.0.SelfAttention.relative_attention_bias.weight" not in set(enc1.state_dict())
    dec_keys = set(dec0.state_dict())
    assert "layer.1.EncDecAttention.q.weight" in dec_keys
    assert "layer.2.DenseReluDense.wi.weight" in dec_keys
    assert family.layer_roles(config, "decoder")["cross_attention"] == "layer.1.EncDecAttention"
    assert not config.is_decoder  # the caller's config is not modified
    with pytest.raises(NotImplementedError, match="encoder stack only"):
        family.build_stem(config, "decoder")


def test_roles_and_structure() -> None:
    assert BertFamily().layer_roles(bert_config())["mlp"] == "intermediate"
    assert RobertaFamily().layer_roles(roberta_config())["attention"] == "attention"
    roles = MambaFamily().layer_roles(mamba_config())
    assert roles["attention"] == "mixer"
    assert "mlp" not in roles
    assert T5Family().hidden_size(t5_config()) == 32
    assert BertFamily().final_norm_tensor_names(bert_config()) == ()
    for family in (BertFamily(), RobertaFamily(), T5Family(), MambaFamily()):
        assert not family.is_moe(bert_config())
    assert [cls.family_id for cls in bert_module.FAMILIES] == ["bert", "roberta"]
    assert [cls.family_id for cls in t5_module.FAMILIES] == ["t5"]
    assert [cls.family_id for cls in mamba_module.FAMILIES] == ["mamba"]


# ---------------------------------------------------------------------------- exactness
LENGTHS = (SEQ, 5, 3, 6)


def _inputs(pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, VOCAB, (len(LENGTHS), SEQ), generator=generator)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(LENGTHS):
        if side == "right":
            mask[row, :length] = 1
        else:
            mask[row, SEQ - length :] = 1
    ids[mask == 0] = pad_id
    return ids, mask


def _close(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor, what: str) -> None:
    keep = mask.bool()
    assert actual.shape == expected.shape, what
    torch.testing.assert_close(
        actual[keep], expected[keep], rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}"
    )


def _oracle_hidden_states(
    case: Case, oracle: Any, output: Any, ids: torch.Tensor
) -> list[torch.Tensor | None]:
    """The oracle's hidden states in the engine's convention (None where it has none)."""
    states = list(output.hidden_states)
    if case.hidden_convention == "standard":
        return list(states)
    # MambaModel: (out_0, ..., out_{N-1}, norm_f(out_{N-1})), no embedding output.
    with torch.no_grad():
        embeddings = oracle.get_input_embeddings()(ids)
    return [embeddings, *states[:-2], states[-1]]


def _compare(
    case: Case,
    result: EngineOutput,
    expected_last: torch.Tensor,
    expected_hidden: list[torch.Tensor | None],
    mask: torch.Tensor,
) -> None:
    _close(result.last_hidden_state, expected_last, mask, "last_hidden_state")
    assert result.hidden_states is not None
    assert len(result.hidden_states) == len(expected_hidden)
    for idx, (ours, theirs) in enumerate(zip(result.hidden_states, expected_hidden, strict=True)):
        if theirs is not None:
            _close(ours, theirs, mask, f"hidden_states[{idx}]")


def _run(
    case: Case, path: Path, ids: torch.Tensor, mask: torch.Tensor, batch: int, logits: bool
) -> EngineOutput:
    config = AutoConfig.from_pretrained(path)
    state_dict = load_file(str(path / "model.safetensors"))
    return run_in_memory(
        case.family,
        config,
        state_dict,
        ids,
        mask,
        batch_size=batch,
        output_hidden_states=True,
        output_logits=logits,
    )


BASE_CASES = [case for case in CASES if case.check_base]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("case", BASE_CASES, ids=[case.name for case in BASE_CASES])
def test_base_checkpoint_matches_transformers(
    case: Case, side: str, checkpoints: dict[tuple[str, str], Path]
) -> None:
    path = checkpoints[case.name, "base"]
    ids, mask = _inputs(case.pad_id, side)
    oracle = case.base_oracle(path).eval()
    with torch.no_grad():
        expected = oracle(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    expected_hidden = _oracle_hidden_states(case, oracle, expected, ids)
    result = _run(case, path, ids, mask, 2, logits=False)
    _compare(case, result, expected.last_hidden_state, expected_hidden, mask)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_head_checkpoint_matches_transformers(
    case: Case, side: str, checkpoints: dict[tuple[str, str], Path]
) -> None:
    path = checkpoints[case.name, "head"]
    ids, mask = _inputs(case.pad_id, side)
    base = case.base_oracle(path).eval()
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    expected_hidden = _oracle_hidden_states(case, base, expected, ids)
    expected_logits = None
    if case.head_oracle is not None:
        head = case.head_oracle(path).eval()
        with torch.no_grad():
            expected_logits = head(input_ids=ids, attention_mask=mask).logits
    results = []
    for batch in (1, 3):
        result = _run(case, path, ids, mask, batch, logits=expected_logits is not None)
        _compare(case, result, expected.last_hidden_state, expected_hidden, mask)
        if expected_logits is not None:
            assert result.logits is not None
            _close(result.logits, expected_logits, mask, "logits")
        results.append(result)
    # batch-size independence, beyond the tolerance to the oracle
    torch.testing.assert_close(
        results[0].last_hidden_state[mask.bool()],
        results[1].last_hidden_state[mask.bool()],
        rtol=1e-5,
        atol=1e-5,
    )


def test_t5_stem_falls_back_to_encoder_embed_tokens(
    tmp_path: Path, checkpoints: dict[tuple[str, str], Path]
) -> None:
    path = checkpoints["t5", "base"]
    state_dict = load_file(str(path / "model.safetensors"))
    state_dict["encoder.embed_tokens.weight"] = state_dict.pop("shared.weight")
    ids, mask = _inputs(0, "right")
    oracle = T5EncoderModel.from_pretrained(path)  # from_pretrained returns it in eval mode
    with torch.no_grad():
        expected = oracle(input_ids=ids, attention_mask=mask).last_hidden_state
    result = run_in_memory(T5Family(), AutoConfig.from_pretrained(path), state_dict, ids, mask)
    _close(result.last_hidden_state, expected, mask, "last_hidden_state")


def test_t5_every_layer_uses_the_context_bias(checkpoints: dict[tuple[str, str], Path]) -> None:
    """A layer > 0 has no bias table: its output depends on the context's position bias."""
    family = T5Family()
    path = checkpoints["t5", "base"]
    config = AutoConfig.from_pretrained(path)
    state_dict = load_file(str(path / "model.safetensors"))
    layer = family.create_layer(config, 1, "encoder")
    layer.load_state_dict(
        {key: state_dict[f"encoder.block.1.{key}"] for key in layer.state_dict()}, strict=True
    )
    layer.eval()
    hidden = torch.randn(2, SEQ, 32)
    context = family.probe_context(config, 2, SEQ, device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        zero_bias = family.call_layer(config, layer, hidden, context, 1)
        context["position_bias"] = torch.randn_like(context["position_bias"])
        other_bias = family.call_layer(config, layer, hidden, context, 1)
    assert not torch.allclose(zero_bias, other_bias)


def test_bert_legacy_layernorm_names_in_stem(checkpoints: dict[tuple[str, str], Path]) -> None:
    path = checkpoints["bert", "head"]
    state_dict = load_file(str(path / "model.safetensors"))
    renamed = {
        key.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        )
        if key.startswith(("bert.embeddings.", "cls."))
        else key: value
        for key, value in state_dict.items()
    }
    family = BertFamily()
    config = AutoConfig.from_pretrained(path)
    stem_map = family.stem_tensor_names(
        config,
        list(family.build_stem(config).state_dict()),
        model_prefix="bert.",
        available=renamed.keys(),
    )
    assert stem_map["embeddings.LayerNorm.weight"] == "bert.embeddings.LayerNorm.gamma"
    head = family.build_lm_head(config)
    assert head is not None
    head_map = family.lm_head_tensor_map(
        config, list(head.state_dict()), model_prefix="bert.", available=renamed.keys()
    )
    assert head_map["cls.predictions.transform.LayerNorm.bias"] == (
        "cls.predictions.transform.LayerNorm.beta"
    )
    assert head_map["cls.predictions.decoder.weight"] == "bert.embeddings.word_embeddings.weight"


def test_mamba_legacy_embedding_name(
    tmp_path: Path, checkpoints: dict[tuple[str, str], Path]
) -> None:
    path = checkpoints["mamba", "head"]
    state_dict = load_file(str(path / "model.safetensors"))
    state_dict["backbone.embedding.weight"] = state_dict.pop("backbone.embeddings.weight")
    save_file(state_dict, str(tmp_path / "model.safetensors"))
    ids, mask = _inputs(0, "right")
    oracle = MambaForCausalLM.from_pretrained(path)  # in eval mode
    with torch.no_grad():
        expected = oracle(input_ids=ids, attention_mask=mask).logits
    result = run_in_memory(
        MambaFamily(), AutoConfig.from_pretrained(path), state_dict, ids, mask, output_logits=True
    )
    assert result.logits is not None
    _close(result.logits, expected, mask, "logits")
