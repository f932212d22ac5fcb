"""The benchmark: ``python -m benchmarks.run [--large] [--rounds N] [--quick]``.

Builds (once) a random Llama checkpoint, then measures every system in its own process,
alternating them round by round (A B C D A B C D ...), with a warm and a cold page cache, and
writes ``RESULTS.md``, ``results.json`` and PNG charts into ``--out`` (``benchmarks/``). The
report is rewritten after every measurement, so a run stopped early still leaves its results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .models import SPECS, ModelSpec, bench_cache_dir, build_checkpoint, weight_bytes

__all__ = ["Plan", "main"]

REPO = Path(__file__).resolve().parent.parent
SYSTEM_ORDER = ["transformers", "accelerate", "airllm", "nexus_sli"]
SWEEP_SYSTEMS = ["accelerate", "airllm", "nexus_sli"]
_MODULE_OF = {"accelerate": "accelerate", "airllm": "airllm"}


@dataclass(frozen=True)
class Plan:
    """What one invocation measures."""

    spec: ModelSpec
    seq: int
    micro: int
    w1_micro_batches: int
    w2_micro_batches: int
    rounds: int
    w2_rounds: int
    caches: tuple[str, ...]
    w2_caches: tuple[str, ...]
    sweep: tuple[int, ...]
    sweep_rounds: int
    threads: int
    quick: bool

    def workload_n(self, workload: str) -> int:
        k = self.w1_micro_batches if workload == "W1" else self.w2_micro_batches
        return k * self.micro


def _log(msg: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {msg}", file=sys.stderr, flush=True)


def _installed(system: str, python: str) -> bool:
    module = _MODULE_OF.get(system)
    if module is None:
        return True
    if python == sys.executable:
        return importlib.util.find_spec(module) is not None
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([python, "-c", probe], check=False).returncode == 0


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        }
    )
    return env


class Runner:
    """Runs jobs in child processes and keeps every record."""

    def __init__(self, plan: Plan, model_dir: Path, scratch: Path, out_dir: Path, args: Any):
        self.plan = plan
        self.model_dir = model_dir
        self.scratch = scratch
        self.out_dir = out_dir
        self.python = sys.executable
        self.records: list[dict[str, Any]] = []
        self.machine_rounds: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {}
        self.args = args
        self.airllm_split = bench_cache_dir_for(args) / f"{plan.spec.name}-airllm"
        self.counter = 0
        self.available: list[str] = []
        self.merged_plan: dict[str, Any] | None = None
        # With --append, rounds continue the numbering of the results already there.
        self.round_offset: dict[tuple[str, str], int] = {}
        self.weight_bytes = weight_bytes(model_dir)
        self.lm_head_bytes = weight_bytes(model_dir, include_lm_head=True) - self.weight_bytes
        per_layer = plan.spec.layer_params() * 4
        self.layer_bytes = per_layer * plan.spec.num_hidden_layers
        self.stem_bytes = self.weight_bytes - self.layer_bytes

    def evict_paths(self) -> list[Path]:
        return [self.model_dir, self.airllm_split]

    def run_child(self, job: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        self.counter += 1
        job_dir = self.scratch / f"job{self.counter:04d}"
        job_dir.mkdir()
        job = {**job, "scratch": str(job_dir), "out": str(job_dir / "result.json")}
        (job_dir / "job.json").write_text(json.dumps(job))
        log_path = job_dir / "log.txt"
        t0 = time.perf_counter()
        with log_path.open("w") as log:
            try:
                proc = subprocess.run(
                    [self.python, "-m", "benchmarks.child", str(job_dir / "job.json")],
                    cwd=str(REPO),
                    env=_child_env(self.plan.threads),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    check=False,
                )
                code: int | None = proc.returncode
            except subprocess.TimeoutExpired:
                code = None
        elapsed = time.perf_counter() - t0
        result_path = job_dir / "result.json"
        if result_path.is_file():
            record: dict[str, Any] = json.loads(result_path.read_text())
        else:
            tail = log_path.read_text(errors="replace")[-2000:]
            why = "timed out" if code is None else f"exit code {code}"
            record = {"status": f"error: child {why}", "traceback": tail}
        record["process_s"] = elapsed
        if not record["status"].startswith("ok"):
            _log(f"  {job.get('system')}: {record['status']}")
            record["log_tail"] = log_path.read_text(errors="replace")[-3000:]
        shutil.rmtree(job_dir / "offload", ignore_errors=True)
        return record

    def measure(self, system: str, workload: str, cache: str, k: int, rnd: int) -> None:
        from .measure import evict, load_average

        plan = self.plan
        n = k * plan.micro
        rnd += self.round_offset.get((workload, cache), 0)
        base: dict[str, Any] = {
            "system": system,
            "workload": workload,
            "cache": cache,
            "n": n,
            "micro_batches": k,
            "round": rnd,
        }
        if system not in self.available:
            self.records.append({**base, "status": "not installed"})
            return
        ref_name = "W1" if workload == "W1" else "W2"
        ref = self.scratch / f"ref-{ref_name}.safetensors"
        job = {
            "system": system,
            "model_dir": str(self.model_dir),
            "n": n,
            "micro": plan.micro,
            "seq": plan.seq,
            "vocab": plan.spec.vocab_size,
            "threads": plan.threads,
            "flops": plan.spec.layer_flops(n * plan.seq, plan.seq),
            "weight_bytes": self.weight_bytes,
            "layer_bytes": self.layer_bytes,
            "stem_bytes": self.stem_bytes,
            "airllm_split": str(self.airllm_split),
            "ref": str(ref),
            "save_ref": str(ref)
            if system == "transformers" and not ref.is_file() and workload in ("W1", "W2")
            else None,
        }
        evicted = evict(self.evict_paths()) if cache == "cold" else 0
        load = load_average()
        t0 = time.time()
        record = self.run_child(job, timeout=self.args.timeout)
        record.update(base)
        record.update({"evicted_bytes": evicted, "loadavg_before": list(load), "started": t0})
        record["loadavg_after"] = list(load_average())
        self.records.append(record)
        if record["status"] == "ok":
            _log(
                f"  {system:12s} {workload} {cache:4s} k={k:<2d} wall {record['wall_s']:7.1f} s "
                f"peak {record['peak_rss_kb'] / 1024:7.0f} MiB  load {load[0]:.1f}"
            )
        self.save()

    def machine(self, rnd: int) -> None:
        from .measure import disk_read_bandwidth, load_average, matmul_peak_gflops

        size = (32 << 20) if self.plan.quick else (1 << 30)
        bw = disk_read_bandwidth(bench_cache_dir_for(self.args) / "diskbw.bin", size)
        shape = (512, 512, 512) if self.plan.quick else (2048, 2048, 5632)
        peak = matmul_peak_gflops(self.plan.threads, shape)
        row = {"round": rnd, "disk_bw": bw, "matmul_gflops": peak, "loadavg": list(load_average())}
        self.machine_rounds.append(row)
        _log(f"round {rnd}: matmul peak {peak:.1f} GFLOP/s, cold disk read {bw / 1e6:.0f} MB/s")
        self.save()

    def save(self, *, final: bool = False) -> None:
        from .report import write_report

        data = {
            "meta": self.meta,
            "plan": self.merged_plan or _plan_dict(self.plan),
            "machine_rounds": self.machine_rounds,
            "records": self.records,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "results.json").write_text(json.dumps(data, indent=1))
        charts = not self.args.no_charts and (final or not self.plan.quick)
        write_report(data, self.out_dir, charts=charts)


def bench_cache_dir_for(args: Any) -> Path:
    return Path(args.cache) if args.cache else bench_cache_dir()


def _plan_dict(plan: Plan) -> dict[str, Any]:
    d = {k: getattr(plan, k) for k in plan.__dataclass_fields__ if k != "spec"}
    d["spec"] = {k: getattr(plan.spec, k) for k in plan.spec.__dataclass_fields__}
    d["n_params"] = plan.spec.n_params()
    return d


def _merge_plans(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The plan of an appended run: the union of what both invocations measured."""

    def union(key: str) -> list[str]:
        return [c for c in ("warm", "cold") if c in old[key] or c in new[key]]

    merged = dict(new)
    merged["caches"] = union("caches") if new["rounds"] else list(old["caches"])
    merged["w2_caches"] = union("w2_caches") if new["w2_rounds"] else list(old["w2_caches"])
    merged["sweep"] = sorted({*old["sweep"], *new["sweep"]})
    merged["rounds"] = old["rounds"] + new["rounds"]
    merged["w2_rounds"] = old["w2_rounds"] + new["w2_rounds"]
    return merged


def _versions(python: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "accelerate", "airllm", "safetensors", "nexus-sli"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.add_argument("--large", action="store_true", help="the ~1.3 B model instead of ~0.5 B")
    p.add_argument("--quick", action="store_true", help="tiny model, one round (smoke test)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of W1 and W2 (default 3)")
    p.add_argument("--w2-rounds", type=int, default=None, help="rounds of W2 (default --rounds)")
    p.add_argument("--sweep-rounds", type=int, default=1, help="rounds of the sweep (default 1)")
    p.add_argument(
        "--sweep",
        default=None,
        help="micro-batch counts of the sweep, comma separated (default 1,2,4,8,16)",
    )
    p.add_argument("--w2-caches", default="warm,cold", help="caches of W2 (default warm,cold)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--systems", default=",".join(SYSTEM_ORDER), help="systems to run")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent), help="output folder")
    p.add_argument("--cache", default=None, help="checkpoint cache (default $XDG_CACHE_HOME/...)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per child process")
    p.add_argument("--no-charts", action="store_true", help="skip the PNG charts")
    p.add_argument(
        "--append",
        action="store_true",
        help="add to the results.json already in --out (e.g. the cells a shorter run left out)",
    )
    p.add_argument(
        "--report-only", action="store_true", help="rewrite RESULTS.md from results.json"
    )
    p.add_argument("--skip-registry", action="store_true", help="skip the registry benchmarks")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    started = time.time()
    if args.report_only:
        from .report import write_report

        data = json.loads((Path(args.out) / "results.json").read_text())
        write_report(data, Path(args.out), charts=not args.no_charts)
        return 0
    if args.quick:
        spec = SPECS["tiny"]
        plan = Plan(spec, 16, 2, 1, 2, 1, 1, ("cold",), ("warm",), (2,), 1, args.threads, True)
    else:
        spec = SPECS["large" if args.large else "default"]
        sweep = tuple(int(x) for x in (args.sweep or "1,2,4,8,16").split(","))
        w2_caches = tuple(c for c in args.w2_caches.split(",") if c)
        w2_rounds = args.rounds if args.w2_rounds is None else args.w2_rounds
        plan = Plan(
            spec, 256, 8, 1, 8, args.rounds, w2_rounds, ("warm", "cold"), w2_caches, sweep,
            args.sweep_rounds, args.threads, False,
        )  # fmt: skip
    cache = bench_cache_dir_for(args)
    model_dir = build_checkpoint(spec, cache, log=_log)
    scratch = Path(tempfile.mkdtemp(prefix="scratch-", dir=cache))
    out_dir = Path(args.out)
    runner = Runner(plan, model_dir, scratch, out_dir, args)
    wanted = [s for s in SYSTEM_ORDER if s in args.systems.split(",")]
    runner.available = [s for s in wanted if _installed(s, runner.python)]
    runner.meta = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "python_executable": runner.python,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "versions": _versions(runner.python),
        "model_dir": str(model_dir),
        "weight_bytes": runner.weight_bytes,
        "lm_head_bytes": runner.lm_head_bytes,
        "layer_bytes": runner.layer_bytes,
        "systems_wanted": wanted,
        "systems_available": runner.available,
        "loadavg_start": list(os.getloadavg()),
        "started": started,
    }
    invocation = {k: runner.meta[k] for k in ("command", "date", "started", "loadavg_start")}
    runner.meta["invocations"] = [invocation]
    previous = out_dir / "results.json"
    if args.append and previous.is_file():
        old = json.loads(previous.read_text())
        if old["plan"]["spec"] != _plan_dict(plan)["spec"]:
            raise SystemExit(f"--append: {previous} holds results of another model")
        runner.records = old["records"]
        for r in runner.records:
            cell = (str(r["workload"]), str(r["cache"]))
            runner.round_offset[cell] = max(runner.round_offset.get(cell, 0), int(r["round"]))
        runner.machine_rounds = old["machine_rounds"]
        keys = ("command", "date", "started", "finished", "loadavg_start", "loadavg_end")
        before = old["meta"].get("invocations") or [
            {k: old["meta"][k] for k in keys if k in old["meta"]}
        ]
        runner.meta["invocations"] = [*before, invocation]
        runner.meta["started"] = old["meta"]["started"]
        if args.skip_registry and "registry" in old["meta"]:
            runner.meta["registry"] = old["meta"]["registry"]
        runner.merged_plan = _merge_plans(old["plan"], _plan_dict(plan))
    try:
        if "airllm" in runner.available:
            _log("AirLLM: writing its per-layer split copy (first use), before any timing")
            job = {"prepare": True, "system": "airllm", "model_dir": str(model_dir)}
            job.update({"threads": plan.threads, "airllm_split": str(runner.airllm_split)})
            prep = runner.run_child(job, timeout=args.timeout)
            runner.meta["airllm_prepare"] = prep
        runner.save()
        # W1 rounds first, then W2 rounds, then the sweep: within a round every cell runs
        # each system in turn (A B C D), so load drifts touch all systems alike.
        phases = [("W1", plan.caches, plan.rounds, plan.w1_micro_batches)]
        phases.append(("W2", plan.w2_caches, plan.w2_rounds, plan.w2_micro_batches))
        for workload, caches, rounds, k in phases:
            for rnd in range(1, rounds + 1):
                runner.machine(rnd)
                for cache_state in caches:
                    _log(f"{workload} round {rnd}: {cache_state}")
                    for system in wanted:
                        runner.measure(system, workload, cache_state, k, rnd)
        reused = set()
        if "warm" in plan.caches and plan.rounds:
            reused.add(plan.w1_micro_batches)
        if "warm" in plan.w2_caches and plan.w2_rounds:
            reused.add(plan.w2_micro_batches)
        for rnd in range(1, plan.sweep_rounds + 1):
            for k in plan.sweep:
                if k in reused:
                    continue  # the warm W1 / W2 runs are these points
                _log(f"sweep round {rnd}: {k} micro-batches")
                for system in [s for s in wanted if s in SWEEP_SYSTEMS]:
                    runner.measure(system, f"sweep{k}", "warm", k, rnd)
        if not args.skip_registry:
            _log("registry micro-benchmarks")
            runner.meta["registry"] = _registry_bench(runner, args)
        runner.machine(0)
        runner.meta["finished"] = time.time()
        runner.meta["loadavg_end"] = list(os.getloadavg())
        invocation["finished"] = runner.meta["finished"]
        invocation["loadavg_end"] = runner.meta["loadavg_end"]
        runner.save(final=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _log(f"done in {(time.time() - started) / 60:.1f} min: {out_dir / 'RESULTS.md'}")
    return 0


def _registry_bench(runner: Runner, args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:  # in this process: one child fewer for the smoke test
        from .registry_bench import run_registry_bench

        return {**run_registry_bench(quick=True), "status": "ok", "in_process": True}
    out = runner.scratch / "registry.json"
    cmd = [runner.python, "-m", "benchmarks.registry_bench", str(out)]
    proc = subprocess.run(
        cmd, cwd=str(REPO), env=_child_env(runner.plan.threads), capture_output=True, check=False
    )
    if proc.returncode != 0 or not out.is_file():
        tail = proc.stderr.decode(errors="replace")[-2000:]
        return {"status": f"error: exit code {proc.returncode}", "log_tail": tail}
    result: dict[str, Any] = json.loads(out.read_text())
    result["status"] = "ok"
    return result


if __name__ == "__main__":
    raise SystemExit(main())
