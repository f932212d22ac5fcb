"""Shared helpers: checkpoints, inputs, directory snapshots, exact comparison, child processes."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nexus_sli import SLIResult, UniversalSLIProcessor

CHILD = Path(__file__).with_name("_child.py")

#: Figures reported at the end of the run (kill points, damaged inputs, fuzz examples, ...).
FIGURES: Counter[str] = Counter()

#: Layers of the deep checkpoint used by the kill / disk-full / lock tests.
DEEP_LAYERS = 10
#: The micro-batch size of every streamed run that is compared exactly (4 rows: 2 micro-batches).
BATCH_SIZE = 3


# ---------------------------------------------------------------------- checkpoints
def save_llama(
    path: Path,
    *,
    layers: int = 2,
    hidden: int = 32,
    vocab: int = 64,
    shard: str | None = None,
    head: bool = True,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """A random Llama saved with ``save_pretrained`` (safetensors, sharded if ``shard``)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    torch.manual_seed(seed)
    values: dict[str, Any] = {
        "hidden_size": hidden,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    values.update(overrides)
    config = LlamaConfig(**values)
    model = (LlamaForCausalLM if head else LlamaModel)(config)
    kwargs: dict[str, Any] = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    return path


def save_gpt2(path: Path, *, layers: int = 2, positions: int = 16, seed: int = 0) -> Path:
    """A random GPT-2 (learned absolute positions: ``positions`` of them)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=32,
        n_head=4,
        n_layer=layers,
        n_positions=positions,
        vocab_size=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def padded_batch(vocab: int, *, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A [4, 9] batch of ids: two rows left-padded, one right-padded, one full."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[1, :6] = 0
    mask[2, 5:] = 0  # right padding
    return ids.masked_fill(mask == 0, 0), mask


def write_inputs(path: Path, ids: torch.Tensor, mask: torch.Tensor) -> Path:
    """Inputs for a child process, as safetensors (never pickle)."""
    save_file({"input_ids": ids.contiguous(), "attention_mask": mask.contiguous()}, str(path))
    return path


def weight_map(model_dir: Path) -> dict[str, str]:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    result: dict[str, str] = index["weight_map"]
    return result


# ---------------------------------------------------------------------- runs and results
def stream(
    model_dir: Path,
    act: Path | None,
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    resume: bool = False,
) -> SLIResult:
    """One streamed run with the settings every exact comparison uses."""
    proc = UniversalSLIProcessor(model_dir, activation_dir=act, progress=False)
    return proc.run(
        ids,
        mask,
        batch_size=BATCH_SIZE,
        output_hidden_states=True,
        output_logits=True,
        resume=resume,
    )


def result_tensors(result: SLIResult) -> dict[str, torch.Tensor]:
    out = {"last_hidden_state": result.last_hidden_state}
    if result.logits is not None:
        out["logits"] = result.logits
    for i, hidden in enumerate(result.hidden_states or ()):
        out[f"hidden.{i}"] = hidden
    return out


def assert_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Bit-for-bit equality of every output tensor (names, dtypes, shapes, values)."""
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for name, tensor in want.items():
        other = got[name]
        assert other.dtype == tensor.dtype and other.shape == tensor.shape, name
        assert torch.equal(other, tensor), f"{name} differs (max abs diff {_diff(other, tensor)})"


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def assert_close_on_tokens(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor) -> None:
    """Equal to transformers on real tokens (padding positions carry no meaning)."""
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- activation directories
@dataclass(frozen=True)
class FileId:
    """Identity of a file on disk: a rewrite (even of equal bytes) changes it."""

    inode: int
    mtime_ns: int
    size: int


def dir_state(act: Path) -> dict[str, FileId]:
    state: dict[str, FileId] = {}
    for entry in sorted(act.iterdir()):
        st = entry.lstat()
        state[entry.name] = FileId(st.st_ino, st.st_mtime_ns, st.st_size)
    return state


def without_lock(state: dict[str, FileId]) -> dict[str, FileId]:
    """A directory snapshot without the lock file (which a lock design may keep or remove)."""
    return {name: info for name, info in state.items() if name != ".lock"}


def lock_is_free(act: Path) -> bool:
    """Nobody holds the directory: no lock file, or one no live process holds.

    Holds for a lock file removed on release, and for one kept but released (flock).
    """
    path = act / ".lock"
    if not path.exists():
        return True
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    try:
        pid = int(path.read_text().strip() or "0")
    except ValueError:
        return True
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def layer_files(act: Path) -> list[str]:
    """Completed activation files (final names), embeddings first."""
    layers = sorted(p.name for p in act.glob("layer_*.safetensors"))
    embeddings = ["embeddings.safetensors"] if (act / "embeddings.safetensors").exists() else []
    return embeddings + layers


def completed_layers(act: Path) -> int:
    """Number of consecutive layers 0.. whose final file exists."""
    n = 0
    while (act / f"layer_{n:05d}.safetensors").exists():
        n += 1
    return n


def temp_files(act: Path) -> list[str]:
    """Anything that looks like an unfinished write (ours or a library's)."""
    return sorted(p.name for p in act.iterdir() if ".tmp" in p.name)


def assert_every_activation_valid(act: Path, shape: Sequence[int]) -> None:
    """Every file with a final name is a complete safetensors file of the right shape."""
    for name in layer_files(act):
        with safe_open(str(act / name), framework="pt") as handle:
            tensor = handle.get_tensor("hidden_states")
        assert list(tensor.shape) == list(shape), name


def stored_inputs_digest(act: Path) -> set[str]:
    """The ``inputs`` fingerprints found in the manifest and every activation file."""
    digests = {json.loads((act / "manifest.json").read_text())["inputs"]}
    for name in layer_files(act):
        with safe_open(str(act / name), framework="pt") as handle:
            digests.add((handle.metadata() or {})["inputs"])
    return digests


# ---------------------------------------------------------------------- child processes
def child_env() -> dict[str, str]:
    """Environment of child processes: one intra-op thread, like this process (bit-exactness)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class _Lines:
    """Complete lines read so far from a pipe, without blocking."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lines: list[str] = []
        self._buffer = ""
        self.closed = False

    def pump(self, timeout: float) -> None:
        if self.closed:
            time.sleep(timeout)
            return
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return
        chunk = os.read(self.fd, 65536).decode()
        if not chunk:
            self.closed = True
            return
        self._buffer += chunk
        *complete, self._buffer = self._buffer.split("\n")
        self.lines.extend(line for line in complete if line)


class Zygote:
    """``_child.py zygote``: imports once, forks one streaming run per spec (see _child.py)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.stderr = workdir / "zygote.err"
        with self.stderr.open("wb") as err:  # a file: a full pipe would block the zygote
            self.proc = subprocess.Popen(
                [sys.executable, str(CHILD), "zygote"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=child_env(),
                cwd=str(workdir),
            )
        assert self.proc.stdout is not None
        self.out = _Lines(self.proc.stdout.fileno())
        self._count = 0
        self.wait_line("READY", timeout=180)

    def wait_line(self, prefix: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.out.lines:
                if line.startswith(prefix):
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"zygote never printed {prefix!r}: {self.out.lines[-20:]}")
            if self.out.closed:
                raise AssertionError(f"zygote ended: {self.stderr.read_text()[-3000:]}")
            self.out.pump(0.2)

    def spawn(self, spec: dict[str, Any], workdir: Path) -> Forked:
        self._count += 1
        tag = f"run{self._count}"
        spec = dict(spec, stdout=str(workdir / f"{tag}.out"), stderr=str(workdir / f"{tag}.err"))
        path = workdir / f"{tag}.json"
        path.write_text(json.dumps(spec))
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{path}\n".encode())
        self.proc.stdin.flush()
        pid = int(self.wait_line(f"PID {path} ").split()[-1])
        return Forked(self, str(path), pid, Path(spec["stdout"]), Path(spec["stderr"]))

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class Forked:
    """One run forked by the zygote: its stdout protocol lines, signals, exit code."""

    zygote: Zygote
    key: str
    pid: int
    stdout: Path
    stderr: Path

    def lines(self) -> list[str]:
        return self.stdout.read_text().splitlines() if self.stdout.exists() else []

    def exit_code(self) -> int | None:
        for line in self.zygote.out.lines:
            if line.startswith(f"EXIT {self.key} "):
                return int(line.split()[-1])
        return None

    def wait_for(self, prefix: str, timeout: float = 120.0) -> str:
        """The first stdout line starting with ``prefix`` (fails if the run ends first)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines():
                if line.startswith(prefix):
                    return line
            code = self.exit_code()
            if code is not None:
                for line in self.lines():
                    if line.startswith(prefix):
                        return line
                raise AssertionError(
                    f"run ended ({code}) before {prefix!r}; stdout: {self.lines()}; "
                    f"stderr: {self.stderr.read_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"run never printed {prefix!r}; stdout: {self.lines()}")
            self.zygote.out.pump(0.01)

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def finish(self, timeout: float = 120.0) -> tuple[int, str]:
        """Wait until the run has ended and was reaped; its exit code and stderr."""
        line = self.zygote.wait_line(f"EXIT {self.key} ", timeout=timeout)
        return int(line.split()[-1]), self.stderr.read_text()

    def kill(self) -> None:
        if self.exit_code() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


@dataclass
class Child:
    """A streaming run in its own interpreter (``_child.py SPEC``), optionally wrapped."""

    spec: dict[str, Any]
    workdir: Path
    wrapper: Sequence[str] = ()
    mode: Sequence[str] = ()
    proc: subprocess.Popen[str] = field(init=False)

    def __post_init__(self) -> None:
        spec_path = self.workdir / f"spec-{id(self)}.json"
        spec_path.write_text(json.dumps(self.spec))
        self.proc = subprocess.Popen(
            [*self.wrapper, sys.executable, str(CHILD), *self.mode, str(spec_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
            cwd=str(self.workdir),
        )

    def finish(self, timeout: float = 300.0) -> tuple[int, list[str], str]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise
        return self.proc.returncode, out.splitlines(), err


def release(go: Path) -> None:
    """Let a child waiting on ``go`` continue."""
    go.write_text("go")


def load_outputs(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def child_spec(
    model: Path,
    act: Path,
    inputs: Path,
    *,
    hooks: Sequence[dict[str, Any]] = (),
    resume: bool = False,
    out: Path | None = None,
) -> dict[str, Any]:
    return {
        "model": str(model),
        "act": str(act),
        "inputs": str(inputs),
        "batch_size": BATCH_SIZE,
        "resume": resume,
        "out": str(out) if out is not None else None,
        "hooks": list(hooks),
    }
