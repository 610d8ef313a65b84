"""Run a function on N gloo ranks (CPU processes) and collect each rank's return value, for multi-rank tests.

    from support.distributed import run_ranks
    outputs = run_ranks(my_module_level_fn, 2, arg1, arg2)   # list indexed by rank

`fn` must be a module-level function (it is pickled into the rank processes, forked from a fork server that has
imported torch, diffusers and paradiff once: `support.preload`). It runs after
`paradiff.runtime.init("cpu")`, so `paradiff.runtime.get()` gives the rank. Return values travel back through
`torch.save`, so tensors, numpy arrays and plain Python objects all work. A failing rank fails the call with its
traceback; a rank that hangs fails it after `timeout` seconds.

The ranks' collectives time out after RANK_TIMEOUT_S (PARADIFF_TIMEOUT, unless `env` or the calling environment
sets it), not the 45 s default: when one rank fails, the others stop waiting for it soon, and the call reports
every rank's error within about that time.
"""

from __future__ import annotations

import io
import os
import queue as queue_module
import socket
import traceback

import torch
import torch.multiprocessing as mp

RANK_TIMEOUT_S = 20.0
"""The ranks' collective timeout (PARADIFF_TIMEOUT) unless the test or its environment gives one."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, fn, args, results, env):
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    from paradiff import runtime

    runtime._runtime = None
    try:
        runtime.init("cpu")
        value = fn(*args)
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        runtime.shutdown()


def _context():
    """A fork server that has imported the heavy modules once: each rank forks from it (a clean single-threaded
    process, like spawn's) instead of importing torch and diffusers anew."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["support.preload"])
    return ctx


def _rank_env(env: dict | None) -> dict:
    env = dict(env or {})
    env.setdefault("PARADIFF_TIMEOUT", os.environ.get("PARADIFF_TIMEOUT") or str(RANK_TIMEOUT_S))
    return env


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0, env: dict | None = None) -> list:
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    env = _rank_env(env)
    try:  # after a first failure, wait for the others' reports about one collective timeout (plus teardown)
        after_failure = float(env["PARADIFF_TIMEOUT"]) + 15.0
    except ValueError:  # a test of a bad value: the ranks fail at init
        after_failure = 15.0
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, results, env), daemon=True)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    outputs: dict[int, object] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            try:
                rank, ok, payload = results.get(timeout=timeout)
            except queue_module.Empty:
                if errors:
                    break
                raise TimeoutError(f"ranks did not finish within {timeout} s") from None
            if ok:
                outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                timeout = min(timeout, after_failure)  # the others fail soon after: show every rank's error
    finally:
        for proc in procs:
            proc.join(timeout=10 if not errors else 1)
            if proc.is_alive():
                proc.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [outputs[rank] for rank in range(world_size)]
