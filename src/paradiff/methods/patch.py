"""Displaced patch parallelism (DistriFusion, CVPR 2024) for UNet2DConditionModel pipelines.

The latent is split into N horizontal bands of rows, one per rank. Every rank runs the whole pipeline loop; the
UNet call is wrapped to run on this rank's rows and all-gather the output rows, so the scheduler step is identical on
all ranks. Inside the UNet, the plan in `paradiff.plans.unet2d` hooks every conv, self-attention and GroupNorm so they
see the whole image: exactly in the first `warmup_steps` steps, then from the previous step's activations of the
other patches, exchanged asynchronously while the step computes (`paradiff.comm`). `mode="naive"` is the baseline
with no interaction between patches (zero padding at the seams, local attention and statistics).

Steps are replayed from CUDA graphs on CUDA (`cuda_graph`), and stale steps can be compiled (`compile=True`).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch.utils import _pytree as pytree

from paradiff.comm import StaleExchange, all_gather
from paradiff.errors import UserError
from paradiff.methods.cfg import denoiser_of
from paradiff.parallel import ParallelMethod
from paradiff.plans import unet2d
from paradiff.plans.patch_layers import GN_MODES, auto_gn_mode

HOOK_NAME = "paradiff.patch"
MODES = ("displaced", "naive")


class PatchParallel(ParallelMethod):
    """Split the latent rows over the ranks of mesh dimension "patch" (all ranks left by other methods).

    warmup_steps: first steps run fully synchronous (exact); at least the first step always is.
    gn_mode: GroupNorm statistics in stale steps: auto (default: corrected when each patch has >= 16 latent
        rows, stale below, where the corrected estimate breaks down), corrected (paper), sync, stale, separate.
    mode: "displaced" (DistriFusion) or "naive" (patches never interact: the baseline that shows seams).
    compile: torch.compile the stale steps (True, or a dict of torch.compile keyword arguments). Off by default: it
        costs ~3 minutes per rank before the first SDXL image, then ~25 instead of ~34 ms per step (2 x H200, 1024 px;
        benchmarks/results/patch-h200). Worth it for many images, not for one.
    bucket_mb: stale activations are all-gathered in buckets of about this many MiB (fewer, larger collectives,
        still overlapping the step; 0: one collective per layer).
    compile_warmup: compile the synchronous warm-up steps too (a second compiled graph: twice the compile time,
        for a few milliseconds on each of the first `warmup_steps` steps). Off by default.
    cuda_graph: replay steps from CUDA graphs (one for warm-up steps, one for stale steps), each captured after
        `graph_warmup` steps of its phase; None: on CUDA only.
    """

    mesh_dim = "patch"

    def __init__(self, warmup_steps: int = 4, gn_mode: str = "auto", mode: str = "displaced",
                 compile: bool | dict = False, cuda_graph: bool | None = None, graph_warmup: int = 1,
                 compile_warmup: bool = False, bucket_mb: float = 16.0):
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise UserError(f"warmup_steps must be a whole number >= 0, got {warmup_steps!r}.")
        if gn_mode not in GN_MODES:
            raise UserError(f"gn_mode must be one of {', '.join(GN_MODES)}; got {gn_mode!r}.")
        if mode not in MODES:
            raise UserError(f"mode must be one of {', '.join(MODES)}; got {mode!r}.")
        if cuda_graph and not torch.cuda.is_available():
            raise UserError("cuda_graph=True needs a CUDA GPU; PyTorch sees none.")
        self.warmup_steps = warmup_steps
        self.gn_mode = gn_mode
        self.mode = mode
        self.compile = compile
        self.compile_warmup = compile_warmup
        if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or not bucket_mb >= 0:
            raise UserError(f"bucket_mb must be >= 0 (0 sends each layer's activations alone), got {bucket_mb!r}.")
        self.bucket_mb = bucket_mb
        self.cuda_graph = cuda_graph
        self.graph_warmup = graph_warmup
        self.hook: PatchHook | None = None

    def apply(self, pipe: Any, mesh: Any) -> None:
        self.hook = apply_to_unet(denoiser_of(pipe), mesh.get_group(self.mesh_dim), self,
                                  vae_scale_factor=getattr(pipe, "vae_scale_factor", 8))
        self.hook.watch_scheduler(pipe)

    def __repr__(self) -> str:
        return (f"PatchParallel(warmup_steps={self.warmup_steps}, gn_mode={self.gn_mode!r}, mode={self.mode!r}, "
                f"compile={self.compile!r}, compile_warmup={self.compile_warmup}, cuda_graph={self.cuda_graph})")


def apply_to_unet(unet: torch.nn.Module, group: Any, config: PatchParallel, vae_scale_factor: int = 8) -> "PatchHook":
    """Install patch parallelism on a bare UNet; call `hook.reset()` before each new denoising run."""
    from diffusers import UNet2DConditionModel

    if not isinstance(unet, UNet2DConditionModel):
        raise UserError(f"patch parallelism supports UNet2DConditionModel pipelines (SD 1.x/2.x/XL/Turbo); this "
                        f"pipeline's denoiser is {type(unet).__name__} (use --method cfg or async).")
    registry = HookRegistry.check_if_exists_or_initialize(unet)
    if registry.get_hook(HOOK_NAME) is not None:
        raise UserError("patch parallelism is already applied to this model.")
    hook = PatchHook(unet, group, config, vae_scale_factor)
    registry.register_hook(hook, HOOK_NAME)
    return hook


# The stale exchange issues each all-gather where its payload is computed and waits for all of them in `finish()`
# (paradiff.comm). Inductor must keep that order: its comm-overlap passes keep collectives in order and sink waits,
# which serialises every all-gather at the end of the step, and its peak-memory reordering sinks the all-gathers to
# just before their waits. Both would leave the step's communication exposed (checked on the generated code in
# tests/test_patch_compile.py).
ORDER_OPTIONS = {"reorder_for_compute_comm_overlap": False, "reorder_for_peak_memory": False}


def compile_kwargs(compile: bool | dict) -> dict:
    """torch.compile arguments for the step: static shapes, and (inductor) the exchange's order kept."""
    kwargs = {"dynamic": False, **(compile if isinstance(compile, dict) else {})}
    if kwargs.get("backend", "inductor") == "inductor" and "mode" not in kwargs:
        kwargs["options"] = {**ORDER_OPTIONS, **kwargs.get("options", {})}
    return kwargs


class PatchHook(ModelHook):
    """UNet-level hook: step phase (sync/stale), row split and gather, compile and CUDA-graph dispatch."""

    def __init__(self, unet: torch.nn.Module, group: Any, config: PatchParallel, vae_scale_factor: int):
        super().__init__()
        self.group = group
        self.config = config
        self.exchange = StaleExchange(group, bucket_mb=config.bucket_mb)
        self.world, self.rank = self.exchange.world, self.exchange.rank
        self.factor = unet2d.downsampling_factor(unet)
        self.vae_scale_factor = vae_scale_factor
        hooks = unet2d.apply(unet, self.exchange, config.gn_mode) if config.mode == "displaced" else {}
        self.counts = {kind: len(installed) for kind, installed in hooks.items()}
        self.norms = hooks.get("groupnorm", [])
        self.gn_mode = config.gn_mode  # "auto" is resolved per input shape
        self.step = 0
        self._key: tuple | None = None
        self._compiled = None
        self._graphs: dict[bool, Any] = {}  # CUDA-graph runners by phase (sync: True, stale: False)
        self._seen = {True: 0, False: 0}  # steps run per phase since the buffers were made
        self._graph_failed = False
        self._pipe = None
        self._scheduler = None

    # -- step counting: a pipeline call starts with scheduler.set_timesteps ------------------------------------
    def reset(self) -> None:
        """A new denoising run starts: the next steps are warm-up (synchronous) steps again."""
        self.step = 0

    def watch_scheduler(self, pipe: Any) -> None:
        self._pipe = weakref.ref(pipe)
        self._hook_scheduler(pipe.scheduler)

    def _hook_scheduler(self, scheduler: Any) -> None:
        self._scheduler = scheduler
        original = scheduler.set_timesteps
        hook = weakref.ref(self)

        def set_timesteps(*args, **kwargs):
            if hook() is not None:
                hook().reset()
            return original(*args, **kwargs)

        scheduler.set_timesteps = set_timesteps

    def _check_scheduler(self) -> None:
        pipe = self._pipe() if self._pipe is not None else None
        if pipe is not None and pipe.scheduler is not self._scheduler:  # the user swapped the scheduler
            self._hook_scheduler(pipe.scheduler)
            self.reset()

    # -- the step ------------------------------------------------------------------------------------------------
    def _check_rows(self, rows: int) -> None:
        need = self.world * self.factor
        if rows % need:
            px = need * self.vae_scale_factor
            low, high = rows // need * need, (rows // need + 1) * need
            raise UserError(
                f"patch parallelism over {self.world} ranks needs the latent height to be a multiple of {need} "
                f"(image height a multiple of {px} px), got {rows} latent rows ({rows * self.vae_scale_factor} px); "
                f"use a height of {max(low, need) * self.vae_scale_factor} or {high * self.vae_scale_factor} px.")

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        self._check_scheduler()
        sample = args[0] if args else kwargs["sample"]
        self._check_rows(sample.shape[-2])
        key = (tuple(sample.shape), sample.dtype, sample.device)
        fresh = key != self._key
        if fresh:  # new shapes: new buffers, and the first step must be synchronous to fill them
            self.exchange.reset()
            self._key, self._graphs, self._seen = key, {}, {True: 0, False: 0}
            if self.config.gn_mode == "auto":
                self.gn_mode = auto_gn_mode(sample.shape[-2] // self.world)
                for norm in self.norms:
                    norm.mode = self.gn_mode
        displaced = self.config.mode == "displaced"
        sync = displaced and (self.step < max(1, self.config.warmup_steps) or not self.exchange.ready)
        self.exchange.sync = sync
        self.step += 1
        fn = self._body
        compile = self.config.compile
        if compile and not fresh and (not sync or self.config.compile_warmup):
            if self._compiled is None:
                self._compiled = torch.compile(self._body, **compile_kwargs(compile))
            fn = self._compiled
        graph = sample.is_cuda if self.config.cuda_graph is None else self.config.cuda_graph
        if graph and not fresh and sample.is_cuda:
            return self._replay(sync, fn, args, kwargs)
        return fn(*args, **kwargs)

    def _replay(self, sync: bool, fn: Any, args: tuple, kwargs: dict) -> Any:
        """Run the step from this phase's CUDA graph (one for synchronous, one for stale steps), captured once the
        phase has run `graph_warmup` times (so compilation and allocator warm-up happen outside the capture)."""
        self._seen[sync] += 1
        runner = self._graphs.get(sync)
        if runner is None:
            if self._graph_failed or self._seen[sync] <= self.config.graph_warmup:
                return fn(*args, **kwargs)
            from paradiff.cudagraph import GraphRunner

            runner = self._graphs[sync] = GraphRunner(fn)
        try:
            return runner(*args, **kwargs)
        except RuntimeError as err:  # capture failed (the same way on every rank): carry on without graphs
            if runner.graph is not None:
                raise
            warnings.warn(f"patch parallel: CUDA graph capture failed, running without it ({err}).")
            self._graphs, self._graph_failed = {}, True
            self.exchange.discard()
            return fn(*args, **kwargs)

    def _body(self, *args: Any, **kwargs: Any) -> Any:
        """This rank's rows through the (hooked) UNet, then the output rows of all ranks."""
        sample = args[0] if args else kwargs["sample"]
        rows = sample.shape[-2] // self.world
        local = sample.narrow(-2, self.rank * rows, rows)
        if args:
            args = (local, *args[1:])
        else:
            kwargs = {**kwargs, "sample": local}
        out = self.fn_ref.original_forward(*args, **kwargs)
        out = pytree.tree_map(
            lambda x: all_gather(x, x.dim() - 2, self.group) if isinstance(x, torch.Tensor) and x.dim() == 4 else x,
            out)
        self.exchange.finish()
        return out
