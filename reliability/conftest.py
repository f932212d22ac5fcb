"""Fixtures of the reliability suite: checkpoints built once, reference runs, registry scopes."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# Run alone, check every annotated function of the package, like tests/ (RELIABILITY_BEARTYPE=0
# turns it off).
if "nexus_sli" not in sys.modules and os.environ.get("RELIABILITY_BEARTYPE", "1") != "0":
    from beartype import BeartypeConf
    from beartype.claw import beartype_package

    beartype_package("nexus_sli", conf=BeartypeConf(claw_skip_package_names=("nexus_sli.demo",)))

import torch

from nexus_sli import get_registry

from ._helpers import (
    DEEP_LAYERS,
    FIGURES,
    Zygote,
    padded_batch,
    result_tensors,
    save_gpt2,
    save_llama,
    stream,
    write_inputs,
)

# Deterministic by default (CI); RELIABILITY_FUZZ_SCALE=10 runs ten times the examples, random.
_SCALE = float(os.environ.get("RELIABILITY_FUZZ_SCALE", "1"))
settings.register_profile(
    "reliability",
    derandomize=_SCALE == 1,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("reliability")


def scaled(examples: int) -> int:
    """``examples`` times RELIABILITY_FUZZ_SCALE."""
    return max(1, int(examples * _SCALE))


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread, like the child processes: exact comparisons across processes
    need the same reduction order, and on a shared 2-core machine it is also much faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def zygote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote]:
    """One child interpreter with torch and nexus_sli imported, forking a process per run."""
    started = Zygote(tmp_path_factory.mktemp("zygote"))
    yield started
    started.close()


@pytest.fixture(autouse=True)
def _isolate_registry() -> Iterator[None]:
    with get_registry().scoped():
        yield


@pytest.fixture(scope="session")
def deep_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10-layer Llama saved in several shards: many small layers to kill a run between."""
    return save_llama(
        tmp_path_factory.mktemp("deep") / "ckpt",
        layers=DEEP_LAYERS,
        hidden=64,
        vocab=128,
        shard="200KB",
    )


@pytest.fixture(scope="session")
def deep_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return padded_batch(128)


@pytest.fixture(scope="session")
def deep_inputs_file(
    tmp_path_factory: pytest.TempPathFactory, deep_inputs: tuple[torch.Tensor, torch.Tensor]
) -> Path:
    return write_inputs(tmp_path_factory.mktemp("inputs") / "inputs.safetensors", *deep_inputs)


@pytest.fixture(scope="session")
def deep_reference(
    tmp_path_factory: pytest.TempPathFactory,
    deep_llama: Path,
    deep_inputs: tuple[torch.Tensor, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Outputs of one uninterrupted run (hidden states, logits) of the deep checkpoint."""
    act = tmp_path_factory.mktemp("reference") / "acts"
    return result_tensors(stream(deep_llama, act, *deep_inputs))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama, for damage and input tests (one file)."""
    return save_llama(tmp_path_factory.mktemp("tiny") / "ckpt", layers=2, hidden=32, vocab=64)


@pytest.fixture(scope="session")
def tiny_sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer Llama in several shards with an index, for damage tests."""
    return save_llama(
        tmp_path_factory.mktemp("tiny_sharded") / "ckpt",
        layers=3,
        hidden=32,
        vocab=64,
        shard="30KB",
    )


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2 with 16 learned positions."""
    return save_gpt2(tmp_path_factory.mktemp("gpt2") / "ckpt")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The figures of the run (what was tried), for the closing note."""
    if not FIGURES:
        return
    terminalreporter.section("reliability figures")
    for key in sorted(FIGURES):
        terminalreporter.write_line(f"{key}: {FIGURES[key]}")
