"""Asynchronous denoising (AsyncDiff, NeurIPS 2024): the denoiser is cut into N sequential components, one per rank,
and after a few synchronous warm-up steps component k at step t consumes component k-1's output of step t-1, so all
components run at the same time.

How it is built (the diffusers model code is not touched):
- `split.py` traces the model on the meta device and cuts its units (resnets/attentions/samplers, SD3 blocks) into
  N contiguous components of equal FLOPs; every rank computes the same split.
- Every unit gets a diffusers `ModelHook`. A *local* unit (this rank's component) runs and copies the outputs other
  components consume into static send buffers. A *remote* unit does not run (its weights are dropped in `apply`):
  it returns static receive buffers holding the values its consumers on this rank need (stale: from the previous
  step), and a zero placeholder for outputs this rank does not use. Shapes come from the unit's meta-device twin.
- A controller hook on the denoiser reads the step index from the pipeline's scheduler, picks sync or async mode,
  applies time shift / stride, exchanges only the stale values each component needs (point-to-point, batched,
  once per step) and broadcasts the final noise prediction from the last component to the group.
- Sync (warm-up) steps pass values down the pipeline of ranks within the step: serial maths, exact. The first
  sync step at new input shapes does it from inside the hooks (eager) and sizes the buffers; later steps, sync or
  async, run the same static forward (compilable, graph-capturable) with communication before/after it.
- Stride 2 (paper, sec. 3.4) uses N+1 ranks: one round every 2 steps; ranks 0..N-1 compute step j+1 from x_j and
  an extra rank computes the last component for step j, so compute and communication happen every other step.
- The static steps can run under `torch.compile` and, on CUDA, a captured CUDA graph (static inputs, static
  buffers; `paradiff.execution`); communication stays outside the compiled/captured region, on the static buffers
  (`paradiff.comm.p2p`). Steps are scheduler steps (the shared step clock), so warm-up covers second-order
  schedulers' extra calls.
What runs where: each rank holds and runs only its component's blocks plus the shared small layers; the scheduler
step runs on every rank; prompt encoding and VAE decoding run on rank 0 only (`paradiff.main_rank`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from diffusers.hooks import ModelHook
from torch.utils import _pytree as pytree

from paradiff.comm import broadcast_
from paradiff.comm.p2p import StaleP2P
from paradiff.errors import UserError
from paradiff.execution import Execution
from paradiff.execution.weights import free_weights
from paradiff.methods.split import Split, split
from paradiff.parallel import ParallelMethod, Parallelized, parallelize_module
from paradiff.plans.common import timestep_position

HOOK_NAME = "paradiff.async"
DEFAULT_WARMUP = 3


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
        self.transfers = plan.transfers()
        self.p2p = StaleP2P(group, self.transfers, self.ranks_of, self.comp, sends=not self.extra)
        self.recv_keys = {(p, leaf) for p, leaf, _, dst in self.transfers if dst == self.comp}
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
        self._begin: tuple[int, int] | None = None  # (generation, index of its first call in scheduler.timesteps)

    # -- step bookkeeping -------------------------------------------------------------------------------------
    def _timestep(self, args, kwargs):
        return args[self.t_pos] if len(args) > self.t_pos else kwargs["timestep"]

    def _with_timestep(self, args, kwargs, value):
        old = self._timestep(args, kwargs)
        new = value.to(old.device, old.dtype).expand(old.shape) if _tensor(old) else float(value)
        if len(args) > self.t_pos:
            return args[: self.t_pos] + (new,) + args[self.t_pos + 1:], kwargs
        return args, {**kwargs, "timestep": new}

    def _index(self, args, kwargs, timesteps) -> int:
        """Index of this call's timestep in the scheduler's list (img2img starts part-way: found once per
        generation, one host sync)."""
        tick = self.target.tick
        if self._begin is None or self._begin[0] != tick.generation:
            t = self._timestep(args, kwargs)
            t0 = t.reshape(-1)[0].to(timesteps.device, timesteps.dtype) if _tensor(t) else \
                torch.tensor(t, dtype=timesteps.dtype)
            hits = (timesteps == t0).nonzero()
            found = int(hits[0, 0]) if len(hits) else tick.call
            self._begin = (tick.generation, found - tick.call)
        return self._begin[1] + tick.call

    # -- running ------------------------------------------------------------------------------------------------
    def _run(self, args, kwargs):
        fn = self.fn_ref.original_forward
        if self.state.mode == "discover":
            return fn(*args, **kwargs)
        if self._run_static is None:
            self._run_static = self.execution.runner(self.execution.compiled(fn), self.target.device,
                                                     name="AsyncDenoise")
        return self._run_static(*args, **kwargs)

    def _broadcast(self, leaves: list, src: int) -> list:
        st = self.state
        return [broadcast_(x.contiguous(), src, st.group, "the asynchronous-denoising result") if _tensor(x) else x
                for x in leaves]

    def new_forward(self, module, *args, **kwargs):
        st = self.state
        tick = self.target.tick
        sync = tick.step < self.warmup
        if sync:
            self._async_from = tick.call + 1
        if st.stride == 2 and not sync and (tick.call - self._async_from) % 2 == 1:
            # idle step of a stride-2 round: rank N-1 computed this step's noise during the round
            leaves = self._pending if st.grank == st.n - 1 else [
                torch.empty(s, dtype=d, device=dev) if s is not None else None for s, d, dev in self._out_meta]
            return pytree.tree_unflatten(self._broadcast(leaves, st.n - 1), self._out_spec)
        shift = 1 if (self.time_shift and not sync) else 0
        src = st.n - 1
        lead = 1 if st.stride == 2 and not sync and not st.extra else 0
        if st.stride == 2 and not sync:
            src = st.n
        if shift or lead:
            timesteps = self.target.clock.scheduler.timesteps
            index = self._index(args, kwargs, timesteps)
            t_index = min(index + lead, len(timesteps) - 1) - shift
            if t_index != index:
                args, kwargs = self._with_timestep(args, kwargs, timesteps[t_index])
        signature = _signature((args, kwargs))
        if sync and signature != st.signature:
            st.mode = "discover"  # new shapes: find them while passing the values down the ranks (eager)
            out = self._run(args, kwargs)
            st.signature = signature
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
            st.p2p.post(send=True, recv=not sync)
        st.p2p.wait()
        leaves, self._out_spec = pytree.tree_flatten(out)
        self._out_meta = [(x.shape, x.dtype, x.device) if _tensor(x) else (None, None, None) for x in leaves]
        if st.stride == 2 and not sync and st.grank == st.n - 1:
            self._pending = [x.clone() if _tensor(x) else x for x in leaves]
        return pytree.tree_unflatten(self._broadcast(leaves, src), self._out_spec)


def _meta_twin(model: torch.nn.Module) -> torch.nn.Module:
    with torch.device("meta"):
        twin = type(model).from_config(dict(model.config))
    if model.dtype != torch.float32:
        torch.nn.Module.to(twin, model.dtype)  # plain Module.to: diffusers' override warns about fp32 modules
    return twin.eval().requires_grad_(False)


class AsyncDenoise(ParallelMethod):
    """Asynchronous denoising over mesh dimension "async": N components on N ranks (N+1 ranks with stride 2).

    `components=None` takes the ranks the other methods leave. `warmup_steps` synchronous (exact) scheduler steps
    come first; `stride=2` computes two steps per round (paper's stride denoising); `time_shift` feeds each async
    step the previous step's timestep (paper's time shift). `compile` / `cuda_graph`: as everywhere in paradiff
    (`paradiff.execution.Execution`), for the steady-state steps.
    """

    mesh_dim = "async"

    def __init__(self, components: int | None = None, *, stride: int = 1, warmup_steps: int = DEFAULT_WARMUP,
                 time_shift: bool = False, compile: bool | dict = False, cuda_graph: bool | None = None):
        if stride not in (1, 2):
            raise UserError(f"AsyncDenoise stride must be 1 or 2, got {stride}.")
        if components is not None and (not isinstance(components, int) or components < 1
                                       or components + stride - 1 < 2):
            raise UserError(f"AsyncDenoise needs components >= 2 (>= 1 with stride 2), got {components!r}.")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise UserError(f"AsyncDenoise needs warmup_steps >= 1 (the first step fills the stale values), "
                            f"got {warmup_steps!r}.")
        self.components, self.stride, self.warmup_steps = components, stride, warmup_steps
        self.time_shift = bool(time_shift)
        self.execution = Execution(compile, cuda_graph)
        self.split: Split | None = None
        self.state: _State | None = None

    def degree(self) -> int | None:
        return None if self.components is None else self.components + self.stride - 1

    def apply(self, target: Parallelized) -> None:
        self.execution.graphs_on(target.device)  # cuda_graph=True without a GPU: say so now
        model, group = target.denoiser, target.group(self)
        size = dist.get_world_size(group)
        n = size - (self.stride - 1)
        if n < 1 or size < 2:
            raise UserError(f"AsyncDenoise with stride {self.stride} needs at least 2 ranks (N components + "
                            f"{self.stride - 1}), got {size}.")
        self.split = plan = split(model, n)
        self.state = state = _State(plan, group, self.stride)
        state.twin = _meta_twin(model)
        for unit, name in enumerate(plan.graph.units):
            module = model.get_submodule(name)
            local = plan.component_of(unit) == state.comp
            if not local:
                free_weights(module, f"the denoiser's {name}",
                             "another rank runs it under AsyncDenoise; load the model again to run it whole.")
            target.register(module, _UnitHook(state, unit, name, local), HOOK_NAME, watch=name)
        target.register(model, _Controller(state, model, target, self.warmup_steps, self.time_shift,
                                           self.execution), HOOK_NAME)

    def check(self, target: Parallelized) -> None:
        for module in target.denoiser.modules():
            if getattr(module, "fused_projections", False):
                raise UserError("attention projections were fused after parallelize (fuse_qkv_projections); "
                                "AsyncDenoise cannot fuse weights other ranks hold: call unfuse_qkv_projections().")

    def __repr__(self) -> str:
        return (f"AsyncDenoise(components={self.components}, stride={self.stride}, warmup_steps={self.warmup_steps}, "
                f"time_shift={self.time_shift}, compile={self.execution.compile!r}, "
                f"cuda_graph={self.execution.cuda_graph!r})")


def apply_to_module(model: torch.nn.Module, group: Any, scheduler: Callable[[], Any], **config: Any) -> Split:
    """Asynchronous denoising on a bare denoiser over `group`; `scheduler()` returns the live scheduler. Drops the
    weights of the units this rank does not run; returns the split."""
    method = AsyncDenoise(**config)
    parallelize_module(model, method, groups={AsyncDenoise.mesh_dim: group}, scheduler=scheduler)
    return method.split
