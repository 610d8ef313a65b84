"""benchmarks/core_regression.py (before/after check of the execution core) runs end to end on tiny models, and
patch_bench.fake_collectives replaces every binding of paradiff's all-gathers (the comm package's layout)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_fake_collectives_replaces_every_binding():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import patch_bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from paradiff.comm import collectives, stale

    real = collectives._all_gather, stale._all_gather, stale._start_all_gather, stale._wait_started
    replaced = patch_bench.fake_collectives(True)
    try:
        assert {"paradiff.comm.collectives._all_gather", "paradiff.comm.stale._all_gather",
                "paradiff.comm.stale._start_all_gather", "paradiff.comm.stale._wait_started"} <= set(replaced)
        assert collectives._all_gather is stale._all_gather is patch_bench._FAKES["_all_gather"]
    finally:
        patch_bench.fake_collectives(False)
    assert (collectives._all_gather, stale._all_gather, stale._start_all_gather, stale._wait_started) == real


@pytest.mark.slow
def test_core_regression_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CORE_SMOKE": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "c")}
    env["PYTHONPATH"] = str(ROOT / "src")  # replaced per tree by the driver
    proc = subprocess.run([sys.executable, "benchmarks/core_regression.py", "--before", ".", "--after", ".",
                           "--section", "all", "--rounds", "2", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "core-all.json").read_text())
    assert [r["config"] for r in result["summary"]] == ["stream-b4", "stream-b1", "patch", "baseline", "cfg"]
    assert all(r["after_over_before"] > 0 and r["verdict"] for r in result["summary"])
    assert len(result["rounds"]) == 2
    for role in ("before", "after"):
        tree = result["trees"][role]
        assert tree["errors"] == {} and Path(tree["paradiff_file"]).is_relative_to(ROOT / "src")
        assert "_all_gather" in " ".join(tree["emulation"].get("replaced", [])) or "emulate" in tree["emulation"]["via"]
    assert "| patch | ms per step |" in (tmp_path / "core-all.md").read_text()
