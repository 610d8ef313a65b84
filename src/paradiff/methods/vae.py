"""Patch-parallel VAE decode: the `AutoencoderKL` decoder split into bands of rows over a group of ranks.

    handle = paradiff.parallelize_vae(pipe.vae)          # every rank of the group; or PatchParallel(vae=True)
    image = pipe.vae.decode(latents).sample              # every rank: the whole image, exact
    handle.remove()

A decoder-level hook takes this rank's band of the latent rows (after `post_quant_conv`, which is per pixel and
runs whole on every rank), runs the hooked decoder on it, and all-gathers the output rows. Inside the decoder the plan
`paradiff.plans.vae` makes every k x k conv read its halo rows from the neighbouring bands, every GroupNorm use the
whole image's statistics and the mid block's self-attention attend to every token, all through a synchronous
exchange (`paradiff.comm.SyncExchange`): the decoder runs once, so there is no stale phase to overlap with. Each
rank holds about 1/N of every activation (the attention keeps the whole image's keys and values, at latent size).

The output rows are all-gathered, not gathered to rank 0: every rank then returns the real image (the same call on
every rank gives the same result, as everywhere else in paradiff), and the gathered image is small next to the
activations (3 channels at the decoder's end against 128 or more in its last block).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry, ModelHook

from paradiff import main_rank, runtime
from paradiff.comm import SyncExchange, all_gather, guarded
from paradiff.errors import UserError
from paradiff.plans import vae as plan
from paradiff.plans.unet2d import Register

HOOK_NAME = plan.HOOK_NAME


def _heights(need: int, rows: int, scale: int) -> str:
    low, high = max(rows // need, 1) * need, (rows // need + 1) * need
    return f"{low * scale} or {high * scale} px"


class BandDecode(ModelHook):
    """On `vae.decoder`: this rank's band of latent rows through the hooked decoder, then every band's output rows."""

    def __init__(self, vae: torch.nn.Module, exchange: SyncExchange):
        super().__init__()
        self.vae, self.exchange = vae, exchange
        self.group, self.world, self.rank = exchange.group, exchange.world, exchange.rank
        self.scale = plan.latent_scale(vae)

    def _check_rows(self, rows: int) -> None:
        if rows % self.world == 0:
            return
        if getattr(self.vae, "use_tiling", False):
            raise UserError(
                f"the {plan.WHAT} over {self.world} ranks needs every decoded latent to be a multiple of "
                f"{self.world} rows high, and with VAE tiling on (enable_vae_tiling) the decoder gets a tile of "
                f"{rows} rows: call vae.disable_tiling() (the split already divides the activations by "
                f"{self.world}) or choose a size whose tiles split evenly.")
        raise UserError(
            f"the {plan.WHAT} over {self.world} ranks needs the latent height to be a multiple of {self.world} "
            f"(image height a multiple of {self.world * self.scale} px), got {rows} latent rows "
            f"({rows * self.scale} px); use a height of {_heights(self.world, rows, self.scale)}.")

    def new_forward(self, module: torch.nn.Module, sample: torch.Tensor, latent_embeds: Any = None,
                    *args: Any, **kwargs: Any) -> torch.Tensor:
        if latent_embeds is not None or args or kwargs:
            raise UserError(f"the {plan.WHAT} supports the plain AutoencoderKL decoder call (no latent_embeds).")
        rows = sample.shape[-2]
        self._check_rows(rows)
        band = rows // self.world
        local = sample.narrow(-2, self.rank * band, band)
        with guarded(f"the {plan.WHAT}"):
            out = self.fn_ref.original_forward(local)
            return all_gather(out, out.dim() - 2, self.group)


def install(vae: Any, group: Any, register: Register) -> dict[str, int]:
    """Put the decoder of `vae` in bands over `group` (hooks registered through `register(module, hook, name)`);
    returns how many layer hooks of each kind were installed."""
    decoder = plan.check_vae(vae)
    registry = getattr(decoder, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(main_rank.HOOK_NAME) is not None:
        raise UserError("this VAE's decoder already runs on rank 0 only (paradiff.parallelize with main-rank stages "
                        "freed it on the other ranks); parallelize the pipeline with PatchParallel(vae=True) "
                        "instead, or call parallelize_vae before parallelize.")
    exchange = SyncExchange(group)
    register(decoder, BandDecode(vae, exchange), "decoder")
    hooks = plan.apply(decoder, exchange, lambda module, hook, name: register(module, hook, f"decoder.{name}"))
    return {kind: len(installed) for kind, installed in hooks.items()}


class ParallelVAE:
    """What `parallelize_vae` installed on one VAE; `remove()` undoes it (the VAE is the serial VAE again)."""

    def __init__(self, vae: Any, group: Any):
        self.vae, self.group = vae, group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self._hooks: list[tuple[torch.nn.Module, str]] = []
        self.counts: dict[str, int] = {}

    def register(self, module: torch.nn.Module, hook: ModelHook, name: str) -> None:
        registry = HookRegistry.check_if_exists_or_initialize(module)
        if registry.get_hook(HOOK_NAME) is not None:
            raise UserError(f"the {plan.WHAT} is already applied to this VAE ({name}); remove it first.")
        registry.register_hook(hook, HOOK_NAME)
        self._hooks.append((module, HOOK_NAME))

    def remove(self) -> None:
        for module, name in reversed(self._hooks):
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(name, recurse=False)
        self._hooks.clear()

    def __repr__(self) -> str:
        return f"ParallelVAE({type(self.vae).__name__}, ranks={self.world}, hooks={self.counts})"


def parallelize_vae(vae: Any, group: Any = None) -> ParallelVAE:
    """Decode with `vae` in bands of latent rows over `group` (default: every rank); returns a handle whose
    `remove()` undoes it. Call it on every rank of the group, and decode on every rank with the same latents: each
    rank returns the whole image, equal to the serial decode. The latent height must be a multiple of the group
    size (width is free). Keep the VAE on this rank's device."""
    if group is None:
        rt = runtime.init()
        if rt.world_size < 2:
            raise UserError("the patch-parallel VAE decode needs at least 2 ranks but gets 1; start the job with more "
                            "ranks (--nproc N or torchrun --nproc-per-node N).")
        group = dist.group.WORLD
    handle = ParallelVAE(vae, group)
    if handle.world < 2:
        raise UserError("the patch-parallel VAE decode needs a group of at least 2 ranks.")
    try:
        handle.counts = install(vae, group, lambda module, hook, name: handle.register(module, hook, name))
    except BaseException:
        handle.remove()
        raise
    return handle
