"""RESULTS.md and PNG charts from the records of :mod:`benchmarks.run`."""

from __future__ import annotations

import importlib
import json
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .models import ModelSpec

__all__ = ["write_report"]

NAMES = {
    "transformers": "(a) transformers in-memory",
    "accelerate": "(b) accelerate disk offload",
    "airllm": "(c) AirLLM",
    "nexus_sli": "(d) nexus_sli",
}
ORDER = ["transformers", "accelerate", "airllm", "nexus_sli"]
SWEEP = ["accelerate", "airllm", "nexus_sli"]
MIB = 1024 * 1024


def _med(xs: Iterable[float]) -> float:
    values = list(xs)
    return statistics.median(values) if values else float("nan")


class _Data:
    def __init__(self, data: dict[str, Any]) -> None:
        self.meta: dict[str, Any] = data.get("meta", {})
        self.plan: dict[str, Any] = data.get("plan", {})
        self.records: list[dict[str, Any]] = data.get("records", [])
        self.machine: list[dict[str, Any]] = data.get("machine_rounds", [])
        self.spec = ModelSpec(**self.plan["spec"])
        # Compute: the best matmul figure of the run (load from other processes only lowers it).
        peaks = [float(m["matmul_gflops"]) for m in self.machine]
        bws = [float(m["disk_bw"]) for m in self.machine]
        self.peak = max(peaks) if peaks else float("nan")
        self.peak_median = _med(peaks)
        # Disk: the median (a read right after the file is first written can come from a cache
        # below the page cache, and would overstate the disk).
        self.bw = _med(bws)
        self.bw_median = _med(bws)
        self.weight_bytes = int(self.meta.get("weight_bytes", 0))

    def runs(self, system: str, workload: str, cache: str) -> list[dict[str, Any]]:
        return [
            r
            for r in self.records
            if r["system"] == system
            and r["workload"] == workload
            and r["cache"] == cache
            and r.get("status") == "ok"
        ]

    def status(self, system: str, workload: str, cache: str) -> str | None:
        for r in self.records:
            same = r["system"] == system and r["workload"] == workload and r["cache"] == cache
            if same and r.get("status") != "ok":
                return str(r.get("status"))
        return None

    def sweep_runs(self, system: str, k: int) -> list[dict[str, Any]]:
        return [
            r
            for r in self.records
            if r["system"] == system
            and r.get("micro_batches") == k
            and r["cache"] == "warm"
            and r.get("status") == "ok"
        ]

    def wall(self, system: str, workload: str, cache: str) -> float:
        return _med(r["wall_s"] for r in self.runs(system, workload, cache))

    def rss(self, system: str, workload: str, cache: str) -> float:
        return _med(r["peak_rss_kb"] * 1024 for r in self.runs(system, workload, cache))

    def flops(self, n: int) -> float:
        seq = int(self.plan["seq"])
        return self.spec.layer_flops(n * seq, seq)

    def bound(self, n: int, cache: str) -> float:
        compute = self.flops(n) / (self.peak * 1e9)
        if cache == "cold":
            return max(compute, self.weight_bytes / self.bw)
        return compute

    def n_of(self, workload: str) -> int:
        micro = int(self.plan["micro"])
        k = self.plan["w1_micro_batches"] if workload == "W1" else self.plan["w2_micro_batches"]
        return int(k) * micro

    def cells(self) -> list[tuple[str, str]]:
        cells = [("W1", c) for c in self.plan["caches"]]
        cells += [("W2", c) for c in self.plan["w2_caches"]]
        return cells


def _fmt(x: float, digits: int = 1) -> str:
    return "—" if x != x else f"{x:.{digits}f}"


def _ratio(a: float, b: float) -> str:
    return "—" if a != a or b != b or b == 0 else f"{a / b:.2f}x"


def _main_table(d: _Data, workload: str, cache: str) -> list[str]:
    n = d.n_of(workload)
    ref_wall = d.wall("transformers", workload, cache)
    ref_rss = d.rss("transformers", workload, cache)
    bound = d.bound(n, cache)
    lines = [
        f"### {workload} ({n} sequences x {d.plan['seq']} tokens, micro-batches of "
        f"{d.plan['micro']}), {cache} page cache",
        "",
        f"Physical bound: {_fmt(bound)} s (layer FLOPs {d.flops(n) / 1e12:.2f} TFLOP at "
        f"{_fmt(d.peak)} GFLOP/s"
        + (
            f"; weights {d.weight_bytes / 1e9:.2f} GB at {d.bw / 1e6:.0f} MB/s "
            f"= {d.weight_bytes / d.bw:.1f} s)"
            if cache == "cold"
            else ")"
        ),
        "",
        "| system | runs | wall s, median (min–max) | wall × (a) | % of bound | peak RSS MiB "
        "| RSS × (a) | RSS above imports MiB | disk read MB | rchar MB | weights read MB "
        "| blocked on weights s (% wall) | layer GFLOP/s (% peak) | max abs diff vs (a) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for system in ORDER:
        runs = d.runs(system, workload, cache)
        if not runs:
            status = d.status(system, workload, cache) or "not run"
            lines.append(f"| {NAMES[system]} | 0 | {status} |" + " |" * 11)
            continue
        walls = [r["wall_s"] for r in runs]
        wall = _med(walls)
        rss = _med(r["peak_rss_kb"] * 1024 for r in runs)
        above = _med((r["peak_rss_kb"] - r["baseline_rss_kb"]) * 1024 for r in runs)
        wait = _med(r["weight_wait_s"] for r in runs)
        wait_pct = _med(100 * r["weight_wait_s"] / r["wall_s"] for r in runs)
        gflops = _med(r["gflops"] for r in runs)
        diffs = [r["max_abs_diff"] for r in runs if "max_abs_diff" in r]
        diff = f"{max(diffs):.2e}" if diffs else "—"
        lines.append(
            f"| {NAMES[system]} | {len(runs)} | {wall:.1f} ({min(walls):.1f}–{max(walls):.1f}) "
            f"| {_ratio(wall, ref_wall)} | {100 * bound / wall:.0f}% | {rss / MIB:.0f} "
            f"| {_ratio(rss, ref_rss)} | {above / MIB:.0f} "
            f"| {_med(r['read_bytes'] for r in runs) / 1e6:.0f} "
            f"| {_med(r['rchar'] for r in runs) / 1e6:.0f} "
            f"| {_med(r['logical_weight_bytes'] for r in runs) / 1e6:.0f} "
            f"| {wait:.2f} ({wait_pct:.1f}%) | {gflops:.1f} ({100 * gflops / d.peak:.0f}%) "
            f"| {diff} |"
        )
    lines.append("")
    return lines


def _target_rows(d: _Data) -> list[str]:
    rows: list[str] = []

    def add(
        name: str,
        value: float,
        target: float,
        *,
        le: bool = True,
        unit: str = "",
        rounds: list[float] | None = None,
    ) -> None:
        aim = f"{'≤' if le else '<'} {target}{unit}"
        if value != value:
            rows.append(f"| {name} | not measured | {aim} | — | — |")
            return
        ok = value <= target if le else value < target
        verdict = "met" if ok else f"**missed**: {value / target:.2f}x the aim"
        per_round = ", ".join(f"{x:.2f}" for x in rounds) if rounds else "—"
        rows.append(f"| {name} | {value:.3g}{unit} | {aim} | {verdict} | {per_round} |")

    def paired(num: str, den: str, w: str, cache: str, key: str) -> list[float]:
        """The ratio within each round that ran both systems (load drifts cancel out)."""
        top = {r["round"]: r[key] for r in d.runs(num, w, cache)}
        bottom = {r["round"]: r[key] for r in d.runs(den, w, cache)}
        return [top[k] / bottom[k] for k in sorted(top) if bottom.get(k)]

    for w in ("W1", "W2"):
        for cache in ("warm", "cold"):
            a, s = d.rss("transformers", w, cache), d.rss("nexus_sli", w, cache)
            if a == a and s == s:
                rr = paired("nexus_sli", "transformers", w, cache, "peak_rss_kb")
                add(f"peak RSS (d)/(a), {w} {cache}", s / a, 0.15, unit="x", rounds=rr)
    for cache in ("warm", "cold"):
        a, s = d.wall("transformers", "W1", cache), d.wall("nexus_sli", "W1", cache)
        if a == a and s == s:
            rr = paired("nexus_sli", "transformers", "W1", cache, "wall_s")
            add(f"wall (d)/(a), W1 {cache}", s / a, 1.0, unit="x", rounds=rr)
    for cache in ("warm", "cold"):
        s = d.wall("nexus_sli", "W2", cache)
        b, c = d.wall("accelerate", "W2", cache), d.wall("airllm", "W2", cache)
        if s == s:
            rb = paired("nexus_sli", "accelerate", "W2", cache, "wall_s")
            rc = paired("nexus_sli", "airllm", "W2", cache, "wall_s")
            nan = float("nan")
            add(f"wall (d)/(b), W2 {cache}", s / b if b == b else nan, 0.8, unit="x", rounds=rb)
            add(f"wall (d)/(c), W2 {cache}", s / c if c == c else nan, 0.5, unit="x", rounds=rc)
    cold = d.wall("nexus_sli", "W1", "cold")
    bound = d.bound(d.n_of("W1"), "cold")
    per = [r["wall_s"] / bound for r in d.runs("nexus_sli", "W1", "cold")]
    add("cold W1 wall of (d) / physical bound", cold / bound, 1.25, unit="x", rounds=per)
    for w in ("W1", "W2"):
        runs = d.runs("nexus_sli", w, "warm")
        if runs:
            pcts = [100 * r["weight_wait_s"] / r["wall_s"] for r in runs]
            add(f"time blocked on weights, (d) {w} warm", _med(pcts), 2.0, le=False, unit="%",
                rounds=pcts)  # fmt: skip
    diffs = [
        r["max_abs_diff"]
        for r in d.records
        if r["system"] == "nexus_sli" and r.get("status") == "ok" and "max_abs_diff" in r
    ]
    add("max abs diff (d) vs (a), every run", max(diffs) if diffs else float("nan"), 1e-4)
    reg = d.meta.get("registry", {})
    if reg.get("status") == "ok":
        add("get_layer_factory median lookup", reg["lookup_median_s"] * 1e6, 1.0, unit=" µs")
        add("register hidden-8192 Llama layer (meta validation), median",
            reg["register_median_s"] * 1e3, 50.0, unit=" ms")  # fmt: skip
        add("RSS growth of that registration", reg["rss_growth_total_kb"] / 1024, 10.0,
            le=False, unit=" MB")  # fmt: skip
    return rows


def _sweep_lines(d: _Data) -> list[str]:
    ks = [int(k) for k in d.plan.get("sweep", [])]
    if not ks:
        return []
    lines = [
        "| micro-batches | sequences | (b) wall s | (c) wall s | (d) wall s | (d)/(b) | (d)/(c) "
        "| (d) peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in ks:
        walls = {s: _med(r["wall_s"] for r in d.sweep_runs(s, k)) for s in ORDER}
        rss = _med(r["peak_rss_kb"] * 1024 for r in d.sweep_runs("nexus_sli", k)) / MIB
        lines.append(
            f"| {k} | {k * int(d.plan['micro'])} | {_fmt(walls['accelerate'])} "
            f"| {_fmt(walls['airllm'])} | {_fmt(walls['nexus_sli'])} "
            f"| {_ratio(walls['nexus_sli'], walls['accelerate'])} "
            f"| {_ratio(walls['nexus_sli'], walls['airllm'])} | {_fmt(rss, 0)} |"
        )
    return [*lines, ""]


def _unit_reads(run: dict[str, Any]) -> tuple[list[tuple[float, float]], int]:
    """The background reads of a nexus_sli run's layers, and how many there are per layer.

    The stem (read by rows, or, in runs before that, as one read first) and the final norm
    (one read last) are dropped; a layer is read in 1 or more units (its stages).
    """
    reads = [(float(s), float(e)) for s, e, _ in run.get("reads", [])]
    n = len(run.get("timeline", []))
    for per in (1, 2, 3):
        for lead in (0, 1):
            if n and lead + per * n + 1 == len(reads):
                return reads[lead : lead + per * n], per
    return reads[:n], 1


def _layer_reads(run: dict[str, Any]) -> list[tuple[float, float]]:
    """Per layer: when its first read began, and the time spent reading all its units."""
    units, per = _unit_reads(run)
    return [
        (units[i][0], sum(e - s for s, e in units[i : i + per]))
        for i in range(0, len(units) - per + 1, per)
    ]


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not runs:
        return None
    ordered = sorted(runs, key=lambda r: float(r["wall_s"]))
    return ordered[len(ordered) // 2]


def _timeline_lines(d: _Data) -> list[str]:
    lines: list[str] = []
    for cache in ("warm", "cold"):
        run = _median_run(d.runs("nexus_sli", "W1", cache))
        if run is None:
            continue
        lines += [
            f"(d) W1 {cache}, median run ({run['wall_s']:.1f} s): per layer, the time the "
            "background reader spent on its tensors (all its stages: mapped and paged in, "
            "from the disk when cold), the time the loop blocked waiting for them, compute over "
            "every micro-batch, and the activation write (none without an activation_dir).",
            "",
            "| layer | read s | blocked s | compute s | write s |",
            "|---|---|---|---|---|",
        ]
        reads = _layer_reads(run)
        for i, (idx, wait, comp, write) in enumerate(run.get("timeline", [])):
            read = reads[i][1] if i < len(reads) else float("nan")
            lines.append(f"| {idx} | {_fmt(read, 3)} | {wait:.3f} | {comp:.2f} | {write:.3f} |")
        lines.append("")
    return lines


def _registry_lines(d: _Data) -> list[str]:
    reg = d.meta.get("registry")
    if not reg:
        return ["Not run.", ""]
    if reg.get("status") != "ok":
        return [f"Failed: {reg.get('status')}", ""]
    return [
        "| measurement | value |",
        "|---|---|",
        f"| `get_layer_factory` lookup, median of {reg['lookup_calls']}-call batches | "
        f"{reg['lookup_median_s'] * 1e6:.2f} µs (min {reg['lookup_min_s'] * 1e6:.2f}, max "
        f"{reg['lookup_max_s'] * 1e6:.2f}) |",
        f"| registration of a Llama decoder layer, hidden 8192 "
        f"({reg['big_layer_params'] / 1e6:.0f} M params, "
        f"{reg['big_layer_params'] * 4 / 2**30:.1f} GiB in float32), meta validation, median of "
        f"{reg['register_repeats']} | {reg['register_median_s'] * 1e3:.1f} ms (first "
        f"{reg['register_first_s'] * 1e3:.1f}, min {reg['register_min_s'] * 1e3:.1f}, max "
        f"{reg['register_max_s'] * 1e3:.1f}) |",
        f"| RSS growth: after the first registration / after all | "
        f"{reg['rss_growth_first_kb'] / 1024:.1f} MB / {reg['rss_growth_total_kb'] / 1024:.1f} MB |",
        "",
    ]


def _charts(d: _Data, out_dir: Path) -> list[str]:
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return []
    made: list[str] = []
    colors = {"transformers": "#4c72b0", "accelerate": "#dd8452", "airllm": "#55a868",
              "nexus_sli": "#c44e52"}  # fmt: skip
    cells = d.cells()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.2
    for j, system in enumerate(ORDER):
        walls, errs_lo, errs_hi, rss = [], [], [], []
        for w, c in cells:
            runs = d.runs(system, w, c)
            values = [r["wall_s"] for r in runs]
            m = _med(values)
            walls.append(m)
            errs_lo.append(m - min(values) if values else 0)
            errs_hi.append(max(values) - m if values else 0)
            rss.append(_med(r["peak_rss_kb"] / 1024 for r in runs) / 1024)
        xs = [i + (j - 1.5) * width for i in range(len(cells))]
        axes[0].bar(xs, walls, width, yerr=[errs_lo, errs_hi], label=NAMES[system],
                    color=colors[system], capsize=2)  # fmt: skip
        axes[1].bar(xs, rss, width, label=NAMES[system], color=colors[system])
    labels = [f"{w} {c}" for w, c in cells]
    for ax, title, unit in ((axes[0], "wall time (median, min–max)", "s"),
                            (axes[1], "peak RSS (median)", "GiB")):  # fmt: skip
        ax.set_xticks(range(len(cells)))
        ax.set_xticklabels(labels)
        ax.set_ylabel(unit)
        ax.set_title(title)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{d.spec.name}: {d.spec.n_params() / 1e9:.2f} B params, float32, "
                 f"{d.meta.get('cores')} cores")  # fmt: skip
    fig.tight_layout()
    fig.savefig(out_dir / "wall_memory.png", dpi=110)
    plt.close(fig)
    made.append("wall_memory.png")

    ks = [int(k) for k in d.plan.get("sweep", [])]
    if ks:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for system in ORDER:
            pts = [(k, _med(r["wall_s"] for r in d.sweep_runs(system, k))) for k in ks]
            pts = [(k, w) for k, w in pts if w == w]
            if pts:
                style = "o-" if system in SWEEP else "s"  # (a): its W1/W2 runs, for reference
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=NAMES[system],
                        color=colors[system])  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel(f"micro-batches of {d.plan['micro']} x {d.plan['seq']} tokens")
        ax.set_ylabel("wall s (median, warm cache)")
        ax.set_title("micro-batch sweep")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "sweep.png", dpi=110)
        plt.close(fig)
        made.append("sweep.png")

    medians = [(c, _median_run(d.runs("nexus_sli", "W1", c))) for c in ("warm", "cold")]
    present = [(c, r) for c, r in medians if r is not None and r.get("timeline")]
    if present:
        fig, axes = plt.subplots(len(present), 1, figsize=(11, 1.9 + 1.6 * len(present)),
                                 squeeze=False)  # fmt: skip
        for ax, (cache, run) in zip(axes[:, 0], present, strict=True):
            assert run is not None
            reads = [(s, e - s) for s, e in _unit_reads(run)[0]]
            t = reads[0][0] if reads else 0.0
            waits, comps, writes = [], [], []
            for _, wait, comp, write in run["timeline"]:
                waits.append((t, wait))
                comps.append((t + wait, comp))
                writes.append((t + wait + comp, write))
                t += wait + comp + write
            ax.broken_barh(reads, (2, 0.8), color="#4c72b0", edgecolor="white")
            ax.broken_barh(waits, (1, 0.8), color="#dd8452", edgecolor="white")
            ax.broken_barh(comps, (0, 0.8), color="#c44e52", edgecolor="white")
            ax.broken_barh(writes, (0, 0.8), color="#333333")
            ax.set_yticks([0.4, 1.4, 2.4])
            ax.set_yticklabels(["compute (+write)", "blocked", "read (prefetch)"])
            ax.set_title(f"(d) per-layer timeline, W1 {cache} cache")
            ax.set_xlabel("s since the first layer read began")
        fig.tight_layout()
        fig.savefig(out_dir / "timeline.png", dpi=110)
        plt.close(fig)
        made.append("timeline.png")
    return made


def _plan_notes(d: _Data) -> list[str]:
    counts: dict[str, int] = {}
    for r in d.records:
        if r.get("status") == "ok" and r["system"] == "nexus_sli":
            key = f"{r['workload']} {r['cache']}"
            counts[key] = counts.get(key, 0) + 1
    done = ", ".join(f"{k}: {v}" for k, v in counts.items()) or "none yet"
    p = d.plan
    lines = [
        f"Runs of each system per cell in this report: {done} (a cell's systems alternate "
        f"A B C D within each round; the sweep's 1 and {p['w2_micro_batches']} micro-batch "
        f"points are the warm W1 and W2 runs); {p['threads']} torch threads per process.",
    ]
    full = (
        counts.get("W1 warm", 0) >= 3
        and counts.get("W1 cold", 0) >= 3
        and counts.get("W2 warm", 0) >= 3
        and counts.get("W2 cold", 0) >= 3
        and all(k in p["sweep"] for k in (1, 2, 4, 8, 16))
    )
    if not full and not p.get("quick"):
        lines.append(
            "**This report is reduced from the full plan** (3 rounds of W1 and W2, warm and "
            "cold, sweep 1, 2, 4, 8, 16): see the notes below for why and what was left out."
        )
    return [*lines, ""]


def _large_summary(out_dir: Path) -> list[str]:
    """The targets of a ``--large`` run kept in ``out_dir/large`` (its own RESULTS.md there)."""
    path = out_dir / "large" / "results.json"
    if not path.is_file() or out_dir.name == "large":
        return []
    large = _Data(json.loads(path.read_text()))
    runs = sorted({int(r["round"]) for r in large.records})
    return [
        f"## Large checkpoint: {large.spec.n_params() / 1e9:.2f} B parameters "
        f"({large.spec.num_hidden_layers} layers), W1",
        "",
        f"From `{large.meta.get('command', '?')}` ({large.meta.get('date', '?')}, "
        f"{len(runs)} rounds); every table, the timeline and the charts of that run are in "
        f"[large/RESULTS.md](large/RESULTS.md).",
        "",
        "| target | measured | aim | verdict | per round |",
        "|---|---|---|---|---|",
        *_target_rows(large),
        "",
    ]


def write_report(data: dict[str, Any], out_dir: Path, *, charts: bool = True) -> None:
    """Write ``RESULTS.md`` (and the charts) into ``out_dir`` from the run's data."""
    d = _Data(data)
    meta = d.meta
    made = _charts(d, out_dir) if charts and d.records else []
    versions = meta.get("versions", {})
    loads = [r["loadavg_before"][0] for r in d.records if "loadavg_before" in r]
    invocations = meta.get("invocations") or [
        {"command": meta.get("command", "?"), "date": meta.get("date", "?")}
    ]
    now = time.time()
    elapsed = sum(float(i.get("finished", now)) - float(i.get("started", now)) for i in invocations)
    finished = "finished" in meta
    lines = [
        "# nexus_sli benchmark results",
        "",
        "Command"
        + ("s" if len(invocations) > 1 else "")
        + ": "
        + "; then ".join(f"`{i['command']}` ({i['date']})" for i in invocations)
        + f" ({'complete' if finished else 'IN PROGRESS'}; {elapsed / 60:.0f} min).",
        "",
        f"Machine: {meta.get('cpu', '?')}, {meta.get('cores', '?')} cores, "
        f"{meta.get('mem_gib', '?')} GiB RAM, no GPU, Linux {meta.get('kernel', '?')}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + ".",
        "",
        f"Load average (1 min) at start {meta.get('loadavg_start', [float('nan')])[0]:.2f}"
        + (
            f"; before each measurement: median {_med(loads):.2f}, min {min(loads):.2f}, "
            f"max {max(loads):.2f}"
            if loads
            else ""
        )
        + (f"; at end {meta['loadavg_end'][0]:.2f}" if "loadavg_end" in meta else "")
        + ". The machine is shared (other jobs ran on the same 2 cores): systems alternate "
        "in rounds so that load affects all alike, and min–max ranges show its spread.",
        "",
        f"Model: random Llama, {d.spec.n_params() / 1e9:.2f} B parameters (hidden "
        f"{d.spec.hidden_size}, intermediate {d.spec.intermediate_size}, "
        f"{d.spec.num_attention_heads} heads, {d.spec.num_key_value_heads} kv heads, "
        f"{d.spec.num_hidden_layers} layers, vocab {d.spec.vocab_size}), float32, sharded "
        f"safetensors; base-model weights {d.weight_bytes / 1e9:.2f} GB (+ LM head "
        f"{meta.get('lm_head_bytes', 0) / 1e9:.2f} GB, not run).",
        "",
        f"Bounds measured in this run: plain torch matmul (best of the rounds) "
        f"peak {_fmt(d.peak)} GFLOP/s (median {_fmt(d.peak_median)}; float32, "
        f"{d.plan['threads']} threads; per round: "
        + ", ".join(f"{m['matmul_gflops']:.0f}" for m in d.machine)
        + f"), cold sequential disk read (median of the rounds) {d.bw / 1e6:.0f} MB/s (per "
        f"round: " + ", ".join(f"{m['disk_bw'] / 1e6:.0f}" for m in d.machine) + ").",
        "",
        *_plan_notes(d),
        "## Targets",
        "",
        "Ratios are of the medians; the last column gives the same figure within each round "
        "(the systems of a round ran minutes apart, so load drifts largely cancel in them).",
        "",
        "| target | measured | aim | verdict | per round |",
        "|---|---|---|---|---|",
        *_target_rows(d),
        "",
        *_large_summary(out_dir),
        "## Results per workload",
        "",
    ]
    for w, c in d.cells():
        if any(r["workload"] == w and r["cache"] == c for r in d.records):
            lines += _main_table(d, w, c)
    if any(str(r["workload"]).startswith(("W2", "sweep")) for r in d.records):
        lines += ["## Micro-batch sweep (warm cache)", "", *_sweep_lines(d)]
    lines += ["## Streaming per-layer timeline", "", *_timeline_lines(d)]
    lines += ["## Registry micro-benchmarks", "", *_registry_lines(d)]
    if made:
        lines += ["## Charts", ""] + [f"![{m}]({m})" for m in made] + [""]
    errors = [r for r in d.records if r.get("status") not in ("ok", "not installed")]
    if errors:
        lines += ["## Failed measurements", ""]
        for r in errors:
            lines.append(f"- {r['system']} {r['workload']} {r['cache']} round {r['round']}: "
                         f"{r['status']}")  # fmt: skip
        lines.append("")
    notes_path = out_dir / "NOTES.md"
    if notes_path.is_file() and not d.plan.get("quick"):
        lines += [notes_path.read_text().rstrip(), ""]
    (out_dir / "RESULTS.md").write_text("\n".join(lines))
