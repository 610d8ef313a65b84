"""This rank's side of the split: the state the unit hooks and the controller share, and the unit hooks (a local
unit runs and stages what other components consume; a remote unit stands in with received values)."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from diffusers.hooks import ModelHook
from torch.utils import _pytree as pytree

from paradiff.comm.p2p import StaleP2P
from paradiff.methods.split import Split


def _tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def _meta(obj: Any) -> Any:
    return pytree.tree_map(lambda x: torch.empty(x.shape, dtype=x.dtype, device="meta") if _tensor(x) else x, obj)


def _signature(obj: Any) -> tuple:
    leaves, spec = pytree.tree_flatten(obj)
    return (str(spec),) + tuple((tuple(x.shape), x.dtype) if _tensor(x) else repr(x) for x in leaves)


class _State:
    """What the controller and the unit hooks of one denoiser share on this rank."""

    def __init__(self, plan: Split, group: Any, stride: int):
        self.group = group
        self.grank = dist.get_rank(group)
        self.n = plan.n
        self.stride = stride
        self.extra = stride == 2 and self.grank == self.n        # stride 2: the lagging replica of the last comp
        self.comp = min(self.grank, self.n - 1)
        self.plan = plan
        self.mode = "discover"   # "discover": first sync step at new shapes, communication inside the hooks;
        #                          "static": hooks only read receive buffers and fill send buffers
        self.signature = None    # input signature the buffers were discovered for
        self.placeholders: dict[tuple, torch.Tensor] = {}
        self.structures: dict[tuple, tuple] = {}
        net = plan.controlnet_unit
        self.transfers = [t for t in plan.transfers() if t[0] != net]
        self.p2p = StaleP2P(group, self.transfers, self.ranks_of, self.comp, sends=not self.extra)
        self.recv_keys = {(p, leaf) for p, leaf, _, dst in self.transfers if dst == self.comp}
        # the ControlNet's residuals travel on their own channel: it runs before the denoiser call
        self.controlnet_transfers = [t for t in plan.transfers() if t[0] == net]
        self.controlnet_p2p = StaleP2P(group, self.controlnet_transfers, self.ranks_of, self.comp,
                                       sends=not self.extra)
        self.controlnet_recv = False  # an asynchronous step's ControlNet residuals are received after the step
        self.observer: Callable[[str, str], None] | None = None  # (phase, "start"/"end") around each forward
        self.twin = None  # meta-device copy of the model, for output shapes of units this rank does not run

    def ranks_of(self, comp: int) -> list[int]:
        """Group ranks that run component `comp` (the last one has a lagging replica under stride 2)."""
        return [comp, self.n] if self.stride == 2 and comp == self.n - 1 else [comp]

    def sends_of(self, unit: int) -> list[tuple[int, list[int]]]:
        if self.extra:
            return []
        return [(leaf, self.ranks_of(dst)) for p, leaf, src, dst in self.transfers if p == unit and src == self.comp]

    def placeholder(self, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (shape, dtype, device)
        if key not in self.placeholders:
            self.placeholders[key] = torch.zeros(shape, dtype=dtype, device=device)
        return self.placeholders[key]


class _UnitHook(ModelHook):
    """Runs a local unit (and stages its outgoing values) or stands in for a remote one with received values."""

    def __init__(self, state: _State, unit: int, name: str, local: bool):
        super().__init__()
        self.state, self.unit, self.name, self.local = state, unit, name, local
        self.sends = state.sends_of(unit) if local else []

    def new_forward(self, module, *args, **kwargs):
        st = self.state
        if self.local:
            out = self.fn_ref.original_forward(*args, **kwargs)
            if self.sends:
                leaves = pytree.tree_leaves(out)
                for leaf, peers in self.sends:
                    buf = st.p2p.stage((self.unit, leaf), leaves[leaf])
                    if st.mode == "discover":
                        st.p2p.send_now(buf, peers)
            return out
        if st.mode == "static":
            return self._out  # the buffers found by the last "discover" step (same input signature)
        spec, metas = self._structure(args, kwargs)
        device = next(x.device for x in pytree.tree_leaves((args, kwargs)) if _tensor(x))
        leaves = []
        for i, meta in enumerate(metas):
            if not isinstance(meta, tuple):
                leaves.append(meta)
                continue
            shape, dtype = meta
            key = (self.unit, i)
            if key in st.recv_keys:
                buf = st.p2p.receive_buffer(key, shape, dtype, device)
                if st.mode == "discover":
                    st.p2p.receive_now(buf, st.plan.component_of(self.unit))
                leaves.append(buf)
            else:
                leaves.append(st.placeholder(shape, dtype, device))
        self._out = pytree.tree_unflatten(leaves, spec)
        return self._out

    def _structure(self, args, kwargs) -> tuple:
        """Output tree spec and (shape, dtype) of each tensor leaf, from the unit's meta twin (cached per input)."""
        st = self.state
        key = (self.unit,) + _signature((args, kwargs))
        if key not in st.structures:
            twin = st.twin.get_submodule(self.name)
            with torch.no_grad():
                out = twin(*_meta(args), **_meta(kwargs))
            leaves, spec = pytree.tree_flatten(out)
            st.structures[key] = (spec, [(tuple(x.shape), x.dtype) if _tensor(x) else x for x in leaves])
        return st.structures[key]




class _ControlNetHook(ModelHook):
    """On the pipeline's ControlNet: the rank whose component holds it runs it, once, and sends each residual to
    the components that consume it; every other rank skips it and returns the residuals it consumes (this
    step's in a synchronous step, the previous step's in an asynchronous one) and zeros it never reads."""

    def __init__(self, state: _State, controller: Any, twin: torch.nn.Module):
        super().__init__()
        self.state, self.controller, self.twin = state, controller, twin
        unit = state.plan.controlnet_unit
        self.unit = unit
        self.local = state.plan.component_of(unit) == state.comp
        self.recv_keys = {(p, leaf) for p, leaf, _, dst in state.controlnet_transfers if dst == state.comp}
        self.sends = sorted({leaf for p, leaf, src, _ in state.controlnet_transfers
                             if self.local and not state.extra and src == state.comp})
        self._structures: dict[tuple, tuple] = {}

    def new_forward(self, module, *args, **kwargs):
        st, p2p = self.state, self.state.controlnet_p2p
        sync, idle = self.controller.phase()
        if idle:  # a stride-2 round's idle step: the denoiser call returns the round's result unread
            return self._stand_in(args, kwargs, receive=False)
        args, kwargs = self.controller.shifted(args, kwargs, sync)
        if self.local:
            out = self.fn_ref.original_forward(*args, **kwargs)
            if self.sends:
                p2p.wait()  # the previous step's sends are done with the buffers
                leaves = pytree.tree_leaves(out)
                for leaf in self.sends:
                    p2p.stage((self.unit, leaf), leaves[leaf])
                p2p.post(send=True, recv=False)
            return out
        out = self._stand_in(args, kwargs, receive=bool(self.recv_keys))
        if self.recv_keys and sync:
            p2p.post(send=False, recv=True)
            p2p.wait()
        st.controlnet_recv = bool(self.recv_keys) and not sync  # received after this step's denoiser call
        return out

    def _stand_in(self, args: tuple, kwargs: dict, receive: bool) -> Any:
        """The ControlNet's output from receive buffers (the residuals this rank consumes) and zeros."""
        key = _signature((args, kwargs))
        if key not in self._structures:
            with torch.no_grad():
                out = self.twin(*_meta(args), **_meta(kwargs))
            leaves, spec = pytree.tree_flatten(out)
            self._structures[key] = (spec, [(tuple(x.shape), x.dtype) if _tensor(x) else x for x in leaves])
        spec, metas = self._structures[key]
        device = next(x.device for x in pytree.tree_leaves((args, kwargs)) if _tensor(x))
        leaves = []
        for i, meta in enumerate(metas):
            if not isinstance(meta, tuple):
                leaves.append(meta)
            elif receive and (self.unit, i) in self.recv_keys:
                leaves.append(self.state.controlnet_p2p.receive_buffer((self.unit, i), *meta, device))
            else:
                leaves.append(self.state.placeholder(meta[0], meta[1], device))
        return pytree.tree_unflatten(leaves, spec)
