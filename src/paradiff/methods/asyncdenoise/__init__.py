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

from paradiff.errors import UserError
from paradiff.execution import Execution
from paradiff.execution.weights import free_weights
from paradiff.methods.asyncdenoise.controller import _Controller
from paradiff.methods.asyncdenoise.units import _ControlNetHook, _State, _UnitHook
from paradiff.methods.split import CONTROLNET, Split, controlnet_configs, controlnet_twin, split
from paradiff.parallel import ParallelMethod, Parallelized, parallelize_module
from paradiff.plans.common import meta_model

HOOK_NAME = "paradiff.async"
DEFAULT_WARMUP = 3


def _meta_twin(model: torch.nn.Module, twin: torch.nn.Module) -> torch.nn.Module:
    """`twin` (a meta-device copy of `model`) in `model`'s dtype, for the output shapes of units run elsewhere."""
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
        self.split = plan = split(model, n, target.controlnet)
        self.state = _State(plan, group, self.stride)
        self._hook_units(target, model, _meta_twin(model, meta_model(type(model), dict(model.config))), "",
                         "the denoiser's", "load the model again to run it whole.")
        self.controller = _Controller(self.state, model, target, self.warmup_steps, self.time_shift, self.execution)
        target.register(model, self.controller, HOOK_NAME)

    def apply_controlnet(self, target: Parallelized) -> None:
        """The ControlNet's units, split with the denoiser's, run on the ranks of their components, at its call;
        its hook exchanges what they produce (see `_ControlNetHook`)."""
        net = target.controlnet
        twin = _meta_twin(net, controlnet_twin(controlnet_configs(net)))
        self._hook_units(target, net, twin, CONTROLNET, "the ControlNet's", "load it again to run it whole.")
        target.register(net, _ControlNetHook(self.state, self.controller, twin), HOOK_NAME)

    def _hook_units(self, target: Parallelized, root: torch.nn.Module, twin: torch.nn.Module, prefix: str,
                    what: str, remedy: str) -> None:
        """A `_UnitHook` on each unit of the split inside `root` (the denoiser: no prefix; the ControlNet: the
        units named `prefix` + the module's name); the weights of the units other ranks run are freed."""
        state = self.state
        for unit, name in enumerate(state.plan.graph.units):
            if name.startswith(CONTROLNET) != bool(prefix):
                continue
            inner = name[len(prefix):]
            module = root.get_submodule(inner)
            local = state.plan.component_of(unit) == state.comp
            if not local:
                free_weights(module, f"{what} {inner}", f"another rank runs it under AsyncDenoise; {remedy}")
            target.register(module, _UnitHook(state, unit, name, local, twin.get_submodule(inner)), HOOK_NAME,
                            watch=inner, root=root)

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
