"""Helpers for the `paradiff serve` tests: an in-process server around a fake runner, and a real CLI server."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np


def fake_image(params: dict, i: int = 0):
    """A solid image whose colour encodes the seed, so a test can tell which request an image answers."""
    from PIL import Image

    seed = params["seed"] + i
    colour = (seed % 251, (seed // 251) % 251, params["steps"] % 251)
    return Image.fromarray(np.full((params["height"], params["width"], 3), colour, np.uint8))


class FakeRunner:
    """Records each call; `gate` (an Event) holds calls until set; prompts starting with 'fail' raise."""

    def __init__(self):
        self.calls: list[dict] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def __call__(self, params: dict):
        self.calls.append(params)
        self.started.set()
        self.gate.wait(60)
        if params["prompt"].startswith("fail"):
            raise ValueError("this prompt fails on every rank")
        return [fake_image(params, i) for i in range(params["n"])]


class InProcessServer:
    """Dispatcher + app + uvicorn in this process (one rank, no collectives), on a free port."""

    def __init__(self, runner, *, max_queue: int = 16, ready: bool = True, **options):
        from paradiff.serve.app import HttpServer, ServeOptions, bind, create_app
        from paradiff.serve.dispatch import Dispatcher, Phase
        from paradiff.serve.metrics import Metrics

        options.setdefault("sizes", [(32, 48), (64, 64)])
        options.setdefault("steps", 4)
        self.options = ServeOptions(**options)
        self.dispatcher = Dispatcher(runner, max_queue=max_queue, tick_s=0.05, log=lambda line: None)
        d = self.dispatcher
        self.metrics = Metrics(queue_depth=d.depth, busy=lambda: float(d.busy),
                               ready=lambda: float(d.phase is Phase.READY))
        self.http = HttpServer(create_app(self.options, d, self.metrics), bind("127.0.0.1", 0))
        self.http.start()
        self.url = f"http://127.0.0.1:{self.http.address[1]}"
        self.loop = None
        if ready:
            self.start_loop()

    def start_loop(self):
        self.errors: list[BaseException] = []

        def run():
            try:
                self.dispatcher.run()
            except BaseException as err:  # noqa: BLE001 - reported by the test
                self.errors.append(err)

        self.loop = threading.Thread(target=run, daemon=True)
        self.loop.start()
        while self.dispatcher.phase.value != "ready":
            time.sleep(0.01)

    def close(self):
        self.dispatcher.request_stop()
        if self.loop is not None:
            self.loop.join(10)
        self.http.stop(5)


def metric_samples(text: str) -> dict:
    """{(name, frozenset(labels.items())): value} from Prometheus text, parsed by prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def sample(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


class CliServer:
    """`python -m paradiff serve ...` as a user starts it (stdout/stderr to a file); `url` once it listens."""

    def __init__(self, *args: str, env: dict | None = None, log_path: str):
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                    **(env or {})}
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "paradiff", "serve", "--port", "0", *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=True)
        self.url = None

    def output(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_listening(self, timeout: float = 120) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            match = re.search(r"listening on (http://\S+)", self.output())
            if match:
                self.url = match.group(1)
                return self.url
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"the server did not start listening:\n{self.output()}")

    def rank_pids(self) -> dict[int, int]:
        """{rank: pid} of the ranks the launcher started (its children, from /proc)."""
        pids = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid != self.proc.pid:
                    continue
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            except (OSError, ValueError, IndexError):
                continue
            if b"RANK" in env:
                pids[int(env[b"RANK"])] = int(entry)
        return pids

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self):
        ranks = self.rank_pids().values()  # the ranks run in sessions of their own: not in the launcher's group
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
