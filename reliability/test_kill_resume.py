"""Killed mid-run: SIGKILL / SIGINT / a kernel kill inside a write, then ``resume=True``.

Every scenario streams the 10-layer checkpoint in a child process (``_child.py``) that stops
at a precise point through a test-only hook, is killed there, and is resumed in this process.
The resumed run must equal an uninterrupted one bit for bit, must not recompute (or rewrite) any
layer completed before the kill, and must never take an unfinished file for a complete one.

The children of all single-kill scenarios run side by side (one module fixture) to keep the
suite fast; each scenario is then checked by its own test.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from ._helpers import (
    DEEP_LAYERS,
    FIGURES,
    FileId,
    Forked,
    Zygote,
    assert_every_activation_valid,
    assert_identical,
    child_spec,
    completed_layers,
    dir_state,
    layer_files,
    lock_is_free,
    result_tensors,
    stream,
    temp_files,
    without_lock,
)


@dataclass(frozen=True)
class Scenario:
    """Where the child stops and how it dies."""

    label: str
    where: str
    target: str
    action: str  # wait (then the parent signals), sleep (signalled meanwhile), fsize
    sig: signal.Signals
    #: Layers complete when the child dies (None: depends on the background writer's timing).
    completed: int | None
    embeddings: bool | None = True
    manifest: bool = True
    note: str = ""


SCENARIOS = [
    Scenario(
        "manifest-before-rename",
        "replace_before",
        "manifest.json",
        "wait",
        signal.SIGKILL,
        0,
        embeddings=False,
        manifest=False,
        note="manifest written to its temp file, not renamed",
    ),
    Scenario(
        "embeddings-before-rename",
        "replace_before",
        "embeddings.safetensors",
        "wait",
        signal.SIGKILL,
        0,
        embeddings=False,
        note="embeddings complete in the temp file, not renamed",
    ),
    Scenario("after-embeddings", "save_after", "-1", "wait", signal.SIGKILL, 0),
    Scenario("after-layer-0", "save_after", "0", "wait", signal.SIGKILL, 1),
    Scenario(
        "sigterm-after-layer-1",
        "save_after",
        "1",
        "wait",
        signal.SIGTERM,
        2,
        note="SIGTERM's default action: killed, no cleanup",
    ),
    Scenario(
        "layer-3-before-rename",
        "replace_before",
        "layer_00003.safetensors",
        "wait",
        signal.SIGKILL,
        3,
        note="layer 3 fully written to its temp file, the rename not done",
    ),
    Scenario(
        "computing-layer-6",
        "compute",
        "6",
        "wait",
        signal.SIGKILL,
        None,
        note="layer 5 may still be in the background writer",
    ),
    Scenario(
        "layer-9-before-rename",
        "replace_before",
        "layer_00009.safetensors",
        "wait",
        signal.SIGKILL,
        9,
    ),
    Scenario(
        "after-last-layer",
        "save_after",
        str(DEEP_LAYERS - 1),
        "wait",
        signal.SIGKILL,
        DEEP_LAYERS,
        note="every layer stored, killed in the final norm / logits",
    ),
    Scenario(
        "sigint-computing-layer-4",
        "compute",
        "4",
        "wait",
        signal.SIGINT,
        4,
        note="Ctrl-C while a layer computes",
    ),
    Scenario(
        "sigint-writing-layer-5",
        "replace_before",
        "layer_00005.safetensors",
        "sleep",
        signal.SIGINT,
        None,
        note="Ctrl-C inside an activation write (between the temp file and the rename)",
    ),
]

# The kernel kills the child inside the write of layer 7 (RLIMIT_FSIZE, SIGXFSZ): the only
# way to stop it deterministically *inside* safetensors' own write.
KERNEL_KILL = Scenario(
    "killed-inside-write-of-layer-7",
    "save",
    "7",
    "fsize",
    signal.SIGXFSZ,
    7,
    note="killed by the kernel inside the activation write (safetensors' own temp file)",
)


@dataclass
class Outcome:
    scenario: Scenario
    act: Path
    returncode: int
    stderr: str
    state: dict[str, FileId]
    completed: int
    embeddings: bool
    temps: list[str]


def _launch(
    zygote: Zygote, scenario: Scenario, root: Path, model: Path, inputs: Path
) -> tuple[Forked, Path]:
    work = root / scenario.label
    work.mkdir()
    act = work / "acts"
    hook: dict[str, Any] = {
        "where": scenario.where,
        "target": scenario.target,
        "action": scenario.action,
        "go": str(work / "go"),
        "seconds": 1.5,
    }
    return zygote.spawn(child_spec(model, act, inputs, hooks=[hook]), work), act


def _kill(scenario: Scenario, child: Forked, act: Path) -> Outcome:
    child.wait_for("AT ")
    if scenario.action != "fsize":
        child.signal(scenario.sig)
    returncode, stderr = child.finish()
    state = dir_state(act)
    return Outcome(
        scenario,
        act,
        returncode,
        stderr,
        state,
        completed_layers(act),
        (act / "embeddings.safetensors").exists(),
        temp_files(act),
    )


@pytest.fixture(scope="module")
def outcomes(
    tmp_path_factory: pytest.TempPathFactory,
    zygote: Zygote,
    deep_llama: Path,
    deep_inputs_file: Path,
    deep_reference: dict[str, torch.Tensor],
) -> dict[str, Outcome]:
    """Launch every scenario's child at once, kill each at its point, keep what is left."""
    root = tmp_path_factory.mktemp("kills")
    launched = [
        (s, *_launch(zygote, s, root, deep_llama, deep_inputs_file))
        for s in [*SCENARIOS, KERNEL_KILL]
    ]
    results: dict[str, Outcome] = {}
    try:
        for scenario, child, act in launched:
            results[scenario.label] = _kill(scenario, child, act)
    finally:
        for _, child, _ in launched:
            child.kill()
    return results


def _check_resume(
    outcome: Outcome,
    model: Path,
    inputs: tuple[torch.Tensor, torch.Tensor],
    reference: dict[str, torch.Tensor],
) -> None:
    act = outcome.act
    hidden_shape = [*inputs[0].shape, 64]
    # No file with a final name is partial: each is a complete safetensors of the right shape.
    assert_every_activation_valid(act, hidden_shape)

    result = stream(model, act, *inputs, resume=True)

    assert_identical(result_tensors(result), reference)
    assert result.stats.layers_resumed == outcome.completed
    assert result.stats.layers_run == DEEP_LAYERS - outcome.completed
    after = dir_state(act)
    # Nothing completed before the kill was recomputed or rewritten (same inode, mtime, size).
    for name in layer_files(act):
        if name in outcome.state:
            assert after[name] == outcome.state[name], f"{name} was rewritten on resume"
    if "manifest.json" in outcome.state:
        assert after["manifest.json"] == outcome.state["manifest.json"]
    # The directory is clean and complete: no temp file, no lock held, every layer once.
    expected = {"manifest.json", "embeddings.safetensors"} | {
        f"layer_{i:05d}.safetensors" for i in range(DEEP_LAYERS)
    }
    assert set(without_lock(after)) == expected, sorted(after)
    assert lock_is_free(act)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.label for s in SCENARIOS])
def test_killed_run_resumes_identically(
    scenario: Scenario,
    outcomes: dict[str, Outcome],
    deep_llama: Path,
    deep_inputs: tuple[torch.Tensor, torch.Tensor],
    deep_reference: dict[str, torch.Tensor],
) -> None:
    FIGURES["kill points tried"] += 1
    outcome = outcomes[scenario.label]
    if scenario.sig in (signal.SIGKILL, signal.SIGTERM):
        assert outcome.returncode == -scenario.sig
        assert ".lock" in outcome.state  # a dead owner's lock: stale, taken over on resume
    else:
        # Ctrl-C: KeyboardInterrupt reaches the caller, after a clean message; lock released.
        assert outcome.returncode in (-signal.SIGINT, 130), outcome.stderr[-2000:]
        assert "KeyboardInterrupt" in outcome.stderr
        assert "nexus-sli: interrupted; completed layers are kept in" in outcome.stderr
        assert "run again with resume=True to continue" in outcome.stderr
        assert lock_is_free(outcome.act)
        # At most nexus_sli's own temp file of the interrupted write (removed on resume).
        assert all(re.fullmatch(r".+\.tmp-\d+", t) for t in outcome.temps), outcome.temps
    if scenario.completed is not None:
        assert outcome.completed == scenario.completed, sorted(outcome.state)
    assert ("manifest.json" in outcome.state) == scenario.manifest
    if scenario.embeddings is not None:
        assert outcome.embeddings == scenario.embeddings
    _check_resume(outcome, deep_llama, deep_inputs, deep_reference)
    FIGURES["kill points resumed identically"] += 1


# Regression test (bug found by this suite): safetensors' save_file writes its own '.tmpXXXXXX'
# file beside the target and renames it; a process killed inside that write left it in the
# activation directory, which ActivationStore._check_contents then refused as a file nexus_sli
# did not write: the run could not be resumed.
def test_killed_inside_activation_write_resumes(
    outcomes: dict[str, Outcome],
    deep_llama: Path,
    deep_inputs: tuple[torch.Tensor, torch.Tensor],
    deep_reference: dict[str, torch.Tensor],
) -> None:
    FIGURES["kill points tried"] += 1
    outcome = outcomes[KERNEL_KILL.label]
    assert outcome.returncode == -signal.SIGXFSZ, outcome.stderr[-2000:]
    assert outcome.completed == KERNEL_KILL.completed
    assert "layer_00007.safetensors" not in outcome.state  # never appears under its final name
    _check_resume(outcome, deep_llama, deep_inputs, deep_reference)
    FIGURES["kill points resumed identically"] += 1


def test_killed_twice_then_resumed(
    tmp_path: Path,
    zygote: Zygote,
    deep_llama: Path,
    deep_inputs_file: Path,
    deep_inputs: tuple[torch.Tensor, torch.Tensor],
    deep_reference: dict[str, torch.Tensor],
) -> None:
    """Killed after layer 2; the resumed child is killed after layer 6; resumed again here."""
    act = tmp_path / "acts"
    first = zygote.spawn(
        child_spec(
            deep_llama,
            act,
            deep_inputs_file,
            hooks=[{"where": "save_after", "target": 2, "action": "wait", "go": "never"}],
        ),
        tmp_path,
    )
    first.wait_for("AT save_after:2")
    first.signal(signal.SIGKILL)
    assert first.finish()[0] == -signal.SIGKILL
    after_first = dir_state(act)
    assert completed_layers(act) == 3

    second = zygote.spawn(
        child_spec(
            deep_llama,
            act,
            deep_inputs_file,
            resume=True,
            hooks=[{"where": "save_after", "target": 6, "action": "wait", "go": "never"}],
        ),
        tmp_path,
    )
    second.wait_for("AT save_after:6")
    second.signal(signal.SIGKILL)
    assert second.finish()[0] == -signal.SIGKILL
    after_second = dir_state(act)
    assert completed_layers(act) == 7
    for name in layer_files(act):
        if name in after_first:
            assert after_second[name] == after_first[name], f"{name} recomputed by the 2nd run"

    result = stream(deep_llama, act, *deep_inputs, resume=True)
    assert_identical(result_tensors(result), deep_reference)
    assert (result.stats.layers_resumed, result.stats.layers_run) == (7, DEEP_LAYERS - 7)
    final = dir_state(act)
    for name in layer_files(act):
        if name in after_second:
            assert final[name] == after_second[name], f"{name} recomputed by the last run"
    FIGURES["kill points tried"] += 2
    FIGURES["kill points resumed identically"] += 2


def test_partial_file_under_final_name_is_recomputed(
    tmp_path: Path,
    deep_llama: Path,
    deep_inputs: tuple[torch.Tensor, torch.Tensor],
    deep_reference: dict[str, torch.Tensor],
) -> None:
    """A file with a final name that is truncated or garbage is never taken as complete."""
    act = tmp_path / "acts"
    stream(deep_llama, act, *deep_inputs)
    layer5 = act / "layer_00005.safetensors"
    layer5.write_bytes(layer5.read_bytes()[: layer5.stat().st_size // 2])  # truncated
    (act / "layer_00007.safetensors").write_bytes(b"\x00" * 64)  # garbage
    before = dir_state(act)
    result = stream(deep_llama, act, *deep_inputs, resume=True)
    assert_identical(result_tensors(result), deep_reference)
    assert (result.stats.layers_resumed, result.stats.layers_run) == (5, DEEP_LAYERS - 5)
    after = dir_state(act)
    for i in range(5):
        name = f"layer_{i:05d}.safetensors"
        assert after[name] == before[name]


def test_reference_equals_transformers(
    deep_llama: Path,
    deep_inputs: tuple[torch.Tensor, torch.Tensor],
    deep_reference: dict[str, torch.Tensor],
) -> None:
    """The run every resumed run is compared with is itself right (transformers' forward)."""
    from transformers import AutoModelForCausalLM

    ids, mask = deep_inputs
    model = AutoModelForCausalLM.from_pretrained(deep_llama)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    keep = mask.bool()
    for i, expected in enumerate(want.hidden_states):
        got = deep_reference[f"hidden.{i}"]
        torch.testing.assert_close(got[keep], expected[keep], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        deep_reference["logits"][keep], want.logits[keep], rtol=1e-4, atol=1e-4
    )
