"""Run the real `python -m paradiff` entry point in a subprocess, as a user would.

Multi-rank runs get the tests' short collective timeout (PARADIFF_TIMEOUT, as in support.distributed.run_ranks)
unless the test passes its own, so that a broken run fails in seconds, not after the 45 s default.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from support.distributed import RANK_TIMEOUT_S


def run_cli(*args: str, timeout: float = 240, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    full_env = {"PARADIFF_TIMEOUT": str(RANK_TIMEOUT_S), **os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                **(env or {})}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "paradiff", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    return proc, time.monotonic() - start
