"""The launcher starts N ranks itself; a dead or stuck rank ends the whole job with a clear message in < 60 s."""

import pytest

from cli_utils import run_cli
from paradiff.runtime import DEFAULT_TIMEOUT_S


def test_two_ranks_all_reduce():
    proc, _ = run_cli("info", "--check", "--nproc", "2")
    assert proc.returncode == 0, proc.stderr
    assert "all-reduce over 2 rank(s): OK" in proc.stdout
    assert "(backend gloo" in proc.stdout


@pytest.mark.slow  # 2 ranks (test_two_ranks_all_reduce is the launcher's fast smoke test)
def test_a_dead_rank_ends_the_job():
    proc, seconds = run_cli("info", "--check", "--nproc", "2", "--fault-rank", "1", "--fault", "die")
    assert proc.returncode == 1
    assert "rank 1 failed (exit code 17, first to fail)" in proc.stderr
    assert seconds < 60
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_stuck_rank_ends_the_job_within_a_minute():
    # A 10 s collective timeout, not the 45 s default: the run takes start-up + timeout + teardown, so the same run
    # at the default timeout takes DEFAULT_TIMEOUT_S - 10 s longer (checked below) without the test waiting it out.
    proc, seconds = run_cli("info", "--check", "--nproc", "2", "--fault-rank", "1", "--fault", "hang", timeout=120,
                            env={"PARADIFF_TIMEOUT": "10"})
    assert proc.returncode == 1
    assert "rank 0: a collective failed" in proc.stderr
    assert "the job was stopped" in proc.stderr
    assert seconds < 60, f"took {seconds:.0f} s"
    assert seconds - 10 + DEFAULT_TIMEOUT_S < 60, f"took {seconds:.0f} s at a 10 s timeout"
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # 2 ranks, waits out a 5 s timeout
def test_timeout_is_configurable():
    proc, seconds = run_cli("info", "--check", "--nproc", "2", "--fault-rank", "0", "--fault", "hang",
                            env={"PARADIFF_TIMEOUT": "5"})
    assert proc.returncode == 1
    assert "rank 1: a collective failed" in proc.stderr and "(timeout 5 s)" in proc.stderr
    assert seconds < 40


def test_bad_timeout_value():
    proc, _ = run_cli("info", "--check", "--nproc", "2", env={"PARADIFF_TIMEOUT": "soon"})
    assert proc.returncode != 0
    assert "PARADIFF_TIMEOUT must be a number" in proc.stderr


@pytest.mark.slow  # 2 ranks under torchrun
def test_the_same_command_runs_under_torchrun():
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "paradiff", "info", "--check"], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "all-reduce over 2 rank(s): OK" in proc.stdout


def test_nproc_must_match_a_torchrun_job():
    # As a torchrun worker sees it (torchrun's own parser would take `--nproc` for `--nproc-per-node`).
    proc, _ = run_cli("info", "--check", "--nproc", "3",
                      env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"})
    assert proc.returncode == 2
    assert "--nproc 3 does not match the 2 ranks" in proc.stderr
