"""The activation store: one safetensors file per layer, written atomically, resumable.

Layout of an activation directory::

    manifest.json              what the activations are for (checkpoint + inputs fingerprints)
    .lock                      flock-ed by the process streaming into the directory
    embeddings.safetensors     hidden states after the embeddings
    layer_00000.safetensors    hidden states after layer 0, ...

Every file is written to ``<name>.tmp-<pid>`` then renamed (and fsynced), so a file with the
final name is always complete. Nothing else may live in the directory: a stray file (a planted
pickle, say) makes the store refuse the directory rather than guess.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .errors import ActivationStoreError, ResumeMismatchError

__all__ = ["ActivationStore"]

_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
}

FORMAT = "nexus_sli.activations/1"
_OWN = re.compile(r"(manifest\.json|\.lock|embeddings\.safetensors|layer_\d{5}\.safetensors)")
_TMP = re.compile(r".+\.tmp-\d+")


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
        except (OSError, ValueError) as exc:
            code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EINVAL
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ActivationStoreError(
                code, f"cannot create activation directory {str(directory)!r}: {why}"
            ) from exc
        if not directory.is_dir():
            raise ActivationStoreError(
                errno.ENOTDIR, f"activation directory {str(directory)!r} is not a directory"
            )
        self._check_contents()
        self._lock_fd: int | None = None
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
        """Hold an exclusive ``flock`` on ``.lock`` for the whole run.

        The kernel drops the lock when the process dies, so a killed run never leaves a stale
        lock, and two runs (two processes, or two threads of one) can never both hold it.
        """
        path = self.directory / ".lock"
        try:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as exc:
            raise ActivationStoreError(
                exc.errno or errno.EIO, f"cannot open the lock file {str(path)!r}: {exc.strerror}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise ActivationStoreError(
                errno.EBUSY,
                f"activation directory {str(self.directory)!r} is in use by another run "
                f"(process {owner}, lock file {str(path)!r}); wait for it or use another "
                f"directory",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def _open(self, resume: bool) -> None:
        for tmp in self.directory.iterdir():
            if _TMP.fullmatch(tmp.name):
                tmp.unlink()  # an interrupted write: never taken for a complete file
        path = self.directory / "manifest.json"
        existing: dict[str, Any] | None = None
        if path.exists():
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError, RecursionError) as exc:
                raise ActivationStoreError(
                    errno.EIO, f"manifest {str(path)!r} is damaged: {exc}"
                ) from exc
            if not isinstance(loaded, dict):
                raise ActivationStoreError(
                    errno.EIO,
                    f"manifest {str(path)!r} is damaged: it holds {type(loaded).__name__}, not "
                    f"an object; nexus_sli did not write it. Remove the directory or use another",
                )
            existing = loaded
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
        """Release the lock (the lock file stays; only the lock on it matters)."""
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            self._lock_fd = None
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

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
        """Store the hidden states after ``layer`` (-1: after the embeddings), atomically.

        The safetensors file is written here, header then the tensor's bytes straight from its
        memory (no serialised copy), to ``<name>.tmp-<pid>``, then renamed; a full disk is an
        :class:`ActivationStoreError` with errno ``ENOSPC`` and leaves no file behind.
        """
        path = self._name(layer)
        tensor = hidden.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        header: dict[str, Any] = {
            "__metadata__": {"inputs": str(self.manifest["inputs"]), "layer": str(layer)},
            "hidden_states": {
                "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [0, nbytes],
            },
        }
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        flat = tensor.reshape(-1)
        if flat.stride(0) != 1:  # size-1 dims can leave a "contiguous" tensor odd strides
            flat = torch.empty(flat.numel(), dtype=flat.dtype).copy_(flat)
        raw = flat.view(torch.uint8).numpy() if nbytes else None
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            with tmp.open("wb") as fh:
                fh.write(len(encoded).to_bytes(8, "little"))
                fh.write(encoded)
                if raw is not None:
                    fh.write(memoryview(raw))  # type: ignore[arg-type]
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
