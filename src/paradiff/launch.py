"""Start N local ranks with PyTorch's elastic launcher (what torchrun runs), so `paradiff <cmd> --nproc N` needs no
torchrun line. Multi-node jobs use torchrun itself: `torchrun --nnodes 2 --nproc-per-node 8 ... -m paradiff <cmd>`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid

IN_LAUNCHED_JOB = "LOCAL_RANK"
"""Environment variable torchrun (and our launcher) sets in every worker: present means 'already a rank'."""


def in_launched_job() -> bool:
    return IN_LAUNCHED_JOB in os.environ


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _child_pids() -> list[int]:
    """This process's children (Linux /proc; empty elsewhere): the ranks the elastic agent started."""
    me, pids = os.getpid(), []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return pids
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and fields[1] == str(me):
            pids.append(int(entry))
    return pids


def _forward_to_ranks(signum, frame) -> None:
    pids = _child_pids()
    if not pids:  # the ranks have not started (or have all gone): nothing will drain, stop the launcher
        raise KeyboardInterrupt
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def launch(nproc: int, argv: list[str], *, module: str = "paradiff", forward_stop_signals: bool = False) -> int:
    """Run `python -m <module> <argv>` on `nproc` local ranks; return 0, or 1 with one line per failed rank.

    The launcher stops every rank as soon as one fails (no restarts), so a dead rank ends the job.
    `forward_stop_signals` (serve): SIGTERM and SIGINT are passed on to the ranks, which stop in their own time
    (a server drains its queue), and the launcher exits with their status, instead of the agent's default of
    stopping them within a few seconds and exiting with an error.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The agent's own INFO/WARNING banners drown the job's output; our summary below says what failed.
    for name in ("torch.distributed.elastic", "torch.distributed.elastic.multiprocessing.api",
                 "torch.distributed.elastic.agent.server.api", "torch.distributed.launcher.api"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    extra = {}
    forwarding = (forward_stop_signals and os.path.isdir("/proc")
                  and "signals_to_handle" in getattr(LaunchConfig, "__dataclass_fields__", {}))
    if forwarding:
        extra["signals_to_handle"] = "SIGHUP,SIGQUIT"  # the agent still stops the ranks on these
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
        shutdown_timeout=5,
        **extra,
    )
    previous = {}
    if forwarding:
        previous = {sig: signal.signal(sig, _forward_to_ranks) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        elastic_launch(config, sys.executable)("-m", module, *argv)
    except ChildFailedError as err:
        first_rank, _ = err.get_first_failure()
        for rank, failure in sorted(err.failures.items()):
            cause = "first to fail" if rank == first_rank else "stopped after"
            print(
                f"paradiff: rank {rank} failed ({_describe_exit(failure.exitcode)}, {cause}); the job was stopped.",
                file=sys.stderr,
            )
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
