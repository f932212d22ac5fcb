"""UniversalSLIProcessor on every built-in model type equals transformers' in-memory model.

For each zoo entry (see ``_zoo.py``: every built-in model type plus a few config variants), a
random checkpoint saved with ``save_pretrained`` (single file and sharded) is streamed over a
batch of 4 ragged sequences (right and left padding) in micro-batches of 1 and of 3. Every
hidden state, ``last_hidden_state`` and the logits must equal the transformers model loaded from
the same directory, at the positions where the attention mask is 1 (rtol = atol = 1e-4,
float32). Base-model checkpoints (saved from the ``AutoModel`` class) are streamed too.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from _zoo import MAX_LEN, ZOO, ZOO_NAMES, Oracle, inputs, make_config, oracle, save_model
from torch import nn
from transformers.utils import logging as hf_logging

from nexus_sli import SLIResult, UniversalSLIProcessor, get_registry

RTOL = ATOL = 1e-4
PADDINGS = ("right-pad", "left-pad")
KINDS = ("single", "sharded")


@pytest.fixture(autouse=True, scope="module")
def _quiet_transformers() -> Iterator[None]:
    # from_pretrained reports unused / newly initialised tensors (e.g. BertModel's pooler when
    # loading a BertForMaskedLM checkpoint) and draws progress bars.
    hf: Any = hf_logging  # its progress-bar switches are untyped
    level = hf.get_verbosity()
    hf.set_verbosity(logging.ERROR)
    hf.disable_progress_bar()
    yield
    hf.enable_progress_bar()
    hf.set_verbosity(level)


@pytest.fixture(autouse=True, scope="module")
def _fast_tiny_runs() -> Iterator[None]:
    # The engine calls gc.collect() on every run; with torch + transformers + pytest loaded a
    # full collection scans millions of objects. Freezing what exists now keeps collections to
    # what the tests create. One intra-op thread: the tensors are tiny, and thread hand-offs
    # only cost time on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
    torch.set_num_threads(threads)


class Zoo:
    """Checkpoints and oracle outputs, each built once per module on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._paths: dict[tuple[str, str], Path] = {}
        self._oracles: dict[tuple[str, str, str], Oracle] = {}

    def checkpoint(self, name: str, kind: str) -> Path:
        """``kind``: ``"single"`` / ``"sharded"`` (head class) or ``"base"`` (single file)."""
        if (name, kind) not in self._paths:
            self._paths[name, kind] = save_model(
                name, self.root / f"{name}-{kind}", head=kind != "base", sharded=kind == "sharded"
            )
        return self._paths[name, kind]

    def expected(self, name: str, kind: str, padding: str) -> Oracle:
        if (name, kind, padding) not in self._oracles:
            ids, mask = self.batch(name, padding)
            self._oracles[name, kind, padding] = oracle(
                name, self.checkpoint(name, kind), ids, mask
            )
        return self._oracles[name, kind, padding]

    @staticmethod
    def batch(name: str, padding: str) -> tuple[torch.Tensor, torch.Tensor]:
        return inputs(name, left=padding == "left-pad")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("zoo"))


def _close(
    actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor, what: str, tol: float = ATOL
) -> None:
    """Equal shapes, and equal values where ``mask`` is 1."""
    assert actual.shape == expected.shape, f"{what}: {list(actual.shape)} != {list(expected.shape)}"
    assert actual.dtype == torch.float32, f"{what}: {actual.dtype}"
    keep = mask.bool()
    torch.testing.assert_close(
        actual[keep], expected[keep], rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}"
    )


def _compare(result: SLIResult, expected: Oracle, mask: torch.Tensor, what: str) -> None:
    assert result.hidden_states is not None, what
    assert len(result.hidden_states) == len(expected.hidden_states), what
    for idx, (ours, theirs) in enumerate(
        zip(result.hidden_states, expected.hidden_states, strict=True)
    ):
        _close(ours, theirs, mask, f"{what} hidden_states[{idx}]")
    assert result.hidden_states[-1] is result.last_hidden_state, what
    _close(result.last_hidden_state, expected.last_hidden_state, mask, f"{what} last_hidden_state")
    if expected.logits is None:
        assert result.logits is None, what
    else:
        assert result.logits is not None, what
        _close(result.logits, expected.logits, mask, f"{what} logits")
    assert torch.equal(result.attention_mask, mask), what


def _run(
    path: Path, ids: torch.Tensor, mask: torch.Tensor, batch_size: int, **kw: Any
) -> SLIResult:
    return UniversalSLIProcessor(path, progress=False).run(
        ids, mask, batch_size=batch_size, output_hidden_states=True, **kw
    )


# ---------------------------------------------------------------------------- the zoo itself
BUILTIN_MODEL_TYPES = {
    *("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral", "qwen2_moe"),
    *("gpt2", "gpt_neox", "gptj", "falcon", "opt", "bloom"),
    *("bert", "roberta", "t5", "mamba"),
}


def test_zoo_covers_every_builtin_model_type() -> None:
    assert {entry.model_type for entry in ZOO.values()} == BUILTIN_MODEL_TYPES
    assert set(ZOO) >= BUILTIN_MODEL_TYPES  # each type's plain config is its own entry
    registry = get_registry()
    supported = {
        t for fid in registry.list_families() for t in registry.get_family(fid).model_types
    }
    assert supported >= BUILTIN_MODEL_TYPES


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_configs_are_tiny(name: str) -> None:
    config = make_config(name)
    assert 32 <= config.hidden_size <= 64
    assert 2 <= config.num_hidden_layers <= 3
    assert 100 <= config.vocab_size <= 128
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, key, None)
        assert value is None or 0 <= value < config.vocab_size, (key, value)
    assert config.pad_token_id == ZOO[name].pad_token_id


def test_zoo_variants() -> None:
    for name in ("mistral", "qwen2", "gemma2"):
        assert make_config(name).sliding_window < MAX_LEN, name
    for name in ("falcon_new_arch", "falcon_new_arch_alibi"):
        assert make_config(name).new_decoder_architecture
    for name in ("falcon_alibi", "falcon_new_arch_alibi"):
        assert make_config(name).alibi
    opt_proj = make_config("opt_proj")
    assert opt_proj.word_embed_proj_dim != opt_proj.hidden_size


# ---------------------------------------------------------------------------- head checkpoints
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_streaming_equals_transformers(zoo: Zoo, name: str, kind: str, padding: str) -> None:
    """Hidden states, last_hidden_state and logits equal transformers at batch sizes 1 and 3."""
    path = zoo.checkpoint(name, kind)
    ids, mask = zoo.batch(name, padding)
    expected = zoo.expected(name, kind, padding)
    has_head = ZOO[name].has_lm_head
    assert (expected.logits is not None) == has_head
    results = []
    for batch_size in (1, 3):
        result = _run(path, ids, mask, batch_size, output_logits=has_head)
        _compare(result, expected, mask, f"{name}/{kind}/{padding}/batch_size={batch_size}")
        results.append(result)
    # Batch-size independence, well inside the tolerance to the oracle.
    one, three = results
    assert one.hidden_states is not None and three.hidden_states is not None
    for idx, (a, b) in enumerate(zip(one.hidden_states, three.hidden_states, strict=True)):
        _close(a, b, mask, f"batch_size 1 vs 3: hidden_states[{idx}]", tol=1e-5)
    if one.logits is not None:
        assert three.logits is not None
        _close(one.logits, three.logits, mask, "batch_size 1 vs 3: logits", tol=1e-5)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_streaming_holds_one_layer_or_two(zoo: Zoo, name: str) -> None:
    """Families with layer stages hold at most one layer's weights at a time, the others two;
    results are the oracle's either way (one sequence per call, so stages are freed and
    re-read across calls of a layer as they would be in a long run)."""
    path = zoo.checkpoint(name, "sharded")
    ids, mask = zoo.batch(name, "left-pad")
    proc = UniversalSLIProcessor(path, progress=False)
    result = proc.run(ids, mask, batch_size=1)
    family, config, source = proc.family, proc.config, proc.checkpoint
    stack = family.layer_types(config)[0]
    model_prefix = family.resolve_model_prefix(config, source.names())
    layer_bytes = []
    for idx in range(family.num_layers(config, stack)):
        prefix = family.get_layer_prefix(idx, stack, model_prefix=model_prefix)
        layer_bytes.append(
            sum(
                source.dtype(n).itemsize * math.prod(source.shape(n))
                for n in source.names()
                if n.startswith(prefix)
            )
        )
    staged = bool(family.layer_stages(config, stack))
    limit = max(layer_bytes) if staged else 2 * max(layer_bytes)
    assert 0 < result.stats.peak_weight_bytes <= limit, (name, staged, layer_bytes)
    if staged:
        assert result.stats.peak_weight_bytes < 2 * min(layer_bytes)
    expected = zoo.expected(name, "sharded", "left-pad")
    _close(result.last_hidden_state, expected.last_hidden_state, mask, f"{name} one-layer run")


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_models_are_sensitive(zoo: Zoo, name: str) -> None:
    """The random weights move every layer's output (and the logits) far beyond the tolerance,
    and the mask matters: with the left pads unmasked the real tokens' outputs change by far
    more than the tolerance, so the equality tests above would see a masking mistake."""
    expected = zoo.expected(name, "single", "left-pad")
    ids, mask = zoo.batch(name, "left-pad")
    keep = mask.bool()
    states = expected.hidden_states
    assert len(states) == make_config(name).num_hidden_layers + 1
    for idx in range(1, len(states)):
        before, after = states[idx - 1], states[idx]
        if before.shape == after.shape:
            assert (after[keep] - before[keep]).abs().max() > 0.1, f"layer {idx - 1} ~ identity"
    if expected.logits is not None:
        assert expected.logits[keep].std() > 0.1
    unpadded = oracle(name, zoo.checkpoint(name, "single"), ids, torch.ones_like(mask))
    moved = (unpadded.last_hidden_state[keep] - expected.last_hidden_state[keep]).abs().max()
    assert moved > 0.1, f"padding does not change {name}'s outputs"


# ---------------------------------------------------------------------------- base checkpoints
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_base_checkpoint_equals_transformers(zoo: Zoo, name: str, padding: str) -> None:
    """A checkpoint saved from the base class (AutoModel; T5Model for t5) streams to the base
    model's last_hidden_state and hidden states."""
    path = zoo.checkpoint(name, "base")
    ids, mask = zoo.batch(name, padding)
    expected = zoo.expected(name, "base", padding)
    assert expected.logits is None
    result = _run(path, ids, mask, 3)
    _compare(result, expected, mask, f"{name}/base/{padding}")


# ---------------------------------------------------------------------------- custom mlp
def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))
    return 0.5 * x * (1.0 + torch.tanh(inner))


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": _gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "silu": _silu,
}


class Affine(nn.Module):
    """``x @ weight.T + bias`` (``transposed=False``, nn.Linear's layout) or ``x @ weight + bias``
    (``transposed=True``, GPT-2's Conv1D layout)."""

    def __init__(self, n_in: int, n_out: int, *, transposed: bool = False) -> None:
        super().__init__()
        self.transposed = transposed
        shape = (n_in, n_out) if transposed else (n_out, n_in)
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.transposed else self.weight.t()
        return x @ weight + self.bias


class ScratchNeoXMLP(nn.Module):
    """GPT-NeoX's MLP from scratch: ``dense_4h_to_h(act(dense_h_to_4h(x)))``."""

    calls: ClassVar[int] = 0

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        hidden, inner = int(config.hidden_size), int(config.intermediate_size)
        self.act = ACTIVATIONS[config.hidden_act]
        self.dense_h_to_4h = Affine(hidden, inner)
        self.dense_4h_to_h = Affine(inner, hidden)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        out: torch.Tensor = self.dense_4h_to_h(self.act(self.dense_h_to_4h(hidden_states)))
        return out


class ScratchGPT2MLP(nn.Module):
    """GPT-2's MLP from scratch: Conv1D weights stored ``[in, out]``, tanh-approximated GELU."""

    calls: ClassVar[int] = 0

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        hidden = int(config.hidden_size)
        inner = getattr(config, "n_inner", None) or 4 * hidden
        self.act = ACTIVATIONS[getattr(config, "activation_function", "gelu_new")]
        self.c_fc = Affine(hidden, inner, transposed=True)
        self.c_proj = Affine(inner, hidden, transposed=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        out: torch.Tensor = self.c_proj(self.act(self.c_fc(hidden_states)))
        return out


SCRATCH_MLPS: dict[str, type[ScratchNeoXMLP] | type[ScratchGPT2MLP]] = {
    "gpt_neox": ScratchNeoXMLP,
    "gpt2": ScratchGPT2MLP,
}


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("name", sorted(SCRATCH_MLPS))
def test_custom_mlp_override_equals_transformers(zoo: Zoo, name: str, padding: str) -> None:
    """A registered from-scratch MLP replaces the family's in every layer; outputs unchanged."""
    scratch = SCRATCH_MLPS[name]
    layer_name = f"{name}_scratch_mlp"
    get_registry().register_custom_layer(layer_name, scratch)
    path = zoo.checkpoint(name, "sharded")
    ids, mask = zoo.batch(name, padding)
    expected = zoo.expected(name, "sharded", padding)
    processor = UniversalSLIProcessor(
        path, custom_layer_overrides={"mlp": layer_name}, progress=False
    )
    before = scratch.calls
    result = processor.run(ids, mask, batch_size=3, output_hidden_states=True, output_logits=True)
    layers = make_config(name).num_hidden_layers
    assert scratch.calls - before == layers * 2  # every layer, both micro-batches (3 + 1)
    _compare(result, expected, mask, f"{name} with custom mlp/{padding}")
