"""Run the real `python -m paradiff` entry point in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def run_cli(*args: str, timeout: float = 240, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "paradiff", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    return proc, time.monotonic() - start
