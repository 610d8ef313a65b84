"""Text conditioning of a stream, computed once per prompt in `prepare()` / `update_prompt()`, never in the step.

SD 1.x/2.x UNets take the text encoder's hidden states only. SDXL's (`addition_embed_type="text_time"`) also take
*added conditioning*: the pooled embedding of the second text encoder and six "time ids" (original size, crop
corner, target size). Both are fixed for a prompt and a stream size, so they are made here with the pipeline's own
`encode_prompt` (an empty negative prompt is left out, so SDXL pipes zero it as diffusers' do by default) and live in static device
buffers that the step reads; a new prompt is written into them in place, so a captured CUDA graph sees it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from paradiff.errors import UserError


@dataclass
class TextFamily:
    """What the UNet needs beside the latent: `sdxl` (added conditioning) and, then, the sizes of its parts."""

    sdxl: bool
    pooled_dim: int = 0
    time_ids: int = 0


def family_of(pipe: Any) -> TextFamily:
    """SD or SDXL, from the UNet's config; an SDXL UNet in a pipeline that cannot make pooled embeddings is an error."""
    unet = pipe.unet
    kind = unet.config.get("addition_embed_type")
    name = type(pipe).__name__
    if kind is None:
        return TextFamily(sdxl=False)
    if kind != "text_time":
        raise UserError(f"{name}'s UNet takes added conditioning of type {kind!r}; StreamPipeline supports SD 1.x/2.x "
                        "UNets and SDXL's 'text_time' conditioning.")
    encoder = getattr(pipe, "text_encoder_2", None)
    if encoder is None or not hasattr(encoder.config, "projection_dim"):
        raise UserError(f"{name} has an SDXL UNet (pooled text embeddings + time ids) but no text_encoder_2 to make "
                        "the pooled embeddings; use a StableDiffusionXL pipeline.")
    pooled = int(encoder.config.projection_dim)
    total = unet.add_embedding.linear_1.in_features
    per_id = int(unet.config.addition_time_embed_dim)
    if (total - pooled) % per_id or (total - pooled) // per_id != 6:
        raise UserError(f"{name}'s UNet expects {total} added-conditioning features, which is not {pooled} pooled + 6 "
                        f"time ids x {per_id} (an SDXL refiner with an aesthetic score is not supported).")
    return TextFamily(sdxl=True, pooled_dim=pooled, time_ids=6)


def encode(pipe: Any, family: TextFamily, prompts: list[str], negatives: list[str] | None, device: Any):
    """(cond, uncond, pooled_cond, pooled_uncond) from the pipeline's `encode_prompt`; uncond parts are None when
    `negatives` is None, pooled parts when the family is not SDXL."""
    need_negative = negatives is not None
    if family.sdxl and need_negative and not any(negatives):
        negatives = None  # as diffusers' SDXL pipelines do without a negative prompt: zeros (force_zeros_for_empty_prompt)
    out = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                             do_classifier_free_guidance=need_negative, negative_prompt=negatives)
    if not family.sdxl:
        cond, uncond = out[0], out[1]
        return cond, uncond if need_negative else None, None, None
    cond, uncond, pooled, pooled_uncond = out
    if pooled is None or (need_negative and pooled_uncond is None):
        raise UserError(f"{type(pipe).__name__}.encode_prompt gave no pooled text embeddings, which the SDXL UNet "
                        "needs; use a StableDiffusionXL pipeline with both text encoders.")
    return cond, uncond if need_negative else None, pooled, pooled_uncond if need_negative else None


def time_ids(height: int, width: int, rows: int, device: Any, dtype: Any) -> torch.Tensor:
    """SDXL's micro-conditioning for a stream of this size: original size = target size, no crop (as diffusers'
    pipelines do by default)."""
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)
    return ids.expand(rows, -1).contiguous()
