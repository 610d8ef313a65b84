"""Patch-parallel plan for the `AutoencoderKL` decoder (SD 1.x/2.x, SDXL, SD3 and Flux VAEs): which stock module
gets which hook when the decoder runs on a band of latent rows per rank, exactly (the exchange is synchronous).

The plan is the table `VAE_PLAN`, read top to bottom, first match wins (the same `Rule`s as `plans.unet2d`):

| module                                     | hook              | why                                            |
|--------------------------------------------|-------------------|------------------------------------------------|
| spatial layers no rule knows (below)       | refused           | their result on a band would not be exact      |
| `nn.Conv2d` k x k, stride 1, padding k // 2 | `SyncHaloConv2d`  | reads rows of the neighbouring bands           |
| `Attention`, self (the mid block's)        | `FullKV` on to_k, to_v | local queries attend to every token       |
| `nn.GroupNorm` (resnets, the attention's, conv_norm_out) | `SyncGroupNorm` | statistics over the whole image      |
| anything else (1x1 convs, linears, SiLU, dropout, nearest x2 `Upsample2D`) | none | per pixel / per token |

Refused: transposed convs, strided, dilated, 1xk or "same"-padded convs, BatchNorm/InstanceNorm, pooling,
`SpatialNorm` (MoVQ decoders), FIR/K upsamplers and any `Upsample2D` that is not a nearest x2 interpolation.
Nearest x2 upsampling maps a band of r rows to exactly the 2r rows of the same band of the upsampled image, so the
bands stay aligned through the decoder and any latent height that splits into N equal bands works.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import Attention, SpatialNorm
from diffusers.models.upsampling import FirUpsample2D, KUpsample2D, Upsample2D

from paradiff.comm import StaleExchange
from paradiff.errors import UserError
from paradiff.plans import unet2d
from paradiff.plans.patch_layers import SyncGroupNorm, SyncHaloConv2d
from paradiff.plans.unet2d import Register, Rule

HOOK_NAME = "paradiff.vae"
WHAT = "patch-parallel VAE decode"

_SPATIAL = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d, torch.nn.BatchNorm2d,
            torch.nn.InstanceNorm2d, torch.nn.AvgPool2d, torch.nn.MaxPool2d, torch.nn.AdaptiveAvgPool2d,
            torch.nn.AdaptiveMaxPool2d, torch.nn.Upsample, SpatialNorm, FirUpsample2D, KUpsample2D)


def _is_unknown_spatial(module: torch.nn.Module) -> bool:
    if isinstance(module, _SPATIAL):
        return True
    if isinstance(module, Upsample2D):  # nearest x2 (interpolate, no transposed conv, no forced output size)
        return module.use_conv_transpose or not module.interpolate
    if isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1):
        padding = module.padding
        return (isinstance(padding, str) or module.stride != (1, 1) or module.dilation != (1, 1)
                or module.padding_mode != "zeros" or module.kernel_size[0] != 2 * padding[0] + 1
                or module.kernel_size[1] != 2 * padding[1] + 1)
    if isinstance(module, Attention):
        return module.spatial_norm is not None
    return False


def _refuse(name: str, module: torch.nn.Module, *_: Any):
    raise UserError(f"the {WHAT} has no rule for the decoder's {name} ({type(module).__name__}: {module}); "
                    "decode on one rank (leave vae=False).")


def _halo_conv(name: str, module: torch.nn.Conv2d, exchange: StaleExchange, gn_mode: str, register: Register):
    hook = SyncHaloConv2d(exchange)
    register(module, hook, name)
    return hook


def _group_norm(name: str, module: torch.nn.GroupNorm, exchange: StaleExchange, gn_mode: str, register: Register):
    hook = SyncGroupNorm(exchange)
    register(module, hook, name)
    return hook


VAE_PLAN = (
    Rule("refused", _is_unknown_spatial, _refuse),
    Rule("conv", lambda m: isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1), _halo_conv),
    Rule("attention", lambda m: isinstance(m, Attention) and not m.is_cross_attention, unet2d._full_kv),
    Rule("groupnorm", lambda m: isinstance(m, torch.nn.GroupNorm), _group_norm),
)


def check_vae(vae: Any) -> torch.nn.Module:
    """The VAE's decoder, if the plan knows this VAE (else a UserError saying what is supported)."""
    from diffusers import AutoencoderKL
    from diffusers.models.autoencoders.vae import Decoder

    if not isinstance(vae, AutoencoderKL):
        raise UserError(f"the {WHAT} supports AutoencoderKL (the SD, SDXL, SD3 and Flux VAEs); this VAE is "
                        f"{type(vae).__name__}: decode it on one rank.")
    if type(vae.decoder) is not Decoder:
        raise UserError(f"the {WHAT} supports diffusers' Decoder; this VAE's decoder is {type(vae.decoder).__name__}.")
    return vae.decoder


def apply(decoder: torch.nn.Module, exchange: StaleExchange, register: Register,
          plan: tuple[Rule, ...] = VAE_PLAN) -> dict[str, list]:
    """Install the hooks of `plan` on the decoder's layers; returns them by kind."""
    return unet2d.apply(decoder, exchange, "sync", register, plan=plan)


def latent_scale(vae: Any) -> int:
    """Pixels per latent row of this VAE (2 per up block beyond the first)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)
