"""benchmarks/patch_bench.py and patch_profile.py run end to end on a tiny UNet on the CPU (2 gloo ranks, or one
process emulating rank 0 of 2) and write their JSON + markdown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv, torchrun=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"] if torchrun else [sys.executable]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.parametrize("emulate", [False, True], ids=["gloo-2-ranks", "emulated-rank-0-of-2"])
def test_patch_bench_tiny(tmp_path, emulate):
    # the emulated run (how GPU sessions measure one rank) goes through torch.compile (dynamo, eager backend: the
    # compiled step's own behaviour is pinned in test_patch_compile.py); the gloo run, every config, eagerly
    configs = "baseline,patch" if emulate else "baseline,patch,patch-nocomm,cfg"
    argv = ["benchmarks/patch_bench.py", "--tiny", "--steps", "6", "--repeat", "1", "--configs", configs,
            "--out", str(tmp_path)]
    _run(*argv, *(["--emulate-ranks", "2", "--compile-backend", "eager"] if emulate else []), torchrun=not emulate)
    result = json.loads((tmp_path / "patch-bench.json").read_text())
    rows = {r["config"]: r for r in result["results"]}
    assert set(rows) == set(configs.split(","))
    assert all(r["step_ms"] > 0 and r["loop_ms"] > 0 and r["step_speedup"] > 0 for r in rows.values())
    assert rows["baseline"]["step_speedup"] == 1.0
    assert ("exposed_comm_ms" in rows["patch"]) is not emulate  # patch minus patch-nocomm
    assert result["env"]["world_size"] == 2 and result["env"]["command"].startswith("patch_bench.py")
    assert ("fake" in result["env"]["backend"]) is emulate
    assert result["setup"]["compile_backend"] == ("eager" if emulate else None)
    assert "| patch |" in (tmp_path / "patch-bench.md").read_text()


def test_patch_profile_tiny(tmp_path):
    _run("benchmarks/patch_profile.py", "--tiny", "--steps", "2", "--by-layer", "--out", str(tmp_path))
    result = json.loads((tmp_path / "patch-profile.json").read_text())
    variants = {v["variant"]: v for v in result["variants"]}
    assert set(variants) == {"full", "rows", "patch"}
    assert all(v["kernel_ms_per_step"] > 0 and v["by_kind"] and v["top"] for v in variants.values())
    # the hooked step launches more kernels than the plain UNet on the same rows (halo, gather, statistics)
    assert variants["patch"]["kernel_calls_per_step"] > variants["rows"]["kernel_calls_per_step"]
    assert "| kernels, all |" in (tmp_path / "patch-profile.md").read_text()
    # --by-layer: the eager split by hooked kind of layer; every kind is seen in both, and the hooks add work
    layered = {v["variant"]: v["by_layer"] for v in result["by_layer"]}
    assert set(layered) == {"rows eager", "patch eager"}
    for kind in ("conv kxk (halo)", "groupnorm", "self-attention to_k/to_v (full K/V)"):
        assert layered["rows eager"][kind] > 0 and layered["patch eager"][kind] > 0
    assert layered["patch eager"]["groupnorm"] > layered["rows eager"]["groupnorm"]
    assert "| groupnorm |" in (tmp_path / "patch-profile.md").read_text()


def test_profile_kinds_of_real_kernel_names():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import patch_profile
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    # names seen in the H200 profile: cuDNN's attention says "fprop" too, and must not count as a convolution
    assert patch_profile.kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7") == "attention"
    assert patch_profile.kind_of("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc") == "conv"
    assert patch_profile.kind_of("nvjet_sm90_hsh_168x128_64x5_1x2_h_bz_coopA_bias_TNN") == "gemm"
    assert patch_profile.kind_of("triton_poi_fused_gelu_mul_split_view_72") == "triton pointwise"
