"""The main job, out of the box: ``nexus-sli demo`` (or ``python -m nexus_sli.demo``).

Builds (once, into the user cache dir, honouring ``XDG_CACHE_HOME``) a small random checkpoint
with transformers (a Llama by default; ``--family gpt2`` or ``--family bert`` for the others),
registers an example custom layer written from scratch for one role of every layer, streams the
checkpoint layer by layer with a progress bar (on a terminal), and prints a report: family,
layers, tokens, wall time, peak memory of the process, the memory the full model would need,
and the max abs difference against transformers' in-memory forward.

No network is used: the checkpoint is random, and inputs are random token ids.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "DEMO_FAMILIES",
    "DemoReport",
    "DemoSpec",
    "ExampleBertIntermediate",
    "ExampleGPT2MLP",
    "ExampleRMSNorm",
    "build_demo_checkpoint",
    "cache_dir",
    "format_report",
    "main",
    "run_demo",
]

#: The max abs difference (hidden states and logits) the demo accepts against transformers.
TOLERANCE = 1e-4


# ---------------------------------------------------------------------- example custom layers
class ExampleRMSNorm(nn.Module):
    """RMSNorm written from scratch: the example custom layer of the Llama demo (``input_norm``)."""

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


class _Conv1D(nn.Module):
    """GPT-2's transposed linear: ``weight`` is ``[in, out]``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(
            *x.shape[:-1], self.weight.shape[1]
        )


class ExampleGPT2MLP(nn.Module):
    """GPT-2's MLP written from scratch (tanh GELU): the example of the GPT-2 demo (``mlp``)."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        hidden = int(config.hidden_size)
        inner = getattr(config, "n_inner", None) or 4 * hidden
        self.c_fc = _Conv1D(hidden, int(inner))
        self.c_proj = _Conv1D(int(inner), hidden)

    def expected_output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return input_shape

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = self.c_fc(hidden_states)
        x = 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
        out: torch.Tensor = self.c_proj(x)
        return out


class ExampleBertIntermediate(nn.Module):
    """BERT's intermediate projection written from scratch (erf GELU): the BERT demo's ``mlp``."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.dense = nn.Linear(int(config.hidden_size), int(config.intermediate_size))

    def expected_output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*input_shape[:-1], self.dense.out_features)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = self.dense(hidden_states)
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


# ---------------------------------------------------------------------- demo checkpoints
@dataclass(frozen=True)
class DemoSpec:
    """One demo checkpoint: what to build and which example custom layer to swap in."""

    name: str
    config_class: str
    model_class: str
    auto_class: str
    config: Mapping[str, Any]
    layer_name: str
    layer: Callable[[Any, int], nn.Module]
    role: str

    def directory(self) -> Path:
        """``<cache>/demo-<name>-<hash of the config>``: a changed config builds a new one."""
        key = json.dumps([self.model_class, dict(self.config)], sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:8]
        return cache_dir() / f"demo-{self.name}-{digest}"


_SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

#: The demo checkpoints, by ``--family`` name (about 170-180 MiB of float32 weights each).
DEMO_FAMILIES: dict[str, DemoSpec] = {
    "llama": DemoSpec(
        name="llama",
        config_class="LlamaConfig",
        model_class="LlamaForCausalLM",
        auto_class="AutoModelForCausalLM",
        config={
            "hidden_size": 512,
            "intermediate_size": 1536,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "num_hidden_layers": 12,
            "vocab_size": 8000,
            "max_position_embeddings": 512,
            "tie_word_embeddings": False,
            **_SPECIAL,
        },
        layer_name="demo_rms_norm",
        layer=ExampleRMSNorm,
        role="input_norm",
    ),
    "gpt2": DemoSpec(
        name="gpt2",
        config_class="GPT2Config",
        model_class="GPT2LMHeadModel",
        auto_class="AutoModelForCausalLM",
        config={
            "n_embd": 512,
            "n_head": 8,
            "n_layer": 12,
            "n_positions": 512,
            "vocab_size": 8000,
            **_SPECIAL,
        },
        layer_name="demo_gpt2_mlp",
        layer=ExampleGPT2MLP,
        role="mlp",
    ),
    "bert": DemoSpec(
        name="bert",
        config_class="BertConfig",
        model_class="BertForMaskedLM",
        auto_class="AutoModelForMaskedLM",
        config={
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_attention_heads": 8,
            "num_hidden_layers": 12,
            "max_position_embeddings": 512,
            "vocab_size": 8000,
            "pad_token_id": 0,
        },
        layer_name="demo_bert_intermediate",
        layer=ExampleBertIntermediate,
        role="mlp",
    ),
}

#: Backwards-compatible name: the Llama demo's config.
DEMO_CONFIG: Mapping[str, Any] = DEMO_FAMILIES["llama"].config


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/nexus_sli`` (``~/.cache/nexus_sli`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nexus_sli"


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No transformers progress bars or load reports: the demo prints its own report."""
    from transformers.utils import logging as hf_logging

    # transformers leaves these untyped; give them their (trivial) types.
    disable_bars: Callable[[], None] = hf_logging.disable_progress_bar
    enable_bars: Callable[[], None] = hf_logging.enable_progress_bar
    bars_were_enabled = bool(hf_logging.is_progress_bar_enabled())
    verbosity = hf_logging.get_verbosity()
    disable_bars()
    hf_logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_were_enabled:
            enable_bars()


def _is_built(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def build_demo_checkpoint(path: Path | None = None, spec: DemoSpec | None = None) -> Path:
    """Save a random model of ``spec`` (Llama by default) to ``path`` once; reuse it afterwards.

    The checkpoint is written into a temporary directory beside ``path`` and renamed into place,
    so an interrupted build never leaves a half-written checkpoint behind.
    """
    spec = spec if spec is not None else DEMO_FAMILIES["llama"]
    path = path if path is not None else spec.directory()
    if _is_built(path):
        return path
    import transformers

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        torch.manual_seed(0)
        config = getattr(transformers, spec.config_class)(**spec.config)
        model = getattr(transformers, spec.model_class)(config)
        with _quiet_transformers():
            model.save_pretrained(tmp, max_shard_size="40MB")
        del model
        try:
            tmp.rename(path)
        except OSError:
            if not _is_built(path):  # not a concurrent build that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        gc.collect()
    return path


# ---------------------------------------------------------------------- memory
def _proc_status_mib(field: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux ``/proc/self/clear_refs``); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_mib() -> float:
    peak = _proc_status_mib("VmHWM")
    if peak is not None:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024


def _rss_mib() -> float | None:
    return _proc_status_mib("VmRSS")


# ---------------------------------------------------------------------- the demo
@dataclass(frozen=True)
class DemoReport:
    """What the demo measured."""

    checkpoint: Path
    built: bool
    family_id: str
    model_type: str
    layers: int
    layer_name: str
    role: str
    sequences: int
    tokens_per_sequence: int
    batch_size: int
    wall_time: float
    peak_rss_mib: float
    baseline_rss_mib: float | None
    peak_includes_build: bool
    full_model_mib: float
    max_abs_diff_hidden: float
    max_abs_diff_logits: float | None

    @property
    def tokens(self) -> int:
        return self.sequences * self.tokens_per_sequence

    @property
    def ok(self) -> bool:
        """Whether the streamed outputs match transformers within :data:`TOLERANCE`."""
        diffs = [self.max_abs_diff_hidden]
        if self.max_abs_diff_logits is not None:
            diffs.append(self.max_abs_diff_logits)
        return all(d <= TOLERANCE for d in diffs)


def run_demo(
    family: str = "llama",
    *,
    sequences: int = 8,
    tokens: int = 128,
    batch_size: int = 4,
    progress: bool | None = None,
    status: Callable[[str], None] | None = None,
) -> DemoReport:
    """Build (once) the demo checkpoint of ``family``, stream it, compare with transformers.

    ``progress`` is passed to :class:`~nexus_sli.UniversalSLIProcessor` (``None``: a progress
    bar on a terminal only); ``status`` receives one-line messages about slow steps.
    """
    from ._registry import get_registry
    from .errors import InputError
    from .universal_sli import UniversalSLIProcessor

    if family not in DEMO_FAMILIES:
        raise InputError(f"no demo for family {family!r}; choose one of {', '.join(DEMO_FAMILIES)}")
    for label, value in (("sequences", sequences), ("tokens", tokens), ("batch_size", batch_size)):
        if value < 1:
            raise InputError(f"{label} must be at least 1, got {value}")
    spec = DEMO_FAMILIES[family]
    vocab = int(spec.config["vocab_size"])
    max_tokens = int(spec.config.get("max_position_embeddings", spec.config.get("n_positions", 0)))
    if tokens > max_tokens:
        raise InputError(f"tokens must be at most {max_tokens} for the {family} demo, got {tokens}")
    say = status if status is not None else (lambda _message: None)

    path = spec.directory()
    built = not _is_built(path)
    if built:
        say(f"building the demo checkpoint (once) in {path} ...")
        build_demo_checkpoint(path, spec)

    registry = get_registry()
    registry.register_custom_layer(spec.layer_name, spec.layer)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (sequences, tokens), generator=generator)
    processor = UniversalSLIProcessor(
        path, custom_layer_overrides={spec.role: spec.layer_name}, progress=progress
    )
    gc.collect()
    reset = _reset_peak_rss()
    baseline = _rss_mib()
    start = time.perf_counter()
    result = processor.run(ids, batch_size=batch_size, output_logits=True)
    wall = time.perf_counter() - start
    peak = _peak_rss_mib()
    full = sum(p.stat().st_size for p in path.glob("*.safetensors")) / 2**20

    say("comparing with the in-memory transformers forward ...")
    import transformers

    with _quiet_transformers():
        model = getattr(transformers, spec.auto_class).from_pretrained(path)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids, output_hidden_states=True)
    diff = float((result.last_hidden_state - expected.hidden_states[-1]).abs().max())
    logit_diff = (
        float((result.logits - expected.logits).abs().max()) if result.logits is not None else None
    )
    return DemoReport(
        checkpoint=path,
        built=built,
        family_id=processor.family.family_id,
        model_type=str(processor.config.model_type),
        layers=processor.family.num_layers(processor.config),
        layer_name=spec.layer_name,
        role=spec.role,
        sequences=sequences,
        tokens_per_sequence=tokens,
        batch_size=batch_size,
        wall_time=wall,
        peak_rss_mib=peak,
        baseline_rss_mib=baseline if reset else None,
        peak_includes_build=built and not reset,
        full_model_mib=full,
        max_abs_diff_hidden=diff,
        max_abs_diff_logits=logit_diff,
    )


def format_report(report: DemoReport) -> list[tuple[str, str]]:
    """The report as ``(label, value)`` rows, for a table or plain lines."""
    peak = f"{report.peak_rss_mib:.0f} MiB (whole process, torch runtime included"
    if report.baseline_rss_mib is not None:
        peak += f"; {report.baseline_rss_mib:.0f} MiB before streaming"
    if report.peak_includes_build:
        peak += "; includes building the checkpoint, run again for the streaming peak"
    peak += ")"
    logits = (
        f", {report.max_abs_diff_logits:.2e} logits"
        if report.max_abs_diff_logits is not None
        else ""
    )
    verdict = "match" if report.ok else f"MISMATCH (tolerance {TOLERANCE:.0e})"
    return [
        ("checkpoint", f"{report.checkpoint}{' (built now)' if report.built else ''}"),
        ("family", f"{report.family_id} ({report.model_type})"),
        ("layers", str(report.layers)),
        ("custom layer", f"{report.layer_name} as {report.role!r} in every layer"),
        (
            "tokens",
            f"{report.tokens} ({report.sequences} x {report.tokens_per_sequence}, "
            f"micro-batches of {report.batch_size})",
        ),
        ("wall time", f"{report.wall_time:.2f} s (streaming)"),
        ("peak memory", peak),
        ("full model", f"{report.full_model_mib:.0f} MiB of weights"),
        (
            "max abs diff",
            f"{report.max_abs_diff_hidden:.2e} hidden states{logits} vs transformers in memory: "
            f"{verdict}",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the demo with plain output; returns the exit status (1 on a mismatch)."""
    parser = argparse.ArgumentParser(prog="python -m nexus_sli.demo", description=__doc__)
    parser.add_argument("--family", choices=list(DEMO_FAMILIES), default="llama")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    report = run_demo(
        args.family,
        sequences=args.sequences,
        tokens=args.tokens,
        batch_size=args.batch_size,
        status=lambda message: print(message, file=sys.stderr, flush=True),
    )
    width = max(len(label) for label, _ in format_report(report))
    print("\n".join(f"{label:<{width}}  {value}" for label, value in format_report(report)))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
