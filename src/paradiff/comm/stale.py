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
stale bucket is issued with the raw op `_c10d_functional.all_gather_into_tensor_coalesced` and waited with
`wait_tensor` in `finish()`: traced, the graph holds the waits where the code puts them, and the compiled step
keeps that order (`paradiff.methods.patch.compile_kwargs`: no comm reordering, no peak-memory reordering, which
would sink the issues too).

On gloo (CPU) the stale payloads are instead sent in `finish()`, one coalesced all-gather per dtype: many gloo
all-gathers in flight at once corrupt the heap (seen as "malloc(): unaligned tcache chunk detected" and a rank
dying mid-run with torch 2.13), and on a CPU communication cannot hide behind compute anyway.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist


from paradiff.comm import collectives


class Slot:
    """One layer's receive buffer, allocated on the first (synchronous) exchange.

    It keeps what every rank sent for the layer, by default as gathered (`[world * payload_rows, ...]`); `keep`, if
    given, maps the gathered tensor to the view in which it is kept instead (a layout the layer reads without
    copying, e.g. `FullKV`'s whole-image keys). Landing writes through that view: one copy, whatever the layout.
    """

    __slots__ = ("recv", "keep")

    def __init__(self, keep: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.recv: torch.Tensor | None = None
        self.keep = keep

    def store(self, gathered: torch.Tensor) -> None:
        kept = gathered if self.keep is None else self.keep(gathered)
        if self.recv is None or self.recv.shape != kept.shape:
            self.recv = kept.clone(memory_format=torch.contiguous_format)
        else:
            self.recv.copy_(kept)


class StaleExchange:
    """Activation exchange over one process group; `sync` selects the phase of the current step.

    Stale payloads are sent in buckets, one per dtype: collected until `bucket_mb` is reached, then all-gathered as
    one coalesced collective (overlap) or all at `finish()` (no overlap). Per-layer collectives would be ~230 per
    SDXL step, most of them latency; buckets cut that to a few dozen without losing the overlap. Coalesced, a
    bucket's payloads are sent where they lie (no copy into a flat buffer). One dtype per bucket: gloo's coalesced
    all-gather returns garbage for mixed dtypes (torch 2.13).
    """

    def __init__(self, group: Any, overlap: bool | None = None, bucket_mb: float = 16.0):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        # overlap: buckets are all-gathered asynchronously as they fill, while the step computes (NCCL);
        # otherwise every stale payload waits for `finish()`, one coalesced collective per dtype, waited in turn
        # (gloo).
        self.overlap = dist.get_backend(group) != "gloo" if overlap is None else overlap
        self.bucket_bytes = bucket_mb * 2**20
        self.group_name = group.group_name
        self.sync = True
        self.slots: list[Slot] = []
        self._open: dict[torch.dtype, list[tuple[Slot, torch.Tensor]]] = {}  # payloads of unsent buckets
        self._open_bytes: dict[torch.dtype, int] = {}  # their size, kept as they come (no re-summing per payload)
        self._sent: list[tuple[list[Slot], list[torch.Tensor]]] = []  # buckets in flight

    def slot(self, keep: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Slot:
        slot = Slot(keep)
        self.slots.append(slot)
        return slot

    @property
    def ready(self) -> bool:
        """True when every slot holds data from a previous step (a stale step may run)."""
        return all(slot.recv is not None for slot in self.slots)

    @property
    def pending(self) -> int:
        """Stale payloads not yet landed in their buffers."""
        return sum(len(b) for b in self._open.values()) + sum(len(slots) for slots, _ in self._sent)

    def discard(self) -> None:
        """Drop this step's stale payloads (a step abandoned half-way, e.g. by a failed CUDA-graph capture)."""
        self._open.clear()
        self._open_bytes.clear()
        self._sent.clear()

    def reset(self) -> None:
        """Forget all buffers (new shapes): the next step must be synchronous."""
        for slot in self.slots:
            slot.recv = None
        self.discard()

    def exchange(self, slot: Slot, payload: torch.Tensor, sync: bool | None = None) -> torch.Tensor:
        """All ranks' payloads concatenated on dim 0: this step's (sync) or the previous step's (stale, as the
        slot keeps them)."""
        if self.sync if sync is None else sync:
            gathered = collectives.all_gather(payload, 0, self.group)
            slot.store(gathered)
            return gathered
        dtype = payload.dtype
        self._open.setdefault(dtype, []).append((slot, payload.contiguous()))
        self._open_bytes[dtype] = self._open_bytes.get(dtype, 0) + payload.numel() * payload.element_size()
        if self.overlap and self._open_bytes[dtype] >= self.bucket_bytes:
            self._send(dtype)
        return slot.recv

    def _send(self, dtype: torch.dtype) -> None:
        """All-gather one bucket (one coalesced collective) without waiting."""
        slots, payloads = zip(*self._open.pop(dtype))
        del self._open_bytes[dtype]
        self._sent.append((list(slots), collectives.backend.start_all_gathers(list(payloads), self.group_name,
                                                                             self.world)))

    def finish(self) -> None:
        """Send what is left and land this step's stale payloads in the static buffers (waits for them)."""
        for dtype in list(self._open):
            self._send(dtype)
            if not self.overlap:  # gloo: one collective in flight at a time
                self._land()
        self._land()

    def _land(self) -> None:
        for slots, gathered in self._sent:
            for slot, part in zip(slots, gathered):
                slot.store(collectives.backend.wait_started(part))
        self._sent.clear()


class SyncExchange(StaleExchange):
    """An exchange that is always synchronous and keeps nothing between calls: for a pass that runs once (the
    patch-parallel VAE decode), where a stale phase never comes and the slots' buffers would only hold memory."""

    def __init__(self, group: Any):
        super().__init__(group, overlap=False)

    @property
    def ready(self) -> bool:
        return True

    def exchange(self, slot: Slot, payload: torch.Tensor, sync: bool | None = None) -> torch.Tensor:
        return collectives.all_gather(payload, 0, self.group)

    def finish(self) -> None:
        """Nothing is ever left in flight."""
