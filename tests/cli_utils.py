"""Run the real `python -m paradiff` entry point in a process of its own, as a user would.

By default the process is forked from the tests' fork server (`support.preload`: torch, diffusers, transformers and
paradiff already imported), in a session of its own, with its stdout and stderr (file descriptors 1 and 2, so the
ranks a `--nproc` run starts write there too) captured: the same code path as a fresh `python -m paradiff` minus the
~9 s of imports on a 2-CPU machine. `fresh=True` starts a new interpreter instead (for what imports themselves do).

Multi-rank runs get the tests' short collective timeout (PARADIFF_TIMEOUT, as in support.distributed.run_ranks)
unless the test passes its own, so that a broken run fails in seconds, not after the 45 s default.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

from support.distributed import RANK_TIMEOUT_S, _context


def _cli_child(args: tuple, env: dict, out_path: str, err_path: str) -> None:
    """The forked process: `python -m paradiff *args` with `env`, its output in the two files."""
    import runpy
    import traceback

    os.setsid()
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out_path), (2, err_path)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))  # what the variable does at a fresh import
    sys.argv = ["paradiff", *args]
    code = 0
    try:
        runpy.run_module("paradiff", run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if stop.code is not None and not isinstance(stop.code, int):
            print(stop.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _forked(args: tuple, env: dict, timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as folder:
        out_path, err_path = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        proc = _context().Process(target=_cli_child, args=(args, env, out_path, err_path))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the process and the ranks it started
            except ProcessLookupError:
                pass
            proc.join(5)
            raise subprocess.TimeoutExpired(["paradiff", *args], timeout)
        with open(out_path) as out, open(err_path) as err:
            return subprocess.CompletedProcess(["paradiff", *args], proc.exitcode, out.read(), err.read())


def run_cli(*args: str, timeout: float = 240, env: dict | None = None,
            fresh: bool = False) -> tuple[subprocess.CompletedProcess, float]:
    full_env = {"PARADIFF_TIMEOUT": str(RANK_TIMEOUT_S), **os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                **(env or {})}
    start = time.monotonic()
    if fresh:
        proc = subprocess.run([sys.executable, "-m", "paradiff", *args], capture_output=True, text=True,
                              timeout=timeout, env=full_env)
    else:
        proc = _forked(args, full_env, timeout)
    return proc, time.monotonic() - start
