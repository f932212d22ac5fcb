"""Checkpoint directories: config, safetensors index, lazy per-tensor reads. Never pickle.

A checkpoint directory holds ``config.json`` and either one ``model.safetensors`` or shards
listed by ``model.safetensors.index.json``. Only safetensors headers are read up front; a
tensor's bytes are read when the engine asks for it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .errors import CheckpointError, InputError, RemoteCodeError

__all__ = ["CHECKPOINT_INDEX", "SafetensorsCheckpoint", "load_config", "read_config_dict"]

CHECKPOINT_INDEX = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def read_config_dict(model_dir: Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint as a dict, with errors that name the file."""
    if not model_dir.exists():
        raise CheckpointError(f"checkpoint directory {str(model_dir)!r} does not exist")
    if not model_dir.is_dir():
        raise CheckpointError(f"checkpoint path {str(model_dir)!r} is not a directory")
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{str(model_dir)!r} is not a checkpoint directory: it has no config.json "
            f"(expected config.json + *.safetensors, as written by save_pretrained)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    if not isinstance(data.get("model_type"), str) or not data["model_type"]:
        raise CheckpointError(
            f"{str(path)!r} has no 'model_type' field; nexus_sli detects the architecture from it"
        )
    return data


def load_config(model_dir: Path, *, trust_remote_code: bool = False) -> Any:
    """The transformers config of a checkpoint directory, built offline, remote code refused."""
    data = read_config_dict(model_dir)
    if data.get("auto_map") and not trust_remote_code:
        py_files = sorted(p.name for p in model_dir.glob("*.py"))
        raise RemoteCodeError(
            f"{str(model_dir / 'config.json')!r} asks for remote code (auto_map: "
            f"{data['auto_map']!r}; code files: {py_files or 'none'}). nexus_sli never imports "
            f"code shipped with a checkpoint unless you opt in with trust_remote_code=True"
        )
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(**data)
    except Exception as exc:
        raise CheckpointError(
            f"{str(model_dir / 'config.json')!r} could not be read as a transformers "
            f"{data['model_type']!r} config: {type(exc).__name__}: {exc}"
        ) from exc


class SafetensorsCheckpoint:
    """A :class:`~nexus_sli._engine.TensorSource` over a directory's safetensors files."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._spans: dict[str, tuple[int, int]] = {}
        self.bytes_read = 0
        self._scan()

    # ------------------------------------------------------------------ layout
    def _files(self) -> list[Path]:
        index_path = self.model_dir / CHECKPOINT_INDEX
        if index_path.is_file():
            try:
                index = json.loads(index_path.read_text(encoding="utf-8"))
                weight_map = index["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"index {str(index_path)!r} is damaged: {exc}") from exc
            files = sorted({str(v) for v in weight_map.values()})
            for name in files:
                if Path(name).name != name or not name.endswith(".safetensors"):
                    raise CheckpointError(
                        f"index {str(index_path)!r} names {name!r}, which is not a safetensors "
                        f"file beside it"
                    )
                if not (self.model_dir / name).is_file():  # regular files only (no FIFO)
                    raise CheckpointError(
                        f"index {str(index_path)!r} names shard {name!r}, which is missing from "
                        f"{str(self.model_dir)!r}"
                    )
            self._index = {str(k): str(v) for k, v in weight_map.items()}
            return [self.model_dir / name for name in files]
        self._index = {}
        files_found = sorted(self.model_dir.glob("*.safetensors"))
        for found in files_found:
            if not found.is_file():
                raise CheckpointError(
                    f"{str(found)!r} is not a regular file (a directory, FIFO or device); "
                    f"checkpoint weights must be plain safetensors files"
                )
        if not files_found:
            pickles = sorted(
                p.name for p in self.model_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES
            )
            hint = (
                f" It has pickle weights ({', '.join(pickles)}), which nexus_sli never loads: "
                f"convert them to safetensors first."
                if pickles
                else ""
            )
            raise CheckpointError(f"no *.safetensors files in {str(self.model_dir)!r}.{hint}")
        return files_found

    def _scan(self) -> None:
        for path in self._files():
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for name in handle.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                        if name in self._where:
                            raise CheckpointError(
                                f"tensor {name!r} appears in two files: "
                                f"{self._where[name].name!r} and {path.name!r}"
                            )
                        view = handle.get_slice(name)
                        self._where[name] = path
                        self._shapes[name] = tuple(int(d) for d in view.get_shape())
                        self._dtypes[name] = _dtype(view.get_dtype(), name, path)
            except CheckpointError:
                raise
            except Exception as exc:
                raise CheckpointError(
                    f"safetensors file {str(path)!r} is damaged or truncated: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            self._check_size(path)
        for name, file in self._index.items():
            if name not in self._where:
                raise CheckpointError(
                    f"index names tensor {name!r} in {file!r}, but that file does not contain it"
                )
            if self._where[name].name != file:
                raise CheckpointError(
                    f"index puts tensor {name!r} in {file!r}, but it is in "
                    f"{self._where[name].name!r}"
                )

    def _check_size(self, path: Path) -> None:
        # safe_open maps the file lazily; a truncated file is found here, before any read.
        # The byte span of every tensor is kept so reads go straight into their tensor.
        with path.open("rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        end = 0
        for key, info in header.items():
            if key == "__metadata__":
                continue
            begin, stop = (int(x) for x in info["data_offsets"])
            self._spans[key] = (8 + header_len + begin, 8 + header_len + stop)
            end = max(end, stop)
        size = os.path.getsize(path)
        if 8 + header_len + end > size:
            raise CheckpointError(
                f"safetensors file {str(path)!r} is truncated: its header describes "
                f"{8 + header_len + end} bytes, the file has {size}"
            )

    # ------------------------------------------------------------------ TensorSource
    def names(self) -> Collection[str]:
        return self._where.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def where(self, name: str) -> str:
        return str(self._where[name])

    def get(self, name: str) -> torch.Tensor:
        return self.get_many([name])[name]

    def get_many(self, names: Collection[str]) -> dict[str, torch.Tensor]:
        """Map tensors from their files and bring their pages in, without copying them.

        Each tensor gets its own private mapping of its byte span (copy-on-write: a module
        that writes into its weights changes only its own copy), populated here with
        ``MADV_POPULATE_READ`` so that the caller (the background reader) does the disk reads,
        not the layer's compute. The page cache is shared rather than copied, and freeing the
        tensor unmaps it, so the process holds what is alive and nothing more. Do not rewrite
        a checkpoint while it is streamed: a file truncated under a live mapping ends the
        process with SIGBUS.
        """
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._where[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, group in by_file.items():
            group.sort(key=lambda n: self._spans[n][0])
            try:
                with path.open("rb", buffering=0) as fh:
                    size = os.fstat(fh.fileno()).st_size
                    for name in group:
                        out[name] = self._map(fh.fileno(), size, name, path)
            except CheckpointError:
                raise
            except OSError as exc:
                raise CheckpointError(
                    f"reading tensors from {str(path)!r} failed: {exc.strerror or exc}"
                ) from exc
        return out

    def will_need(self, names: Collection[str]) -> None:
        """Ask the kernel to start reading these tensors into the page cache (no memory of
        this process is used; the later :meth:`get_many` then finds them there)."""
        if not hasattr(os, "posix_fadvise"):
            return
        by_file: dict[Path, list[tuple[int, int]]] = {}
        for name in names:
            by_file.setdefault(self._where[name], []).append(self._spans[name])
        for path, spans in by_file.items():
            begin, end = min(b for b, _ in spans), max(e for _, e in spans)
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue  # a hint only: get_many reports the real problem
            try:
                os.posix_fadvise(fd, begin, end - begin, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)

    def get_rows(self, name: str, rows: Sequence[int]) -> torch.Tensor:
        """Rows ``rows`` (sorted, distinct) of a tensor along its first dimension, read alone.

        Consecutive rows are read with one ``readinto``; nothing else of the tensor is read,
        so embedding a batch reads the rows of its tokens, not the whole table.
        """
        path = self._where[name]
        begin, end = self._spans[name]
        dtype = self._dtypes[name]
        shape = self._shapes[name]
        if not shape:
            raise CheckpointError(f"tensor {name!r} in {str(path)!r} is a scalar; it has no rows")
        row_bytes = dtype.itemsize * int(torch.Size(shape[1:]).numel())
        if end - begin != row_bytes * shape[0]:
            raise CheckpointError(
                f"tensor {name!r} in {str(path)!r} spans {end - begin} bytes, but "
                f"{list(shape)} of {dtype} needs {row_bytes * shape[0]}"
            )
        out = torch.empty((len(rows), *shape[1:]), dtype=dtype)
        if not rows or row_bytes == 0:
            return out
        if rows[0] < 0 or rows[-1] >= shape[0]:
            raise InputError(
                f"index {rows[0] if rows[0] < 0 else rows[-1]} is out of range for tensor "
                f"{name!r} with {shape[0]} rows"
            )
        view = out.view(torch.uint8).numpy().data.cast("B")
        try:
            with path.open("rb", buffering=0) as fh:
                i = 0
                while i < len(rows):
                    j = i + 1
                    while j < len(rows) and rows[j] == rows[j - 1] + 1:
                        j += 1
                    fh.seek(begin + rows[i] * row_bytes)
                    self._fill(fh, view[i * row_bytes : j * row_bytes], name, path)
                    i = j
        except OSError as exc:
            raise CheckpointError(
                f"reading tensor {name!r} from {str(path)!r} failed: {exc.strerror or exc}"
            ) from exc
        self.bytes_read += len(rows) * row_bytes
        return out

    @staticmethod
    def _fill(fh: Any, view: memoryview, name: str, path: Path) -> None:
        done, size = 0, len(view)
        while done < size:
            n = fh.readinto(view[done:])
            if not n:
                raise CheckpointError(
                    f"tensor {name!r} in {str(path)!r} ends early: read {done} of {size} bytes "
                    f"(the file is truncated or changed while streaming)"
                )
            done += n

    def _map(self, fd: int, file_size: int, name: str, path: Path) -> torch.Tensor:
        begin, end = self._spans[name]
        dtype = self._dtypes[name]
        shape = self._shapes[name]
        size = end - begin
        expected = dtype.itemsize * int(torch.Size(shape).numel())
        if size != expected:
            raise CheckpointError(
                f"tensor {name!r} in {str(path)!r} spans {size} bytes, but {list(shape)} of "
                f"{dtype} needs {expected}"
            )
        if end > file_size:
            raise CheckpointError(
                f"tensor {name!r} in {str(path)!r} ends early: the file has {file_size} bytes, "
                f"the tensor ends at {end} (the file is truncated or changed while streaming)"
            )
        if size == 0:
            return torch.empty(shape, dtype=dtype)
        start = begin - begin % mmap.ALLOCATIONGRANULARITY
        region = mmap.mmap(
            fd,
            end - start,
            flags=mmap.MAP_PRIVATE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=start,
        )
        _populate(region, begin - start, size)
        self.bytes_read += size
        tensor = torch.frombuffer(
            region, dtype=dtype, count=expected // dtype.itemsize, offset=begin - start
        )
        return tensor.reshape(shape)

    def files(self) -> Iterator[Path]:
        yield from sorted(set(self._where.values()))

    def fingerprint(self) -> str:
        """Identifies the checkpoint: config, file names, sizes and tensor headers."""
        digest = hashlib.sha256()
        digest.update((self.model_dir / "config.json").read_bytes())
        for path in self.files():
            digest.update(path.name.encode())
            digest.update(str(path.stat().st_size).encode())
        for name in sorted(self._where):
            digest.update(f"{name}:{self._shapes[name]}:{self._dtypes[name]}".encode())
        return digest.hexdigest()

    def dominant_dtype(self) -> torch.dtype:
        """The checkpoint's own floating dtype (the most common among its float tensors)."""
        counts: dict[torch.dtype, int] = {}
        for dtype in self._dtypes.values():
            if dtype.is_floating_point:
                counts[dtype] = counts.get(dtype, 0) + 1
        return max(counts, key=lambda d: counts[d]) if counts else torch.float32


#: ``madvise(MADV_POPULATE_READ)`` (Linux 5.14): read-fault a range in without breaking
#: copy-on-write; IO errors come back as OSError instead of SIGBUS later.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


def _populate(region: mmap.mmap, offset: int, size: int) -> None:
    """Bring a mapped range into memory now (on the calling, background, thread)."""
    page = mmap.PAGESIZE
    first = offset - offset % page
    try:
        region.madvise(_MADV_POPULATE_READ, first, offset + size - first)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        for at in range(first, offset + size, page):  # older kernels: touch each page
            region[at]


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _dtype(code: str, name: str, path: Path) -> torch.dtype:
    try:
        return _DTYPES[code]
    except KeyError:
        raise CheckpointError(
            f"tensor {name!r} in {str(path)!r} has dtype {code!r}, which nexus_sli cannot load"
        ) from None
