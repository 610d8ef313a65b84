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
  buffers); communication stays outside the compiled/captured region, on the static buffers.
What runs where: each rank holds and runs only its component's blocks plus the shared small layers; the scheduler
step runs on every rank; prompt encoding and VAE decoding run on rank 0 only (`paradiff.main_rank`).
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from typing import Any, Callable

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry, ModelHook
from torch.utils import _pytree as pytree

from paradiff.bench import clock_mark
from paradiff.errors import UserError
from paradiff.main_rank import free_weights
from paradiff.methods.split import Split, split
from paradiff.parallel import ParallelMethod

HOOK_NAME = "paradiff.async"
DEFAULT_WARMUP = 3


def _tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def _meta(obj: Any) -> Any:
    return pytree.tree_map(lambda x: torch.empty(x.shape, dtype=x.dtype, device="meta") if _tensor(x) else x, obj)


def _signature(obj: Any) -> tuple:
    leaves, spec = pytree.tree_flatten(obj)
    return (str(spec),) + tuple((tuple(x.shape), x.dtype) if _tensor(x) else repr(x) for x in leaves)


def _clock(like: Any) -> Any:
    """A timing mark on the device of `like` (a CUDA event, no sync), or the host clock."""
    return clock_mark(like.device if _tensor(like) else torch.device("cpu"))


class _State:
    """What the controller and the unit hooks of one denoiser share on this rank."""

    def __init__(self, model: torch.nn.Module, plan: Split, group: Any, stride: int):
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
        self.works: list = []
        self.send_buf: dict[tuple[int, int], torch.Tensor] = {}
        self.recv_buf: dict[tuple[int, int], torch.Tensor] = {}
        self.placeholders: dict[tuple, torch.Tensor] = {}
        self.structures: dict[tuple, tuple] = {}
        self.transfers = plan.transfers()
        self.recv_keys = {(p, leaf) for p, leaf, _, dst in self.transfers if dst == self.comp}
        self.timings: list | None = None  # set to [] to record (mode, start, end) around each forward (benchmarks)
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

    def exchange(self, send: bool, recv: bool) -> None:
        """Post the sends of this rank's staged values and/or the receives of the values it consumes, as one batch
        in the order every rank agrees on. Async steps do both after the compute (the values are for the next
        step); sync steps receive before the compute and send after it."""
        ops = []
        for producer, leaf, src, dst in self.transfers:
            if send and src == self.comp and not self.extra:
                for peer in self.ranks_of(dst):
                    ops.append(dist.P2POp(dist.isend, self.send_buf[(producer, leaf)], group=self.group,
                                          group_peer=peer))
            if recv and dst == self.comp:
                ops.append(dist.P2POp(dist.irecv, self.recv_buf[(producer, leaf)], group=self.group,
                                      group_peer=src))
        if ops:
            self.works.extend(dist.batch_isend_irecv(ops))

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works.clear()


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
                    key = (self.unit, leaf)
                    value = leaves[leaf]
                    buf = st.send_buf.get(key)
                    if buf is None or buf.shape != value.shape or buf.dtype != value.dtype:
                        buf = st.send_buf[key] = torch.empty_like(value, memory_format=torch.contiguous_format)
                    buf.copy_(value)
                    if st.mode == "discover":
                        st.works.extend(dist.isend(buf, group=st.group, group_dst=peer) for peer in peers)
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
                buf = st.recv_buf.get(key)
                if buf is None or buf.shape != shape or buf.dtype != dtype:
                    buf = st.recv_buf[key] = torch.zeros(shape, dtype=dtype, device=device)
                if st.mode == "discover":
                    src = st.plan.component_of(self.unit)
                    dist.recv(buf, group=st.group, group_src=src)
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


class _Graphed:
    """One CUDA graph of `fn` at fixed input shapes: inputs are copied into static tensors, then replayed."""

    def __init__(self, fn: Callable, args: tuple, kwargs: dict):
        leaves, self.spec = pytree.tree_flatten((args, kwargs))
        self.static = [x.clone() if _tensor(x) else x for x in leaves]
        a, k = pytree.tree_unflatten(self.static, self.spec)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn(*a, **k)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(*a, **k)

    def __call__(self, args: tuple, kwargs: dict):
        for dst, src in zip(self.static, pytree.tree_leaves((args, kwargs))):
            if _tensor(dst):
                dst.copy_(src)
        self.graph.replay()
        return self.out


class _Controller(ModelHook):
    """Per denoiser call: step index from the scheduler, sync/async/idle mode, timestep shift, exchange, broadcast."""

    def __init__(self, state: _State, model: torch.nn.Module, scheduler: Callable[[], Any], warmup: int,
                 time_shift: bool, compile: bool | str, cuda_graph: bool):
        super().__init__()
        self.state, self.scheduler, self.warmup, self.time_shift = state, scheduler, warmup, time_shift
        self.compile, self.cuda_graph = compile, cuda_graph
        names = list(inspect.signature(type(model).forward).parameters)[1:]
        self.t_pos = names.index("timestep")
        self._ts = None
        self._count = self._offset = self._total = 0
        self._compiled = None
        self._graphs: dict[tuple, _Graphed] = {}
        self._pending = None     # stride 2, rank N-1: its output for the next (idle) step
        self._out_spec = None

    # -- step bookkeeping -------------------------------------------------------------------------------------
    def _timestep(self, args, kwargs):
        return args[self.t_pos] if len(args) > self.t_pos else kwargs["timestep"]

    def _with_timestep(self, args, kwargs, value):
        old = self._timestep(args, kwargs)
        new = value.to(old.device, old.dtype).expand(old.shape) if _tensor(old) else float(value)
        if len(args) > self.t_pos:
            return args[: self.t_pos] + (new,) + args[self.t_pos + 1:], kwargs
        return args, {**kwargs, "timestep": new}

    def _step(self, args, kwargs) -> tuple[int, int]:
        """(index into scheduler.timesteps, call count within this generation)."""
        ts = self.scheduler().timesteps
        if ts is None:
            raise UserError("AsyncDenoise: the scheduler has no timesteps; call the pipeline (or set_timesteps) first.")
        if ts is not self._ts or self._count >= self._total:
            t = self._timestep(args, kwargs)
            t0 = t.reshape(-1)[0].to(ts.device, ts.dtype) if _tensor(t) else torch.tensor(t, dtype=ts.dtype)
            hits = (ts == t0).nonzero()
            self._ts, self._count = ts, 0
            self._offset = int(hits[0, 0]) if len(hits) else 0
            self._total = len(ts) - self._offset
        count = self._count
        self._count += 1
        return self._offset + count, count

    # -- running ------------------------------------------------------------------------------------------------
    def _run(self, args, kwargs):
        fn = self.fn_ref.original_forward
        if self.state.mode == "discover" or not (self.compile or self.cuda_graph):
            return fn(*args, **kwargs)
        if self.compile and self._compiled is None:
            backend = self.compile if isinstance(self.compile, str) else "inductor"
            self._compiled = torch.compile(fn, backend=backend, dynamic=False)
        fn = self._compiled or fn
        if not self.cuda_graph:
            return fn(*args, **kwargs)
        key = _signature((args, kwargs))
        if key not in self._graphs:
            try:
                self._graphs[key] = _Graphed(fn, args, kwargs)
            except Exception as err:  # noqa: BLE001 - capture fails on some ops/versions; stay correct, go slower
                warnings.warn(f"AsyncDenoise: CUDA graph capture failed ({type(err).__name__}: {err}); "
                              "continuing without CUDA graphs.", stacklevel=2)
                torch.cuda.synchronize()
                self.cuda_graph = False
                return fn(*args, **kwargs)
        return self._graphs[key](args, kwargs)

    def _broadcast(self, leaves: list, src: int) -> list:
        st = self.state
        out = []
        for x in leaves:
            if _tensor(x):
                x = x.clone() if self.cuda_graph else x.contiguous()
                dist.broadcast(x, group=st.group, group_src=src)
            out.append(x)
        return out

    def new_forward(self, module, *args, **kwargs):
        st = self.state
        index, count = self._step(args, kwargs)
        ts = self._ts
        last = len(ts) - 1
        sync = count < self.warmup
        if st.stride == 2 and not sync and (count - self.warmup) % 2 == 1:
            # idle step of a stride-2 round: rank N-1 computed this step's noise during the round
            leaves = self._pending if st.grank == st.n - 1 else [
                torch.empty(s, dtype=d, device=dev) if s is not None else None for s, d, dev in self._out_meta]
            return pytree.tree_unflatten(self._broadcast(leaves, st.n - 1), self._out_spec)
        shift = 1 if (self.time_shift and not sync) else 0
        t_index = index - shift
        src = st.n - 1
        if st.stride == 2 and not sync:
            src = st.n
            if not st.extra:
                t_index = min(index + 1, last) - shift
        if t_index != index:
            args, kwargs = self._with_timestep(args, kwargs, ts[t_index])
        signature = _signature((args, kwargs))
        if sync and signature != st.signature:
            st.mode = "discover"  # new shapes: find them while passing the values down the ranks (eager)
            out = self._run(args, kwargs)
            st.signature = signature
        else:
            st.mode = "static"
            if sync:
                st.exchange(send=False, recv=True)
                st.wait()
            start = _clock(self._timestep(args, kwargs)) if st.timings is not None else None
            out = self._run(args, kwargs)
            if start is not None:
                st.timings.append(("sync" if sync else "async", start, _clock(self._timestep(args, kwargs))))
            st.exchange(send=True, recv=not sync)
        st.wait()
        leaves, self._out_spec = pytree.tree_flatten(out)
        self._out_meta = [(x.shape, x.dtype, x.device) if _tensor(x) else (None, None, None) for x in leaves]
        if st.stride == 2 and not sync and st.grank == st.n - 1:
            self._pending = [x.clone() if _tensor(x) else x for x in leaves]
        return pytree.tree_unflatten(self._broadcast(leaves, src), self._out_spec)


def apply_to_module(model: torch.nn.Module, group: Any, scheduler: Callable[[], Any], *, stride: int = 1,
                    warmup_steps: int = DEFAULT_WARMUP, time_shift: bool = False, compile: bool | str = False,
                    cuda_graph: bool = False) -> Split:
    """Install asynchronous denoising on a bare denoiser over `group`; `scheduler()` returns the live scheduler.

    Drops the weights of the units this rank does not run. Returns the split.
    """
    size = dist.get_world_size(group)
    n = size - (stride - 1)
    if n < 1 or size < 2:
        raise UserError(f"AsyncDenoise with stride {stride} needs at least 2 ranks (N components + {stride - 1}), "
                        f"got {size}.")
    registry = HookRegistry.check_if_exists_or_initialize(model)
    if registry.get_hook(HOOK_NAME) is not None:
        raise UserError("AsyncDenoise is already applied to this model.")
    plan = split(model, n)
    state = _State(model, plan, group, stride)
    state.twin = _meta_twin(model)
    for unit, name in enumerate(plan.graph.units):
        module = model.get_submodule(name)
        local = plan.component_of(unit) == state.comp
        if not local:
            free_weights(module)
        HookRegistry.check_if_exists_or_initialize(module).register_hook(
            _UnitHook(state, unit, name, local), HOOK_NAME)
    registry.register_hook(
        _Controller(state, model, scheduler, warmup_steps, time_shift, compile, cuda_graph), HOOK_NAME)
    model._paradiff_async = state
    return plan


def _meta_twin(model: torch.nn.Module) -> torch.nn.Module:
    with torch.device("meta"):
        twin = type(model).from_config(dict(model.config))
    if model.dtype != torch.float32:
        torch.nn.Module.to(twin, model.dtype)  # plain Module.to: diffusers' override warns about fp32 modules
    return twin.eval().requires_grad_(False)


class AsyncDenoise(ParallelMethod):
    """Asynchronous denoising over mesh dimension "async": N components on N ranks (N+1 ranks with stride 2).

    `components=None` takes the ranks the other methods leave. `warmup_steps` synchronous (exact) steps come first;
    `stride=2` computes two steps per round (paper's stride denoising); `time_shift` feeds each async step the
    previous step's timestep (paper's time shift). `compile` (True or a torch.compile backend name) and
    `cuda_graph` speed up the steady-state steps.
    """

    mesh_dim = "async"

    def __init__(self, components: int | None = None, *, stride: int = 1, warmup_steps: int = DEFAULT_WARMUP,
                 time_shift: bool = False, compile: bool | str = False, cuda_graph: bool = False):
        if stride not in (1, 2):
            raise UserError(f"AsyncDenoise stride must be 1 or 2, got {stride}.")
        if components is not None and (not isinstance(components, int) or components < 1
                                       or components + stride - 1 < 2):
            raise UserError(f"AsyncDenoise needs components >= 2 (>= 1 with stride 2), got {components!r}.")
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise UserError(f"AsyncDenoise needs warmup_steps >= 1 (the first step fills the stale values), "
                            f"got {warmup_steps!r}.")
        self.components, self.stride, self.warmup_steps = components, stride, warmup_steps
        self.time_shift, self.compile, self.cuda_graph = bool(time_shift), compile, bool(cuda_graph)
        self.split: Split | None = None

    def degree(self) -> int | None:
        return None if self.components is None else self.components + self.stride - 1

    def apply(self, pipe: Any, mesh: Any) -> None:
        from paradiff.methods.cfg import denoiser_of

        if self.cuda_graph and not torch.cuda.is_available():
            raise UserError("AsyncDenoise(cuda_graph=True) needs a CUDA GPU.")
        group = mesh.get_group(self.mesh_dim)
        ref = weakref.ref(pipe)
        self.split = apply_to_module(
            denoiser_of(pipe), group, lambda: ref().scheduler, stride=self.stride, warmup_steps=self.warmup_steps,
            time_shift=self.time_shift, compile=self.compile, cuda_graph=self.cuda_graph)

    def __repr__(self) -> str:
        return (f"AsyncDenoise(components={self.components}, stride={self.stride}, warmup_steps={self.warmup_steps}, "
                f"time_shift={self.time_shift})")
