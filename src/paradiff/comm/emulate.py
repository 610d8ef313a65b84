"""One process as one rank of N: what per-rank compute, memory and compile time look like without N GPUs.

    rt = paradiff.comm.emulate.start(world_size=2, device="cuda")   # instead of torchrun; rank=k for rank k
    pipe = paradiff.parallelize(pipe, paradiff.PatchParallel())
    ...
    paradiff.comm.emulate.stop()

The process group is PyTorch's fake backend (collectives complete at once and move nothing), and the step's traced
collectives (`paradiff.comm.collectives.backend`) become local copies of this rank's data, so every tensor has the
shape and the cost of the real run except the network. The point-to-point exchange of asynchronous denoising
(`paradiff.comm.p2p.transport`) becomes local copies too: a receive copies a same-shaped local tensor into its
buffer (the memory traffic a real receive causes on this GPU), a send only counts its bytes. AsyncDenoise's
components are then measured one at a time, as rank k of N for each k. These two backends are the documented
seams for emulation: nothing else is patched.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from paradiff import runtime
from paradiff.comm import collectives, p2p


class LocalCopies(collectives.Collectives):
    """Every rank is assumed to hold what this one holds: an all-gather is N copies of the local tensor."""

    def __init__(self, world: int):
        self.world = world

    def all_gather(self, x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
        return torch.cat([x] * dist.get_world_size(group), dim=dim)

    def start_all_gathers(self, xs: list[torch.Tensor], group_name: str, world: int) -> list[torch.Tensor]:
        return [torch.cat([x] * world) for x in xs]

    def wait_started(self, x: torch.Tensor) -> torch.Tensor:
        return x


class LocalTransport(p2p.Transport):
    """Point-to-point as local copies: a receive fills its buffer from a local tensor of its shape, a send is
    counted only. `sent` / `received`: bytes so far."""

    def __init__(self):
        self.sent = self.received = 0
        self._sources: dict[tuple, torch.Tensor] = {}

    def _receive(self, buf: torch.Tensor) -> None:
        key = (tuple(buf.shape), buf.dtype, buf.device)
        if key not in self._sources:
            self._sources[key] = torch.zeros_like(buf)
        buf.copy_(self._sources[key])
        self.received += buf.nbytes

    def batch(self, ops: list, group: Any) -> list:
        for kind, buf, _ in ops:
            if kind == "recv":
                self._receive(buf)
            else:
                self.sent += buf.nbytes
        return []

    def send(self, buf: torch.Tensor, group: Any, peer: int) -> None:
        self.sent += buf.nbytes

    def recv(self, buf: torch.Tensor, group: Any, src: int) -> None:
        self._receive(buf)


def start(world_size: int, device: Any = None, rank: int = 0) -> runtime.Runtime:
    """Initialise this process as `rank` of `world_size` over the fake backend, with local-copy collectives and
    point-to-point transfers."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if world_size < 2:
        raise ValueError("emulation needs world_size >= 2")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be 0 to {world_size - 1}, got {rank}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    collectives.backend = LocalCopies(world_size)
    p2p.transport = LocalTransport()
    runtime._runtime = runtime.Runtime(rank=rank, world_size=world_size, local_rank=0, local_world_size=1,
                                       device=dev, backend="fake (emulated: collectives are local copies)")
    return runtime._runtime


def stop() -> None:
    collectives.backend = collectives.Collectives()
    p2p.transport = p2p.Transport()
    runtime.shutdown()


def active() -> bool:
    return isinstance(collectives.backend, LocalCopies)
