"""Patch-parallel plan for the video UNets: `UNetSpatioTemporalConditionModel` (Stable Video Diffusion) and
`UNetMotionModel` (AnimateDiff: an SD UNet with motion modules inside its blocks).

Both fold the frames into the batch of their 2-D layers, so a row band of every frame sits on each rank and the
2-D table of `paradiff.plans.unet2d` applies to the spatial layers unchanged. The temporal layers mix *frames* of
one pixel, never rows: they need no neighbour rows and no other rank's tokens, except their GroupNorms, whose
statistics run over frames x rows (a [batch, channels, frames, rows, columns] input) and are formed over the whole
image like every other GroupNorm (`PatchGroupNorm` groups everything after the channels, frames included).

| module                                                  | hook               | why                                  |
|---------------------------------------------------------|--------------------|--------------------------------------|
| temporal block (SVD's `TemporalBasicTransformerBlock`, AnimateDiff's `AnimateDiffTransformer3D`, `TransformerTemporalModel`, `TemporalResnetBlock`) | its inside by `TEMPORAL_PLAN` | it mixes frames, not rows |
| inside it: `Attention`                                  | none               | attends over the frames of one pixel |
| inside it: `nn.GroupNorm`                               | `PatchGroupNorm`   | statistics over frames x whole image |
| inside it: `nn.Conv3d` with a 1x1 spatial kernel        | none               | convolves over frames only           |
| inside it: anything spatial (kxk convs, norms)          | refused            | a temporal block that reads rows     |
| everything else                                         | `unet2d.PATCH_PLAN` (a `Conv3d` with a spatial kernel: refused) |        |
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention

from paradiff.plans import unet2d
from paradiff.plans.unet2d import Rule

VIDEO_DENOISERS = ("UNetSpatioTemporalConditionModel", "UNetMotionModel")
"""Denoisers with a frames axis: sample [batch, frames, channels, rows, cols] (SVD) or [batch, channels, frames,
rows, cols] (AnimateDiff)."""


def _temporal_classes() -> tuple[type, ...]:
    from diffusers.models.attention import TemporalBasicTransformerBlock
    from diffusers.models.resnet import TemporalResnetBlock
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    return TemporalBasicTransformerBlock, AnimateDiffTransformer3D, TransformerTemporalModel, TemporalResnetBlock


def _spatial(module: torch.nn.Module) -> bool:
    """A layer that reads neighbouring rows or columns (a temporal block must have none)."""
    if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
        return any(k > 1 for k in module.kernel_size[-2:])
    return isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.InstanceNorm2d,
                               torch.nn.InstanceNorm3d))


def _frames_only_conv(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Conv3d) and all(k == 1 for k in module.kernel_size[-2:])


TEMPORAL_PLAN = (
    Rule("frames attention", lambda m: isinstance(m, Attention), None),
    Rule("groupnorm", lambda m: isinstance(m, torch.nn.GroupNorm), unet2d._group_norm),
    Rule("frames conv", _frames_only_conv, None),
    Rule("refused", _spatial, unet2d._refuse),
)

VIDEO_PATCH_PLAN = (
    Rule("temporal", lambda m: isinstance(m, _temporal_classes()), None, inside=TEMPORAL_PLAN),
    *unet2d.PATCH_PLAN,
    Rule("refused", lambda m: isinstance(m, torch.nn.Conv3d) and _spatial(m), unet2d._refuse),
)


def patch_plan(model: torch.nn.Module) -> tuple[Rule, ...] | None:
    """The patch plan of a video denoiser (None for any other model)."""
    return VIDEO_PATCH_PLAN if is_video(model) else None


def is_video(model: torch.nn.Module) -> bool:
    return any(cls.__name__ in VIDEO_DENOISERS for cls in type(model).__mro__)
