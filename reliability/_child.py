"""Child process of the reliability suite: one streaming run with test-only hooks.

Run as ``python _child.py SPEC.json`` (one run), or ``python _child.py zygote``: import
torch, transformers and nexus_sli once, then fork one run per spec path read on stdin (the
import costs seconds; a fork, milliseconds). The spec names the checkpoint, the activation
directory, an inputs file (safetensors: ``input_ids``, ``attention_mask``), the batch size,
``resume``, where to write the outputs and a list of hooks. A hook fires once, at a precise
point of the run, and then ``wait``\\ s for its go file (the parent kills or signals the child
meanwhile), ``sleep``\\ s, or ``fsize``: lowers RLIMIT_FSIZE so that the kernel kills the
process (SIGXFSZ) inside the write of that file. Hook points (``where``):

``replace_before`` / ``replace_after``  ``os.replace`` onto the file named ``target``
``save_after``                          ``ActivationStore.save(layer=target)`` returned
``save``                                ``ActivationStore.save(layer=target)`` is called
``compute``                             the family is about to run layer ``target``
``pid_alive``                           the store asks whether a lock owner is alive

Nothing here is part of the package: the hooks wrap its functions from the outside.

Stdout protocol: ``AT <where>:<target>`` when a hook fires, ``DONE <stats json>`` after a
successful run, ``ERROR <type> <errno> <message>`` on a nexus_sli error (exit status 2).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def main(spec_path: str) -> int:
    spec: dict[str, Any] = json.loads(Path(spec_path).read_text())
    hooks: list[dict[str, Any]] = spec.get("hooks", [])
    if any(h["action"] == "fsize" for h in hooks):
        # Die like an uncatchable kill when a write crosses the limit (no core file).
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)

    from safetensors.torch import load_file, save_file

    import nexus_sli._store as store_module
    from nexus_sli import NexusSLIError, UniversalSLIProcessor

    fired: set[int] = set()
    lock = threading.Lock()

    def act(index: int, hidden_bytes: int = 0) -> None:
        hook = hooks[index]
        with lock:
            if index in fired:
                return
            fired.add(index)
        print(f"AT {hook['where']}:{hook['target']}", flush=True)
        action = hook["action"]
        if action == "sleep":
            time.sleep(float(hook.get("seconds", 1.0)))
        elif action == "fsize":
            limit = max(hidden_bytes // 2, 1)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        elif action == "wait":
            go = Path(hook["go"])
            deadline = time.monotonic() + float(hook.get("timeout", 120.0))
            while not go.exists():
                if time.monotonic() > deadline:
                    print("TIMEOUT", flush=True)
                    os._exit(3)
                time.sleep(0.005)
        else:
            raise ValueError(f"unknown hook action {action!r}")

    def matching(where: str, target: object) -> list[int]:
        return [
            i
            for i, h in enumerate(hooks)
            if h["where"] == where and str(h["target"]) == str(target) and i not in fired
        ]

    real_replace = os.replace

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        name = os.path.basename(os.fspath(dst))
        for i in matching("replace_before", name):
            act(i)
        real_replace(src, dst, **kwargs)
        for i in matching("replace_after", name):
            act(i)

    os.replace = replace

    store_cls = store_module.ActivationStore
    real_save: Callable[..., None] = store_cls.save

    def save(self: Any, layer: int, hidden: Any) -> None:
        for i in matching("save", layer):
            act(i, hidden.numel() * hidden.element_size())
        real_save(self, layer, hidden)
        for i in matching("save_after", layer):
            act(i)

    store_cls.save = save  # type: ignore[method-assign]

    liveness = "_pid_alive"  # a lock design that breaks stale locks asks this
    real_alive = getattr(store_module, liveness, None)
    if real_alive is not None:
        alive: Callable[[int], bool] = real_alive

        def pid_alive(pid: int) -> bool:
            for i in matching("pid_alive", "any"):
                act(i)
            return alive(pid)

        setattr(store_module, liveness, pid_alive)
    elif any(h["where"] == "pid_alive" for h in hooks):
        print("NOHOOK pid_alive", flush=True)

    inputs = load_file(spec["inputs"])
    try:
        proc = UniversalSLIProcessor(
            spec["model"], activation_dir=spec["act"], progress=bool(spec.get("progress", False))
        )
        family = proc.family
        real_call = family.call_layer

        def call_layer(config: Any, layer: Any, hidden: Any, ctx: Any, idx: int, *rest: Any) -> Any:
            for i in matching("compute", idx):
                act(i)
            return real_call(config, layer, hidden, ctx, idx, *rest)

        family.call_layer = call_layer  # type: ignore[method-assign,assignment]
        try:
            result = proc.run(
                inputs["input_ids"],
                inputs["attention_mask"],
                batch_size=int(spec["batch_size"]),
                output_hidden_states=True,
                output_logits=True,
                resume=bool(spec["resume"]),
            )
        finally:
            del family.call_layer  # the family object is shared through the registry
    except NexusSLIError as exc:
        code = getattr(exc, "errno", None)
        message = str(exc).replace("\n", " ")
        print(f"ERROR {type(exc).__name__} {code} {message}", flush=True)
        return 2
    if spec.get("out"):
        tensors = {"last_hidden_state": result.last_hidden_state}
        if result.logits is not None:
            tensors["logits"] = result.logits
        for i, hidden in enumerate(result.hidden_states or ()):
            tensors[f"hidden.{i}"] = hidden.clone()
        save_file({k: v.contiguous() for k, v in tensors.items()}, spec["out"])
    stats = {"layers_run": result.stats.layers_run, "layers_resumed": result.stats.layers_resumed}
    print(f"DONE {json.dumps(stats)}", flush=True)
    return 0


def disk_full(spec_path: str) -> int:
    """Run on a small tmpfs until the disk is full, show what is left, grow it, resume.

    Meant to run inside ``unshare -m`` after the activation directory's parent was mounted
    as a tmpfs; ``spec["grow"]`` is the command that gives the space back.
    """
    import subprocess

    spec = json.loads(Path(spec_path).read_text())
    first = main(spec_path)
    act = Path(spec["act"])
    listing: dict[str, int] = {}
    valid: dict[str, bool] = {}
    if act.exists():
        from safetensors import safe_open

        for entry in sorted(act.iterdir()):
            listing[entry.name] = entry.stat().st_size
            if entry.name.endswith(".safetensors"):
                try:
                    with safe_open(str(entry), framework="pt") as handle:
                        handle.get_tensor("hidden_states")
                    valid[entry.name] = True
                except Exception:
                    valid[entry.name] = False
    print(f"LISTING {json.dumps({'files': listing, 'valid': valid, 'code': first})}", flush=True)
    subprocess.run(spec["grow"], check=True)
    spec["resume"] = True
    Path(spec_path).write_text(json.dumps(spec))
    return main(spec_path)


def _preload() -> None:
    """Import everything a run needs, without starting a thread (the zygote forks after)."""
    import safetensors.torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import nexus_sli
    import nexus_sli._store

    nexus_sli.get_registry()


def _forked(spec_path: str) -> None:
    """In a forked child: stdout/stderr to the spec's files, run, exit like a process would."""
    spec = json.loads(Path(spec_path).read_text())
    out = os.open(spec["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(spec["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.close(out)
    os.close(err)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    signal.signal(signal.SIGINT, signal.default_int_handler)
    code = 1
    try:
        code = main(spec_path)
    except KeyboardInterrupt:
        # What CPython does with an uncaught KeyboardInterrupt: traceback, then die by SIGINT.
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def zygote() -> int:
    """Import once, then fork one child per spec path read on stdin.

    Prints ``PID <spec> <pid>`` when a child starts and ``EXIT <spec> <code>`` when it ends
    (``-N``: killed by signal N), reaping every child so that no zombie keeps a lock "alive".
    """
    import select

    _preload()
    print("READY", flush=True)
    children: dict[int, str] = {}
    buffer = b""
    stdin_open = True
    while stdin_open or children:
        if stdin_open:
            ready, _, _ = select.select([0], [], [], 0.01)
            if ready:
                chunk = os.read(0, 65536)
                if not chunk:
                    stdin_open = False
                buffer += chunk
                *lines, rest = buffer.split(b"\n")
                buffer = rest
                for raw in lines:
                    spec_path = raw.decode().strip()
                    if not spec_path:
                        continue
                    pid = os.fork()
                    if pid == 0:
                        _forked(spec_path)
                    children[pid] = spec_path
                    print(f"PID {spec_path} {pid}", flush=True)
        else:
            time.sleep(0.01)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            print(f"EXIT {children.pop(pid)} {os.waitstatus_to_exitcode(status)}", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "zygote":
        sys.exit(zygote())
    if sys.argv[1] == "disk-full":
        sys.exit(disk_full(sys.argv[2]))
    sys.exit(main(sys.argv[1]))
