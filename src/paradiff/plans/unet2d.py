"""Patch-parallel plan for `UNet2DConditionModel` (SD 1.x, 2.x, XL, Turbo): which stock module gets which hook.

| module                                   | hook             | why                                              |
|------------------------------------------|------------------|--------------------------------------------------|
| `nn.Conv2d`, kernel > 1 row              | `HaloConv2d`     | reads rows of the neighbouring patches           |
| `nn.Conv2d` 1x1, `nn.Linear`             | none             | per pixel / per token                            |
| `Attention`, self (`attn1`)              | `FullKV` on to_k, to_v | local queries attend to all tokens          |
| `Attention`, cross (`attn2`)             | none             | keys/values are the text, the same on all ranks  |
| `nn.GroupNorm`                           | `PatchGroupNorm` | statistics over the whole image                  |
| `nn.LayerNorm`, time/text embeddings     | none             | per token / no spatial extent                    |

Anything spatial the table does not know (another norm or conv type) is refused with a clear error rather than
silently computed per patch.
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry
from diffusers.models.attention_processor import Attention

from paradiff.comm import StaleExchange
from paradiff.errors import UserError
from paradiff.plans.patch_layers import FullKV, HaloConv2d, PatchGroupNorm

HOOK_NAME = "paradiff.patch"


def downsampling_factor(unet: torch.nn.Module) -> int:
    """How much the UNet shrinks the latent (2 per stride-2 conv), so patches can be sized to survive it."""
    factor = 1
    for module in unet.modules():
        if isinstance(module, torch.nn.Conv2d) and module.stride[0] > 1:
            factor *= module.stride[0]
    return factor


def _register(module: torch.nn.Module, hook) -> None:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)


def apply(unet: torch.nn.Module, exchange: StaleExchange, gn_mode: str) -> dict[str, list]:
    """Install the displaced-patch hooks on `unet`; returns the hooks installed, by kind."""
    hooks: dict[str, list] = {"conv": [], "attention": [], "groupnorm": []}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size[0] > 1:
            if module.padding_mode != "zeros" or module.kernel_size[0] != 2 * module.padding[0] + 1 \
                    or module.dilation[0] != 1:
                raise UserError(f"patch parallelism does not support the conv {name} ({module}).")
            hooks["conv"].append(HaloConv2d(exchange))
            _register(module, hooks["conv"][-1])
        elif isinstance(module, Attention) and not module.is_cross_attention:
            if getattr(module, "fused_projections", False) or not hasattr(module, "to_k"):
                raise UserError(f"patch parallelism needs separate to_k/to_v projections in {name}; "
                                "call unfuse_qkv_projections() first.")
            hooks["attention"].append((FullKV(exchange), FullKV(exchange)))
            _register(module.to_k, hooks["attention"][-1][0])
            _register(module.to_v, hooks["attention"][-1][1])
        elif isinstance(module, torch.nn.GroupNorm):
            hooks["groupnorm"].append(PatchGroupNorm(exchange, gn_mode))  # "separate" syncs in warm-up steps
            _register(module, hooks["groupnorm"][-1])
        elif isinstance(module, (torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d)) or (
                isinstance(module, torch.nn.Conv2d) and module.kernel_size[1] > 1 and module.kernel_size[0] == 1):
            raise UserError(f"patch parallelism has no rule for {name} ({type(module).__name__}).")
    return hooks
