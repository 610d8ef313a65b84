"""Stale point-to-point exchange for asynchronous denoising: static send and receive buffers per transferred value.

Each value that crosses components (a unit output consumed on another rank) has a static send buffer on its
producer's rank and a static receive buffer on each consumer's rank, so the step that reads them can be compiled
and captured. `post` issues the sends and/or receives of one step as one batch, in the order every rank agrees
on (the split's transfer list); `wait` completes them. Every send and receive goes through `transport`, the seam
`paradiff.comm.emulate` swaps for local copies (one process standing in for one rank of N).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from paradiff.comm.collectives import guarded

Key = tuple[int, int]  # (producer unit, output leaf)


class Transport:
    """The point-to-point operations of the exchange (torch.distributed)."""

    def batch(self, ops: list[tuple[str, torch.Tensor, int]], group: Any) -> list:
        """Post ("send" | "recv", buffer, group peer) operations as one batch; returns the works to wait on."""
        kinds = {"send": dist.isend, "recv": dist.irecv}
        return dist.batch_isend_irecv([dist.P2POp(kinds[kind], buf, group=group, group_peer=peer)
                                       for kind, buf, peer in ops])

    def send(self, buf: torch.Tensor, group: Any, peer: int) -> Any:
        return dist.isend(buf, group=group, group_dst=peer)

    def recv(self, buf: torch.Tensor, group: Any, src: int) -> None:
        dist.recv(buf, group=group, group_src=src)


transport = Transport()


class StaleP2P:
    """`transfers`: (producer unit, leaf, source component, destination component); `ranks_of(component)`: the
    group ranks that run a component; `component`: this rank's (None: it sends nothing, e.g. stride 2's replica)."""

    def __init__(self, group: Any, transfers: list[tuple[int, int, int, int]], ranks_of: Any,
                 component: int, sends: bool = True):
        self.group = group
        self.transfers = transfers
        self.ranks_of = ranks_of
        self.component = component
        self.sends = sends
        self.send_buf: dict[Key, torch.Tensor] = {}
        self.recv_buf: dict[Key, torch.Tensor] = {}
        self.works: list = []

    def stage(self, key: Key, value: torch.Tensor) -> torch.Tensor:
        """Copy a produced value into its static send buffer (allocated on first use or a new shape)."""
        buf = self.send_buf.get(key)
        if buf is None or buf.shape != value.shape or buf.dtype != value.dtype:
            buf = self.send_buf[key] = torch.empty_like(value, memory_format=torch.contiguous_format)
        buf.copy_(value)
        return buf

    def receive_buffer(self, key: Key, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self.recv_buf.get(key)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self.recv_buf[key] = torch.zeros(shape, dtype=dtype, device=device)
        return buf

    def send_now(self, buf: torch.Tensor, peers: list[int]) -> None:
        """Send one value at once (the first synchronous step, while the buffers are being discovered)."""
        with guarded("the asynchronous-denoising exchange"):
            self.works.extend(transport.send(buf, self.group, peer) for peer in peers)

    def receive_now(self, buf: torch.Tensor, src: int) -> None:
        with guarded("the asynchronous-denoising exchange"):
            transport.recv(buf, self.group, src)

    def post(self, send: bool, recv: bool) -> None:
        """Post the sends of this rank's staged values and/or the receives of the values it consumes."""
        ops = []
        for producer, leaf, src, dst in self.transfers:
            if send and self.sends and src == self.component:
                ops.extend(("send", self.send_buf[(producer, leaf)], peer) for peer in self.ranks_of(dst))
            if recv and dst == self.component:
                ops.append(("recv", self.recv_buf[(producer, leaf)], src))
        if ops:
            with guarded("the asynchronous-denoising exchange"):
                self.works.extend(transport.batch(ops, self.group))

    def wait(self) -> None:
        with guarded("the asynchronous-denoising exchange"):
            for work in self.works:
                if work is not None:
                    work.wait()
        self.works.clear()

    def bytes_per_step(self) -> dict[str, int]:
        """Bytes this rank sends and receives in one asynchronous step (once the buffers exist: after the first
        step at these shapes): each staged value once per consuming rank, each consumed value once."""
        sent = received = 0
        for producer, leaf, src, dst in self.transfers:
            key = (producer, leaf)
            if self.sends and src == self.component and key in self.send_buf:
                sent += self.send_buf[key].nbytes * len(self.ranks_of(dst))
            if dst == self.component and key in self.recv_buf:
                received += self.recv_buf[key].nbytes
        return {"sent": sent, "received": received}
