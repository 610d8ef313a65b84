"""Model families for asynchronous denoising: which modules are the splittable *units* and what a call looks like.

A family is a small table, not a forked forward: `units(model)` names the weight-holding modules that run in
sequence (UNet: every resnet / attention / down- or up-sampler inside the down, mid and up blocks, and the motion
modules of AnimateDiff's; SVD: its spatio-temporal resnets and transformers likewise; SD3: every joint transformer
block), and `example_inputs(model, batch)` builds a call on the meta device so the split can be costed
and traced without weights. Everything else with weights (time embedding, conv_in/conv_out, pos/context embedders,
final norm) is *shared*: small, and run by every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from paradiff.errors import UserError
from paradiff.plans.common import example_inputs


ALL = None
"""`expand=ALL`: open every deep transformer stack into its blocks (see `Family.units`)."""


@dataclass(frozen=True)
class Family:
    """`units(model, expand)`: unit names in definition order. `expand` names the transformer stacks (UNet
    attentions with several transformer blocks) to open into one unit per block, so a cut can fall inside them;
    their norm/proj_in/proj_out then become shared glue. `ALL` opens every deep stack, an empty set none."""

    name: str
    units: Callable[[torch.nn.Module, Any], list[str]]
    example_inputs: Callable[[torch.nn.Module, int], dict]


def deep_stack(module: torch.nn.Module) -> bool:
    blocks = getattr(module, "transformer_blocks", None)
    return isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 1


def _children_units(prefix: str, block: torch.nn.Module, expand: Any) -> list[str]:
    """The module-list entries of a block (resnets.0, attentions.0, downsamplers.0, ...), or the block itself when
    it holds weights outside its lists (then it cannot be cut inside)."""
    names: list[str] = []
    listed = 0
    for child_name, child in block.named_children():
        if isinstance(child, torch.nn.ModuleList):
            for index, item in enumerate(child):
                if any(True for _ in item.parameters()):
                    name = f"{prefix}.{child_name}.{index}"
                    if deep_stack(item) and (expand is ALL or name in expand):
                        names += [f"{name}.transformer_blocks.{j}" for j in range(len(item.transformer_blocks))]
                    else:
                        names.append(name)
                    listed += sum(p.numel() for p in item.parameters())
    total = sum(p.numel() for p in block.parameters())
    return names if names and listed == total else [prefix]


def _encoder_units(model: torch.nn.Module, expand: Any, prefix: str = "") -> list[str]:
    """The units of a UNet's (or a ControlNet's) down blocks and mid block."""
    units: list[str] = []
    for i, block in enumerate(model.down_blocks):
        units += _children_units(f"{prefix}down_blocks.{i}", block, expand)
    if model.mid_block is not None:
        units += _children_units(f"{prefix}mid_block", model.mid_block, expand)
    return units


def _unet_units(model: torch.nn.Module, expand: Any = frozenset()) -> list[str]:
    units = _encoder_units(model, expand)
    for i, block in enumerate(model.up_blocks):
        units += _children_units(f"up_blocks.{i}", block, expand)
    return units


def controlnet_units(net: torch.nn.Module, prefix: str, expand: Any = frozenset()) -> list[str]:
    """A pipeline's ControlNet as units, named `prefix` + the module's name in `net`: per ControlNetModel (each net
    of a MultiControlNetModel), its conditioning embedding (it reads only the control image) and the units of its
    down and mid blocks, as a UNet's. So a large ControlNet spreads over components like the UNet does. Its conv_in,
    time embedding and residual projections (1x1 convs) are shared glue."""
    from paradiff.plans.common import controlnets

    units: list[str] = []
    many = hasattr(net, "nets")
    for i, one in enumerate(controlnets(net)):
        base = f"{prefix}nets.{i}." if many else prefix
        units += [f"{base}controlnet_cond_embedding"] + _encoder_units(one, expand, base)
    return units


def _unet_inputs(model: torch.nn.Module, batch: int) -> dict:
    cfg = model.config
    if cfg.addition_embed_type not in (None, "text_time"):
        raise UserError(f"AsyncDenoise supports UNets conditioned on text (SD1.x/2.x), text+time (SDXL) and class "
                        f"labels (the x4 upscaler's noise level); this one has "
                        f"addition_embed_type={cfg.addition_embed_type!r}.")
    return example_inputs(model, batch)  # with `class_labels` when the UNet has a class embedding


def _sd3_units(model: torch.nn.Module, expand: Any = frozenset()) -> list[str]:
    return [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]


def _sd3_inputs(model: torch.nn.Module, batch: int) -> dict:
    return example_inputs(model, batch)


def _svd_units(model: torch.nn.Module, expand: Any = frozenset()) -> list[str]:
    """SVD's blocks as a UNet's; its transformer stacks stay closed: each spatial block is zipped with a temporal
    block (`temporal_transformer_blocks`), so they cannot be opened one list at a time."""
    return _unet_units(model, frozenset())


UNET = Family("UNet2DConditionModel", _unet_units, _unet_inputs)
SD3 = Family("SD3Transformer2DModel", _sd3_units, _sd3_inputs)
SVD = Family("UNetSpatioTemporalConditionModel", _svd_units, example_inputs)
MOTION = Family("UNetMotionModel", _unet_units, _unet_inputs)  # AnimateDiff: the motion modules are units too


def family_of(model: torch.nn.Module) -> Family:
    """The family table for `model`, or a UserError naming the supported denoisers."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel, UNetMotionModel, UNetSpatioTemporalConditionModel

    for cls, family in ((UNet2DConditionModel, UNET), (SD3Transformer2DModel, SD3),
                        (UNetSpatioTemporalConditionModel, SVD), (UNetMotionModel, MOTION)):
        if isinstance(model, cls):
            return family
    raise UserError(f"AsyncDenoise supports UNet2DConditionModel (SD1.x/2.x/XL/Turbo), SD3Transformer2DModel, "
                    f"UNetSpatioTemporalConditionModel (SVD) and UNetMotionModel (AnimateDiff) denoisers, not "
                    f"{type(model).__name__}.")
