"""Exchange of per-layer activations between patch ranks, synchronous or one step stale, in static buffers.

Each wrapped layer owns a `Slot`: a static receive buffer holding what every rank sent for that layer (all-gathered
along dim 0). In a *sync* step `exchange` all-gathers the fresh payload and returns it (exact). In a *stale* step it
returns the slot's buffer (last step's data), and issues the all-gather of this step's payload asynchronously;
`finish()` at the end of the step waits for them and copies the results into the buffers. So communication overlaps
the rest of the step. Functional collectives are used throughout: torch.compile traces them, and the copy into the
static buffer is an in-place update, which CUDA graphs capture as well.

Where the wait lands decides the overlap. Traced through `funcol`, every collective is followed by its wait at once,
and inductor's `sink_waits` pass then serialises them all at the end of the step (it keeps collectives in order, so
each next all-gather is issued only after the previous wait: no overlap at all; seen on the generated code). So a
stale all-gather is issued with the raw op `_c10d_functional.all_gather_into_tensor` and waited with `wait_tensor`
in `finish()`: traced, the graph holds the waits where the code puts them, and the compiled step keeps that order
(`paradiff.methods.patch.compile_kwargs`: no comm reordering, no peak-memory reordering, which would sink the
issues too).

On gloo (CPU) the stale payloads are instead sent together in `finish()`, one all-gather per dtype: many gloo
all-gathers in flight at once corrupt the heap (seen as "malloc(): unaligned tcache chunk detected" and a rank dying
mid-run with torch 2.13), and on a CPU communication cannot hide behind compute anyway.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


# `all_gather_single` replaces the deprecated `all_gather_tensor` in recent PyTorch; same semantics.
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


class Slot:
    """One layer's receive buffer: `[world * payload_rows, ...]`, allocated on the first (synchronous) exchange."""

    __slots__ = ("recv",)

    def __init__(self) -> None:
        self.recv: torch.Tensor | None = None


def _start_all_gather(x: torch.Tensor, group_name: str, world: int) -> torch.Tensor:
    """Issue an all-gather along dim 0 and return its (not yet valid) result; `_wait_started` makes it valid."""
    return torch.ops._c10d_functional.all_gather_into_tensor(x, world, group_name)


def _wait_started(x: torch.Tensor) -> torch.Tensor:
    return torch.ops._c10d_functional.wait_tensor(x)


def _wait(x: torch.Tensor) -> torch.Tensor:
    return x.wait() if isinstance(x, funcol.AsyncCollectiveTensor) else x


def all_gather(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """All-gather `x` along `dim` over `group`, waited (functional collective: traceable by torch.compile)."""
    return _wait(_all_gather(x.contiguous(), dim, group))


class StaleExchange:
    """Activation exchange over one process group; `sync` selects the phase of the current step."""

    def __init__(self, group: Any, overlap: bool | None = None):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        # overlap: one asynchronous all-gather per stale payload, in flight while the step computes (NCCL);
        # otherwise the stale payloads wait and go in one batched all-gather per dtype in `finish()` (gloo).
        self.overlap = dist.get_backend(group) != "gloo" if overlap is None else overlap
        self.group_name = group.group_name
        self.sync = True
        self.slots: list[Slot] = []
        self._pending: list[tuple[Slot, torch.Tensor]] = []

    def slot(self) -> Slot:
        slot = Slot()
        self.slots.append(slot)
        return slot

    @property
    def ready(self) -> bool:
        """True when every slot holds data from a previous step (a stale step may run)."""
        return all(slot.recv is not None for slot in self.slots)

    def reset(self) -> None:
        """Forget all buffers (new shapes): the next step must be synchronous."""
        for slot in self.slots:
            slot.recv = None
        self._pending.clear()

    def exchange(self, slot: Slot, payload: torch.Tensor, sync: bool | None = None) -> torch.Tensor:
        """All ranks' payloads concatenated on dim 0: this step's (sync) or the previous step's (stale)."""
        if self.sync if sync is None else sync:
            gathered = _wait(_all_gather(payload.contiguous(), 0, self.group))
            if slot.recv is None or slot.recv.shape != gathered.shape:
                slot.recv = gathered.clone()
            else:
                slot.recv.copy_(gathered)
            return gathered
        stale = slot.recv
        payload = payload.contiguous()
        self._pending.append((slot, _start_all_gather(payload, self.group_name, self.world) if self.overlap
                              else payload))
        return stale

    def finish(self) -> None:
        """Land this step's stale-phase exchanges in the static buffers (waits for them)."""
        if not self.overlap:
            self._gather_batched()
        for slot, gathered in self._pending:
            slot.recv.copy_(_wait_started(gathered) if self.overlap else gathered)
        self._pending.clear()

    def _gather_batched(self) -> None:
        """Replace each pending payload by its all-gathered value, with one collective per dtype."""
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, (_, payload) in enumerate(self._pending):
            by_dtype.setdefault(payload.dtype, []).append(i)
        for indices in by_dtype.values():
            payloads = [self._pending[i][1] for i in indices]
            sizes = [p.numel() for p in payloads]
            flat = torch.cat([p.reshape(-1) for p in payloads])
            gathered = all_gather(flat, 0, self.group).view(self.world, -1).split(sizes, dim=1)
            for i, payload, part in zip(indices, payloads, gathered):
                slot = self._pending[i][0]
                self._pending[i] = (slot, part.reshape(self.world * payload.shape[0], *payload.shape[1:]))
