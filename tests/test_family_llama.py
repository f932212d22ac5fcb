"""The Llama-style family against transformers: tensor names, meta layers, exact outputs."""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_MAPPING_NAMES,
)

from nexus_sli._engine import run_in_memory
from nexus_sli.errors import CheckpointError, InvalidFamilyError
from nexus_sli.families.llama import FAMILIES, LlamaFamily

FAMILY = LlamaFamily()
VOCAB = 101
TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "max_position_embeddings": 64,
    **TOKENS,
}
#: Small configs; sliding windows (3) are shorter than the test sequences (8).
EXTRA: dict[str, dict[str, Any]] = {
    "llama": {"attention_bias": True},
    "mistral": {"sliding_window": 3, "head_dim": 8},
    "qwen2": {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1},
    "qwen3": {"head_dim": 8, "tie_word_embeddings": True},
    "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "sliding_window": 3, "query_pre_attn_scalar": 8},
    "phi3": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 24,
        "mlp_only_layers": [1],
    },
}
MODEL_TYPES = sorted(EXTRA)
SLIDING_TYPES = ("mistral", "qwen2", "gemma2")


def make_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    kwargs = {**COMMON, **EXTRA[model_type], **overrides}
    config: PretrainedConfig = CONFIG_MAPPING[model_type](**kwargs)
    return config


@dataclass
class Saved:
    """A tiny random head checkpoint, the base checkpoint with the same weights, and the
    transformers outputs (the oracle) on the test inputs."""

    config: PretrainedConfig
    head_dir: Path
    base_dir: Path
    #: ``{(kind, padding): transformers output}``, kind ``"base"`` or ``"head"``.
    expected: dict[tuple[str, str], Any] = field(default_factory=dict)

    def names(self, which: str) -> set[str]:
        directory = self.head_dir if which == "head" else self.base_dir
        with safe_open(str(directory / "model.safetensors"), "pt") as f:
            return set(f.keys())

    def oracle(self, kind: str, padding: str) -> Any:
        """The default ``from_pretrained`` model's outputs (hidden states included)."""
        if (kind, padding) not in self.expected:
            auto = AutoModel if kind == "base" else AutoModelForCausalLM
            model: torch.nn.Module = auto.from_pretrained(
                self.base_dir if kind == "base" else self.head_dir
            )
            model.eval()
            for pad in ("right", "left"):
                ids, mask = _inputs(pad)
                with torch.no_grad():
                    self.expected[kind, pad] = model(
                        input_ids=ids, attention_mask=mask, output_hidden_states=True
                    )
        return self.expected[kind, padding]


def _from_config(auto: Any, config: PretrainedConfig) -> Any:
    """A randomly initialised model of ``auto`` (typed ``Any``: transformers is untyped here)."""
    return auto.from_config(config)


def _randomize(model: torch.nn.Module) -> None:
    """Weights far from the tiny default init, so that masking mistakes show up."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.2)


@pytest.fixture(scope="module", autouse=True)
def _cheap_gc() -> Iterator[None]:
    # The engine calls gc.collect() to free memory; with transformers imported each call scans
    # millions of objects (~0.3 s). Freezing what exists now keeps results identical and the
    # file fast; objects created later are still collected.
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="module")
def _saved_cache() -> dict[str, Saved]:
    return {}


@pytest.fixture
def saved(
    model_type: str, _saved_cache: dict[str, Saved], tmp_path_factory: pytest.TempPathFactory
) -> Saved:
    if model_type not in _saved_cache:
        config = make_config(model_type)
        torch.manual_seed(0)
        model = _from_config(AutoModelForCausalLM, config)
        _randomize(model)
        root = tmp_path_factory.mktemp(model_type)
        model.save_pretrained(root / "head")
        model.model.save_pretrained(root / "base")
        _saved_cache[model_type] = Saved(
            AutoConfig.from_pretrained(root / "head"), root / "head", root / "base"
        )
    return _saved_cache[model_type]


def _inputs(padding: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (4, 8), generator=gen)
    mask = torch.ones_like(ids)
    for row, length in enumerate((8, 5, 7, 3)):
        mask[row, length:] = 0
    if padding == "left":
        mask = mask.flip(1)
    return ids, mask


def _assert_close_valid(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor) -> None:
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], theirs[keep], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- metadata
def test_family_attributes() -> None:
    assert (LlamaFamily,) == FAMILIES
    assert FAMILY.family_id == "llama"
    assert set(FAMILY.model_types) == set(MODEL_TYPES)
    expected = {MODEL_MAPPING_NAMES[t] for t in MODEL_TYPES}
    expected |= {MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[t] for t in MODEL_TYPES}
    assert set(FAMILY.architectures) == expected
    assert FAMILY.get_layer_prefix(3) == "model.layers.3."
    assert FAMILY.get_layer_prefix(3, model_prefix="") == "layers.3."
    assert FAMILY.layer_types(make_config("llama")) == ("decoder",)


def test_unknown_model_type_and_layer_type() -> None:
    bert_like = CONFIG_MAPPING["gpt2"]()
    with pytest.raises(InvalidFamilyError, match="model type"):
        FAMILY.create_layer(bert_like, 0)
    with pytest.raises(InvalidFamilyError, match="layer type"):
        FAMILY.get_layer_prefix(0, "encoder")
    with pytest.raises(InvalidFamilyError, match="out of range"):
        FAMILY.create_layer(make_config("llama"), 2)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_saved_architecture_is_claimed(model_type: str, saved: Saved) -> None:
    config = json.loads((saved.head_dir / "config.json").read_text())
    assert config["architectures"][0] in FAMILY.architectures
    base = json.loads((saved.base_dir / "config.json").read_text())
    assert base["architectures"][0] in FAMILY.architectures


# ---------------------------------------------------------------------- names
@pytest.mark.parametrize("which", ["head", "base"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_tensor_names_exact(model_type: str, which: str, saved: Saved) -> None:
    config = saved.config
    names = saved.names(which)
    mp = FAMILY.resolve_model_prefix(config, names)
    assert mp == ("model." if which == "head" else "")
    covered: set[str] = set()
    for idx in range(FAMILY.num_layers(config)):
        with torch.device("meta"):
            layer = FAMILY.create_layer(config, idx)
        prefix = FAMILY.get_layer_prefix(idx, model_prefix=mp)
        ours = {prefix + key for key in layer.state_dict()}
        theirs = {n for n in names if n.startswith(prefix)}
        assert ours == theirs, f"layer {idx}"
        covered |= ours
    embeddings = FAMILY.embedding_tensor_names(config, model_prefix=mp)
    final_norm = FAMILY.final_norm_tensor_names(config, model_prefix=mp)
    assert set(embeddings) <= names
    assert set(final_norm) <= names
    covered |= set(embeddings) | set(final_norm)
    if which == "head" or FAMILY.is_tied(config):
        head = FAMILY.lm_head_tensor_names(config, model_prefix=mp)
        assert set(head) <= names
        covered |= set(head)
    assert covered == names


def test_tied_head_points_at_embeddings() -> None:
    config = make_config("qwen3")
    assert FAMILY.is_tied(config)
    assert FAMILY.lm_head_tensor_names(config) == ("model.embed_tokens.weight",)
    assert FAMILY.lm_head_tensor_names(config, model_prefix="") == ("embed_tokens.weight",)
    head_map = FAMILY.lm_head_tensor_map(
        config, ["lm_head.weight"], model_prefix="", available=["embed_tokens.weight"]
    )
    assert head_map == {"lm_head.weight": "embed_tokens.weight"}
    # Like from_pretrained: a stored head is used even when the config says tied.
    stored = FAMILY.lm_head_tensor_map(
        config,
        ["lm_head.weight"],
        model_prefix="model.",
        available=["model.embed_tokens.weight", "lm_head.weight"],
    )
    assert stored == {"lm_head.weight": "lm_head.weight"}
    untied = make_config("llama")
    assert FAMILY.lm_head_tensor_names(untied) == ("lm_head.weight",)


def test_resolve_model_prefix_rejects_foreign_names() -> None:
    with pytest.raises(CheckpointError):
        FAMILY.resolve_model_prefix(make_config("llama"), ["transformer.h.0.attn.c_attn.weight"])


def test_ignored_patterns_match_legacy_rotary_buffers() -> None:
    import re

    legacy = "model.layers.0.self_attn.rotary_emb.inv_freq"
    assert any(re.search(p, legacy) for p in FAMILY.ignored_tensor_patterns)
    assert not any(
        re.search(p, "model.layers.0.self_attn.q_proj.weight")
        for p in FAMILY.ignored_tensor_patterns
    )


# ---------------------------------------------------------------------- layers
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_create_layer_on_meta_allocates_nothing(model_type: str) -> None:
    config = make_config(model_type)
    for idx in range(FAMILY.num_layers(config)):
        with torch.device("meta"):
            layer = FAMILY.create_layer(config, idx)
        tensors = [*layer.parameters(), *layer.buffers()]
        assert tensors
        assert all(t.is_meta for t in tensors)
        assert all(v.is_meta for v in layer.state_dict().values())
        for role, path in FAMILY.layer_roles(config).items():
            assert isinstance(layer.get_submodule(path), torch.nn.Module), role
    assert config._attn_implementation is None  # the caller's config is not modified


@pytest.mark.parametrize(
    ("model_type", "requested", "used"),
    [
        ("llama", None, "sdpa"),
        ("llama", "eager", "eager"),
        ("gemma2", None, "eager"),
        ("gemma2", "sdpa", "eager"),  # gemma2 has no sdpa path (softcapping)
        ("mixtral", None, "sdpa"),
    ],
)
def test_attention_implementation(model_type: str, requested: str | None, used: str) -> None:
    config = make_config(model_type)
    config._attn_implementation = requested
    with torch.device("meta"):
        layer = FAMILY.create_layer(config, 0)
    attention: Any = layer.get_submodule("self_attn")
    assert attention.config._attn_implementation == used
    assert config._attn_implementation == requested
    if model_type == "mixtral":
        experts: Any = layer.get_submodule("mlp.experts")
        assert experts.config._experts_implementation == "grouped_mm"


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_layer_roles(model_type: str) -> None:
    roles = FAMILY.layer_roles(make_config(model_type))
    assert roles["layer"] == ""
    assert roles["attention"] == "self_attn"
    assert roles["mlp"] == "mlp"
    assert ("router" in roles) == (model_type == "mixtral")


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_moe_layer_loads_fused_and_per_expert_layouts(model_type: str) -> None:
    config = make_config(model_type)
    torch.manual_seed(0)
    model = _from_config(AutoModel, config)
    _randomize(model)
    reference = model.get_submodule("layers.0")
    fused = reference.state_dict()
    assert "mlp.experts.gate_up_proj" in fused
    layer = FAMILY.create_layer(config, 0)
    layer.load_state_dict(fused, strict=True)
    per_expert = layer.state_dict()
    assert "mlp.experts.gate_up_proj" not in per_expert
    again = FAMILY.create_layer(config, 0)
    again.load_state_dict({k: v.clone() for k, v in per_expert.items()}, strict=True)
    for key, value in fused.items():
        torch.testing.assert_close(again.get_parameter(key), value, rtol=0, atol=0)


# ---------------------------------------------------------------------- exactness
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_head_matches_transformers(model_type: str, padding: str, saved: Saved) -> None:
    """Logits and every hidden state equal the head model's, for micro-batches of 1 and 3."""
    ids, mask = _inputs(padding)
    expected = saved.oracle("head", padding)
    state = load_file(str(saved.head_dir / "model.safetensors"))
    results = []
    for batch_size in (1, 3):
        out = run_in_memory(
            FAMILY,
            saved.config,
            state,
            ids,
            mask,
            batch_size=batch_size,
            output_hidden_states=True,
            output_logits=True,
        )
        assert out.logits is not None
        assert out.logits.shape == expected.logits.shape
        _assert_close_valid(out.logits, expected.logits, mask)
        _assert_close_valid(out.last_hidden_state, expected.hidden_states[-1], mask)
        assert out.hidden_states is not None
        assert len(out.hidden_states) == len(expected.hidden_states)
        for ours, theirs in zip(out.hidden_states, expected.hidden_states, strict=True):
            _assert_close_valid(ours, theirs, mask)
        results.append(out.logits)
    _assert_close_valid(results[0], results[1], mask)


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_base_matches_transformers(model_type: str, padding: str, saved: Saved) -> None:
    """A checkpoint saved from the base model (no prefix) gives the base model's outputs."""
    ids, mask = _inputs(padding)
    expected = saved.oracle("base", padding)
    state = load_file(str(saved.base_dir / "model.safetensors"))
    config = AutoConfig.from_pretrained(saved.base_dir)
    out = run_in_memory(
        FAMILY,
        config,
        state,
        ids,
        mask,
        batch_size=3 if padding == "right" else 2,
        output_hidden_states=True,
    )
    _assert_close_valid(out.last_hidden_state, expected.last_hidden_state, mask)
    assert out.hidden_states is not None
    assert len(out.hidden_states) == len(expected.hidden_states)
    for ours, theirs in zip(out.hidden_states, expected.hidden_states, strict=True):
        _assert_close_valid(ours, theirs, mask)
    assert out.logits is None


@pytest.mark.parametrize("model_type", SLIDING_TYPES)
def test_sliding_layers_use_a_sliding_mask(model_type: str) -> None:
    """The test sequences are longer than the window, so sliding layers see a different mask."""
    config = make_config(model_type)
    stem = FAMILY.build_stem(config)
    ids, mask = _inputs("right")
    with torch.no_grad():
        _, context = FAMILY.embed(config, stem, ids, mask)
    masks = context["masks"]
    assert set(masks) == {"full_attention", "sliding_attention"} or model_type == "mistral"
    sliding = masks["sliding_attention"]
    assert isinstance(sliding, torch.Tensor)
    if "full_attention" in masks:
        assert not torch.equal(sliding, masks["full_attention"])


def test_gemma2_logits_are_softcapped() -> None:
    config = make_config("gemma2", final_logit_softcapping=2.0)
    linear = torch.nn.Linear(32, VOCAB, bias=False)
    head = torch.nn.ModuleDict({"lm_head": linear})
    with torch.no_grad():
        linear.weight.normal_(0.0, 10.0)
        logits = FAMILY.compute_logits(config, head, torch.randn(2, 3, 32))
    assert logits.abs().max() <= 2.0
    plain = make_config("gemma", final_logit_softcapping=2.0)
    with torch.no_grad():
        uncapped = FAMILY.compute_logits(plain, head, torch.randn(2, 3, 32))
    assert uncapped.abs().max() > 2.0


# ---------------------------------------------------------------------- MoE detection
@pytest.mark.parametrize(
    ("model_type", "overrides", "expected"),
    [
        ("llama", {}, False),
        ("llama", {"num_experts": 0}, False),
        ("mistral", {}, False),
        ("mixtral", {}, True),
        ("mixtral", {"num_local_experts": 0, "num_experts_per_tok": 0}, False),
        ("qwen2_moe", {}, True),
        ("qwen2_moe", {"num_experts": 0}, False),
        ("qwen2_moe", {"mlp_only_layers": [0, 1]}, False),
    ],
)
def test_is_moe(model_type: str, overrides: dict[str, Any], expected: bool) -> None:
    assert FAMILY.is_moe(make_config(model_type, **overrides)) is expected
