"""One process as rank 0 of N: what per-rank compute, memory and compile time look like without N GPUs.

    rt = paradiff.comm.emulate.start(world_size=2, device="cuda")   # instead of torchrun
    pipe = paradiff.parallelize(pipe, paradiff.PatchParallel())
    ...
    paradiff.comm.emulate.stop()

The process group is PyTorch's fake backend (collectives complete at once and move nothing), and the step's traced
collectives (`paradiff.comm.collectives.backend`) become local copies of this rank's data, so every tensor has the
shape and the cost of the real run except the network. Point-to-point receives leave their buffers as they were.
This is the documented seam for emulation: nothing else is patched.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from paradiff import runtime
from paradiff.comm import collectives


class LocalCopies(collectives.Collectives):
    """Every rank is assumed to hold what this one holds: an all-gather is N copies of the local tensor."""

    def __init__(self, world: int):
        self.world = world

    def all_gather(self, x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
        return torch.cat([x] * dist.get_world_size(group), dim=dim)

    def start_all_gather(self, x: torch.Tensor, group_name: str, world: int) -> torch.Tensor:
        return torch.cat([x] * world)

    def wait_started(self, x: torch.Tensor) -> torch.Tensor:
        return x


def start(world_size: int, device: Any = None) -> runtime.Runtime:
    """Initialise this process as rank 0 of `world_size` over the fake backend, with local-copy collectives."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if world_size < 2:
        raise ValueError("emulation needs world_size >= 2")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    collectives.backend = LocalCopies(world_size)
    runtime._runtime = runtime.Runtime(rank=0, world_size=world_size, local_rank=0, local_world_size=1, device=dev,
                                       backend="fake (emulated: collectives are local copies)")
    return runtime._runtime


def stop() -> None:
    collectives.backend = collectives.Collectives()
    runtime.shutdown()


def active() -> bool:
    return isinstance(collectives.backend, LocalCopies)
