"""What a streaming run holds and reads: about one layer of weights, embedding rows only,
layer calls capped by ``max_tokens_per_call`` (results unchanged by any of it)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from _checkpoints import padded_batch, save_llama

from nexus_sli import InputError, UniversalSLIProcessor


def _tensor_bytes(path: Path) -> dict[str, int]:
    """Bytes of every tensor in the checkpoint's safetensors files, from their headers."""
    sizes: dict[str, int] = {}
    for file in sorted(path.glob("*.safetensors")):
        with file.open("rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, info in header.items():
            if name != "__metadata__":
                begin, end = info["data_offsets"]
                sizes[name] = end - begin
    return sizes


def _layer_bytes(sizes: dict[str, int], layers: int) -> list[int]:
    return [
        sum(v for k, v in sizes.items() if k.startswith(f"model.layers.{i}."))
        for i in range(layers)
    ]


def _oracle(path: Path, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModel

    with torch.no_grad():
        out: Any = AutoModel.from_pretrained(path)(input_ids=ids, attention_mask=mask)
    hidden: torch.Tensor = out.last_hidden_state
    return hidden


def _close(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> None:
    keep = mask.bool()
    torch.testing.assert_close(actual[keep], expected[keep], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_llama_holds_about_one_layer_of_weights(tmp_path: Path, batch_size: int) -> None:
    """Attention of layer i+1 is read while layer i's MLP runs: never two whole layers."""
    path = save_llama(tmp_path / "ckpt", num_hidden_layers=5, shard="60KB")
    ids, mask = padded_batch(128, left=True)
    result = UniversalSLIProcessor(path, progress=False).run(ids, mask, batch_size=batch_size)
    layers = _layer_bytes(_tensor_bytes(path), 5)
    assert 0 < result.stats.peak_weight_bytes <= max(layers)
    _close(result.last_hidden_state, _oracle(path, ids, mask), mask)


def test_family_without_stages_holds_two_layers(tmp_path: Path) -> None:
    """Mamba declares no stages: the next layer is read whole while one runs."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    config = MambaConfig(hidden_size=64, state_size=8, num_hidden_layers=4, vocab_size=128)
    MambaForCausalLM(config).save_pretrained(tmp_path / "mamba")
    ids = torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    result = UniversalSLIProcessor(tmp_path / "mamba", progress=False).run(ids, mask)
    sizes = _tensor_bytes(tmp_path / "mamba")
    layer = sum(v for k, v in sizes.items() if k.startswith("backbone.layers.0."))
    assert result.stats.peak_weight_bytes == 2 * layer
    _close(result.last_hidden_state, _oracle(tmp_path / "mamba", ids, mask), mask)


def test_embedding_table_is_read_by_rows(tmp_path: Path) -> None:
    """Only the rows of the tokens in the batch are read from a 4096-row table."""
    path = save_llama(tmp_path / "ckpt", vocab_size=4096, num_hidden_layers=2)
    sizes = _tensor_bytes(path)
    ids = torch.tensor([[5, 9, 9, 4000, 17], [17, 5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    proc = UniversalSLIProcessor(path, progress=False)
    result = proc.run(ids, mask, batch_size=1)
    rows = {(0, 5), (0, 9), (0, 4000), (0, 17), (1, 17), (1, 5), (1, 6), (1, 7), (1, 8)}
    row_bytes = sizes["model.embed_tokens.weight"] // 4096
    expected = sum(_layer_bytes(sizes, 2)) + sizes["model.norm.weight"] + len(rows) * row_bytes
    assert proc.checkpoint.bytes_read == expected
    assert proc.checkpoint.bytes_read < sizes["model.embed_tokens.weight"]
    _close(result.last_hidden_state, _oracle(path, ids, mask), mask)


def test_max_tokens_per_call_splits_calls_not_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_llama(tmp_path / "ckpt", num_hidden_layers=2)
    ids, mask = padded_batch(128, left=True)  # [batch, seq]
    seq = ids.shape[1]
    proc = UniversalSLIProcessor(path, progress=False)
    calls: list[int] = []
    original = proc.family.call_layer

    def counting(config: Any, layer: Any, hidden: torch.Tensor, *args: Any) -> torch.Tensor:
        calls.append(hidden.shape[0])
        return original(config, layer, hidden, *args)

    monkeypatch.setattr(proc.family, "call_layer", counting)
    expected = _oracle(path, ids, mask)
    for cap, per_call in [(None, 8), (1, 1), (2 * seq, 2), (2 * seq + 1, 2), (3 * seq, 3)]:
        calls.clear()
        result = proc.run(ids, mask, batch_size=8, max_tokens_per_call=cap)
        want = min(8, ids.shape[0]) if cap is None else per_call
        assert max(calls) == want, (cap, calls)
        assert len(calls) == 2 * math.ceil(ids.shape[0] / want)
        _close(result.last_hidden_state, expected, mask)
    with pytest.raises(InputError, match="max_tokens_per_call must be at least 1"):
        proc.run(ids, mask, max_tokens_per_call=0)
