"""Build small random checkpoints with transformers, saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def llama_config(**overrides: Any) -> Any:
    from transformers import LlamaConfig

    values: dict[str, Any] = {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "vocab_size": 128,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    values.update(overrides)
    return LlamaConfig(**values)


def save_llama(
    path: Path, *, head: bool = True, shard: str | None = None, seed: int = 0, **overrides: Any
) -> Path:
    """Save a random Llama (LlamaForCausalLM, or LlamaModel with head=False) to ``path``."""
    from transformers import LlamaForCausalLM, LlamaModel

    torch.manual_seed(seed)
    config = llama_config(**overrides)
    model = (LlamaForCausalLM if head else LlamaModel)(config)
    kwargs: dict[str, Any] = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    return path


def padded_batch(vocab: int, *, left: bool, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A [4, 9] batch of ids with ragged lengths, padded right or left."""
    g = torch.Generator().manual_seed(seed)
    lengths = [9, 6, 3, 8]
    ids = torch.randint(3, vocab, (len(lengths), 9), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        if left:
            mask[row, 9 - n :] = 1
        else:
            mask[row, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask
