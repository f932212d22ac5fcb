"""Process and machine measurements: peak RSS, I/O counters, page-cache eviction, bounds."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = [
    "disk_read_bandwidth",
    "evict",
    "io_counters",
    "load_average",
    "matmul_peak_gflops",
    "proc_status_kb",
    "reset_peak_rss",
]


def proc_status_kb(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``, ...); 0 if absent."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (``/proc/self/clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def io_counters() -> dict[str, int]:
    """``/proc/self/io``: ``rchar`` (bytes through read syscalls), ``read_bytes`` (from disk)."""
    out: dict[str, int] = {}
    with open("/proc/self/io", encoding="ascii") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            out[key.strip()] = int(value)
    return out


def _files(paths: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(p for p in sorted(path.rglob("*")) if p.is_file())
        elif path.is_file():
            found.append(path)
    return found


def evict(paths: Iterable[Path]) -> int:
    """Drop the page cache of every file under ``paths`` (POSIX_FADV_DONTNEED); bytes covered."""
    total = 0
    for path in _files(paths):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def disk_read_bandwidth(path: Path, size: int) -> float:
    """Cold sequential read bandwidth (bytes/s) of a ``size``-byte file kept at ``path``.

    The file is written once (random bytes, fsynced); each call evicts it from the page cache
    and reads it back in 16 MiB chunks.
    """
    if not path.is_file() or path.stat().st_size != size:
        path.parent.mkdir(parents=True, exist_ok=True)
        chunk = os.urandom(16 << 20)
        with path.open("wb") as fh:
            left = size
            while left > 0:
                fh.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
            fh.flush()
            os.fsync(fh.fileno())
    evict([path])
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        total = 0
        while True:
            n = os.readv(fd, [view])
            if n <= 0:
                break
            total += n
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    evict([path])
    return total / dt if dt > 0 else 0.0


def matmul_peak_gflops(threads: int, size: tuple[int, int, int] = (2048, 2048, 5632)) -> float:
    """Best-of plain ``torch.matmul`` throughput (GFLOP/s, float32) with ``threads`` threads."""
    torch.set_num_threads(threads)
    m, k, n = size
    a = torch.randn(m, k)
    b = torch.randn(k, n)
    out = torch.empty(m, n)
    torch.matmul(a, b, out=out)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(3):
            torch.matmul(a, b, out=out)
        dt = time.perf_counter() - t0
        best = max(best, 3 * 2.0 * m * k * n / dt / 1e9)
    return best


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages."""
    return os.getloadavg()
