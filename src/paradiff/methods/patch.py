"""Displaced patch parallelism (DistriFusion, CVPR 2024) for UNet2DConditionModel pipelines.

The latent is split into N horizontal bands of rows, one per rank. Every rank runs the whole pipeline loop; the
UNet call is wrapped to run on this rank's rows and all-gather the output rows, so the scheduler step is identical on
all ranks. Inside the UNet, the plan in `paradiff.plans.unet2d` hooks every conv, self-attention and GroupNorm so they
see the whole image: exactly in the first `warmup_steps` scheduler steps (the step clock of `paradiff.execution`),
then from the previous step's activations of the other patches, exchanged asynchronously while the step computes
(`paradiff.comm`). `mode="naive"` is the baseline with no interaction between patches (zero padding at the seams,
local attention and statistics).

Steps are replayed from CUDA graphs on CUDA (`cuda_graph`, one graph per phase), and stale steps can be compiled
(`compile=True`), with the policy every method shares (`paradiff.execution.Execution`).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import ModelHook
from diffusers.models.attention_processor import Attention
from torch.utils import _pytree as pytree

from paradiff.comm import StaleExchange, all_gather
from paradiff.errors import UserError
from paradiff.execution import Execution
from paradiff.parallel import CONTROLNET_RESIDUALS, ParallelMethod, Parallelized, parallelize_module
from paradiff.plans import unet2d, video
from paradiff.plans.patch_layers import GN_MODES, auto_gn_mode

HOOK_NAME = unet2d.HOOK_NAME
MODES = ("displaced", "naive")

# The stale exchange issues each all-gather where its payload is computed and waits for all of them in `finish()`
# (paradiff.comm). Inductor must keep that order: its comm-overlap passes keep collectives in order and sink waits,
# which serialises every all-gather at the end of the step, and its peak-memory reordering sinks the all-gathers to
# just before their waits. Both would leave the step's communication exposed (checked on the generated code in
# tests/test_patch_compile.py).
ORDER_OPTIONS = {"reorder_for_compute_comm_overlap": False, "reorder_for_peak_memory": False}


class PatchParallel(ParallelMethod):
    """Split the latent rows over the ranks of mesh dimension "patch" (all ranks left by other methods).

    warmup_steps: the first scheduler steps run fully synchronous (exact); at least the first step always is.
    gn_mode: GroupNorm statistics in stale steps: auto (default: corrected when each patch has >= 16 latent
        rows, stale below, where the corrected estimate breaks down), corrected (paper), sync, stale, separate.
    mode: "displaced" (DistriFusion) or "naive" (patches never interact: the baseline that shows seams).
    compile: torch.compile the stale steps (True, or a dict of torch.compile keyword arguments). Off by default: it
        costs minutes per rank before the first SDXL image (benchmarks/results/patch-h200). Worth it for many
        images, not for one.
    cuda_graph: replay steps from CUDA graphs (one for warm-up steps, one for stale steps), each captured after
        `graph_warmup` steps of its phase; None: on CUDA only.
    bucket_mb: stale activations are all-gathered in buckets of about this many MiB (fewer, larger collectives,
        still overlapping the step; 0: one collective per layer).
    compile_warmup: compile the synchronous warm-up steps too (a second compiled graph: twice the compile time,
        for a few milliseconds on each of the first `warmup_steps` steps). Off by default.
    vae: decode over the patch ranks too, in bands of rows (exact; `paradiff.methods.vae`): each patch rank keeps
        its VAE decoder and holds about 1/N of its activations, instead of rank 0 decoding alone. The latent height
        must then be a multiple of N (it already is: patch parallelism needs N x 8 latent rows).
    """

    mesh_dim = "patch"

    def __init__(self, warmup_steps: int = 4, gn_mode: str = "auto", mode: str = "displaced",
                 compile: bool | dict = False, cuda_graph: bool | None = None, graph_warmup: int = 1,
                 compile_warmup: bool = False, bucket_mb: float = 16.0, vae: bool = False):
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise UserError(f"warmup_steps must be a whole number >= 0, got {warmup_steps!r}.")
        if gn_mode not in GN_MODES:
            raise UserError(f"gn_mode must be one of {', '.join(GN_MODES)}; got {gn_mode!r}.")
        if mode not in MODES:
            raise UserError(f"mode must be one of {', '.join(MODES)}; got {mode!r}.")
        if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or not bucket_mb >= 0:
            raise UserError(f"bucket_mb must be >= 0 (0 sends each layer's activations alone), got {bucket_mb!r}.")
        self.warmup_steps, self.gn_mode, self.mode = warmup_steps, gn_mode, mode
        self.execution = Execution(compile, cuda_graph, graph_warmup)
        self.compile_warmup = bool(compile_warmup)
        self.bucket_mb = bucket_mb
        if not isinstance(vae, bool):
            raise UserError(f"vae must be True or False, got {vae!r}.")
        self.vae = vae
        self.hook: PatchHook | None = None

    def apply(self, target: Parallelized) -> None:
        from diffusers import UNet2DConditionModel

        unet = target.denoiser
        if not isinstance(unet, UNet2DConditionModel) and video.patch_plan(unet) is None:
            raise UserError(f"patch parallelism supports UNet2DConditionModel pipelines (SD 1.x/2.x/XL/Turbo) and the "
                            f"video UNets ({', '.join(video.VIDEO_DENOISERS)}); this pipeline's denoiser is "
                            f"{type(unet).__name__} (use CFGParallel or AsyncDenoise).")
        self.execution.graphs_on(target.device)  # cuda_graph=True without a GPU: say so now
        self.hook = PatchHook(unet, target, target.group(self), self)
        target.register(unet, self.hook, HOOK_NAME)

        if self.vae:
            from paradiff.methods import vae as vae_method

            pipe_vae = getattr(target.host, "vae", None)
            if pipe_vae is None:
                raise UserError("PatchParallel(vae=True) splits a pipeline's VAE decode, and this model has no "
                                "pipeline VAE (parallelize_module, apply_to_unet): use paradiff.parallelize_vae(vae).")
            vae_method.install(pipe_vae, target.group(self),
                               lambda module, hook, name: target.register(module, hook, vae_method.HOOK_NAME))

    def apply_controlnet(self, target: Parallelized) -> None:
        """The ControlNet's residuals stay the rows of this rank's patch, for this rank's UNet patch."""
        self.controlnet_hook = ControlNetPatchHook(target.controlnet, target, target.group(self), self)
        target.register(target.controlnet, self.controlnet_hook, HOOK_NAME)

    def check(self, target: Parallelized) -> None:
        if self.mode != "displaced":
            return
        for i, block in enumerate(getattr(target.denoiser, "up_blocks", ())):
            if getattr(block, "b1", None) is not None:
                raise UserError("FreeU is enabled (pipe.enable_freeu): its Fourier filter would run on one patch's "
                                "rows, so patch parallelism cannot compute it; call pipe.disable_freeu(), or use "
                                "CFGParallel or AsyncDenoise.")
        for attention in self.hook.attentions:
            if getattr(attention, "fused_projections", False):
                raise UserError("the self-attention projections were fused after parallelize "
                                "(fuse_qkv_projections); patch parallelism needs them separate: call "
                                "unfuse_qkv_projections().")

    def __repr__(self) -> str:
        return (f"PatchParallel(warmup_steps={self.warmup_steps}, gn_mode={self.gn_mode!r}, mode={self.mode!r}, "
                f"compile={self.execution.compile!r}, compile_warmup={self.compile_warmup}, "
                f"cuda_graph={self.execution.cuda_graph}, graph_warmup={self.execution.graph_warmup}, "
                f"bucket_mb={self.bucket_mb}, vae={self.vae})")


def apply_to_unet(unet: torch.nn.Module, group: Any, config: PatchParallel) -> "PatchHook":
    """Install patch parallelism on a bare UNet; call `hook.reset()` before each new denoising run."""
    parallelize_module(unet, config, groups={PatchParallel.mesh_dim: group})
    return config.hook


class PatchHook(ModelHook):
    """UNet-level hook: step phase (sync/stale), row split and gather, compile and CUDA-graph dispatch."""

    gather = True  # the output rows of every rank are put together (the UNet's noise prediction)

    def __init__(self, unet: torch.nn.Module, target: Parallelized, group: Any, config: PatchParallel):
        super().__init__()
        self.target, self.group, self.config = target, group, config
        self.exchange = StaleExchange(group, bucket_mb=config.bucket_mb)
        self.world, self.rank = self.exchange.world, self.exchange.rank
        self.factor = unet2d.downsampling_factor(unet)
        self.row_pixels, self.image_name = target.row_pixels  # the upscaler: its input image, 1 px per row
        hooks = {}
        if config.mode == "displaced":
            hooks = unet2d.apply(unet, self.exchange, config.gn_mode,
                                 lambda module, hook, name: target.register(module, hook, HOOK_NAME, watch=name,
                                                                            root=unet),
                                 plan=video.patch_plan(unet) or unet2d.PATCH_PLAN)
        self.counts = {kind: len(installed) for kind, installed in hooks.items()}
        self.norms = hooks.get("groupnorm", [])
        self.attentions = [m for m in unet.modules() if isinstance(m, Attention) and not m.is_cross_attention]
        self.gn_mode = config.gn_mode  # "auto" is resolved per input shape
        self._key: tuple | None = None
        execution = config.execution
        self._compiled = execution.compiled(self._body, defaults=_order_defaults(execution))
        self._runner = execution.runner(self._run_phase, target.device, name="patch parallel",
                                        on_failure=self.exchange.discard)

    def reset(self) -> None:
        """A new denoising run starts (bare UNets; under `parallelize` the step clock says so)."""
        self.target.start()

    def _check_rows(self, rows: int) -> None:
        message = patch_rows_message(rows, self.world, self.factor, self.row_pixels, self.image_name)
        if message is not None:
            raise UserError(message)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        sample = args[0] if args else kwargs["sample"]
        self._check_rows(sample.shape[-2])
        key = (tuple(sample.shape), sample.dtype, sample.device)
        fresh = key != self._key
        if fresh:  # new shapes: new buffers, and the first step must be synchronous to fill them
            self.exchange.reset()
            self._key = key
            self._runner.reset()
            if self.config.gn_mode == "auto":
                self.gn_mode = auto_gn_mode(sample.shape[-2] // self.world)
                for norm in self.norms:
                    norm.mode = self.gn_mode
        tick = self.target.tick
        displaced = self.config.mode == "displaced"
        sync = displaced and (tick.step < max(1, self.config.warmup_steps) or not self.exchange.ready)
        self.exchange.sync = sync
        if fresh:
            return self._body(*args, **kwargs)
        return self._runner(sync, *args, phase=sync, **kwargs)

    def _run_phase(self, sync: bool, *args: Any, **kwargs: Any) -> Any:
        compiled = self.config.compile and (not sync or self.config.compile_warmup)
        return (self._compiled if compiled else self._body)(*args, **kwargs)

    def _body(self, *args: Any, **kwargs: Any) -> Any:
        """This rank's rows through the (hooked) UNet, then the output rows of all ranks."""
        sample = args[0] if args else kwargs["sample"]
        rows = sample.shape[-2] // self.world
        local = sample.narrow(-2, self.rank * rows, rows)
        args, kwargs = self._split_extra(sample, args, kwargs)
        if args:
            args = (local, *args[1:])
        else:
            kwargs = {**kwargs, "sample": local}
        out = self.fn_ref.original_forward(*args, **kwargs)
        if self.gather:  # rows are dim -2 of an image [B, C, H, W] and of a video [B, F, C, H, W] alike
            out = pytree.tree_map(
                lambda x: all_gather(x, x.dim() - 2, self.group) if isinstance(x, torch.Tensor) and x.dim() >= 4
                else x, out)
        self.exchange.finish()
        return out

    def _rows(self, x: torch.Tensor, sample: torch.Tensor, scale: int = 1) -> torch.Tensor:
        """This rank's rows of `x`, a map of the whole image at `scale` x the sample's size (`x` itself when it
        already has a patch's rows: a ControlNet's residuals, split with the UNet)."""
        height, width = sample.shape[-2] * scale, sample.shape[-1] * scale
        if x.dim() != 4 or x.shape[-2] * width != height * x.shape[-1]:
            return x
        rows = x.shape[-2] // self.world
        return x.narrow(-2, self.rank * rows, rows)

    def _split_extra(self, sample: torch.Tensor, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Row-split the call's other image-shaped inputs: a ControlNet's residuals, when the caller computed them
        on the whole image (a ControlNet paradiff did not split)."""
        extra = {}
        for name in CONTROLNET_RESIDUALS:
            if kwargs.get(name) is not None:
                extra[name] = pytree.tree_map(lambda x: self._rows(x, sample), kwargs[name])
        return args, {**kwargs, **extra} if extra else kwargs


class ControlNetPatchHook(PatchHook):
    """On the pipeline's ControlNet: the same split as the UNet's, with the control image split at its scale
    (`embedding_factor` pixel rows per latent row); the residuals stay this rank's rows, which this rank's UNet
    patch adds to its own: no exchange beyond the layers' own."""

    gather = False

    def __init__(self, net: torch.nn.Module, target: Parallelized, group: Any, config: PatchParallel):
        from paradiff.plans.common import controlnets, embedding_factor

        nets = controlnets(net)
        self.net, self.scales = net, [embedding_factor(n) for n in nets]
        super().__init__(net, target, group, config)
        self.factor = max(unet2d.downsampling_factor(n.down_blocks) for n in nets)

    def _split_extra(self, sample: torch.Tensor, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        from paradiff.plans.common import check_control_images, control_images, with_control_images

        check_control_images(self.net, args, kwargs)
        images, many = control_images(args, kwargs)
        local = [self._rows(image, sample, scale) for image, scale in zip(images, self.scales)]
        return with_control_images(args, kwargs, local, many)


def patch_rows_message(rows: int, world: int, factor: int, row_pixels: int = 8, image: str = "image") -> str | None:
    """The one-line error for `rows` latent rows that `world` patches of a UNet downsampling by `factor` cannot
    split (None when they can); `row_pixels` pixels of `image` per latent row (the CLI checks with it too)."""
    need = world * factor
    if rows % need == 0:
        return None
    low, high = rows // need * need, (rows // need + 1) * need
    return (f"patch parallelism over {world} ranks needs the latent height to be a multiple of {need} "
            f"({image} height a multiple of {need * row_pixels} px), got {rows} latent rows "
            f"({rows * row_pixels} px); use a{'n' if image[0] in 'aeiou' else ''} {image} height of "
            f"{max(low, need) * row_pixels} or {high * row_pixels} px.")


def _order_defaults(execution: Execution) -> dict:
    """torch.compile defaults of the patch step: inductor keeps the stale exchange's order (see ORDER_OPTIONS)."""
    user = execution.compile if isinstance(execution.compile, dict) else {}
    if user.get("backend", "inductor") == "inductor" and "mode" not in user:
        return {"options": dict(ORDER_OPTIONS)}
    return {}


def compile_kwargs(compile: bool | dict) -> dict:
    """torch.compile arguments of the patch step (what `PatchParallel(compile=...)` passes)."""
    execution = Execution(compile)
    return execution.compile_kwargs(_order_defaults(execution))
