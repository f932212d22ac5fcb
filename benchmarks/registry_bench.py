"""Registry micro-benchmarks, in their own process: ``python -m benchmarks.registry_bench OUT``.

* ``get_layer_factory``: median time of one lookup of a registered name (shared registry).
* Registration of a factory building a transformers ``LlamaDecoderLayer`` of hidden size 8192
  (intermediate 28672, 64 heads, 8 kv heads: ~3.4 GB in float32 if it were built for real),
  with the default meta-device validation: median time and RSS growth.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from .measure import proc_status_kb

__all__ = ["run_registry_bench"]


def _big_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=8192,
        intermediate_size=28672,
        num_attention_heads=64,
        num_key_value_heads=8,
        num_hidden_layers=1,
        vocab_size=32000,
        max_position_embeddings=4096,
    )


def run_registry_bench(*, quick: bool = False) -> dict[str, Any]:
    """Measure lookups and big-layer registrations; returns the figures as a dict."""
    from torch import nn
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from nexus_sli import get_registry

    registry = get_registry()

    def small(config: Any, layer_idx: int) -> nn.Module:
        return nn.Identity()

    registry.register_custom_layer("bench_lookup", small)
    lookups = 5_000 if quick else 50_000
    per_call: list[float] = []
    get = registry.get_layer_factory
    for _ in range(3 if quick else 7):
        t0 = time.perf_counter()
        for _ in range(lookups):
            get("bench_lookup")
        per_call.append((time.perf_counter() - t0) / lookups)

    config = _big_config()

    def big(config: Any, layer_idx: int) -> nn.Module:
        return LlamaDecoderLayer(config, layer_idx)

    params = 0
    import torch

    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaDecoderLayer(config, 0).parameters())
    gc.collect()
    rss0 = proc_status_kb("VmRSS")
    times: list[float] = []
    rss_after_first = 0
    repeats = 3 if quick else 25
    for i in range(repeats):
        t0 = time.perf_counter()
        registry.register_custom_layer("llama_bench_big", big, probe_config=config)
        times.append(time.perf_counter() - t0)
        if i == 0:
            gc.collect()
            rss_after_first = proc_status_kb("VmRSS")
        registry.unregister_custom_layer("llama_bench_big")
    gc.collect()
    rss1 = proc_status_kb("VmRSS")
    return {
        "lookup_median_s": statistics.median(per_call),
        "lookup_min_s": min(per_call),
        "lookup_max_s": max(per_call),
        "lookup_calls": lookups,
        "register_first_s": times[0],
        "register_median_s": statistics.median(times),
        "register_min_s": min(times),
        "register_max_s": max(times),
        "register_repeats": repeats,
        "big_layer_params": params,
        "rss_before_kb": rss0,
        "rss_growth_first_kb": rss_after_first - rss0,
        "rss_growth_total_kb": rss1 - rss0,
        "peak_rss_kb": proc_status_kb("VmHWM"),
    }


def main(argv: list[str]) -> int:
    result = run_registry_bench(quick="--quick" in argv[1:])
    Path(argv[0]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
