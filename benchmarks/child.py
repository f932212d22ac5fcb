"""One measurement in its own process: ``python -m benchmarks.child JOB.json``.

The job (written by :mod:`benchmarks.run`) names a system, a checkpoint and a workload; the
result (JSON) goes to ``job["out"]``. Peak RSS is this process's ``VmHWM``; I/O comes from
``/proc/self/io``, counted from after the imports.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .measure import io_counters, proc_status_kb

__all__ = ["SYSTEMS", "make_inputs", "run_job"]

SYSTEMS = {
    "transformers": "(a) transformers in-memory",
    "accelerate": "(b) transformers + accelerate disk offload",
    "airllm": "(c) AirLLM",
    "nexus_sli": "(d) nexus_sli streaming",
}

#: The Python package each system needs beyond torch/transformers.
REQUIRES = {"transformers": "transformers", "accelerate": "accelerate", "airllm": "airllm"}

_POOL_SEED = 1234


def make_inputs(n: int, seq: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` rows of a fixed pool of ``max(n, 128)`` random sequences (all unpadded)."""
    g = torch.Generator().manual_seed(_POOL_SEED)
    pool = torch.randint(3, vocab, (max(n, 128), seq), generator=g)
    ids = pool[:n].clone()
    return ids, torch.ones_like(ids)


class _Timer:
    """Accumulates time spent inside wrapped callables."""

    def __init__(self) -> None:
        self.total = 0.0
        self.calls = 0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - t0
                self.calls += 1

        return timed


def _micro_batches(n: int, micro: int) -> list[tuple[int, int]]:
    return [(s, min(s + micro, n)) for s in range(0, n, micro)]


def _forward_hf(model: Any, ids: torch.Tensor, mask: torch.Tensor, micro: int) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for s, e in _micro_batches(ids.shape[0], micro):
            out = model(input_ids=ids[s:e], attention_mask=mask[s:e], use_cache=False)
            outs.append(out.last_hidden_state)
    return torch.cat(outs)


def _run_transformers(job: dict[str, Any], ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    from transformers import AutoModel

    t0 = time.perf_counter()
    model = AutoModel.from_pretrained(job["model_dir"], dtype=torch.float32)
    model.eval()
    t1 = time.perf_counter()
    out = _forward_hf(model, ids, mask, job["micro"])
    t2 = time.perf_counter()
    return {
        "out": out,
        "load_s": t1 - t0,
        "forward_s": t2 - t1,
        "weight_wait_s": t1 - t0,  # everything is read before the first forward
        "compute_s": t2 - t1,
        "logical_weight_bytes": job["weight_bytes"],
    }


def _run_accelerate(job: dict[str, Any], ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    importlib.import_module("accelerate")
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(job["model_dir"])
    device_map: dict[str, str] = {"embed_tokens": "cpu", "norm": "cpu", "rotary_emb": "cpu"}
    device_map.update({f"layers.{i}": "disk" for i in range(config.num_hidden_layers)})
    offload = Path(job["scratch"]) / "offload"
    t0 = time.perf_counter()
    model = AutoModel.from_pretrained(
        job["model_dir"], dtype=torch.float32, device_map=device_map, offload_folder=str(offload)
    )
    model.eval()
    t1 = time.perf_counter()
    timer = _Timer()
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is not None and getattr(hook, "offload", False):
            hook.pre_forward = timer.wrap(hook.pre_forward)
    out = _forward_hf(model, ids, mask, job["micro"])
    t2 = time.perf_counter()
    passes = len(_micro_batches(ids.shape[0], job["micro"]))
    written = sum(p.stat().st_size for p in offload.rglob("*") if p.is_file())
    return {
        "out": out,
        "load_s": t1 - t0,
        "forward_s": t2 - t1,
        "weight_wait_s": timer.total,
        "compute_s": (t2 - t1) - timer.total,
        "offload_folder_bytes": written if offload.exists() else 0,
        "logical_weight_bytes": job["layer_bytes"] * passes + job["stem_bytes"],
        "hooks_timed": timer.calls,
    }


def _airllm_model(job: dict[str, Any]) -> Any:
    airllm = importlib.import_module("airllm")
    return airllm.AutoModel.from_pretrained(
        job["model_dir"],
        device="cpu",
        dtype=torch.float32,
        layer_shards_saving_path=job["airllm_split"],
    )


def _run_airllm(job: dict[str, Any], ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    t0 = time.perf_counter()
    air = _airllm_model(job)
    t1 = time.perf_counter()
    timer = _Timer()
    for module in air.layers:
        hooks = module._forward_pre_hooks
        for key in list(hooks):
            hooks[key] = timer.wrap(hooks[key])
    # The base model (embeddings, layers, final norm) of AirLLM's meta LlamaForCausalLM: its
    # streaming hooks sit on these modules; the LM head is not run (last hidden state only).
    out = _forward_hf(air.model.model, ids, mask, job["micro"])
    t2 = time.perf_counter()
    passes = len(_micro_batches(ids.shape[0], job["micro"]))
    return {
        "out": out,
        "load_s": t1 - t0,
        "forward_s": t2 - t1,
        "weight_wait_s": timer.total,
        "compute_s": (t2 - t1) - timer.total,
        "logical_weight_bytes": (job["layer_bytes"] + job["stem_bytes"]) * passes,
        "hooks_timed": timer.calls,
    }


def _run_nexus(job: dict[str, Any], ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    from nexus_sli import UniversalSLIProcessor

    t0 = time.perf_counter()
    proc = UniversalSLIProcessor(job["model_dir"], progress=False)
    reads: list[tuple[float, float, int]] = []
    get_many = proc.checkpoint.get_many

    def timed_get_many(names: Any) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        before = proc.checkpoint.bytes_read
        result = get_many(names)
        reads.append((start, time.perf_counter(), proc.checkpoint.bytes_read - before))
        return result

    proc.checkpoint.get_many = timed_get_many  # type: ignore[method-assign]
    t1 = time.perf_counter()
    result = proc.run(ids, mask, batch_size=job["micro"])
    t2 = time.perf_counter()
    stats = result.stats
    loop_start = reads[0][0] if reads else t1
    return {
        "out": result.last_hidden_state,
        "load_s": t1 - t0,
        "forward_s": t2 - t1,
        "weight_wait_s": stats.read_wait,
        "compute_s": stats.compute,
        "write_s": stats.write,
        "logical_weight_bytes": proc.checkpoint.bytes_read,
        "timeline": [list(row) for row in stats.timeline],
        "reads": [[s - loop_start, e - loop_start, b] for s, e, b in reads],
        "run_s": t2 - t1,
    }


_RUNNERS: dict[str, Callable[[dict[str, Any], torch.Tensor, torch.Tensor], dict[str, Any]]] = {
    "transformers": _run_transformers,
    "accelerate": _run_accelerate,
    "airllm": _run_airllm,
    "nexus_sli": _run_nexus,
}


_IMPORTS = {
    "transformers": ["transformers.models.llama.modeling_llama"],
    "accelerate": ["transformers.models.llama.modeling_llama", "accelerate", "accelerate.hooks"],
    "airllm": ["transformers.models.llama.modeling_llama", "accelerate", "airllm"],
    "nexus_sli": ["transformers.models.llama.modeling_llama", "nexus_sli", "nexus_sli.families"],
}


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in this process and return its result record."""
    torch.set_num_threads(int(job["threads"]))
    # Imports happen before the clock starts, the same for every system.
    for name in _IMPORTS[job["system"]]:
        importlib.import_module(name)
    if job.get("prepare"):
        # AirLLM writes its per-layer split copy on first use: done here, before any timing.
        t0 = time.perf_counter()
        _airllm_model(job)
        return {"status": "ok", "prepare_s": time.perf_counter() - t0}
    ids, mask = make_inputs(int(job["n"]), int(job["seq"]), int(job["vocab"]))
    baseline_kb = proc_status_kb("VmRSS")
    io0 = io_counters()
    t0 = time.perf_counter()
    got = _RUNNERS[job["system"]](job, ids, mask)
    wall = time.perf_counter() - t0
    hwm_kb = proc_status_kb("VmHWM")
    io1 = io_counters()
    out: torch.Tensor = got.pop("out")
    record: dict[str, Any] = {
        "status": "ok",
        "wall_s": wall,
        "peak_rss_kb": hwm_kb,
        "baseline_rss_kb": baseline_kb,
        "read_bytes": io1["read_bytes"] - io0["read_bytes"],
        "rchar": io1["rchar"] - io0["rchar"],
        "gflops": job["flops"] / got["compute_s"] / 1e9 if got["compute_s"] > 0 else 0.0,
        "out_shape": list(out.shape),
        "out_finite": bool(torch.isfinite(out).all()),
        **got,
    }
    if job.get("save_ref"):
        from safetensors.torch import save_file

        save_file({"out": out.contiguous()}, job["save_ref"])
    if job.get("ref") and Path(job["ref"]).is_file():
        from safetensors.torch import load_file

        ref = load_file(job["ref"])["out"]
        rows = min(ref.shape[0], out.shape[0])
        record["max_abs_diff"] = float((out[:rows] - ref[:rows]).abs().max())
        record["diff_rows"] = rows
    return record


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    try:
        record = run_job(job)
    except Exception as exc:
        record = {
            "status": f"error: {type(exc).__name__}: {str(exc)[:500]}",
            "traceback": traceback.format_exc()[-4000:],
        }
    Path(job["out"]).write_text(json.dumps(record))
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (AirLLM's worker thread, large frees)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
