"""Rank 0's request queue -> every rank: the loop all ranks run while serving, one generation at a time.

Rank 0 holds a bounded queue that the HTTP app fills (from uvicorn's thread). Its main thread takes one request at
a time and broadcasts it (`paradiff.comm.broadcast_object`) to every rank; all ranks run the same pipeline call,
then all-gather a status (ok / failed), and rank 0 resolves the request's future with its images. The other ranks
loop: receive a message, run it. Messages are ("job", id, params, draining), ("tick", draining) and ("stop",);
`draining` tells the other ranks that rank 0 is stopping (so a rank that got SIGTERM too knows to wait for it).

Faults end the server instead of leaving it half alive:
- idle ranks are not left waiting in a collective longer than the collective timeout: rank 0 sends a tick (a
  broadcast plus the status all-gather, both ways) every `tick_s` seconds, so a rank that hangs while the server is
  idle is found within PARADIFF_TIMEOUT as well as one that hangs during a generation;
- a failed or timed-out collective, or a request that fails on some ranks but not on the others (the ranks may be
  out of step), raises `RankFailure` on the rank that sees it; rank 0 first fails every queued request and stops
  accepting (`Phase.FAILED`), so the process exits non-zero and a supervisor restarts it;
- a request that fails the same way on every rank (a consistent pipeline error) fails only that request.
"""

from __future__ import annotations

import collections
import enum
import itertools
import math
import re
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable


class Phase(str, enum.Enum):
    LOADING = "loading"
    WARMING_UP = "warming up"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


class NotAccepting(Exception):
    """The server does not take requests now (loading, warming up, draining, failed): HTTP 503."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(NotAccepting):
    """The bounded queue is full: HTTP 503 with Retry-After."""


class ServerStopping(Exception):
    """An accepted request that will not run: the server stopped (a rank failed)."""


class RankFailure(Exception):
    """The ranks can no longer serve together (a rank died, hung, or went out of step): the server must exit."""


@dataclass(eq=False)
class Job:
    id: int
    params: dict
    submitted: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)
    started: float | None = None
    generation_s: float | None = None

    @property
    def queue_s(self) -> float | None:
        return None if self.started is None else self.started - self.submitted


def _is_collective_failure(err: BaseException) -> bool:
    from paradiff.comm.collectives import is_collective_failure
    from paradiff.errors import CollectiveError

    return isinstance(err, CollectiveError) or is_collective_failure(err)


def _first_line(err: BaseException) -> str:
    """The cause in a few words: the backend's own message, without CollectiveError's advice for user scripts
    (calling the pipeline on rank 0 only does not happen here) or gloo's source locations."""
    from paradiff import comm

    text = str(err).replace(getattr(comm, "LIKELY_CAUSE", "") or "\0", "").strip()
    text = text.splitlines()[0] if text else ""
    match = re.search(r"failed on this rank \((.*)\)\.?$", text)
    if match:
        text = match.group(1)
    text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\] ", "", text).split(". ")[0].strip()
    if len(text) > 200:
        text = text[:200].rsplit(" ", 1)[0] + " ..."
    return text or type(err).__name__


class Dispatcher:
    """The serving loop of one rank; on rank 0 also the bounded queue the HTTP app submits to.

    `runner(params) -> result` runs one generation; every rank calls it with the same params, in the same order.
    """

    def __init__(self, runner: Callable[[dict], Any], *, max_queue: int = 16, rank: int = 0, world_size: int = 1,
                 device: Any = None, tick_s: float | None = None, log: Callable[[str], None] | None = None):
        from paradiff import runtime

        self.runner = runner
        self.max_queue = max_queue
        self.main = rank == 0
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.tick_s = tick_s if tick_s is not None else min(1.0, runtime.timeout_seconds() / 8)
        self.phase = Phase.LOADING
        self.failure: str | None = None
        self.busy = False
        self.draining_seen = False  # other ranks: rank 0 said it is draining
        self.idle_since = time.monotonic()
        self._cond = threading.Condition(threading.RLock())
        self._queue: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._ids = itertools.count(1)
        self._generation_ema: float | None = None
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.watch: Callable[[], str | None] | None = None
        """Rank 0: called between requests; a reason string stops the server (e.g. the HTTP thread died)."""

    # -- rank 0, any thread ------------------------------------------------------------------------------------

    def depth(self) -> int:
        return len(self._queue)

    def retry_after(self) -> int:
        """Seconds after which a refused client may try again: about the time to work through the queue."""
        if self.phase in (Phase.LOADING, Phase.WARMING_UP):
            return 10
        if self.phase is not Phase.READY:
            return 30
        per_job = self._generation_ema or 5.0
        return int(min(300, max(1, math.ceil((self.depth() + 1) * per_job))))

    def submit(self, params: dict) -> Job:
        """Queue a request; raises `NotAccepting` (not ready, draining, failed) or `QueueFull`."""
        with self._cond:
            if self.phase is not Phase.READY:
                reason = {Phase.LOADING: "is loading the model", Phase.WARMING_UP: "is warming up",
                          Phase.DRAINING: "is shutting down", Phase.STOPPED: "has stopped",
                          Phase.FAILED: "has failed and is stopping"}[self.phase]
                raise NotAccepting(f"the server {reason}; try again later.", self.retry_after())
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); try again later.",
                                self.retry_after())
            job = Job(next(self._ids), params)
            self._queue.append(job)
            self._cond.notify_all()
            return job

    def discard(self, job: Job) -> bool:
        """Take a request that has not started off the queue (deadline passed, client gone). False if it runs."""
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return False
            job.future.cancel()
            return True

    def set_phase(self, phase: Phase) -> None:
        with self._cond:
            if self.phase in (Phase.DRAINING, Phase.FAILED, Phase.STOPPED) and phase in (Phase.WARMING_UP,
                                                                                         Phase.READY):
                return  # a stop asked for during loading or warm-up wins
            self.phase = phase
            self._cond.notify_all()

    def request_stop(self) -> None:
        """Drain: refuse new requests, finish the queued ones, then stop every rank (SIGTERM/SIGINT on rank 0)."""
        with self._cond:
            if self.phase in (Phase.LOADING, Phase.WARMING_UP, Phase.READY):
                self.phase = Phase.DRAINING
                self._log(f"paradiff serve: stopping: finishing {len(self._queue) + (1 if self.busy else 0)} "
                          "accepted request(s), refusing new ones")
            self._cond.notify_all()

    def fail(self, reason: str) -> None:
        """Stop accepting and fail every accepted request (the ranks cannot run them any more)."""
        with self._cond:
            self.phase = Phase.FAILED
            self.failure = reason
            pending = list(self._queue) + ([self._running] if self._running is not None else [])
            self._queue.clear()
            self._cond.notify_all()
        for job in pending:
            if not job.future.done():
                job.future.set_exception(ServerStopping(f"the server is stopping: {reason}"))

    # -- every rank, main thread ---------------------------------------------------------------------------------

    def warm_up(self, jobs: list[dict]) -> list[float]:
        """Run each warm-up request on every rank (compiles and captures each size); seconds per request."""
        self.set_phase(Phase.WARMING_UP)
        seconds = []
        for params in jobs:
            start = time.perf_counter()
            try:
                self.runner(params)
            except Exception as err:
                if _is_collective_failure(err):
                    self._fatal(f"a rank died or stopped responding during warm-up ({_first_line(err)})", err)
                raise
            seconds.append(time.perf_counter() - start)
            self._generation_ema = seconds[-1]
        return seconds

    def run(self) -> None:
        """Serve until rank 0 stops: every rank runs the same requests in the same order. Raises `RankFailure`."""
        self.set_phase(Phase.READY)
        while True:
            message = self._next_message() if self.main else None
            try:
                message = self._broadcast(message)
            except Exception as err:  # noqa: BLE001 - any failure here means the ranks are no longer together
                self._fatal(f"a rank died or stopped responding ({_first_line(err)})", err)
            kind = message[0]
            if kind == "stop":
                if self.main and self.phase is Phase.FAILED:
                    raise RankFailure(self.failure or "the server failed")
                break
            self.draining_seen = self.draining_seen or bool(message[-1])
            if kind == "tick":
                self._exchange(0, "the serve heartbeat")
                continue
            _, job_id, params, _ = message
            self.busy = True
            try:
                self._run_job(job_id, params)
            finally:
                self.busy, self.idle_since = False, time.monotonic()
        with self._cond:
            self.phase = Phase.STOPPED
            self._cond.notify_all()

    def _next_message(self) -> tuple:
        with self._cond:
            deadline = time.monotonic() + self.tick_s
            while True:
                while self._queue:
                    job = self._queue.popleft()
                    if job.future.set_running_or_notify_cancel():
                        job.started = time.monotonic()
                        self._running, self.busy = job, True
                        return ("job", job.id, job.params, self.phase is Phase.DRAINING)
                if self.phase in (Phase.DRAINING, Phase.FAILED):
                    return ("stop",)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    problem = self.watch() if self.watch is not None else None
                    if problem is not None:
                        self.fail(problem)  # the condition's lock is an RLock
                        return ("stop",)
                    return ("tick", self.phase is Phase.DRAINING)
                self._cond.wait(remaining)

    def _run_job(self, job_id: int, params: dict) -> None:
        start = time.perf_counter()
        result, error = None, None
        try:
            result = self.runner(params)
        except Exception as err:  # noqa: BLE001 - reported to the client, or fatal below
            if _is_collective_failure(err):
                self._fatal(f"a rank died or stopped responding during request {job_id} ({_first_line(err)})", err)
            error = err
        seconds = time.perf_counter() - start
        statuses = self._exchange(0 if error is None else 1, f"the status of request {job_id}")
        failed = [rank for rank, status in enumerate(statuses) if status]
        if failed and len(failed) < len(statuses):
            detail = f": {type(error).__name__}: {_first_line(error)}" if error is not None else ""
            self._fatal(f"request {job_id} failed on rank(s) {', '.join(map(str, failed))} but not on the others"
                        f"{detail}; the ranks may be out of step", error)
        if not self.main:
            return
        with self._cond:
            job, self._running = self._running, None
        if job is None or job.id != job_id:
            return
        job.generation_s = seconds
        if error is None:
            self._generation_ema = seconds if self._generation_ema is None else 0.8 * self._generation_ema + 0.2 * seconds
            job.future.set_result(result)
        else:
            job.future.set_exception(error)

    def _fatal(self, reason: str, cause: BaseException | None) -> None:
        if self.main:
            self.fail(reason)
        raise RankFailure(reason) from cause

    def _broadcast(self, message: tuple | None) -> tuple:
        if self.world_size == 1:
            return message
        from paradiff import comm

        return comm.broadcast_object(message, src=0, what="the next serve request")

    def _exchange(self, status: int, what: str) -> list[int]:
        """All-gather one status per rank: a collective both ways, so a rank that stopped responding is found."""
        if self.world_size == 1:
            return [status]
        import torch
        import torch.distributed as dist

        from paradiff import comm

        try:
            flags = comm.all_gather(torch.tensor([status], dtype=torch.int32, device=self.device), 0,
                                    dist.group.WORLD)
            return [int(v) for v in flags.tolist()]
        except Exception as err:  # noqa: BLE001 - CollectiveError or a backend error: the ranks are not together
            self._fatal(f"a rank died or stopped responding during {what} ({_first_line(err)})", err)
            raise  # not reached
