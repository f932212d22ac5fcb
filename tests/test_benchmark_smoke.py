"""The benchmark's smoke run: tiny model, one round, every system, so that it cannot rot.

No timing is asserted (benchmarks are not tests): only that the command runs end to end, that
(a) and (d) run and agree, that a system whose package is missing is reported as such, and that
the report is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_benchmark_quick_run(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--no-charts", "--out", str(out)],
        cwd=str(REPO),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((out / "results.json").read_text())
    by_system: dict[str, list[dict[str, object]]] = {}
    for record in data["records"]:
        by_system.setdefault(str(record["system"]), []).append(record)
    assert set(by_system) == {"transformers", "accelerate", "airllm", "nexus_sli"}
    for system in ("transformers", "nexus_sli"):
        assert by_system[system], system
        for record in by_system[system]:
            assert record["status"] == "ok", record
    for system in ("accelerate", "airllm"):
        for record in by_system[system]:
            assert record["status"] in ("ok", "not installed"), record
    for record in by_system["nexus_sli"]:
        diff = record.get("max_abs_diff")
        assert isinstance(diff, float) and diff <= 1e-4, record
    assert data["meta"]["registry"]["status"] == "ok"
    report = (out / "RESULTS.md").read_text()
    assert "## Targets" in report and "(d) nexus_sli" in report
