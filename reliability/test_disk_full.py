"""Disk full: an activation write that fails with ENOSPC.

The run must stop with :class:`nexus_sli.ActivationStoreError` (an ``OSError`` whose errno is
ENOSPC) naming the file, leave no temporary or partial file and no lock behind, and resume
once space is back, bit-identical to an uninterrupted run and without recomputing the layers
stored before the failure.

ENOSPC is injected in this process at the write of a layer, of the embeddings and of the
manifest (half the bytes written, then the error a full disk gives to the writer the store
uses), and at the fsync of a layer and of the manifest; and it is produced for real in a child
process whose activation directory is a tiny tmpfs mounted in a private mount namespace
(``unshare -m``; skipped where that is not permitted).
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError

import nexus_sli._store as store_module
from nexus_sli import ActivationStoreError

from ._helpers import (
    DEEP_LAYERS,
    FIGURES,
    Child,
    assert_every_activation_valid,
    assert_identical,
    child_spec,
    completed_layers,
    dir_state,
    layer_files,
    load_outputs,
    lock_is_free,
    result_tensors,
    stream,
    temp_files,
)

# What safetensors (0.8, Rust) raises when the disk fills up inside save_file, as observed on a
# full tmpfs: a SafetensorError, not an OSError.
SAFETENSORS_ENOSPC = "Error while serializing: I/O error: No space left on device (os error 28)"

Inputs = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Failure:
    """Where the injected ENOSPC hits and what is stored complete before it."""

    label: str
    target: str
    completed: int
    manifest: bool = True
    embeddings: bool = True


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FullDisk:
    """A file whose first write stores half of its bytes, then fails with ENOSPC."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.inner.write(view[: max(len(view) // 2, 1)])
        self.inner.flush()
        raise _enospc()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.close()


def _inject_write(monkeypatch: pytest.MonkeyPatch, target: str) -> list[str]:
    """The write of the file named ``target*`` stores half its bytes, then the disk is full.

    Injected where the store writes, whichever way it does: Python file objects (``open``) get
    the ``OSError`` a full disk gives; safetensors' ``save_file`` (Rust) the
    ``SafetensorError`` it really raises on a full disk.
    """
    hits: list[str] = []
    real_open = io.open

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        named = isinstance(file, str | os.PathLike) and Path(file).name.startswith(target)
        if named and "w" in mode and not hits:
            hits.append(os.fspath(file))
            return _FullDisk(handle)
        return handle

    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(builtins, "open", open_)
    real_save = getattr(store_module, "save_file", None)
    if real_save is not None:
        save = real_save

        def save_file(tensors: dict[str, torch.Tensor], filename: str, **kwargs: Any) -> None:
            if Path(filename).name.startswith(target) and not hits:
                hits.append(filename)
                save(tensors, filename, **kwargs)
                data = Path(filename).read_bytes()
                Path(filename).write_bytes(data[: len(data) // 2])  # a partial write
                raise SafetensorError(SAFETENSORS_ENOSPC)
            save(tensors, filename, **kwargs)

        monkeypatch.setattr(store_module, "save_file", save_file)
    return hits


def _inject_fsync(monkeypatch: pytest.MonkeyPatch, target: str) -> list[str]:
    """fsync of the file being written (a delayed-allocation filesystem reports ENOSPC here)."""
    real = os.fsync
    hits: list[str] = []

    def fsync(fd: Any) -> None:
        path = os.readlink(f"/proc/self/fd/{int(fd)}") if isinstance(fd, int) else ""
        if Path(path).name.startswith(target) and not hits:
            hits.append(path)
            raise _enospc()
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return hits


def _check_failure(
    exc: ActivationStoreError, failure: Failure, act: Path, hidden_shape: list[int]
) -> None:
    """Clear error, nothing partial, nothing locked, exactly the earlier layers stored."""
    assert isinstance(exc, OSError)
    assert failure.target in str(exc), str(exc)
    assert temp_files(act) == [], temp_files(act)
    assert lock_is_free(act)
    assert (act / "manifest.json").exists() == failure.manifest
    assert (act / "embeddings.safetensors").exists() == failure.embeddings
    assert completed_layers(act) == failure.completed
    assert len(layer_files(act)) == failure.completed + failure.embeddings  # nothing after
    assert_every_activation_valid(act, hidden_shape)


def _check_resume(
    failure: Failure, act: Path, model: Path, inputs: Inputs, reference: dict[str, torch.Tensor]
) -> None:
    before = dir_state(act)
    result = stream(model, act, *inputs, resume=True)
    assert_identical(result_tensors(result), reference)
    assert result.stats.layers_resumed == failure.completed
    assert result.stats.layers_run == DEEP_LAYERS - failure.completed
    after = dir_state(act)
    for name in layer_files(act):
        if name in before:
            assert after[name] == before[name], f"{name} was rewritten on resume"
    assert temp_files(act) == [] and lock_is_free(act)
    FIGURES["disk-full failures resumed identically"] += 1


INJECTED = [
    Failure("write-layer-4", "layer_00004.safetensors", 4),
    Failure("write-embeddings", "embeddings.safetensors", 0, embeddings=False),
    Failure("write-manifest", "manifest.json", 0, manifest=False, embeddings=False),
    Failure("fsync-layer-6", "layer_00006.safetensors", 6),
    Failure("fsync-manifest", "manifest.json", 0, manifest=False, embeddings=False),
]


@pytest.mark.parametrize("failure", INJECTED, ids=lambda f: f.label)
def test_enospc_stops_cleanly_and_resumes(
    failure: Failure,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    deep_llama: Path,
    deep_inputs: Inputs,
    deep_reference: dict[str, torch.Tensor],
) -> None:
    act = tmp_path / "acts"
    if failure.label.startswith("write"):
        hits = _inject_write(monkeypatch, failure.target)
    else:
        hits = _inject_fsync(monkeypatch, failure.target)
    with pytest.raises(ActivationStoreError) as info:
        stream(deep_llama, act, *deep_inputs)
    assert hits, "the injected failure never fired"
    monkeypatch.undo()  # space is back
    exc = info.value
    assert exc.errno == errno.ENOSPC
    assert "the disk is full" in str(exc) and "resume=True" in str(exc)
    _check_failure(exc, failure, act, [*deep_inputs[0].shape, 64])
    _check_resume(failure, act, deep_llama, deep_inputs, deep_reference)


# ---------------------------------------------------------------------- a real full disk
def _can_unshare_mount(tmp: Path) -> bool:
    unshare = shutil.which("unshare")
    mount = shutil.which("mount")
    if unshare is None or mount is None:
        return False
    probe = tmp / "probe"
    probe.mkdir()
    script = 'mount -t tmpfs -o size=64k tmpfs "$0"'
    try:
        done = subprocess.run(
            [unshare, "-m", "sh", "-c", script, str(probe)], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@dataclass
class RealDiskFull:
    phase1: dict[str, Any]
    code: int
    lines: list[str]
    stderr: str
    out: Path


@pytest.fixture(scope="module")
def real_disk_full(
    tmp_path_factory: pytest.TempPathFactory, deep_llama: Path, deep_inputs_file: Path
) -> RealDiskFull:
    """A child fills a 96 KiB tmpfs (room for the manifest, embeddings and a few layers), then
    grows it to 16 MiB and resumes. Everything happens in a private mount namespace."""
    work = tmp_path_factory.mktemp("enospc")
    if not _can_unshare_mount(work):
        pytest.skip("needs unshare -m and mount (root or user namespaces) for a real tmpfs")
    mnt = work / "mnt"
    mnt.mkdir()
    out = work / "out.safetensors"
    spec = child_spec(deep_llama, mnt / "acts", deep_inputs_file, out=out)
    spec["grow"] = ["mount", "-o", "remount,size=16m", str(mnt)]
    mount = 'mount -t tmpfs -o size=96k tmpfs "$0" && exec "$@"'
    unshare = shutil.which("unshare")
    assert unshare is not None
    child = Child(
        spec, work, wrapper=[unshare, "-m", "sh", "-c", mount, str(mnt)], mode=["disk-full"]
    )
    code, lines, stderr = child.finish()
    listing = [line for line in lines if line.startswith("LISTING ")]
    assert listing, (lines, stderr[-3000:])
    return RealDiskFull(json.loads(listing[0][len("LISTING ") :]), code, lines, stderr, out)


def test_real_disk_full_stops_cleanly_and_resumes(
    real_disk_full: RealDiskFull, deep_reference: dict[str, torch.Tensor]
) -> None:
    run = real_disk_full
    errors = [line for line in run.lines if line.startswith("ERROR ")]
    assert errors and errors[0].startswith("ERROR ActivationStoreError "), run.lines
    assert "No space left on device" in errors[0] or "the disk is full" in errors[0]
    files: dict[str, int] = run.phase1["files"]
    valid: dict[str, bool] = run.phase1["valid"]
    assert run.phase1["code"] == 2
    # Nothing partial, no temp file, no lock; a prefix of the layers is stored.
    assert all(valid.values()), valid
    assert not [n for n in files if ".tmp" in n], files
    assert ".lock" not in files or run.code == 0  # released (the resume could take it)
    stored = sum(1 for n in files if n.startswith("layer_"))
    assert 0 < stored < DEEP_LAYERS, files
    assert {f"layer_{i:05d}.safetensors" for i in range(stored)} <= set(files)
    # Space back: the resumed run continues after the last stored layer, bit-identical.
    assert run.code == 0, run.stderr[-3000:]
    done = json.loads(next(line for line in run.lines if line.startswith("DONE "))[5:])
    assert done == {"layers_resumed": stored, "layers_run": DEEP_LAYERS - stored}
    assert_identical(load_outputs(run.out), deep_reference)
    FIGURES["disk-full failures resumed identically"] += 1


# Regression test (bug found by this suite): a real full disk inside safetensors' save_file gave
# an ActivationStoreError with errno EIO (the SafetensorError was mapped to EIO), not ENOSPC.
def test_real_disk_full_has_errno_enospc(real_disk_full: RealDiskFull) -> None:
    error = next(line for line in real_disk_full.lines if line.startswith("ERROR "))
    assert error.split()[2] == str(errno.ENOSPC), error
