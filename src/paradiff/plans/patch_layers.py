"""Displaced-patch layer hooks (DistriFusion): how a conv, a self-attention and a GroupNorm see the whole image
while each rank holds only its rows of every activation.

- `HaloConv2d`: a kxk conv with padding p reads p rows above and below its patch from the neighbouring ranks.
- `FullKV`: on the `to_k`/`to_v` projections of a self-attention, the local keys/values are extended to the full
  image's token set (the other ranks' tokens), so local queries attend to every token.
- `PatchGroupNorm`: GroupNorm statistics over the whole image, from per-rank (mean, mean of squares).

`SyncHaloConv2d` and `SyncGroupNorm` are their memory-lean forms for a pass that is synchronous and runs once (the
patch-parallel VAE decode, `paradiff.plans.vae`), where activations, not time, are what the split saves: no padded
copy of a conv's input, no float32 copy of a GroupNorm's input.

Each hook asks the `StaleExchange` for the other ranks' data: this step's (sync phase, exact) or the previous step's
(stale phase; this step's are sent in the background for the next step). The model code is not touched: the hooks
are diffusers `ModelHook`s on the stock modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook

from paradiff.comm import StaleExchange

GN_MODES = ("auto", "corrected", "sync", "stale", "separate")
# "auto" picks corrected GroupNorm when each patch has at least this many latent rows, stale below. Measured on the
# reference model (25 steps, warm-up 4; benchmarks/results/patch-fidelity-cpu.md): 16 rows per patch (2 ranks,
# 16 prompts): corrected 44.3 dB vs stale 40.4 dB; 8 rows (4 ranks, 8 prompts): corrected 29.3 dB (adherence 25%
# vs 75% serial) vs stale 36.6 dB (75%). The paper's settings (SDXL 1024 px on up to 8 GPUs) have >= 16 rows per patch.
CORRECTED_MIN_ROWS = 16


def auto_gn_mode(patch_rows: int) -> str:
    """The GroupNorm mode "auto" stands for, given the latent rows of one patch."""
    return "corrected" if patch_rows >= CORRECTED_MIN_ROWS else "stale"


class _Exchanging(ModelHook):
    """A layer hook that owns one slot of the step's activation exchange."""

    def __init__(self, exchange: StaleExchange, keep=None):
        super().__init__()
        self.exchange = exchange
        self.slot = exchange.slot(keep)


class HaloConv2d(_Exchanging):
    """Conv over this rank's rows plus `padding` halo rows from each neighbour (zeros at the image border)."""

    def new_forward(self, module: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        p = module.padding[0]
        ex = self.exchange
        payload = torch.cat([x[:, :, :p], x[:, :, -p:]], dim=2)  # [B, C, 2p, W]: my top rows, my bottom rows
        halos = ex.exchange(self.slot, payload).unflatten(0, (ex.world, x.shape[0]))
        top = halos[ex.rank - 1, :, :, p:] if ex.rank > 0 else torch.zeros_like(payload[:, :, :p])
        bottom = halos[ex.rank + 1, :, :, :p] if ex.rank < ex.world - 1 else torch.zeros_like(payload[:, :, :p])
        x = torch.cat([top, x, bottom], dim=2)
        return F.conv2d(x, module.weight, module.bias, module.stride, (0, module.padding[1]), module.dilation,
                        module.groups)


class FullKV(_Exchanging):
    """After `to_k`/`to_v` of a self-attention: the other ranks' tokens joined to this rank's fresh ones.

    The slot keeps the gathered tokens batch-major (`[B, world, L, C]`), the layout attention reads as
    `[B, world * L, C]` without a copy; a stale step writes this rank's fresh tokens over its own part in place
    (1/world of the tokens) instead of concatenating all of them anew. (Compiled, the write is functionalised and
    inductor still materialises the whole-image K/V once, fused with attention's layout.) An exchange that keeps
    nothing (`SyncExchange`) gets the gathered parts joined.
    """

    def __init__(self, exchange: StaleExchange):
        super().__init__(exchange, keep=lambda gathered: gathered.unflatten(0, (exchange.world, -1)).transpose(0, 1))

    def post_forward(self, module: torch.nn.Module, output: torch.Tensor) -> torch.Tensor:
        ex = self.exchange
        gathered = ex.exchange(self.slot, output)
        kept = self.slot.recv
        if kept is None:
            return gathered.unflatten(0, (ex.world, output.shape[0])).transpose(0, 1).flatten(1, 2)
        if not ex.sync:  # own tokens are always fresh (identical to the gathered ones in a sync step)
            kept[:, ex.rank].copy_(output)
        return kept.flatten(1, 2)


class PatchGroupNorm(_Exchanging):
    """GroupNorm with whole-image statistics; `mode` says how they are formed in a stale step.

    sync: exact, all-gathered every step. separate: this patch's own statistics.
    stale: the other patches' statistics from last step, this patch's fresh ones (whole = last whole + my change / N).
    corrected (DistriFusion): last step's whole-image statistics + (this patch's fresh - its last), i.e. every
    patch is assumed to have changed as this one did (whole = last whole + my change); best with wide patches.
    """

    def __init__(self, exchange: StaleExchange, mode: str):
        super().__init__(exchange)
        self.mode = mode

    def new_forward(self, module: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        ex = self.exchange
        sync = ex.sync or self.mode == "sync"
        if not sync and self.mode == "separate":
            return F.group_norm(x, module.num_groups, module.weight, module.bias, module.eps)
        shape = x.shape
        xg = x.reshape(shape[0], module.num_groups, -1).float()
        local = torch.stack([xg.mean(-1), xg.square().mean(-1)])  # [2, B, G]
        gathered = ex.exchange(self.slot, local, sync=sync).unflatten(0, (ex.world, 2))
        if sync:
            stats = gathered.mean(0)
        elif self.mode == "stale":
            stats = gathered.mean(0) + (local - gathered[ex.rank]) / ex.world
        else:  # corrected
            stats = gathered.mean(0) + (local - gathered[ex.rank])
        mean, meansq = stats.unbind(0)
        var = meansq - mean.square()
        local_var = local[1] - local[0].square()
        var = torch.where(var < 0, local_var, var)  # a stale correction can overshoot; fall back to local
        y = (xg - mean.unsqueeze(-1)) * torch.rsqrt(var.clamp_min(0).unsqueeze(-1) + module.eps)
        y = y.reshape(shape).to(x.dtype)
        if module.affine:
            y = y * module.weight.view(1, -1, *([1] * (x.dim() - 2))) + module.bias.view(1, -1, *([1] * (x.dim() - 2)))
        return y


class SyncHaloConv2d(HaloConv2d):
    """`HaloConv2d` without the padded copy of its input (synchronous exchange only): the conv runs on this rank's
    rows with zero padding, then its first and last `padding` output rows are computed again from the neighbours'
    halo rows (each from 3p input rows). Same result, one activation less at the peak."""

    def new_forward(self, module: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        p = module.padding[0]
        ex = self.exchange
        if x.shape[2] < 2 * p:  # a band thinner than its halos: the plain form
            return super().new_forward(module, x)
        payload = torch.cat([x[:, :, :p], x[:, :, -p:]], dim=2)
        halos = ex.exchange(self.slot, payload).unflatten(0, (ex.world, x.shape[0]))

        def conv(rows: torch.Tensor, padding: tuple) -> torch.Tensor:
            return F.conv2d(rows, module.weight, module.bias, module.stride, padding, module.dilation, module.groups)

        y = conv(x, module.padding)  # right except the p rows at each band edge, which saw zeros
        if ex.rank > 0:
            y[:, :, :p] = conv(torch.cat([halos[ex.rank - 1, :, :, p:], x[:, :, :2 * p]], dim=2), (0, module.padding[1]))
        if ex.rank < ex.world - 1:
            y[:, :, -p:] = conv(torch.cat([x[:, :, -2 * p:], halos[ex.rank + 1, :, :, :p]], dim=2),
                                (0, module.padding[1]))
        return y


class SyncGroupNorm(PatchGroupNorm):
    """Exact GroupNorm over the whole image (synchronous), without the float32 copy of its input.

    Each rank sends its per-group (mean, variance) (computed in float32, a slice of groups at a time for half
    inputs); they combine exactly (equal bands: mean of means, mean of variances + variance of means), and the
    normalisation and affine are one fused `x * scale + shift` per channel written straight into the output.
    """

    CHUNKS = 8  # half-precision inputs are upcast this many group slices at a time

    def __init__(self, exchange: StaleExchange):
        super().__init__(exchange, "sync")

    def new_forward(self, module: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        ex = self.exchange
        batch, channels, groups = x.shape[0], x.shape[1], module.num_groups
        xg = x.reshape(batch, groups, -1)
        if xg.dtype in (torch.float32, torch.float64):
            var, mean = torch.var_mean(xg, dim=-1, correction=0)
        else:
            parts = [torch.var_mean(part.float(), dim=-1, correction=0)
                     for part in xg.split(max(1, -(-groups // self.CHUNKS)), dim=1)]
            var, mean = torch.cat([v for v, _ in parts], 1), torch.cat([m for _, m in parts], 1)
        gathered = ex.exchange(self.slot, torch.stack([mean, var])).unflatten(0, (ex.world, 2))  # [N, 2, B, G]
        means, variances = gathered.unbind(1)
        mean = means.mean(0)
        var = variances.mean(0) + (means - mean).square().mean(0)
        scale = torch.rsqrt(var + module.eps).repeat_interleave(channels // groups, dim=1)  # [B, C]
        shift = -mean.repeat_interleave(channels // groups, dim=1) * scale
        if module.affine:
            scale = scale * module.weight
            shift = shift * module.weight + module.bias
        view = (batch, channels) + (1,) * (x.dim() - 2)
        shift, scale = shift.view(view), scale.view(view)
        if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):  # autograd: no out=
            return torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype))
        return torch.addcmul(shift, x, scale, out=torch.empty_like(x))  # float32 math, one rounding to x's dtype
