"""`parallelize(pipe, *methods)` and `unparallelize(pipe)`: plans of hooks applied to a stock diffusers pipeline.

Each method spans one named dimension of a device mesh, in the order given (outermost first), e.g.
`parallelize(pipe, CFGParallel(), PatchParallel())` on 4 ranks builds the mesh {"cfg": 2, "patch": 2}.

Everything is installed on the pipeline's *components* (diffusers `ModelHook`s on the denoiser and its layers, on
the text encoders and the VAE decoder), never on the pipeline object, so a pipeline made from it with
`from_pipe` shares the parallel denoiser. Around every denoiser call an outermost hook ticks the step clock and,
at the first call of each generation, checks what the methods cannot honour (a model changed after parallelize,
FreeU under patch parallelism, ...) and that every rank starts from the same inputs.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry, ModelHook
from torch.utils import _pytree as pytree

from paradiff import main_rank, runtime
from paradiff.comm import all_gather, guarded
from paradiff.errors import UserError
from paradiff.execution import Execution, StepClock, Tick
from paradiff.plans.common import check_control_images, controlnet_of, denoiser_of, row_pixels, timestep_of

GENERATION_HOOK = "paradiff.generation"
CONTROLNET_RESIDUALS = ("down_block_additional_residuals", "mid_block_additional_residual")


class ParallelMethod:
    """Base class of a parallel method: a plan applied to an unchanged pipeline over one mesh dimension.

    Subclasses set `mesh_dim` and implement `apply(target)`; `degree` returns how many ranks the method spans (None:
    all ranks the other methods leave); `check(target)` runs at the start of each generation and raises a UserError
    for a pipeline state the method cannot compute exactly.
    """

    mesh_dim: ClassVar[str] = ""
    execution: Execution = Execution()

    @property
    def compile(self) -> bool | dict:
        return self.execution.compile

    @property
    def cuda_graph(self) -> bool | None:
        return self.execution.cuda_graph

    def degree(self) -> int | None:
        return None

    def apply(self, target: "Parallelized") -> None:
        raise NotImplementedError

    def check(self, target: "Parallelized") -> None:
        """Called at the first denoiser call of every generation."""

    def apply_controlnet(self, target: "Parallelized") -> None:
        """Install the method on the pipeline's ControlNet (`target.controlnet`). Called after every method's
        `apply`, innermost mesh dimension first, so the outer dimension's hook (CFG's batch split) wraps the inner
        ones on the ControlNet, as it does inside the denoiser's blocks."""


class Parallelized:
    """What `parallelize` installed on one pipeline's components, so it can be checked each generation and undone.

    Methods register their hooks through `register` (removed by `unparallelize`, last first) and read the
    current step from `clock`. `controlnet`: the pipeline's ControlNet, which it calls once per step before the
    denoiser; the step clock ticks at whichever of the two a step calls first, so both see the same step.
    """

    def __init__(self, denoiser: torch.nn.Module, methods: tuple[ParallelMethod, ...], groups: dict[str, Any],
                 device: torch.device, *, host: Any = None, is_main: bool = True,
                 row_pixels: tuple[int, str] = (8, "image"), check_inputs: bool = True,
                 controlnet: torch.nn.Module | None = None):
        self.denoiser = denoiser
        self.controlnet = controlnet
        self.methods = methods
        self.groups = groups
        self.device = torch.device(device)
        self.is_main = is_main
        self.host = host
        self.clock = StepClock(host, on_start=self._generation_starts)
        self.row_pixels = row_pixels  # (pixels per latent row, of which image): for size errors
        self.check_inputs = check_inputs
        self._hooks: list[tuple[torch.nn.Module, str]] = []
        self._watched: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
        self._ahead: Tick | None = None  # the ControlNet's tick, which the denoiser call of its step takes

    def group(self, method: ParallelMethod) -> Any:
        return self.groups[method.mesh_dim]

    def start(self) -> None:
        """A new generation starts (bare models; a pipeline's scheduler says so itself)."""
        self.clock.start(self.clock.scheduler)

    @property
    def tick(self) -> Tick:
        return self.clock.current

    def step_tick(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[Tick, bool]:
        """The tick of this call and whether it starts its step: the ControlNet ticks the clock and leaves the tick
        to the denoiser call that follows it; a denoiser called alone ticks it itself."""
        if module is self.controlnet:
            self._ahead = self.clock.tick(timestep_of(module, args, kwargs))
            return self._ahead, True
        if self._ahead is not None:
            tick, self._ahead = self._ahead, None
            return tick, False
        return self.clock.tick(timestep_of(module, args, kwargs)), True

    def register(self, module: torch.nn.Module, hook: ModelHook, name: str, watch: str | None = None,
                 root: torch.nn.Module | None = None) -> None:
        """Register `hook` on `module` (undone by `unparallelize`); `watch` names it in `root` (default: the
        denoiser), so that a module replaced after parallelize (a LoRA layer, fused projections) is caught before
        it computes."""
        registry = HookRegistry.check_if_exists_or_initialize(module)
        if registry.get_hook(name) is not None:
            raise UserError(f"{name} is already applied to this model; call paradiff.unparallelize(pipe) first.")
        registry.register_hook(hook, name)
        self._hooks.append((module, name))
        if watch is not None:
            self._watched.append((self.denoiser if root is None else root, watch, module))

    def _generation_starts(self) -> None:
        self._ahead = None
        for model in (self.denoiser, self.controlnet):
            if model is not None:
                HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)

    def check_model(self) -> None:
        """The modules the plans hooked are still the denoiser's (nothing replaced them after parallelize)."""
        for root, name, module in self._watched:
            try:
                current = root.get_submodule(name)
            except AttributeError:
                current = None
            if current is not module:
                raise UserError(f"the model was changed after parallelize ({name} was replaced: a LoRA loaded, "
                                "projections fused?); call paradiff.unparallelize(pipe), change the model, then "
                                "parallelize it again.")
        if any(hasattr(model, "_hf_hook") for model in (self.denoiser, self.controlnet) if model is not None):
            raise UserError("CPU offloading (enable_model_cpu_offload and the like) cannot be combined with paradiff's "
                            "parallel methods; each rank keeps its model on its own GPU.")

    def remove(self) -> None:
        for module, name in reversed(self._hooks):
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(name, recurse=False)
        self._hooks.clear()
        self.clock.detach()
        if getattr(self.denoiser, "_paradiff", None) is self:
            del self.denoiser._paradiff
        if getattr(self.controlnet, "_paradiff", None) is self:
            del self.controlnet._paradiff


def _fingerprint(args: tuple, kwargs: dict, device: torch.device) -> torch.Tensor:
    """Sums of every floating input tensor: equal on every rank when the ranks start from the same inputs."""
    parts = [torch.stack([x.float().sum(), x.float().abs().sum()]).to(device)
             for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor) and x.is_floating_point()]
    return torch.nan_to_num(torch.cat(parts)) if parts else torch.zeros(1, device=device)


class GenerationHook(ModelHook):
    """Outermost hook of the denoiser (and of the ControlNet): ticks the clock; at each generation's first call,
    checks the pipeline state and that every rank got the same inputs; turns a failed collective into one
    sentence."""

    def __init__(self, target: Parallelized, what: str = "a denoiser step"):
        super().__init__()
        self.target, self.what = target, what

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        target = self.target
        tick, starts = target.step_tick(module, args, kwargs)
        if tick.first:
            if module is target.controlnet:
                check_control_images(module, args, kwargs)
            if starts:
                target.check_model()
                for method in target.methods:
                    method.check(target)
            if target.check_inputs:
                if target.controlnet is not None:  # its residuals are this rank's part (its inputs were checked)
                    kwargs_seen = {k: v for k, v in kwargs.items() if k not in CONTROLNET_RESIDUALS}
                self._check_same_inputs(args, kwargs_seen if target.controlnet is not None else kwargs)
        with guarded(self.what):
            return self.fn_ref.original_forward(*args, **kwargs)

    def _check_same_inputs(self, args: tuple, kwargs: dict) -> None:
        local = _fingerprint(args, kwargs, self.target.device)
        with guarded("the first denoiser step (checking that every rank has the same inputs)"):
            gathered = all_gather(local.unsqueeze(0), 0, dist.group.WORLD)
        if not bool((gathered == gathered[:1]).all()):  # one host sync per generation
            raise UserError("the ranks called the pipeline with different inputs (latents, prompts or embeddings "
                            "differ at the first step): give every rank the same seed, e.g. "
                            "generator=torch.Generator().manual_seed(0), and the same arguments.")


def resolve_mesh_dims(methods: tuple[ParallelMethod, ...], world_size: int) -> dict[str, int]:
    """Sizes of each method's mesh dimension; a method with no fixed degree takes the ranks left over."""
    dims: dict[str, int | None] = {}
    for method in methods:
        if not isinstance(method, ParallelMethod):
            raise UserError(f"{method!r} is not a paradiff parallel method (PatchParallel, CFGParallel, AsyncDenoise).")
        if method.mesh_dim in dims:
            raise UserError(f"two methods use the same mesh dimension {method.mesh_dim!r}.")
        dims[method.mesh_dim] = method.degree()
    fixed = 1
    for size in dims.values():
        fixed *= size or 1
    free = [name for name, size in dims.items() if size is None]
    if len(free) > 1:
        raise UserError(f"only one method may take the remaining ranks; give a size to one of {free}.")
    if free:
        if world_size % fixed:
            raise UserError(f"{world_size} ranks cannot be split into groups of {fixed}.")
        dims[free[0]] = world_size // fixed
    return {name: int(size) for name, size in dims.items()}  # type: ignore[arg-type]


def parallelized(pipe: Any) -> Parallelized | None:
    """The installation on `pipe`'s denoiser (shared by pipelines made with `from_pipe`), or None."""
    return getattr(denoiser_of(pipe), "_paradiff", None)


def parallelize(pipe: Any, *methods: ParallelMethod, device: str | None = None,
                main_rank_stages: bool = True) -> Any:
    """Apply `methods` to `pipe` in place and move it to this rank's device; returns `pipe`.

    Call it in every rank (under torchrun or `paradiff ... --nproc N`). Only rank 0 shows progress bars.
    `main_rank_stages`: the text encoders and the VAE decoder run on rank 0 only (their outputs are broadcast; the
    other ranks free those weights and decode blank images), see `paradiff.main_rank`.
    """
    if not methods:
        raise UserError("parallelize() needs at least one method, e.g. paradiff.PatchParallel().")
    rt = runtime.init(device)
    dims = resolve_mesh_dims(methods, rt.world_size)
    for name, size in dims.items():
        if size < 2:
            raise UserError(
                f"the {name!r} method needs at least 2 ranks but gets {size}; start the job with more ranks "
                "(--nproc N or torchrun --nproc-per-node N)."
            )
    if parallelized(pipe) is not None:
        raise UserError("this pipeline is already parallelized; call paradiff.unparallelize(pipe) first.")
    mesh = runtime.mesh(dims)
    pipe.to(rt.device)
    target = Parallelized(denoiser_of(pipe), methods, {name: mesh.get_group(name) for name in dims}, rt.device,
                          host=pipe, is_main=rt.is_main, row_pixels=row_pixels(pipe), controlnet=controlnet_of(pipe))
    _install(target, lambda: main_rank.install(pipe, target) if main_rank_stages else None)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=not rt.is_main)
    return pipe


def _install(target: Parallelized, extra: Any = None) -> None:
    for model in (target.denoiser, target.controlnet):
        if getattr(model, "_paradiff", None) is not None:
            raise UserError("this model is already parallelized; call paradiff.unparallelize first.")
    try:
        for method in target.methods:
            method.apply(target)
        if target.controlnet is not None:
            for method in reversed(target.methods):
                method.apply_controlnet(target)
        target.register(target.denoiser, GenerationHook(target), GENERATION_HOOK)
        if target.controlnet is not None:
            target.register(target.controlnet, GenerationHook(target, "a ControlNet step"), GENERATION_HOOK)
        if extra is not None:
            extra()
    except BaseException:
        target.remove()
        raise
    target.denoiser._paradiff = target
    if target.controlnet is not None:
        target.controlnet._paradiff = target


class _SchedulerHost:
    """Stands in for a pipeline when a bare model is stepped by a scheduler the caller owns."""

    def __init__(self, scheduler: Callable[[], Any]):
        self._scheduler = scheduler

    @property
    def scheduler(self) -> Any:
        return self._scheduler()


def parallelize_module(model: torch.nn.Module, *methods: ParallelMethod, groups: dict[str, Any],
                       scheduler: Callable[[], Any] | None = None, device: Any = None,
                       controlnet: torch.nn.Module | None = None) -> Parallelized:
    """Apply `methods` to a bare denoiser over the process groups `groups` (mesh dimension -> group).

    `scheduler()` returns the scheduler whose `set_timesteps` starts each generation; without one, the caller
    starts each generation with `.start()` on the result and every denoiser call counts as one step.
    `controlnet`: the ControlNet whose residuals the caller passes to the denoiser (called before it, each step).
    """
    device = device if device is not None else next(model.parameters()).device
    host = _SchedulerHost(scheduler) if scheduler is not None else None
    target = Parallelized(model, methods, groups, device, host=host, check_inputs=False, controlnet=controlnet)
    _install(target)
    return target


def unparallelize(pipe: Any) -> Any:
    """Remove every hook `parallelize` installed; returns `pipe`.

    On rank 0 the pipeline is then the serial pipeline again. Weights a rank freed (the text encoders and the VAE
    decoder on ranks other than 0, the components other ranks ran under AsyncDenoise) cannot come back: using
    them raises a UserError that says so.
    """
    target = parallelized(pipe)
    if target is None:
        raise UserError("this pipeline is not parallelized (paradiff.parallelize was not applied to it).")
    target.remove()
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=False)
    return pipe
