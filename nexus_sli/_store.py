"""The activation store: one safetensors file per layer, written atomically, resumable.

Layout of an activation directory::

    manifest.json              what the activations are for (checkpoint + inputs fingerprints)
    .lock                      held by the process streaming into the directory
    embeddings.safetensors     hidden states after the embeddings
    layer_00000.safetensors    hidden states after layer 0, ...

Every file is written to ``<name>.tmp-<pid>`` then renamed (and fsynced), so a file with the
final name is always complete. Nothing else may live in the directory: a stray file (a planted
pickle, say) makes the store refuse the directory rather than guess.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ActivationStoreError, ResumeMismatchError

__all__ = ["ActivationStore"]

FORMAT = "nexus_sli.activations/1"
_OWN = re.compile(r"(manifest\.json|\.lock|embeddings\.safetensors|layer_\d{5}\.safetensors)")
_TMP = re.compile(r".+\.tmp-\d+")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class ActivationStore:
    """Per-layer activations of one run, in one directory, held under a lock file."""

    def __init__(
        self, directory: Path, manifest: dict[str, Any], *, resume: bool, durable: bool = True
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        #: fsync every file and the directory (off for throw-away temporary directories).
        self.durable = durable
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ActivationStoreError(
                exc.errno or errno.EIO,
                f"cannot create activation directory {str(directory)!r}: {exc.strerror or exc}",
            ) from exc
        self._check_contents()
        self._locked = False
        self._lock()
        try:
            self._open(resume)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ setup
    def _check_contents(self) -> None:
        for entry in self.directory.iterdir():
            if _OWN.fullmatch(entry.name) or _TMP.fullmatch(entry.name):
                continue
            raise ActivationStoreError(
                errno.EEXIST,
                f"activation directory {str(self.directory)!r} contains {entry.name!r}, which "
                f"nexus_sli did not write; refusing to use it. Pass an empty directory or one "
                f"made by nexus_sli",
            )

    def _lock(self) -> None:
        path = self.directory / ".lock"
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = int(path.read_text().strip() or "0")
                except (OSError, ValueError):
                    owner = 0
                if owner and owner != os.getpid() and _pid_alive(owner):
                    raise ActivationStoreError(
                        errno.EBUSY,
                        f"activation directory {str(self.directory)!r} is in use by process "
                        f"{owner} (lock file {str(path)!r}); wait for it or use another directory",
                    ) from None
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()  # stale lock of a dead process
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            self._locked = True
            return
        raise ActivationStoreError(errno.EBUSY, f"could not take the lock {str(path)!r}")

    def _open(self, resume: bool) -> None:
        for tmp in self.directory.iterdir():
            if _TMP.fullmatch(tmp.name):
                tmp.unlink()  # an interrupted write: never taken for a complete file
        path = self.directory / "manifest.json"
        existing: dict[str, Any] | None = None
        if path.exists():
            try:
                existing = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ActivationStoreError(
                    errno.EIO, f"manifest {str(path)!r} is damaged: {exc}"
                ) from exc
        if resume and existing is not None:
            for key in ("format", "checkpoint", "inputs", "run"):
                if existing.get(key) != self.manifest.get(key):
                    what = {
                        "format": "another store format",
                        "checkpoint": "another checkpoint",
                        "inputs": "other inputs",
                        "run": "other run settings (dtype or custom layer overrides)",
                    }[key]
                    raise ResumeMismatchError(
                        f"cannot resume in {str(self.directory)!r}: it holds activations made for "
                        f"{what} (manifest {key} differs). Use another activation_dir, or "
                        f"resume=False to start over there"
                    )
            return
        for entry in self.directory.iterdir():
            if entry.name.endswith(".safetensors"):
                entry.unlink()
        self._write_bytes(path, json.dumps(self.manifest, indent=2, sort_keys=True).encode())

    def close(self) -> None:
        """Release the lock."""
        if self._locked:
            with contextlib.suppress(FileNotFoundError):
                (self.directory / ".lock").unlink()
            self._locked = False

    # ------------------------------------------------------------------ files
    def _write_bytes(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            with tmp.open("wb") as fh:
                fh.write(data)
                fh.flush()
                if self.durable:
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
            if self.durable:
                _fsync_dir(self.directory)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise self._write_error(path, exc) from exc

    def _write_error(self, path: Path, exc: OSError) -> ActivationStoreError:
        code = exc.errno or errno.EIO
        why = "the disk is full" if code == errno.ENOSPC else (exc.strerror or str(exc))
        return ActivationStoreError(
            code,
            f"writing activations to {str(path)!r} failed: {why}. No partial file was kept; "
            f"free space and run again with resume=True to continue from the last complete layer",
        )

    def _name(self, layer: int) -> Path:
        return self.directory / (
            "embeddings.safetensors" if layer < 0 else f"layer_{layer:05d}.safetensors"
        )

    def save(self, layer: int, hidden: torch.Tensor) -> None:
        """Store the hidden states after ``layer`` (-1: after the embeddings), atomically."""
        path = self._name(layer)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        metadata = {"inputs": str(self.manifest["inputs"]), "layer": str(layer)}
        try:
            save_file({"hidden_states": hidden.contiguous()}, str(tmp), metadata=metadata)
            if self.durable:
                with tmp.open("rb+") as fh:
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
            if self.durable:
                _fsync_dir(self.directory)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise self._write_error(path, exc) from exc
        except Exception as exc:  # safetensors reports I/O errors as its own exception types
            with contextlib.suppress(OSError):
                tmp.unlink()
            cause = exc if isinstance(exc, OSError) else OSError(errno.EIO, str(exc))
            raise self._write_error(path, cause) from exc

    def load(self, layer: int) -> torch.Tensor:
        """The stored hidden states after ``layer``."""
        path = self._name(layer)
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                if meta.get("inputs") != str(self.manifest["inputs"]) or meta.get("layer") != str(
                    layer
                ):
                    raise ResumeMismatchError(
                        f"{str(path)!r} was written for other inputs or another layer"
                    )
                tensor: torch.Tensor = handle.get_tensor("hidden_states")
                return tensor
        except ResumeMismatchError:
            raise
        except Exception as exc:
            raise ActivationStoreError(
                errno.EIO, f"stored activations {str(path)!r} cannot be read: {exc}"
            ) from exc

    def is_complete(self, layer: int, shape: tuple[int, ...]) -> bool:
        """Whether a valid file for ``layer`` with hidden states of ``shape`` exists."""
        path = self._name(layer)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                ok = meta.get("inputs") == str(self.manifest["inputs"]) and meta.get(
                    "layer"
                ) == str(layer)
                return ok and tuple(handle.get_slice("hidden_states").get_shape()) == shape
        except Exception:
            return False

    def last_complete(self, num_layers: int, shape: tuple[int, ...]) -> int:
        """Index of the last layer whose output (and every earlier one) is stored; -1 if none.

        -2 when not even the embeddings are stored.
        """
        if not self.is_complete(-1, shape):
            return -2
        last = -1
        for layer in range(num_layers):
            if not self.is_complete(layer, shape):
                break
            last = layer
        return last
