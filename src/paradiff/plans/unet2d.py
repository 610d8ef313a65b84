"""Patch-parallel plan for `UNet2DConditionModel` (SD 1.x, 2.x, XL, Turbo): which stock module gets which hook.

The plan is the table `PATCH_PLAN`, read top to bottom, first match wins:

| module                                   | hook             | why                                              |
|------------------------------------------|------------------|--------------------------------------------------|
| `nn.Conv2d`, kernel > 1 row              | `HaloConv2d`     | reads rows of the neighbouring patches           |
| `Attention`, self (`attn1`)              | `FullKV` on to_k, to_v | local queries attend to all tokens          |
| `nn.GroupNorm`                           | `PatchGroupNorm` | statistics over the whole image                  |
| BatchNorm, InstanceNorm, 1xk convs       | refused          | spatial, and no rule for them                    |
| anything else (1x1 convs, linears, LayerNorm, cross-attention, embeddings) | none | per pixel / per token / no spatial extent |

Anything spatial the table does not know is refused with a clear error rather than silently computed per patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers.models.attention_processor import Attention

from paradiff.comm import StaleExchange
from paradiff.errors import UserError
from paradiff.plans.patch_layers import FullKV, HaloConv2d, PatchGroupNorm

HOOK_NAME = "paradiff.patch"
Register = Callable[[torch.nn.Module, object, str], None]  # (module, hook, name in the model)


def downsampling_factor(unet: torch.nn.Module) -> int:
    """How much the UNet shrinks the latent (2 per stride-2 conv), so patches can be sized to survive it."""
    factor = 1
    for module in unet.modules():
        if isinstance(module, torch.nn.Conv2d) and module.stride[0] > 1:
            factor *= module.stride[0]
    return factor


def _halo_conv(name: str, module: torch.nn.Conv2d, exchange: StaleExchange, gn_mode: str, register: Register):
    if module.padding_mode != "zeros" or module.kernel_size[0] != 2 * module.padding[0] + 1 \
            or module.dilation[0] != 1:
        raise UserError(f"patch parallelism does not support the conv {name} ({module}).")
    hook = HaloConv2d(exchange)
    register(module, hook, name)
    return hook


def _full_kv(name: str, module: Attention, exchange: StaleExchange, gn_mode: str, register: Register):
    if getattr(module, "fused_projections", False) or not hasattr(module, "to_k"):
        raise UserError(f"patch parallelism needs separate to_k/to_v projections in {name}; "
                        "call unfuse_qkv_projections() first.")
    hooks = (FullKV(exchange), FullKV(exchange))
    register(module.to_k, hooks[0], f"{name}.to_k")
    register(module.to_v, hooks[1], f"{name}.to_v")
    return hooks


def _group_norm(name: str, module: torch.nn.GroupNorm, exchange: StaleExchange, gn_mode: str, register: Register):
    hook = PatchGroupNorm(exchange, gn_mode)  # "separate" syncs in warm-up steps
    register(module, hook, name)
    return hook


def _refuse(name: str, module: torch.nn.Module, *_):
    raise UserError(f"patch parallelism has no rule for {name} ({type(module).__name__}).")


@dataclass(frozen=True)
class Rule:
    """`install(name, module, exchange, gn_mode, register)` puts the hook on a matched module; None: the module is
    known and needs none. `inside`: the rules for the matched module's descendants, in place of the table's (a
    temporal block whose self-attention mixes frames, not rows, `paradiff.plans.video`)."""

    kind: str
    matches: Callable[[torch.nn.Module], bool]
    install: Callable | None
    inside: tuple["Rule", ...] | None = None


PATCH_PLAN = (
    Rule("conv", lambda m: isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1, _halo_conv),
    Rule("attention", lambda m: isinstance(m, Attention) and not m.is_cross_attention, _full_kv),
    Rule("groupnorm", lambda m: isinstance(m, torch.nn.GroupNorm), _group_norm),
    Rule("refused", lambda m: isinstance(m, (torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d)) or (
        isinstance(m, torch.nn.Conv2d) and m.kernel_size[1] > 1 and m.kernel_size[0] == 1), _refuse),
)


def apply(unet: torch.nn.Module, exchange: StaleExchange, gn_mode: str, register: Register,
          plan: tuple[Rule, ...] = PATCH_PLAN) -> dict[str, list]:
    """Install the displaced-patch hooks of `plan` on `unet`; returns the hooks installed, by kind."""
    hooks: dict[str, list] = {rule.kind: [] for rule in plan if rule.kind != "refused" and rule.install is not None}
    seen: set[int] = set()

    def visit(name: str, module: torch.nn.Module, rules: tuple[Rule, ...]) -> None:
        if id(module) in seen:  # a module shared by two parents is hooked once, as named_modules() would
            return
        seen.add(id(module))
        rule = next((rule for rule in rules if rule.matches(module)), None)
        if rule is not None and rule.install is not None:
            installed = rule.install(name, module, exchange, gn_mode, register)  # a refusal raises here
            hooks.setdefault(rule.kind, []).append(installed)
        inner = rule.inside if rule is not None and rule.inside is not None else rules
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child, inner)

    visit("", unet, plan)
    return hooks
