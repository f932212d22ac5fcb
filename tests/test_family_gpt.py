"""GPT-style families (gpt2, gptj, falcon, bloom / gpt_neox / opt) against transformers.

For every model type a tiny random model is saved as a base checkpoint and as a head
checkpoint; the family must name every tensor exactly, build its layers on meta, and its
layer-major run (``run_in_memory``) must equal the in-memory transformers model (default
attention implementation) for right and left padding, at any micro-batch size.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    BloomConfig,
    FalconConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
)

from nexus_sli._engine import EngineOutput, run_in_memory
from nexus_sli._family import ArchitectureFamily
from nexus_sli.errors import InvalidFamilyError, UnsupportedArchitectureError
from nexus_sli.families.gpt import GPTFamily
from nexus_sli.families.gpt_neox import GPTNeoXFamily
from nexus_sli.families.opt import OPTFamily

VOCAB = 100
PAD, BOS, EOS = 0, 1, 2
SPECIAL: dict[str, Any] = {
    "vocab_size": VOCAB,
    "pad_token_id": PAD,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # The models are tiny: one intra-op thread is fastest, and it avoids OpenMP spin waits
    # (tens of ms per op) when the CPU is shared with other processes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Case:
    family: type[ArchitectureFamily]
    make_config: Callable[[], PretrainedConfig]
    head_prefix: str


CASES: dict[str, Case] = {
    "gpt2": Case(
        GPTFamily,
        lambda: GPT2Config(n_embd=32, n_head=4, n_layer=2, n_positions=64, **SPECIAL),
        "transformer.",
    ),
    "gpt2_scaled": Case(
        GPTFamily,
        lambda: GPT2Config(
            n_embd=32,
            n_head=4,
            n_layer=3,
            n_positions=64,
            n_inner=48,
            scale_attn_by_inverse_layer_idx=True,
            tie_word_embeddings=False,
            **SPECIAL,
        ),
        "transformer.",
    ),
    "gptj": Case(
        GPTFamily,
        lambda: GPTJConfig(n_embd=32, n_head=4, n_layer=2, n_positions=64, rotary_dim=4, **SPECIAL),
        "transformer.",
    ),
    "falcon": Case(
        GPTFamily,
        lambda: FalconConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, **SPECIAL),
        "transformer.",
    ),
    "falcon_new_arch": Case(
        GPTFamily,
        lambda: FalconConfig(
            hidden_size=32,
            num_attention_heads=4,
            num_kv_heads=2,
            num_hidden_layers=2,
            new_decoder_architecture=True,
            **SPECIAL,
        ),
        "transformer.",
    ),
    "falcon_alibi": Case(
        GPTFamily,
        lambda: FalconConfig(
            hidden_size=48,
            num_attention_heads=6,
            num_hidden_layers=2,
            alibi=True,
            multi_query=False,
            parallel_attn=False,
            bias=True,
            **SPECIAL,
        ),
        "transformer.",
    ),
    "bloom": Case(
        GPTFamily,
        lambda: BloomConfig(hidden_size=32, n_head=4, n_layer=2, **SPECIAL),
        "transformer.",
    ),
    "gpt_neox": Case(
        GPTNeoXFamily,
        lambda: GPTNeoXConfig(
            hidden_size=32,
            num_attention_heads=4,
            num_hidden_layers=2,
            intermediate_size=64,
            **{"rotary_pct": 0.5, **SPECIAL},
        ),
        "gpt_neox.",
    ),
    "gpt_neox_tied_seq": Case(
        GPTNeoXFamily,
        lambda: GPTNeoXConfig(
            hidden_size=32,
            num_attention_heads=4,
            num_hidden_layers=2,
            intermediate_size=64,
            use_parallel_residual=False,
            tie_word_embeddings=True,
            **SPECIAL,
        ),
        "gpt_neox.",
    ),
    "opt": Case(
        OPTFamily,
        lambda: OPTConfig(
            hidden_size=32, num_attention_heads=4, num_hidden_layers=2, ffn_dim=64, **SPECIAL
        ),
        "model.",
    ),
    "opt_proj_post_ln": Case(
        OPTFamily,
        lambda: OPTConfig(
            hidden_size=32,
            num_attention_heads=4,
            num_hidden_layers=2,
            ffn_dim=64,
            word_embed_proj_dim=16,
            do_layer_norm_before=False,
            **SPECIAL,
        ),
        "model.",
    ),
    "opt_proj_untied": Case(
        OPTFamily,
        lambda: OPTConfig(
            hidden_size=32,
            num_attention_heads=4,
            num_hidden_layers=2,
            ffn_dim=64,
            word_embed_proj_dim=24,
            tie_word_embeddings=False,
            **SPECIAL,
        ),
        "model.",
    ),
}


@dataclass
class Saved:
    """One case saved as base and head checkpoint, with its oracles."""

    family: ArchitectureFamily
    head_prefix: str
    dirs: dict[str, Path]
    names: dict[str, set[str]]
    configs: dict[str, Any]
    models: dict[str, torch.nn.Module]


def _names(path: Path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        return set(handle.keys())


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Saved:
    case = CASES[request.param]
    dirs: dict[str, Path] = {}
    models: dict[str, torch.nn.Module] = {}
    autos: tuple[tuple[str, Any], ...] = (("base", AutoModel), ("head", AutoModelForCausalLM))
    for kind, auto in autos:
        torch.manual_seed(0)
        model = auto.from_config(case.make_config())
        dirs[kind] = tmp_path_factory.mktemp(f"{request.param}_{kind}")
        model.save_pretrained(dirs[kind])
        models[kind] = auto.from_pretrained(dirs[kind]).eval()
    return Saved(
        family=case.family(),
        head_prefix=case.head_prefix,
        dirs=dirs,
        names={kind: _names(path) for kind, path in dirs.items()},
        configs={kind: AutoConfig.from_pretrained(path) for kind, path in dirs.items()},
        models=models,
    )


def _inputs(padding_side: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    lengths = [7, 4, 6, 2]
    seq = max(lengths)
    ids = torch.full((len(lengths), seq), PAD, dtype=torch.long)
    mask = torch.zeros((len(lengths), seq), dtype=torch.long)
    for row, length in enumerate(lengths):
        tokens = torch.randint(3, VOCAB, (length,), generator=generator)
        span = slice(0, length) if padding_side == "right" else slice(seq - length, seq)
        ids[row, span] = tokens
        mask[row, span] = 1
    return ids, mask


def _close_at(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> None:
    keep = mask.bool()
    torch.testing.assert_close(actual[keep], expected[keep], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- names
@pytest.mark.parametrize("kind", ["base", "head"])
def test_tensor_names_exact(saved: Saved, kind: str) -> None:
    family, config, names = saved.family, saved.configs[kind], saved.names[kind]
    prefix = family.resolve_model_prefix(config, names)
    assert prefix == ("" if kind == "base" else saved.head_prefix)
    assert family._model_prefix(None) == saved.head_prefix
    covered: set[str] = set()
    n_layers = family.num_layers(config)
    assert n_layers == config.num_hidden_layers
    for idx in range(n_layers):
        with torch.device("meta"):
            layer = family.create_layer(config, idx)
        assert all(t.is_meta for t in [*layer.parameters(), *layer.buffers()])
        layer_prefix = family.get_layer_prefix(idx, model_prefix=prefix)
        assert layer_prefix.endswith(f".{idx}.")
        expected = {n for n in names if n.startswith(layer_prefix)}
        built = {layer_prefix + key for key in layer.state_dict()}
        assert built == expected
        covered |= built
    embeddings = set(family.embedding_tensor_names(config, model_prefix=prefix))
    final = set(family.final_norm_tensor_names(config, model_prefix=prefix))
    assert embeddings <= names
    assert final <= names
    covered |= embeddings | final
    if kind == "head" or family.is_tied(config):
        head = set(family.lm_head_tensor_names(config, model_prefix=prefix))
        assert head <= names
        covered |= head
    # Nothing in the checkpoint is left unexplained.
    assert names - covered == set()
    # Default model_prefix is the head layout.
    assert (
        family.get_layer_prefix(0)
        == saved.head_prefix + family.layer_paths["decoder"].format(idx=0) + "."
    )


def test_streaming_modules_match_checkpoint(saved: Saved) -> None:
    """Stem, final and head keys map onto the checkpoint exactly (the engine's plan)."""
    family, config, names = saved.family, saved.configs["head"], saved.names["head"]
    prefix = saved.head_prefix
    stem = family.build_stem(config)
    stem_map = family.stem_tensor_names(
        config, list(stem.state_dict()), model_prefix=prefix, available=names
    )
    assert set(stem_map.values()) == set(family.embedding_tensor_names(config))
    final_keys = {prefix + k for k in family.build_final(config).state_dict()}
    assert final_keys == set(family.final_norm_tensor_names(config))
    head = family.build_lm_head(config)
    assert head is not None
    head_map = family.lm_head_tensor_map(
        config, list(head.state_dict()), model_prefix=prefix, available=names
    )
    assert set(head_map.values()) == set(family.lm_head_tensor_names(config))


def test_structure(saved: Saved) -> None:
    family, config = saved.family, saved.configs["base"]
    assert family.layer_types(config) == ("decoder",)
    assert family.hidden_size(config) == config.hidden_size
    assert not family.is_moe(config)
    with torch.device("meta"):
        layer = family.create_layer(config, 0)
    roles = family.layer_roles(config)
    # OPT's MLP is not a submodule: it has mlp_in / mlp_out instead of mlp.
    required = (
        {"layer", "attention", "mlp_in", "mlp_out"}
        if isinstance(family, OPTFamily)
        else {
            "layer",
            "attention",
            "mlp",
        }
    )
    assert required <= set(roles)
    assert roles["layer"] == ""
    for path in roles.values():
        layer.get_submodule(path)
    with pytest.raises(InvalidFamilyError):
        family.get_layer_prefix(0, "encoder")


def test_unknown_model_type_rejected() -> None:
    config = GPT2Config(n_embd=32, n_head=4, n_layer=2, **SPECIAL)
    for family in (GPTNeoXFamily(), OPTFamily()):
        with pytest.raises(UnsupportedArchitectureError):
            family.create_layer(config, 0)
    llama = LlamaConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, **SPECIAL)
    with pytest.raises(UnsupportedArchitectureError):
        GPTFamily().create_layer(llama, 0)


def test_config_left_untouched(saved: Saved) -> None:
    config = saved.configs["base"]
    assert config._attn_implementation is None
    with torch.device("meta"):
        saved.family.create_layer(config, 0)
    assert config._attn_implementation is None


# ---------------------------------------------------------------------------- exactness
def _run(
    saved: Saved, kind: str, ids: torch.Tensor, mask: torch.Tensor, batch_size: int
) -> EngineOutput:
    config = saved.configs[kind]
    if kind == "head":
        # As UniversalSLIProcessor does: "sdpa" set explicitly (the base run keeps None).
        config = copy.copy(config)
        config._attn_implementation = "sdpa"
    return run_in_memory(
        saved.family,
        config,
        load_file(str(saved.dirs[kind] / "model.safetensors")),
        ids,
        mask,
        batch_size=batch_size,
        output_hidden_states=True,
        output_logits=kind == "head",
    )


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_run_in_memory_equals_transformers(saved: Saved, padding_side: str) -> None:
    """Base checkpoint in micro-batches of 3 (3 + 1 rows), head checkpoint one row at a time:
    both equal the in-memory models, so results do not depend on the micro-batch size."""
    ids, mask = _inputs(padding_side)
    for kind, batch_size in (("base", 3), ("head", 1)):
        with torch.no_grad():
            expected = saved.models[kind](
                input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False
            )
        out = _run(saved, kind, ids, mask, batch_size)
        assert out.hidden_states is not None
        assert len(out.hidden_states) == len(expected.hidden_states)
        for ours, theirs in zip(out.hidden_states, expected.hidden_states, strict=True):
            _close_at(ours, theirs, mask)
        if kind == "base":
            _close_at(out.last_hidden_state, expected.last_hidden_state, mask)
            assert out.logits is None
        else:
            _close_at(out.last_hidden_state, expected.hidden_states[-1], mask)
            assert out.logits is not None
            _close_at(out.logits, expected.logits, mask)


def _matches(patterns: Collection[str], name: str) -> bool:
    """Whether a pattern matches ``name``; ``re.search`` and ``re.fullmatch`` must agree."""
    searched = any(re.search(p, name) for p in patterns)
    assert searched == any(re.fullmatch(p, name) for p in patterns), name
    return searched


@pytest.mark.parametrize(
    ("family", "legacy", "real"),
    [
        (
            GPTFamily,
            [
                "transformer.h.0.attn.bias",
                "h.3.attn.masked_bias",
                "transformer.h.1.crossattention.bias",
                "transformer.h.0.self_attention.rotary_emb.inv_freq",
            ],
            ["transformer.h.0.attn.c_attn.bias", "h.0.attn.c_proj.bias", "h.0.mlp.c_fc.bias"],
        ),
        (
            GPTNeoXFamily,
            [
                "gpt_neox.layers.0.attention.bias",
                "layers.2.attention.masked_bias",
                "gpt_neox.layers.0.attention.rotary_emb.inv_freq",
            ],
            ["gpt_neox.layers.0.attention.dense.bias", "layers.0.attention.query_key_value.bias"],
        ),
    ],
)
def test_ignored_patterns_match_legacy_names_only(
    family: type[ArchitectureFamily], legacy: list[str], real: list[str]
) -> None:
    assert all(_matches(family.ignored_tensor_patterns, n) for n in legacy)
    assert not any(_matches(family.ignored_tensor_patterns, n) for n in real)
    assert not any(_matches(family.unused_tensor_patterns, n) for n in real)


@pytest.mark.parametrize(
    ("case", "extra"),
    [
        ("gpt2", ["transformer.h.0.attn.bias", "transformer.h.1.attn.masked_bias", "score.weight"]),
        ("bloom", ["lm_head.weight", "score.weight"]),
        ("gpt_neox", ["score.weight", "gpt_neox.layers.1.attention.rotary_emb.inv_freq"]),
        ("opt", ["lm_head.weight", "score.weight"]),
    ],
)
def test_legacy_and_unused_tensors_tolerated(tmp_path: Path, case: str, extra: list[str]) -> None:
    """Legacy buffers, stored copies of tied heads and other task heads are no error."""
    spec = CASES[case]
    torch.manual_seed(0)
    auto: Any = AutoModelForCausalLM
    model = auto.from_config(spec.make_config())
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    for name in extra:
        state[name] = torch.zeros(2, 2)
    ids, mask = _inputs("left")
    out = run_in_memory(spec.family(), config, state, ids, mask, batch_size=4)
    with torch.no_grad():
        expected = model.eval()(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    _close_at(out.last_hidden_state, expected.hidden_states[-1], mask)


def test_neox_head_accepts_lm_head_name() -> None:
    family = GPTNeoXFamily()
    config = GPTNeoXConfig(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64, **SPECIAL
    )
    keys = ["lm_head.weight"]
    assert family.lm_head_tensor_map(
        config, keys, model_prefix="gpt_neox.", available={"lm_head.weight"}
    ) == {"lm_head.weight": "lm_head.weight"}
    assert family.lm_head_tensor_map(
        config, keys, model_prefix="gpt_neox.", available={"embed_out.weight"}
    ) == {"lm_head.weight": "embed_out.weight"}
