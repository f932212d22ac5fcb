"""Concurrency: the registry under many threads, and several writers on one activation directory.

Registry: threads register, replace, unregister and look up layers (their own names and
shared ones), register families, and run lookups inside scoped overrides, all at once, with
the interpreter switching threads every few microseconds. Invariants are checked during the
run (a thread always reads its own writes, a name never maps to another name's factory, no
scope leaks into another thread) and after it (no lost update). The operations are counted.

Activation directory: two processes (or two threads) streaming into one directory: one wins,
the other is refused by the lock, and nothing is mixed.
"""

from __future__ import annotations

import errno
import random
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from nexus_sli import (
    ActivationStoreError,
    ArchitectureFamily,
    ArchitectureRegistry,
    DuplicateLayerError,
    UnknownLayerError,
)
from nexus_sli import _store as store_module
from nexus_sli._validation import default_probe_config

from ._helpers import (
    FIGURES,
    Forked,
    Zygote,
    assert_identical,
    child_env,
    child_spec,
    dir_state,
    load_outputs,
    lock_is_free,
    release,
    result_tensors,
    stored_inputs_digest,
    stream,
    without_lock,
    write_inputs,
)

Inputs = tuple[torch.Tensor, torch.Tensor]
THREADS = 8
OPS_PER_THREAD = 1500


class Tagged(nn.Module):
    """A layer whose factory knows which name it was made for."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)


def factory_for(name: str, version: int) -> Callable[[Any, int], nn.Module]:
    def factory(config: Any, layer_idx: int) -> nn.Module:
        return Tagged(config, layer_idx)

    factory.for_name = name  # type: ignore[attr-defined]
    factory.version = version  # type: ignore[attr-defined]
    return factory


def family_for(thread: int, version: int) -> ArchitectureFamily:
    cls = type(
        f"Family{thread}v{version}",
        (ArchitectureFamily,),
        {
            "family_id": f"stress_family_{thread}",
            "family_name": f"stress family {thread}",
            "model_types": (f"stress_type_{thread}",),
        },
    )
    family: ArchitectureFamily = cls()
    return family


@pytest.fixture
def fast_switching() -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(5e-6)
    yield
    sys.setswitchinterval(before)


SHARED = [f"shared_layer{i}" for i in range(4)]


def _worker(
    registry: ArchitectureRegistry,
    thread: int,
    barrier: threading.Barrier,
    counts: list[int],
    errors: list[str],
) -> None:
    try:
        _operations(registry, thread, barrier, counts, errors)
    except BaseException as exc:
        errors.append(f"thread {thread} died: {''.join(traceback.format_exception(exc))}")


def _operations(
    registry: ArchitectureRegistry,
    thread: int,
    barrier: threading.Barrier,
    counts: list[int],
    errors: list[str],
) -> None:
    rng = random.Random(thread)
    mine = [f"own{thread}_layer{i}" for i in range(6)]
    model: dict[str, Any] = {}  # what this thread's own names must map to
    family_model: ArchitectureFamily | None = None
    ops = 0

    def fail(message: str) -> None:
        errors.append(f"thread {thread}, op {ops}: {message}")

    barrier.wait()
    for version in range(1, OPS_PER_THREAD + 1):
        ops += 1
        op = rng.random()
        name = rng.choice(mine)
        if op < 0.18:  # register own name
            factory = factory_for(name, version)
            try:
                registry.register_custom_layer(name, factory, validate=rng.random() < 0.05)
                if name in model:
                    fail(f"duplicate {name} accepted")
                model[name] = factory
            except DuplicateLayerError:
                if name not in model:
                    fail(f"{name} reported duplicate but this thread never registered it")
        elif op < 0.30:  # replace own name
            factory = factory_for(name, version)
            registry.register_custom_layer(name, factory, replace=True, validate=False)
            model[name] = factory
        elif op < 0.40:  # unregister own name
            removed = registry.unregister_custom_layer(name)
            if removed != (name in model):
                fail(f"unregister {name} returned {removed}")
            model.pop(name, None)
        elif op < 0.62:  # look up own name: reads its own writes
            try:
                found = registry.get_layer_factory(name)
                if model.get(name) is not found:
                    fail(f"{name} gave a factory this thread did not register last")
            except UnknownLayerError:
                if name in model:
                    fail(f"{name} lost (a concurrent update overwrote it)")
        elif op < 0.72:  # shared names: replace and read, never another name's factory
            shared = rng.choice(SHARED)
            if rng.random() < 0.5:
                registry.register_custom_layer(
                    shared, factory_for(shared, version), replace=True, validate=False
                )
            else:
                try:
                    found = registry.get_layer_factory(shared)
                    if getattr(found, "for_name", None) != shared:
                        fail(f"{shared} maps to a factory made for {found!r}")
                except UnknownLayerError:
                    pass
        elif op < 0.80:  # scoped override: visible inside, gone after, never elsewhere
            scoped_name = f"scoped{thread}_layer"
            factory = factory_for(scoped_name, version)
            with registry.scoped({scoped_name: factory}, replace=True, validate=False):
                if registry.get_layer_factory(scoped_name) is not factory:
                    fail("scoped factory not visible in its scope")
                extra = f"scoped{thread}_extra"
                registry.register_custom_layer(extra, factory_for(extra, version), validate=False)
                if registry.unregister_custom_layer(extra) is not True:
                    fail("scoped unregister failed")
                ops += 3
            for who in (thread, rng.randrange(THREADS)):
                try:
                    registry.get_layer_factory(f"scoped{who}_layer")
                    fail(f"scope of thread {who} leaked into thread {thread}")
                except UnknownLayerError:
                    pass
        elif op < 0.86:  # families: register / replace / unregister / detect
            action = rng.random()
            fid = f"stress_family_{thread}"
            if action < 0.4:
                fam = family_for(thread, version)
                registry.register(fid, fam, replace=True)
                family_model = fam
            elif action < 0.6:
                removed = registry.unregister_family(fid)
                if removed != (family_model is not None):
                    fail(f"unregister_family returned {removed}")
                family_model = None
            else:
                config = {"model_type": f"stress_type_{thread}"}
                try:
                    detected = registry.detect_family(config)
                    if detected is not family_model:
                        fail("detect_family returned a family this thread did not register")
                except Exception as exc:
                    if family_model is not None:
                        fail(f"detect_family lost the family: {exc}")
        else:  # listings are consistent snapshots
            names = registry.list_custom_layers()
            if len(names) != len(set(names)):
                fail("list_custom_layers has duplicates")
            for own in mine:
                if (own in names) != (own in model):
                    fail(f"listing disagrees about {own}")
            for record in registry.list_layer_registrations():
                if getattr(record.factory, "for_name", record.name) != record.name:
                    fail(f"registration {record.name} holds another name's factory")
    # No lost update: the final state of this thread's names is exactly its model.
    for name in mine:
        try:
            if registry.get_layer_factory(name) is not model.get(name):
                fail(f"final {name} differs")
        except UnknownLayerError:
            if name in model:
                fail(f"final {name} missing")
    counts[thread] = ops


def test_registry_under_many_threads(fast_switching: None) -> None:
    # Import transformers' probe config class first: its first import is not thread-safe
    # (test_cold_concurrent_validated_registrations covers that case on its own).
    default_probe_config()
    registry = ArchitectureRegistry.isolated()
    barrier = threading.Barrier(THREADS)
    counts = [0] * THREADS
    errors: list[str] = []
    threads = [
        threading.Thread(target=_worker, args=(registry, t, barrier, counts, errors))
        for t in range(THREADS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads), "a registry operation deadlocked"
    assert errors == [], errors[:10]
    assert all(counts), counts
    total = sum(counts)
    FIGURES["registry threads"] = THREADS
    FIGURES["registry operations"] += total
    for shared in SHARED:
        assert getattr(registry.get_layer_factory(shared), "for_name", None) == shared


COLD_START = """
import sys, threading, time

# Switch threads often, and make the first import of the probe config's module take a
# while: the window in which other threads look the class up mid-import is then certain.
sys.setswitchinterval(1e-6)

class SlowFinder:
    def find_spec(self, name, path=None, target=None):
        if name == "transformers.models.llama.configuration_llama":
            time.sleep(0.2)
        return None

sys.meta_path.insert(0, SlowFinder())
from torch import nn
from nexus_sli import ArchitectureRegistry, NexusSLIError

class Layer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.proj = nn.Linear(config.hidden_size, 4)

registry = ArchitectureRegistry.isolated()
barrier = threading.Barrier(8)
outcomes = []

def register(i):
    barrier.wait()
    try:
        registry.register_custom_layer(f"cold{i}_layer", Layer)
        outcomes.append("ok")
    except NexusSLIError as exc:
        outcomes.append(f"nexus {type(exc).__name__}")
    except BaseException as exc:
        outcomes.append(f"LEAK {type(exc).__name__}: {exc}")

threads = [threading.Thread(target=register, args=(i,)) for i in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("\\n".join(outcomes))
"""


# Regression test (bug found by this suite): default_probe_config imported transformers'
# LlamaConfig on every call, and the first import through transformers' lazy module is not
# thread-safe: concurrent first validated registrations failed with ImportError ("cannot import
# name 'LlamaConfig'").
def test_cold_concurrent_validated_registrations(tmp_path: Path) -> None:
    """In a fresh interpreter (nothing of transformers imported yet), 8 threads register."""
    done = subprocess.run(
        [sys.executable, "-c", COLD_START],
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(),
        cwd=str(tmp_path),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outcomes = (
        done.stdout.split("\n")[:-1] if done.stdout.endswith("\n") else done.stdout.split("\n")
    )
    FIGURES["registry cold-start threads"] = 8
    assert outcomes == ["ok"] * 8, outcomes


def _fake_plugin(root: Path) -> None:
    """A distribution exposing one nexus_sli.layers entry point whose import takes a while."""
    dist = root / "fake_nexus_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-nexus-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[nexus_sli.layers]\nplugin_layer = fake_nexus_plugin_mod:factory\n"
    )
    (root / "fake_nexus_plugin_mod.py").write_text(
        "import time\nfrom torch import nn\ntime.sleep(0.3)\n"
        "def factory(config, layer_idx):\n    return nn.Linear(config.hidden_size, 4)\n"
    )


# Regression test (bug found by this suite): _load_pending_plugins cleared _plugins_pending and
# loaded the plugins outside the lock: a lookup in another thread meanwhile skipped loading and
# raised UnknownLayerError for a layer an installed plugin provides.
def test_plugin_lookups_race_the_lazy_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_plugin(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fake_nexus_plugin_mod", raising=False)
    registry = ArchitectureRegistry.isolated()
    barrier = threading.Barrier(THREADS)
    outcomes: list[str] = []

    def lookup() -> None:
        barrier.wait()
        try:
            registry.get_layer_factory("plugin_layer")
            outcomes.append("found")
        except UnknownLayerError:
            outcomes.append("missed")

    threads = [threading.Thread(target=lookup) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    sys.modules.pop("fake_nexus_plugin_mod", None)
    assert outcomes == ["found"] * THREADS, outcomes


# ---------------------------------------------------------------------- one directory, two writers
def _hold(where: str, target: object, go: Path) -> dict[str, Any]:
    return {"where": where, "target": target, "action": "wait", "go": str(go)}


def test_second_writer_refused_while_first_streams(
    tmp_path: Path,
    zygote: Zygote,
    deep_llama: Path,
    deep_inputs: Inputs,
    deep_inputs_file: Path,
    deep_reference: dict[str, torch.Tensor],
) -> None:
    act = tmp_path / "acts"
    go = tmp_path / "go"
    out = tmp_path / "first.safetensors"
    first = zygote.spawn(
        child_spec(deep_llama, act, deep_inputs_file, hooks=[_hold("save_after", 2, go)], out=out),
        tmp_path,
    )
    try:
        first.wait_for("AT save_after:2")
        before = dir_state(act)
        ids, mask = deep_inputs
        attempts = [
            (ids, mask, False),  # same work, from scratch: would wipe the first's files
            (ids, mask, True),  # same work, resume: would take half-written work
            (ids.flip(0), mask.flip(0), False),  # other work
        ]
        for a_ids, a_mask, resume in attempts:
            with pytest.raises(ActivationStoreError) as info:
                stream(deep_llama, act, a_ids, a_mask, resume=resume)
            assert info.value.errno == errno.EBUSY
            assert "in use" in str(info.value) and str(first.pid) in str(info.value)
            assert without_lock(dir_state(act)) == without_lock(before)  # nothing touched
            assert not lock_is_free(act)  # and the first still holds the lock
            FIGURES["lock: writers refused"] += 1
        release(go)
        code, stderr = first.finish()
    finally:
        first.kill()
    assert code == 0, stderr[-3000:]
    assert_identical(load_outputs(out), deep_reference)
    assert len(stored_inputs_digest(act)) == 1  # every file from the same run
    again = stream(deep_llama, act, *deep_inputs, resume=True)
    assert again.stats.layers_run == 0
    assert_identical(result_tensors(again), deep_reference)


def test_two_processes_race_for_one_directory(
    tmp_path: Path,
    zygote: Zygote,
    deep_llama: Path,
    deep_inputs: Inputs,
    deep_reference: dict[str, torch.Tensor],
) -> None:
    """Started together on different inputs: exactly one streams, the other is refused."""
    ids, mask = deep_inputs
    inputs = {
        "a": write_inputs(tmp_path / "a.safetensors", ids, mask),
        "b": write_inputs(tmp_path / "b.safetensors", ids.flip(0), mask.flip(0)),
    }
    references = {
        "a": deep_reference,
        "b": result_tensors(stream(deep_llama, None, ids.flip(0), mask.flip(0))),
    }
    act = tmp_path / "acts"
    go = tmp_path / "go"
    runs: dict[str, Forked] = {}
    for key in ("a", "b"):
        spec = child_spec(
            deep_llama,
            act,
            inputs[key],
            hooks=[_hold("save_after", -1, go)],
            out=tmp_path / f"{key}.out.safetensors",
        )
        runs[key] = zygote.spawn(spec, tmp_path)
    try:
        first_lines = {key: _first_of(run) for key, run in runs.items()}
        winners = [k for k, line in first_lines.items() if line.startswith("AT ")]
        losers = [k for k, line in first_lines.items() if line.startswith("ERROR ")]
        assert len(winners) == 1 and len(losers) == 1, first_lines
        assert first_lines[losers[0]].startswith(f"ERROR ActivationStoreError {errno.EBUSY} ")
        release(go)
        codes = {key: run.finish()[0] for key, run in runs.items()}
    finally:
        for run in runs.values():
            run.kill()
    winner, loser = winners[0], losers[0]
    assert codes == {winner: 0, loser: 2}
    assert_identical(load_outputs(tmp_path / f"{winner}.out.safetensors"), references[winner])
    assert len(stored_inputs_digest(act)) == 1
    FIGURES["lock: process races won by exactly one"] += 1


def _first_of(
    run: Forked, prefixes: tuple[str, ...] = ("AT ", "ERROR "), timeout: float = 120.0
) -> str:
    """The child's first protocol line starting with one of ``prefixes``: by default ``AT``
    (it holds the lock) or ``ERROR`` (it was refused)."""
    deadline = time.monotonic() + timeout
    while True:
        ended = run.exit_code() is not None
        for line in run.lines():
            if line.startswith(prefixes):
                return line
        if ended or time.monotonic() > deadline:
            raise AssertionError(
                f"no AT/ERROR line: {run.lines()} {run.stderr.read_text()[-2000:]}"
            )
        run.zygote.out.pump(0.01)


# Regression test (bug found by this suite): ActivationStore._lock broke a stale lock by reading
# its pid, unlinking the file and retrying O_EXCL: two processes that both found the same dead
# owner both unlinked (the second one the first one's fresh lock) and both streamed.
def test_two_processes_taking_over_one_stale_lock(
    tmp_path: Path, zygote: Zygote, deep_llama: Path, deep_inputs_file: Path
) -> None:
    act = tmp_path / "acts"
    act.mkdir()
    dead = zygote.spawn(child_spec(tmp_path / "missing", act, deep_inputs_file), tmp_path)
    dead.finish()
    (act / ".lock").write_text(str(dead.pid))  # a lock left by a process that died
    runs: list[Forked] = []
    gos = []
    for i in range(2):
        checked, hold = tmp_path / f"checked{i}", tmp_path / f"hold{i}"
        gos.append((checked, hold))
        hooks = [
            {"where": "pid_alive", "target": "any", "action": "wait", "go": str(checked)},
            _hold("save_after", -1, hold),
        ]
        runs.append(
            zygote.spawn(child_spec(deep_llama, act, deep_inputs_file, hooks=hooks), tmp_path)
        )
    try:
        gates = [
            _first_of(run, ("AT pid_alive", "NOHOOK", "AT save_after", "ERROR ")) for run in runs
        ]
        if all(gate.startswith("AT pid_alive") for gate in gates):
            # Both found the dead owner's lock and are about to break it: the first goes on
            # and takes the lock, then the second.
            release(gos[0][0])
            first = _first_of(runs[0], ("AT save_after", "ERROR "))
            release(gos[1][0])
            second = _first_of(runs[1], ("AT save_after", "ERROR "))
        else:  # a lock design that needs no liveness check: they simply race
            release(gos[0][0])
            release(gos[1][0])
            first, second = sorted(_first_of(run, ("AT save_after", "ERROR ")) for run in runs)
        release(gos[0][1])
        release(gos[1][1])
        for run in runs:
            run.finish()
    finally:
        for run in runs:
            run.kill()
    assert first.startswith("AT save_after"), first
    assert second.startswith("ERROR ActivationStoreError"), (
        f"the second process broke the first one's live lock and streamed too: {second}"
    )


# Regression test (bug found by this suite): ActivationStore._lock took a lock holding its own
# pid for stale: a second run in the same process (another thread) took over a live run's
# directory and, with resume=False, deleted its activations.
def test_second_thread_refused_while_first_streams(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    deep_llama: Path,
    deep_inputs: Inputs,
    deep_reference: dict[str, torch.Tensor],
) -> None:
    act = tmp_path / "acts"
    holding, go = threading.Event(), threading.Event()
    real_save = store_module.ActivationStore.save

    def save(self: Any, layer: int, hidden: torch.Tensor) -> None:
        real_save(self, layer, hidden)
        if layer == 2 and threading.current_thread().name == "first-writer":
            holding.set()
            go.wait(60)

    monkeypatch.setattr(store_module.ActivationStore, "save", save)
    results: list[Any] = []
    first = threading.Thread(
        target=lambda: results.append(stream(deep_llama, act, *deep_inputs)), name="first-writer"
    )
    first.start()
    try:
        assert holding.wait(60)
        before = dir_state(act)
        outcome = "streamed"
        try:
            stream(deep_llama, act, *deep_inputs)
        except ActivationStoreError:
            outcome = "refused"
        after = dir_state(act)
    finally:
        go.set()
        first.join(60)
    assert results and results[0] is not None
    assert_identical(result_tensors(results[0]), deep_reference)
    assert outcome == "refused"
    assert without_lock(after) == without_lock(before)
