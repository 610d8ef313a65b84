"""The controller hook on the denoiser: per call, the step from the shared clock, sync/async/idle mode, the time
shift, the exchange of stale values and the broadcast of the last component's output."""

from __future__ import annotations

import torch
from diffusers.hooks import ModelHook
from torch.utils import _pytree as pytree

from paradiff.comm import broadcast_
from paradiff.execution import Execution
from paradiff.methods.asyncdenoise.units import _State, _signature, _tensor
from paradiff.parallel import Parallelized
from paradiff.plans.common import timestep_position


class _Controller(ModelHook):
    """Per denoiser call: step from the clock, sync/async/idle mode, timestep shift, exchange, broadcast."""

    def __init__(self, state: _State, model: torch.nn.Module, target: Parallelized, warmup: int,
                 time_shift: bool, execution: Execution):
        super().__init__()
        self.state, self.target, self.warmup, self.time_shift = state, target, warmup, time_shift
        self.execution = execution
        self.t_pos = timestep_position(model)
        self._run_static = None
        self._async_from = 0     # first call of the asynchronous steps in this generation
        self._pending = None     # stride 2, rank N-1: its output for the next (idle) step
        self._out_spec = self._out_meta = None

    # -- step bookkeeping -------------------------------------------------------------------------------------
    def _timestep(self, args, kwargs):
        return args[self.t_pos] if len(args) > self.t_pos else kwargs["timestep"]

    def _with_timestep(self, args, kwargs, value):
        old = self._timestep(args, kwargs)
        new = value.to(old.device, old.dtype).expand(old.shape) if _tensor(old) else float(value)
        if len(args) > self.t_pos:
            return args[: self.t_pos] + (new,) + args[self.t_pos + 1:], kwargs
        return args, {**kwargs, "timestep": new}

    # -- running ------------------------------------------------------------------------------------------------
    def _run(self, args, kwargs):
        fn = self.fn_ref.original_forward
        if self.state.mode == "discover":
            return fn(*args, **kwargs)
        if self._run_static is None:
            self._run_static = self.execution.runner(self.execution.compiled(fn), self.target.device,
                                                     name="AsyncDenoise")
        return self._run_static(*args, **kwargs)

    def _receive_controlnet(self) -> None:
        """After an asynchronous step's forward read them: receive this step's values of the ControlNet's units for
        the next step (posted before the step's other values, as their ranks sent them at the ControlNet's call)."""
        st = self.state
        if st.controlnet_recv:
            st.controlnet_recv = False
            st.controlnet_p2p.post(send=False, recv=True)
            st.controlnet_p2p.wait()

    def _broadcast(self, leaves: list, src: int) -> list:
        st = self.state
        return [broadcast_(x.contiguous(), src, st.group, "the asynchronous-denoising result") if _tensor(x) else x
                for x in leaves]

    def phase(self) -> tuple[bool, bool]:
        """(synchronous, idle) for the current step: idle is a stride-2 round's second step, whose noise rank N-1
        computed during the round. The ControlNet's hook asks too, before the denoiser call of its step."""
        st, tick = self.state, self.target.tick
        sync = tick.step < self.warmup
        if sync:
            self._async_from = tick.call + 1
        return sync, st.stride == 2 and not sync and (tick.call - self._async_from) % 2 == 1

    def shifted(self, args: tuple, kwargs: dict, sync: bool) -> tuple[tuple, dict]:
        """The call with the timestep this rank computes in an asynchronous step (time shift, stride 2's lead)."""
        st = self.state
        shift = 1 if (self.time_shift and not sync) else 0
        lead = 1 if st.stride == 2 and not sync and not st.extra else 0
        if shift or lead:
            timesteps = self.target.clock.scheduler.timesteps
            index = self.target.clock.position(self._timestep(args, kwargs))
            t_index = min(index + lead, len(timesteps) - 1) - shift
            if t_index != index:
                args, kwargs = self._with_timestep(args, kwargs, timesteps[t_index])
        return args, kwargs

    def new_forward(self, module, *args, **kwargs):
        st = self.state
        sync, idle = self.phase()
        if idle:
            leaves = self._pending if st.grank == st.n - 1 else [
                torch.empty(s, dtype=d, device=dev) if s is not None else None for s, d, dev in self._out_meta]
            return pytree.tree_unflatten(self._broadcast(leaves, st.n - 1), self._out_spec)
        src = st.n if st.stride == 2 and not sync else st.n - 1
        args, kwargs = self.shifted(args, kwargs, sync)
        signature = _signature((args, kwargs))
        if sync and signature != st.signature:
            st.mode = "discover"  # new shapes: find them while passing the values down the ranks (eager)
            out = self._run(args, kwargs)
            st.signature = signature
            self._receive_controlnet()
        else:
            st.mode = "static"
            if sync:
                st.p2p.post(send=False, recv=True)
                st.p2p.wait()
            phase = "sync" if sync else "async"
            if st.observer is not None:
                st.observer(phase, "start")
            out = self._run(args, kwargs)
            if st.observer is not None:
                st.observer(phase, "end")
            self._receive_controlnet()
            st.p2p.post(send=True, recv=not sync)
        st.p2p.wait()
        st.controlnet_p2p.wait()  # the ControlNet call's sends: done with their buffers before the next call
        leaves, self._out_spec = pytree.tree_flatten(out)
        self._out_meta = [(x.shape, x.dtype, x.device) if _tensor(x) else (None, None, None) for x in leaves]
        if st.stride == 2 and not sync and st.grank == st.n - 1:
            self._pending = [x.clone() if _tensor(x) else x for x in leaves]
        return pytree.tree_unflatten(self._broadcast(leaves, src), self._out_spec)


