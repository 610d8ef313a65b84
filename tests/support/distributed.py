"""Run a function on N gloo ranks (CPU processes) and collect each rank's return value, for multi-rank tests.

    from support.distributed import run_ranks
    outputs = run_ranks(my_module_level_fn, 2, arg1, arg2)   # list indexed by rank

`fn` must be a module-level function (it is pickled into spawned processes). It runs after
`paradiff.runtime.init("cpu")`, so `paradiff.runtime.get()` gives the rank. Return values travel back through
`torch.save`, so tensors, numpy arrays and plain Python objects all work. A failing rank fails the call with its
traceback; a rank that hangs fails it after `timeout` seconds.
"""

from __future__ import annotations

import io
import os
import queue as queue_module
import socket
import traceback

import torch
import torch.multiprocessing as mp


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


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0, env: dict | None = None) -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, results, dict(env or {})), daemon=True)
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
                timeout = min(timeout, 60.0)  # the others usually fail soon after: show every rank's error
    finally:
        for proc in procs:
            proc.join(timeout=10 if not errors else 1)
            if proc.is_alive():
                proc.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [outputs[rank] for rank in range(world_size)]
