"""Distributed runtime: one process per device, started by torchrun (or `paradiff --nproc`), or a single process.

Every other layer asks this module for the rank, the device and the process groups; nothing else calls
`torch.distributed.init_process_group`. Collectives get a short timeout so that a dead or stuck rank ends the whole
job with a clear message instead of a hang.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from paradiff.errors import UserError

DEFAULT_TIMEOUT_S = 45.0
"""Collective timeout. A stuck rank is reported within this many seconds (plus process teardown)."""


@dataclass(frozen=True)
class Runtime:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str | None  # None when single-process

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_runtime: Runtime | None = None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def timeout_seconds() -> float:
    """The collective timeout in seconds (env `PARADIFF_TIMEOUT` overrides the default)."""
    value = os.environ.get("PARADIFF_TIMEOUT")
    if value in (None, ""):
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        raise UserError(f"PARADIFF_TIMEOUT must be a number of seconds, got {value!r}.") from None
    if seconds <= 0:
        raise UserError(f"PARADIFF_TIMEOUT must be positive, got {value!r}.")
    return seconds


def _pick_device(requested: str | None, local_rank: int, world_size: int, local_world_size: int) -> torch.device:
    kind = (requested or ("cuda" if torch.cuda.is_available() else "cpu")).lower()
    if kind.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("device='cuda' was asked for, but PyTorch sees no CUDA GPU on this machine.")
        count = torch.cuda.device_count()
        if ":" in kind and world_size == 1:
            return torch.device(kind)
        if local_world_size > count:
            raise UserError(
                f"{local_world_size} ranks were started on this node but only {count} CUDA GPU(s) are visible; "
                f"use --nproc {count} or fewer."
            )
        return torch.device("cuda", local_rank)
    if kind in ("cpu", "mps"):
        return torch.device(kind)
    raise UserError(f"device={requested!r}: unknown device; use cpu or cuda.")


def init(device: str | None = None) -> Runtime:
    """Initialise (once) from the torchrun environment, or as a single process when there is none."""
    global _runtime
    if _runtime is not None:
        return _runtime
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    dev = _pick_device(device, local_rank, world_size, local_world_size)
    backend = None
    if world_size > 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
            backend = "nccl"
        else:
            backend = "gloo"
        if not dist.is_initialized():
            kwargs = {}
            if backend == "nccl":
                kwargs["device_id"] = dev  # eager communicator creation: errors surface at start, not mid-step
            dist.init_process_group(
                backend=backend,
                timeout=datetime.timedelta(seconds=timeout_seconds()),
                **kwargs,
            )
    _runtime = Runtime(rank, world_size, local_rank, local_world_size, dev, backend)
    return _runtime


def get() -> Runtime:
    """The runtime, initialised with defaults on first use."""
    return init() if _runtime is None else _runtime


def current() -> Runtime | None:
    """The runtime if `init()` has run, else None (never initialises: safe in error handlers)."""
    return _runtime


def is_main_process() -> bool:
    """True on global rank 0 (or in a single process). Safe to call before `init()`."""
    if _runtime is not None:
        return _runtime.is_main
    return _env_int("RANK", 0) == 0


def mesh(dims: dict[str, int]):
    """A `DeviceMesh` over all ranks with named dimensions, e.g. `mesh({"cfg": 2, "patch": 2})`.

    Methods take their process groups from named mesh dimensions (`mesh.get_group("patch")`), so methods compose
    (CFG parallel x patch parallel) without knowing about each other.
    """
    from torch.distributed.device_mesh import init_device_mesh

    rt = get()
    total = 1
    for size in dims.values():
        total *= size
    if total != rt.world_size:
        shape = " x ".join(f"{n} {name}" for name, n in dims.items())
        raise UserError(f"this parallel plan needs {total} ranks ({shape}) but the job has {rt.world_size}.")
    if not rt.distributed:
        raise UserError("a parallel mesh needs a distributed job: start it with --nproc N or torchrun.")
    return init_device_mesh(rt.device.type, tuple(dims.values()), mesh_dim_names=tuple(dims.keys()))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Tear down the process group so the job exits without NCCL/gloo warnings."""
    global _runtime
    if dist.is_initialized():
        dist.destroy_process_group()
    _runtime = None
