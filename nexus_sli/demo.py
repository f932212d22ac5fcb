"""The main job, out of the box: ``python -m nexus_sli.demo``.

Builds (once, into the user cache dir, honouring ``XDG_CACHE_HOME``) a small random Llama
checkpoint with transformers, registers an example custom layer (an RMSNorm written from
scratch) for the ``input_norm`` role, streams the checkpoint layer by layer, and prints a
report: family, layers, tokens, wall time, peak memory, the memory the full model would need,
and the max abs difference against transformers' in-memory forward.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ExampleRMSNorm", "build_demo_checkpoint", "main"]

DEMO_CONFIG: dict[str, Any] = {
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "num_hidden_layers": 12,
    "vocab_size": 8000,
    "max_position_embeddings": 512,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}


class ExampleRMSNorm(nn.Module):
    """RMSNorm written from scratch: the example custom layer the demo registers."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(config.hidden_size))
        self.eps = float(getattr(config, "rms_norm_eps", 1e-6))

    def expected_output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return input_shape

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(hidden_states.dtype)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/nexus_sli`` (``~/.cache/nexus_sli`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nexus_sli"


def build_demo_checkpoint(path: Path) -> Path:
    """Save a random Llama to ``path`` once (sharded safetensors); reuse it afterwards."""
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        return path
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tmp = path.with_name(path.name + ".partial")
    model = LlamaForCausalLM(LlamaConfig(**DEMO_CONFIG))
    model.save_pretrained(tmp, max_shard_size="40MB")
    tmp.rename(path)
    return path


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m nexus_sli.demo", description=__doc__)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)

    from . import UniversalSLIProcessor, get_registry

    path = build_demo_checkpoint(cache_dir() / "demo-llama")
    registry = get_registry()
    registry.register_custom_layer("demo_rms_norm", ExampleRMSNorm)
    ids = torch.randint(3, DEMO_CONFIG["vocab_size"], (args.sequences, args.tokens))
    processor = UniversalSLIProcessor(path, custom_layer_overrides={"input_norm": "demo_rms_norm"})
    start = time.perf_counter()
    result = processor.run(ids, batch_size=args.batch_size, output_logits=True)
    wall = time.perf_counter() - start
    peak = _peak_rss_mib()
    full = sum(p.stat().st_size for p in path.glob("*.safetensors")) / 2**20

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        expected = model(input_ids=ids, output_hidden_states=True)
    expected_hidden = expected.hidden_states[-1]
    diff = float((result.last_hidden_state - expected_hidden).abs().max())
    logit_diff = (
        float((result.logits - expected.logits).abs().max())
        if result.logits is not None
        else float("nan")
    )
    lines = [
        f"checkpoint       {path}",
        f"family           {processor.family.family_id} ({processor.config.model_type})",
        f"layers           {processor.family.num_layers(processor.config)}",
        "custom layer     demo_rms_norm as 'input_norm' in every layer",
        f"tokens           {ids.numel()} ({args.sequences} x {args.tokens}, micro-batches of {args.batch_size})",
        f"wall time        {wall:.2f} s",
        f"peak memory      {peak:.0f} MiB (whole process, torch runtime included)",
        f"full model       {full:.0f} MiB of weights",
        f"max abs diff     {diff:.2e} hidden states, {logit_diff:.2e} logits (vs transformers in memory)",
    ]
    print("\n".join(lines))
    return 0 if diff <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
