"""Stages outside the denoiser that every rank would otherwise repeat identically run on the main rank only.

Under any parallel method all ranks run the pipeline loop and hold the same prompt embeddings and the same final
latent. So, when a pipeline is parallelized (hooks on the components, so pipelines made with `from_pipe` share
them):
- text encoders (and SVD's image encoder): rank 0 runs each encoder's forward and broadcasts its output; the other
  ranks free the weights (SDXL: 0.8 B parameters, SD3's T5: 4.7 B, SVD's CLIP vision 0.6 B, per GPU) and take the
  broadcast. An error on rank 0 is raised on every
  rank instead of leaving the others waiting;
- VAE decoder: only rank 0 decodes; the others free the decoder and get zeros of the decoded shape (blank images).
  The VAE encoder (img2img) stays on every rank: the initial latents are computed locally. A decoder that a
  method already split over its ranks (`PatchParallel(vae=True)`, `paradiff.parallelize_vae`) is left to it: every
  one of those ranks keeps its decoder weights.
Every rank must make the same calls (as every parallel method requires anyway).
`parallelize(..., main_rank_stages=False)` keeps every stage on every rank.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import ModelHook

from paradiff.comm import broadcast_tree
from paradiff.execution.weights import free_weights
from paradiff.plans.common import vae_scale_factor
from paradiff.plans.vae import HOOK_NAME as VAE_HOOK_NAME

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
ENCODERS = TEXT_ENCODERS + ("image_encoder",)  # SVD's CLIP vision encoder (0.6 B): its embedding, like a prompt's
HOOK_NAME = "paradiff.main_rank"
REMEDY = ("only rank 0 keeps them: use it on rank 0, or parallelize with main_rank_stages=False to keep every stage "
          "on every rank.")


class SharedOutput(ModelHook):
    """Rank 0 runs the module and broadcasts its output; the other ranks receive it."""

    def __init__(self, main: bool, device: torch.device, what: str):
        super().__init__()
        self.main, self.device, self.what = main, device, what

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not self.main:
            return broadcast_tree(device=self.device, what=f"the {self.what} output")
        try:
            out = self.fn_ref.original_forward(*args, **kwargs)
        except Exception as err:  # e.g. a bad input: the other ranks raise it too instead of waiting
            broadcast_tree(error=err, what=f"the {self.what} output")
            raise
        return broadcast_tree(out, what=f"the {self.what} output")


class BlankDecoder(ModelHook):
    """Stands in for the VAE decoder on ranks that do not decode: zeros of the decoded image's shape."""

    def __init__(self, scale: int, channels: int):
        super().__init__()
        self.scale, self.channels = scale, channels

    def new_forward(self, module: torch.nn.Module, z: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return z.new_zeros(z.shape[0], self.channels, z.shape[-2] * self.scale, z.shape[-1] * self.scale)


class PassThrough(ModelHook):
    """Stands in for a freed 1x1 layer whose output only feeds a stand-in (the VAE's post-quant conv)."""

    def new_forward(self, module: torch.nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x


class MainDecoder(ModelHook):
    """On rank 0's VAE decoder: runs it unchanged; marks it as the one decoder of the group (so that splitting it
    afterwards is refused on every rank alike, not only on the ranks whose decoder was freed)."""


def install(pipe: Any, target: Any) -> None:
    """Put the text encoders and the VAE decoder of `pipe` on the main rank (hooks registered through `target`)."""
    for name in ENCODERS:
        encoder = getattr(pipe, name, None)
        if isinstance(encoder, torch.nn.Module):
            if not target.is_main:
                free_weights(encoder, f"pipe.{name}", REMEDY)
            target.register(encoder, SharedOutput(target.is_main, target.device, name), HOOK_NAME)
    vae = getattr(pipe, "vae", None)
    decoder = getattr(vae, "decoder", None)
    if not isinstance(decoder, torch.nn.Module):
        return
    registry = getattr(decoder, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(VAE_HOOK_NAME) is not None:
        return  # split over its ranks by a method: every one of them decodes its band
    if target.is_main:
        target.register(decoder, MainDecoder(), HOOK_NAME)
        return
    channels = getattr(vae.config, "out_channels", 3)
    free_weights(decoder, "pipe.vae.decoder", REMEDY)
    target.register(decoder, BlankDecoder(vae_scale_factor(pipe), channels), HOOK_NAME)
    post = getattr(vae, "post_quant_conv", None)
    if isinstance(post, torch.nn.Module):
        free_weights(post, "pipe.vae.post_quant_conv", REMEDY)
        target.register(post, PassThrough(), HOOK_NAME)
