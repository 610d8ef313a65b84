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
    """What the controller, the ControlNet's hook and the unit hooks of one denoiser share on this rank."""

    def __init__(self, plan: Split, group: Any, stride: int):
        self.group = group
        self.grank = dist.get_rank(group)
        self.n = plan.n
        self.stride = stride
        self.extra = stride == 2 and self.grank == self.n        # stride 2: the lagging replica of the last comp
        self.comp = min(self.grank, self.n - 1)
        self.plan = plan
        self.mode = "discover"   # "discover": communication inside the hooks (the first sync step at new shapes;
        #                          every sync ControlNet call); "static": hooks only read receive buffers and fill
        #                          send buffers
        self.signature = None    # input signature the buffers were discovered for
        self.placeholders: dict[tuple, torch.Tensor] = {}
        self.structures: dict[tuple, tuple] = {}
        self.transfers = plan.transfers()
        self.recv_keys = {(p, leaf) for p, leaf, _, dst in self.transfers if dst == self.comp}
        # what the ControlNet's units produce travels on its own channel: they run at its call, before the denoiser's
        self.controlnet_units = frozenset(plan.controlnet_units)
        self.p2p = StaleP2P(group, [t for t in self.transfers if t[0] not in self.controlnet_units], self.ranks_of,
                            self.comp, sends=not self.extra)
        self.controlnet_p2p = StaleP2P(group, [t for t in self.transfers if t[0] in self.controlnet_units],
                                       self.ranks_of, self.comp, sends=not self.extra)
        self.controlnet_recv = False  # an asynchronous step's ControlNet values are received after the step
        self.observer: Callable[[str, str], None] | None = None  # (phase, "start"/"end") around each forward

    def ranks_of(self, comp: int) -> list[int]:
        """Group ranks that run component `comp` (the last one has a lagging replica under stride 2)."""
        return [comp, self.n] if self.stride == 2 and comp == self.n - 1 else [comp]

    def channel(self, unit: int) -> StaleP2P:
        return self.controlnet_p2p if unit in self.controlnet_units else self.p2p

    def sends_of(self, unit: int) -> list[tuple[int, list[int]]]:
        if self.extra:
            return []
        return [(leaf, self.ranks_of(dst)) for p, leaf, src, dst in self.transfers if p == unit and src == self.comp]

    def placeholder(self, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (shape, dtype, device)
        if key not in self.placeholders:
            self.placeholders[key] = torch.zeros(shape, dtype=dtype, device=device)
        return self.placeholders[key]


def _structure(twin: torch.nn.Module, cache: dict, key: tuple, args: tuple, kwargs: dict) -> tuple:
    """Output tree spec and (shape, dtype) of each tensor leaf of `twin` (a meta-device module) called with the
    shapes of `args`/`kwargs`, cached under `key`."""
    if key not in cache:
        with torch.no_grad():
            out = twin(*_meta(args), **_meta(kwargs))
        leaves, spec = pytree.tree_flatten(out)
        cache[key] = (spec, [(tuple(x.shape), x.dtype) if _tensor(x) else x for x in leaves])
    return cache[key]


class _UnitHook(ModelHook):
    """Runs a local unit (and stages its outgoing values) or stands in for a remote one with received values.
    `twin`: the unit's meta-device copy (output shapes of a remote unit)."""

    def __init__(self, state: _State, unit: int, name: str, local: bool, twin: torch.nn.Module):
        super().__init__()
        self.state, self.unit, self.name, self.local, self.twin = state, unit, name, local, twin
        self.sends = state.sends_of(unit) if local else []
        self.p2p = state.channel(unit)

    def new_forward(self, module, *args, **kwargs):
        st = self.state
        if self.local:
            out = self.fn_ref.original_forward(*args, **kwargs)
            if self.sends:
                leaves = pytree.tree_leaves(out)
                for leaf, peers in self.sends:
                    buf = self.p2p.stage((self.unit, leaf), leaves[leaf])
                    if st.mode == "discover":
                        self.p2p.send_now(buf, peers)
            return out
        if st.mode == "static":
            return self._out  # the buffers found by the last "discover" step (same input signature)
        spec, metas = _structure(self.twin, st.structures, (self.unit,) + _signature((args, kwargs)), args, kwargs)
        device = next(x.device for x in pytree.tree_leaves((args, kwargs)) if _tensor(x))
        leaves = []
        for i, meta in enumerate(metas):
            if not isinstance(meta, tuple):
                leaves.append(meta)
                continue
            shape, dtype = meta
            key = (self.unit, i)
            if key in st.recv_keys:
                buf = self.p2p.receive_buffer(key, shape, dtype, device)
                if st.mode == "discover":
                    self.p2p.receive_now(buf, st.plan.component_of(self.unit))
                leaves.append(buf)
            else:
                leaves.append(st.placeholder(shape, dtype, device))
        self._out = pytree.tree_unflatten(leaves, spec)
        return self._out


class _ControlNetHook(ModelHook):
    """On the pipeline's ControlNet, around its call (each step, before the denoiser's): the step's phase and
    timestep, and the exchange of what its units produce (its blocks are units of the split, each with a
    `_UnitHook`). A synchronous call passes their values between ranks from inside the hooks, in unit order: with
    the ControlNet placed last, a rank may feed a later rank's ControlNet blocks and read their residuals in the
    same call. An asynchronous call reads the previous step's values; its sends are posted after the call and its
    receives after the denoiser's forward. A rank that runs none of its units and reads none of their outputs skips
    the call (zeros of the output's shapes)."""

    def __init__(self, state: _State, controller: Any, twin: torch.nn.Module):
        super().__init__()
        self.state, self.controller, self.twin = state, controller, twin
        units = state.controlnet_units
        self.needed = any(state.plan.component_of(u) == state.comp for u in units) or \
            any(p in units for p, _ in state.recv_keys)
        self._structures: dict[tuple, tuple] = {}

    def new_forward(self, module, *args, **kwargs):
        st = self.state
        sync, idle = self.controller.phase()
        if idle or not self.needed:  # idle: a stride-2 round's second step, whose denoiser call returns unread
            return self._zeros(args, kwargs)
        args, kwargs = self.controller.shifted(args, kwargs, sync)
        st.mode = "discover" if sync else "static"
        out = self.fn_ref.original_forward(*args, **kwargs)
        if not sync:
            st.controlnet_p2p.post(send=True, recv=False)
            st.controlnet_recv = True
        return out

    def _zeros(self, args: tuple, kwargs: dict) -> Any:
        spec, metas = _structure(self.twin, self._structures, _signature((args, kwargs)), args, kwargs)
        device = next(x.device for x in pytree.tree_leaves((args, kwargs)) if _tensor(x))
        leaves = [self.state.placeholder(*meta, device) if isinstance(meta, tuple) else meta for meta in metas]
        return pytree.tree_unflatten(leaves, spec)
