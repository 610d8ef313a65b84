"""benchmarks/core_regression.py (before/after check of the execution core) runs end to end on tiny models, and
patch_bench.fake_collectives replaces every binding of paradiff's all-gathers (the comm package's layout)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_fake_collectives_uses_the_emulation_seam():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import patch_bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from paradiff.comm import collectives, emulate

    torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        assert patch_bench.fake_collectives(True) == ["paradiff.comm.collectives.backend"]
        assert emulate.active()
        x = torch.arange(3.0)
        assert collectives.all_gather(x, 0, torch.distributed.group.WORLD).tolist() == [0.0, 1.0, 2.0] * 2
        patch_bench.fake_collectives(False)
        assert not emulate.active()
    finally:
        collectives.backend = collectives.Collectives()
        torch.distributed.destroy_process_group()


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
