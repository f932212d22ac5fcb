"""Random Llama checkpoints (and a small offline tokenizer) for the benchmark, built once."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["SPECS", "ModelSpec", "bench_cache_dir", "build_checkpoint", "weight_bytes"]

_FORMAT = 1  # bump to rebuild every cached checkpoint


@dataclass(frozen=True)
class ModelSpec:
    """The shape of one random Llama checkpoint."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    vocab_size: int
    max_shard_size: str
    max_position_embeddings: int = 2048

    def n_params(self) -> int:
        """Parameters of the LlamaForCausalLM (untied LM head)."""
        return self.layer_params() * self.num_hidden_layers + self.hidden_size * (
            2 * self.vocab_size + 1
        )

    def layer_params(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        kv = h // self.num_attention_heads * self.num_key_value_heads
        return 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h

    def layer_flops(self, tokens: int, seq: int) -> float:
        """FLOPs of the decoder layers for ``tokens`` tokens in sequences of ``seq``.

        2 per multiply-add of every projection, plus the attention products (QK^T and AV, all
        ``seq`` keys as SDPA computes them with an explicit mask).
        """
        h, i = self.hidden_size, self.intermediate_size
        kv = h // self.num_attention_heads * self.num_key_value_heads
        per_token = 2 * (2 * h * h + 2 * h * kv + 3 * h * i) + 2 * 2 * seq * h
        return float(per_token) * tokens * self.num_hidden_layers


SPECS: dict[str, ModelSpec] = {
    # ~0.49 B parameters: the large model's layer shape, 8 layers.
    "default": ModelSpec("llama-0.5b", 2048, 5632, 16, 4, 8, 32000, "500MB"),
    # ~1.30 B parameters: hidden 2048, intermediate 5632, 16 heads, 4 kv heads, 26 layers.
    "large": ModelSpec("llama-1.3b", 2048, 5632, 16, 4, 26, 32000, "1GB"),
    # For the smoke test: tiny, sharded, same code paths.
    "tiny": ModelSpec("llama-tiny", 64, 128, 4, 2, 2, 128, "60KB", 64),
}


def bench_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/nexus_sli/bench`` (``~/.cache`` when unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "nexus_sli" / "bench"


def weight_bytes(model_dir: Path, *, include_lm_head: bool = False) -> int:
    """Bytes of the base model's tensors (embeddings, layers, final norm) in ``model_dir``."""
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    total = 0
    seen: set[str] = set()
    for file in sorted(set(index["weight_map"].values())):
        with (model_dir / file).open("rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, meta in header.items():
            if name == "__metadata__" or name in seen:
                continue
            seen.add(name)
            if name.startswith("lm_head") and not include_lm_head:
                continue
            start, end = meta["data_offsets"]
            total += int(end) - int(start)
    return total


def _save_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    factory: Any = PreTrainedTokenizerFast  # untyped constructor
    fast = factory(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.save_pretrained(str(path))


def build_checkpoint(spec: ModelSpec, cache: Path | None = None, *, log: Any = print) -> Path:
    """The directory of ``spec``'s checkpoint, built with transformers on first use."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cache = cache or bench_cache_dir()
    target = cache / spec.name
    stamp = target / "bench-model.json"
    want = {"format": _FORMAT, **asdict(spec)}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return target
    log(
        f"building random checkpoint {spec.name} ({spec.n_params() / 1e9:.2f} B params) in {target}"
    )
    t0 = time.perf_counter()
    shutil.rmtree(target, ignore_errors=True)
    tmp = cache / f".{spec.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = LlamaConfig(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        num_hidden_layers=spec.num_hidden_layers,
        vocab_size=spec.vocab_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=2,
        bos_token_id=1,
        eos_token_id=2,
        dtype="float32",
    )
    torch.manual_seed(0)
    model: Any = LlamaForCausalLM(config)
    model = model.to(torch.float32)
    model.save_pretrained(str(tmp), max_shard_size=spec.max_shard_size)
    del model
    if not (tmp / "model.safetensors.index.json").is_file():
        raise RuntimeError(f"{spec.name}: expected a sharded checkpoint in {tmp}")
    _save_tokenizer(tmp, spec.vocab_size)
    (tmp / "bench-model.json").write_text(json.dumps(want, indent=1))
    tmp.rename(target)
    log(f"built {spec.name} in {time.perf_counter() - t0:.0f} s")
    return target
