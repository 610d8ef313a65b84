"""Model facts every layer needs, written once: which module is the denoiser, how much the VAE downsamples, where
a denoiser takes its timestep, and what a call of it looks like (for tracing, benchmarks and tests)."""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any

import torch

from paradiff.errors import UserError

DENOISER_NAMES = ("unet", "transformer")
SDXL_TIME_IDS = 6  # original size, crop top-left, target size


def denoiser_name(pipe: Any) -> str:
    for name in DENOISER_NAMES:
        if isinstance(getattr(pipe, name, None), torch.nn.Module):
            return name
    raise UserError(f"{type(pipe).__name__} has no `unet` or `transformer` denoiser; paradiff cannot parallelize it.")


def denoiser_of(pipe: Any) -> torch.nn.Module:
    """The pipeline's denoiser (`pipe.unet` or `pipe.transformer`), or a UserError naming what is missing."""
    return getattr(pipe, denoiser_name(pipe))


CONTROLNET_CLASSES = ("ControlNetModel", "MultiControlNetModel")


def controlnet_of(pipe: Any) -> torch.nn.Module | None:
    """The pipeline's ControlNet (`pipe.controlnet`: one ControlNetModel or a MultiControlNetModel), or None. The
    pipeline calls it once per step, before the denoiser, and passes its residuals to the denoiser."""
    net = getattr(pipe, "controlnet", None)
    if not isinstance(net, torch.nn.Module):
        return None
    if type(net).__name__ not in CONTROLNET_CLASSES:
        raise UserError(f"paradiff runs ControlNetModel and MultiControlNetModel ControlNets, not "
                        f"{type(net).__name__} ({type(pipe).__name__}).")
    return net


def controlnets(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The ControlNetModels of a pipeline's ControlNet (the nets of a MultiControlNetModel, or the one)."""
    return list(net.nets) if hasattr(net, "nets") else [net]


def embedding_factor(net: torch.nn.Module) -> int:
    """How much a ControlNet's conditioning embedding shrinks the control image (2 per stride-2 conv): the control
    image has this many pixel rows per latent row."""
    factor = 1
    for module in net.controlnet_cond_embedding.modules():
        if isinstance(module, torch.nn.Conv2d):
            factor *= module.stride[0]
    return factor


CONTROLNET_COND_POSITION = 3  # ControlNetModel.forward(sample, timestep, encoder_hidden_states, controlnet_cond, ...)


def control_images(args: tuple, kwargs: dict) -> tuple[list, bool]:
    """The control images of a ControlNet call (a list, one per net) and whether the call gave a list."""
    cond = args[CONTROLNET_COND_POSITION] if len(args) > CONTROLNET_COND_POSITION else kwargs.get("controlnet_cond")
    many = isinstance(cond, (list, tuple))
    return (list(cond) if many else [cond]), many


def with_control_images(args: tuple, kwargs: dict, images: list, many: bool) -> tuple[tuple, dict]:
    value = images if many else images[0]
    if len(args) > CONTROLNET_COND_POSITION:
        return args[:CONTROLNET_COND_POSITION] + (value,) + args[CONTROLNET_COND_POSITION + 1:], kwargs
    return args, {**kwargs, "controlnet_cond": value}


def check_control_images(net: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """A UserError for control images a ControlNet cannot take: another channel count than its
    `conditioning_channels`, another size than the latent's times its `embedding_factor`."""
    sample = args[0] if args else kwargs["sample"]
    images, _ = control_images(args, kwargs)
    nets = controlnets(net)
    if len(images) != len(nets):
        raise UserError(f"{len(nets)} ControlNets got {len(images)} control images; give one per ControlNet.")
    for i, (image, model) in enumerate(zip(images, nets)):
        which = f"ControlNet {i}" if len(nets) > 1 else "the ControlNet"
        channels = model.config.conditioning_channels
        if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[1] != channels:
            got = f"{image.shape[1]} channels" if isinstance(image, torch.Tensor) and image.dim() == 4 else \
                f"a {type(image).__name__}"
            raise UserError(f"{which} takes control images of {channels} channels (conditioning_channels), got "
                            f"{got}.")
        scale = embedding_factor(model)
        want = (sample.shape[-2] * scale, sample.shape[-1] * scale)
        if tuple(image.shape[-2:]) != want:
            raise UserError(f"{which} needs a control image of {want[0]}x{want[1]} px ({scale} px per latent row of "
                            f"the {sample.shape[-2]}x{sample.shape[-1]} latent), got "
                            f"{image.shape[-2]}x{image.shape[-1]} px: give one of the generated image's size.")
def meta_model(cls: type, config: dict) -> torch.nn.Module:
    """`cls.from_config(config)` on the meta device, nothing allocated. A few diffusers layers make parameters
    with the legacy `torch.Tensor([...])` constructor, which ignores the device context (SVD's `AlphaBlender`
    mix factors): they are moved to the meta device too, so a meta forward does not meet a CPU tensor."""
    with torch.device("meta"):
        model = cls.from_config(config)
    if any(p.device.type != "meta" for p in model.parameters()):
        torch.nn.Module.to(model, "meta")  # plain Module.to: diffusers' override warns about fp32 modules
    return model


def vae_scale_factor(pipe: Any) -> int:
    """Pixels per latent row: the pipeline's own figure, else 2 per VAE down block beyond the first, else 8."""
    scale = getattr(pipe, "vae_scale_factor", None)
    if isinstance(scale, int):
        return scale
    vae = getattr(pipe, "vae", None)
    channels = getattr(getattr(vae, "config", None), "block_out_channels", None)
    return 2 ** (len(channels) - 1) if channels else 8


UPSCALE_PIPELINES = ("StableDiffusionUpscalePipeline",)
"""Pipelines that denoise at their input image's size (one latent row per input pixel row; the output is
`vae_scale_factor` times larger): the SD x4 upscaler."""
INPAINT_PIPELINES = ("StableDiffusionInpaintPipeline", "StableDiffusionXLInpaintPipeline")
IMAGE_TO_VIDEO_PIPELINES = ("StableVideoDiffusionPipeline",)
"""Pipelines that animate an input image and take no prompt (Stable Video Diffusion)."""
VIDEO_PIPELINES = IMAGE_TO_VIDEO_PIPELINES + ("AnimateDiffPipeline",)
"""Pipelines whose output is frames (`.frames`), with a `num_frames` argument."""


def takes_prompt(pipe: Any) -> bool:
    """Whether the pipeline's call takes a text prompt (SVD's does not)."""
    return "prompt" in inspect.signature(type(pipe).__call__).parameters


def pixels_per_latent_row(pipeline_class: str, scale: int) -> tuple[int, str]:
    """(pixels per latent row, of which image) for a pipeline class name and its VAE scale factor: the x4 upscaler
    counts its input image (1 px per row), every other pipeline its output image (`scale` px per row)."""
    return (1, "input image") if pipeline_class in UPSCALE_PIPELINES else (scale, "image")


def row_pixels(pipe: Any) -> tuple[int, str]:
    """`pixels_per_latent_row` of a pipeline object (what patch parallelism's size errors speak of)."""
    names = [cls.__name__ for cls in type(pipe).__mro__]
    name = next((n for n in names if n in UPSCALE_PIPELINES), type(pipe).__name__)
    return pixels_per_latent_row(name, vae_scale_factor(pipe))


def image_inputs(pipe: Any, height: int, width: int) -> dict:
    """Call arguments an image-conditioned pipeline needs beside the prompt, for a `height` x `width` output
    (benchmarks: the values do not matter for speed): inpainting a gray image and a centred square mask; the
    x4 upscaler a gray input image `row_pixels` times smaller, in place of height/width (it has none); SVD a gray
    image to animate; AnimateDiff its default frames (`default_frames`). {} for text-to-image pipelines."""
    from PIL import Image

    names = {cls.__name__ for cls in type(pipe).__mro__}
    if names & set(IMAGE_TO_VIDEO_PIPELINES):
        return {"image": Image.new("RGB", (width, height), (128, 128, 128))}
    if names & set(VIDEO_PIPELINES):
        return {"num_frames": default_frames(denoiser_of(pipe))}
    net = controlnet_of(pipe)
    if net is not None:  # a gray control image per ControlNet (and a gray picture to start from, img2img)
        gray = Image.new("RGB", (width, height), (128, 128, 128))
        control = [gray] * len(controlnets(net)) if hasattr(net, "nets") else gray
        if "Img2Img" in type(pipe).__name__:
            return {"image": gray, "control_image": control}
        return {"image": control}
    if names & set(UPSCALE_PIPELINES):
        scale = vae_scale_factor(pipe)
        return {"image": Image.new("RGB", (width // scale, height // scale), (128, 128, 128)),
                "height": None, "width": None}
    if names & set(INPAINT_PIPELINES):
        mask = Image.new("L", (width, height), 0)
        mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
        return {"image": Image.new("RGB", (width, height), (128, 128, 128)), "mask_image": mask}
    return {}


@lru_cache(maxsize=None)
def _parameter_names(cls: type) -> tuple[str, ...]:
    return tuple(list(inspect.signature(cls.forward).parameters)[1:])


def timestep_position(model: torch.nn.Module) -> int | None:
    """Positional index of `timestep` in the denoiser's forward (None when it has none)."""
    names = _parameter_names(type(model))
    return names.index("timestep") if "timestep" in names else None


def timestep_of(model: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    position = timestep_position(model)
    if position is not None and len(args) > position:
        return args[position]
    return kwargs.get("timestep")


MOTION_DENOISERS = ("UNetMotionModel",)
"""Denoisers whose sample is [batch, channels, frames, rows, cols] and whose pipeline repeats the prompt embeddings
once per frame (AnimateDiff)."""
SVD_DENOISERS = ("UNetSpatioTemporalConditionModel",)
"""Denoisers whose sample is [batch, frames, channels, rows, cols], conditioned on an image embedding and 3 added
time ids (Stable Video Diffusion)."""
MOTION_FRAMES = 16  # AnimateDiff's default number of frames (the example call's)


def _is(model: Any, names: tuple[str, ...]) -> bool:
    return any(cls.__name__ in names for cls in type(model).__mro__)


def default_frames(model: torch.nn.Module) -> int | None:
    """The frames of a video denoiser's call when none are asked for: SVD's `num_frames`, AnimateDiff's 16 (at most
    its motion modules' `motion_max_seq_length`); None for image denoisers."""
    config = model.config
    if _is(model, SVD_DENOISERS):
        return int(config.num_frames)
    if _is(model, MOTION_DENOISERS):
        return min(MOTION_FRAMES, config.get("motion_max_seq_length") or MOTION_FRAMES)
    return None


def frames_per_batch_row(model: torch.nn.Module, args: tuple, kwargs: dict) -> int:
    """How many rows of a conditioning input belong to one batch element: the frames for AnimateDiff, whose pipeline
    repeats the prompt embeddings per frame ([batch x frames, tokens, width]); 1 for every other denoiser."""
    if not _is(model, MOTION_DENOISERS):
        return 1
    sample = args[0] if args else kwargs.get("sample")
    return int(sample.shape[2]) if isinstance(sample, torch.Tensor) and sample.dim() == 5 else 1


def _side(sample_size: Any) -> tuple[int, int]:
    if isinstance(sample_size, (list, tuple)):
        return int(sample_size[0]), int(sample_size[1])
    return int(sample_size or 64), int(sample_size or 64)


CLASS_LABEL_EXAMPLE = 20  # a valid class index for every num_class_embeds > 20 (the x4 upscaler's noise level, <= 350)


def class_labels(model: torch.nn.Module, batch: int, *, device: Any = "meta", dtype: torch.dtype = torch.float32,
                 generator: torch.Generator | None = None) -> torch.Tensor | None:
    """The `class_labels` a UNet with a class embedding needs (None when it has none), by `class_embed_type`:
    None + `num_class_embeds` (an nn.Embedding: integer labels, e.g. the x4 upscaler's noise level), "timestep"
    (timestep-like numbers), "identity" (vectors of the time-embedding width), "projection"/"simple_projection"
    (vectors of `projection_class_embeddings_input_dim`)."""
    config = model.config
    kind, count = config.get("class_embed_type"), config.get("num_class_embeds")
    if getattr(model, "class_embedding", None) is None:
        return None
    device = torch.device(device)
    if kind is None and count:
        return torch.full((batch,), min(CLASS_LABEL_EXAMPLE, count - 1), dtype=torch.long, device=device)
    if kind == "timestep":
        return torch.full((batch,), 500.0, device=device)
    if kind == "identity":
        width = config.get("time_embedding_dim") or config.block_out_channels[0] * 4
    elif kind in ("projection", "simple_projection"):
        width = config.projection_class_embeddings_input_dim
    else:
        raise UserError(f"paradiff does not know the class labels of class_embed_type={kind!r} yet.")
    if device.type == "meta":
        return torch.empty(batch, width, device=device, dtype=dtype)
    return torch.randn(batch, width, generator=generator).to(device=device, dtype=dtype)


def example_inputs(model: torch.nn.Module, batch: int = 2, height: int | None = None, width: int | None = None, *,
                   device: Any = "meta", dtype: torch.dtype = torch.float32, seed: int = 0,
                   frames: int | None = None) -> dict:
    """Keyword arguments of one denoiser call at `height` x `width` latent rows/columns (default: the model's
    sample size): empty tensors on the meta device (tracing), else seeded random values. UNets get `in_channels`
    input channels (9 for inpainting: latent, mask, masked-image latent; 7 for the x4 upscaler: latent, low-res
    image), SDXL's added conditioning and, with a class embedding, `class_labels` (see `class_labels`). Video
    UNets get `frames` frames (default: SVD's `num_frames`, AnimateDiff's 16, at most its motion modules'
    `motion_max_seq_length`): SVD a 5-D sample, one image
    embedding per video and its 3 added time ids (fps, motion bucket, noise augmentation); AnimateDiff a 5-D sample
    and the prompt embeddings once per frame, as their pipelines call them."""
    config = model.config
    device = torch.device(device)
    default_h, default_w = _side(config.get("sample_size"))
    h, w = height or default_h, width or default_w
    generator = torch.Generator("cpu").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        if device.type == "meta":
            return torch.empty(*shape, device=device, dtype=dtype)
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    timestep = torch.full((batch,), 500.0, device=device)
    if hasattr(config, "joint_attention_dim"):  # SD3-style transformer
        return dict(hidden_states=randn(batch, config.in_channels, h, w),
                    encoder_hidden_states=randn(batch, 333, config.joint_attention_dim),
                    pooled_projections=randn(batch, config.pooled_projection_dim), timestep=timestep)
    if not hasattr(config, "cross_attention_dim"):
        raise UserError(f"paradiff does not know the inputs of {type(model).__name__} yet.")
    cross = config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    if _is(model, SVD_DENOISERS):
        frames = frames or default_frames(model)
        ids = torch.tensor([[6.0, 127.0, 0.02]] * batch)  # fps - 1, motion bucket id, noise augmentation
        return dict(sample=randn(batch, frames, config.in_channels, h, w), timestep=timestep,
                    encoder_hidden_states=randn(batch, 1, cross),
                    added_time_ids=ids.to(device, dtype) if device.type != "meta" else randn(batch, 3))
    motion = _is(model, MOTION_DENOISERS)
    frames = (frames or default_frames(model)) if motion else 1
    sample = randn(batch, config.in_channels, frames, h, w) if motion else randn(batch, config.in_channels, h, w)
    kwargs: dict = dict(sample=sample, timestep=timestep, encoder_hidden_states=randn(batch * frames, 77, cross))
    labels = class_labels(model, batch, device=device, dtype=dtype, generator=generator)
    if labels is not None:
        kwargs["class_labels"] = labels
    if config.get("addition_embed_type") == "text_time":
        text_dim = config.projection_class_embeddings_input_dim - SDXL_TIME_IDS * config.addition_time_embed_dim
        scale = 8
        ids = torch.tensor([[h * scale, w * scale, 0, 0, h * scale, w * scale]] * batch, dtype=dtype)
        kwargs["added_cond_kwargs"] = {"text_embeds": randn(batch, text_dim),
                                       "time_ids": ids.to(device) if device.type != "meta" else randn(batch, 6)}
    return kwargs
