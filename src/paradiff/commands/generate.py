"""`paradiff generate PROMPT`: one image (or one video) from a diffusers pipeline, serial or with a parallel method."""

from __future__ import annotations

import argparse
import time

from paradiff.commands.common import (add_model_args, add_parallel_args, check_before_launch, check_method_flags,
                                      check_model_flag, image_size, non_negative_int, positive_int)
from paradiff.commands import control
from paradiff.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate an image from a prompt",
                       description="Generate an image. Under --nproc N or torchrun, all ranks work on one image. "
                                   "The pipeline is the --model's own (model_index.json): text-to-image, "
                                   "inpainting (--image and --mask), the x4 upscaler (--image), text-to-video "
                                   "(AnimateDiff, --num-frames) or image-to-video (Stable Video Diffusion: --image, "
                                   "no prompt).")
    p.add_argument("prompt", nargs="?", default=None, help="text prompt (none for image-to-video)")
    p.add_argument("--negative-prompt", default=None)
    add_model_args(p)
    p.add_argument("--steps", type=positive_int, default=25, help="denoising steps (default 25)")
    p.add_argument("--size", type=image_size, default=None, help="N or HxW, multiples of 8 (default: the model's)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: 3.0 for the embedded model, else the pipeline's)")
    p.add_argument("--image", default=None,
                   help="input image file (PNG): the picture to inpaint (with --mask), to upscale (x4 upscaler) or "
                        "to animate (Stable Video Diffusion)")
    p.add_argument("--mask", default=None,
                   help="inpainting mask (PNG, same picture size): white is repainted, black kept")
    control.add_args(p)  # --controlnet, --control-image (with --image: ControlNet img2img)
    p.add_argument("--num-frames", type=positive_int, default=None,
                   help="frames of a video model (default: the pipeline's: 16 for AnimateDiff, SVD's num_frames)")
    p.add_argument("-o", "--output", default=None,
                   help="output file, written by rank 0 (default out.png); a video model writes out.mp4, out.gif "
                        "(default) or a folder of PNG frames")
    add_parallel_args(p)
    p.set_defaults(run=run, check_before_launch=check_generate_before_launch)


def check_generate_before_launch(args: argparse.Namespace) -> None:
    """The shared launch checks, then the image inputs against the model (one line before any rank starts)."""
    check_before_launch(args)
    image_inputs(args, args.nproc or 1)


def _open_image(flag: str, path: str, mode: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except FileNotFoundError:
        raise UserError(f"{flag} {path}: no such file.") from None
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"{flag} {path}: not an image file ({type(err).__name__}).") from None


def _patch_degree(method: str, world: int) -> int | None:
    parts = method.split("+")
    return world // (2 if "cfg" in parts else 1) if "patch" in parts else None


def image_inputs(args: argparse.Namespace, world: int) -> dict:
    """The image arguments of the pipeline call, checked against the model's pipeline class (model_index.json) and
    against the row split of patch parallelism over `world` ranks; a UserError says what is wrong in one line.

    Inpainting: `image`, `mask_image`, and the output size (--size, else the image's). The x4 upscaler: `image`
    (its output is 4x larger; --size does not apply). Text-to-image models take neither flag."""
    from paradiff.methods.patch import patch_rows_message
    from paradiff.pipelines import pipeline_facts
    from paradiff.plans.common import (IMAGE_TO_VIDEO_PIPELINES, INPAINT_PIPELINES, UPSCALE_PIPELINES,
                                       pixels_per_latent_row)

    if args.mask and not args.image:
        raise UserError("--mask needs --image: the picture whose masked part is repainted.")
    facts = pipeline_facts(args.model)
    cls, name = facts["class_name"], facts["name"]
    control_kwargs, control_size = control.control_inputs(args, facts, _open_image)
    inpaint, upscale = cls in INPAINT_PIPELINES, cls in UPSCALE_PIPELINES
    if args.mask and not inpaint:
        raise UserError(f"--mask is for inpainting models; {name} is a {cls}.")
    animate = cls in IMAGE_TO_VIDEO_PIPELINES
    if args.image and not (inpaint or upscale or animate or control_size):
        raise UserError(f"--image needs an inpainting model (with --mask), the x4 upscaler, an image-to-video model "
                        f"or a ControlNet (img2img); {name} is a {cls}.")
    if inpaint and not args.mask:
        raise UserError(f"{name} is an inpainting model ({cls}): give --image and --mask.")
    if upscale and not args.image:
        raise UserError(f"{name} is an upscaler ({cls}): give --image, the picture to upscale.")
    if animate and not args.image:
        raise UserError(f"{name} is an image-to-video model ({cls}): give --image, the picture to animate.")
    vae, unet = facts["vae"], facts["unet"]
    scale = 2 ** (len(vae["block_out_channels"]) - 1) if vae else 8
    kwargs: dict = {}
    size = control_size or args.size
    if args.image:
        image = _open_image("--image", args.image, "RGB")
        kwargs["image"] = image
        if upscale:
            if args.size:
                raise UserError(f"--size does not apply to an upscaler: its output is {scale}x the --image "
                                f"({image.height}x{image.width} -> {image.height * scale}x{image.width * scale}).")
            size = (image.height // scale * scale, image.width // scale * scale)  # diffusers' rounding
        elif size is None:
            size = (image.height, image.width)
            if image.height % scale or image.width % scale:
                fit = f"{image.height // scale * scale}x{image.width // scale * scale}"
                raise UserError(f"--image is {image.height}x{image.width} px; the output of "
                                f"{'image-to-video' if animate else 'inpainting'} needs sides that are multiples of "
                                f"{scale}: give --size (e.g. {fit}).")
            kwargs["height"], kwargs["width"] = size
    if args.mask:
        kwargs["mask_image"] = _open_image("--mask", args.mask, "L")
    degree = _patch_degree(getattr(args, "method", "none"), world)
    if degree and degree > 1 and facts.get("transformer"):
        raise UserError(f"--method {args.method}: patch parallelism splits a UNet's rows, and {name}'s denoiser is "
                        f"a {facts['transformer']} ({cls}); use --method cfg, async or cfg+async.")
    if degree and degree > 1 and unet and unet.get("down_block_types"):  # a UNet: 2x down per block but the last
        if size is None:
            sample = unet.get("sample_size") or 64
            size = (sample[0] if isinstance(sample, (list, tuple)) else sample) * scale, 0
        row_pixels, image_name = pixels_per_latent_row(cls, scale)
        rows = size[0] // row_pixels if upscale else size[0] // scale
        message = patch_rows_message(rows, degree, 2 ** (len(unet["down_block_types"]) - 1), row_pixels, image_name)
        if message is not None:
            raise UserError(message)
    kwargs.update(video_inputs(args, facts))
    return {**kwargs, **control_kwargs}


def video_inputs(args: argparse.Namespace, facts: dict) -> dict:
    """`num_frames` for a video model, and the checks of the flags that depend on the model being one: the prompt
    (none for image-to-video), --num-frames (video models only; AnimateDiff's motion modules take at most
    `motion_max_seq_length` frames), -o (a video file or folder for a video, a still image otherwise), and
    --negative-prompt / --guidance for SVD (no prompt; its guidance ramps over the frames up to --guidance)."""
    import importlib.util
    from pathlib import Path

    from paradiff.plans.common import IMAGE_TO_VIDEO_PIPELINES, VIDEO_PIPELINES

    cls, name = facts["class_name"], facts["name"]
    video, animate = cls in VIDEO_PIPELINES, cls in IMAGE_TO_VIDEO_PIPELINES
    if animate and args.prompt is not None:
        raise UserError(f"{name} is an image-to-video model ({cls}): it takes no prompt, only --image.")
    if animate and args.negative_prompt is not None:
        raise UserError(f"{name} is an image-to-video model ({cls}): it takes no --negative-prompt.")
    if not animate and args.prompt is None:
        raise UserError("give a prompt: paradiff generate \"a red circle\" ...")
    suffix = Path(args.output or "").suffix.lower()
    if not video:
        if args.num_frames is not None:
            raise UserError(f"--num-frames is for video models (AnimateDiff, Stable Video Diffusion); {name} is a "
                            f"{cls}.")
        if suffix in VIDEO_SUFFIXES or (args.output and not suffix):
            raise UserError(f"-o {args.output}: {name} makes one image ({cls}); give an image file such as out.png.")
        return {}
    if args.output is None:
        args.output = "out.gif"
    elif suffix and suffix not in VIDEO_SUFFIXES:
        raise UserError(f"-o {args.output}: {name} makes a video ({cls}); give {', '.join(VIDEO_SUFFIXES)} or a "
                        "folder for PNG frames.")
    if suffix not in ("", ".gif") and importlib.util.find_spec("imageio_ffmpeg") is None:
        raise UserError(f"-o {args.output}: writing {suffix} needs imageio-ffmpeg (pip install imageio-ffmpeg); "
                        "or write out.gif or a folder.")
    unet = facts["unet"] or {}
    frames = args.num_frames or (unet.get("num_frames") if animate else None) or MOTION_FRAMES_DEFAULT
    longest = unet.get("motion_max_seq_length")
    if longest and frames > longest:
        raise UserError(f"--num-frames {frames}: {name}'s motion modules take at most {longest} frames.")
    return {"num_frames": frames}


VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".mov", ".mkv", ".avi")
MOTION_FRAMES_DEFAULT = 16  # AnimateDiffPipeline's default
FPS = {"StableVideoDiffusionPipeline": 7, "AnimateDiffPipeline": 8}  # the pipelines' own frame rates


def write_video(frames: list, path: str, fps: float) -> None:
    """Frames (PIL images) to a video file (imageio: ffmpeg, or pillow for gif) or a folder of PNGs."""
    import numpy as np

    from paradiff.stream.io import open_sink

    sink = open_sink(path, fps)
    try:
        for frame in frames:
            sink.write(np.asarray(frame.convert("RGB")))
    finally:
        sink.close()


def call_kwargs(args: argparse.Namespace) -> dict:
    """The pipeline call's options from the flags; the embedded model gets its own CFG scale, not diffusers' 7.5."""
    return pipeline_kwargs(steps=args.steps, size=args.size, guidance=args.guidance,
                           negative_prompt=args.negative_prompt, embedded_model=args.model is None)


def pipeline_kwargs(*, steps: int, size: tuple[int, int] | None = None, guidance: float | None = None,
                    negative_prompt: str | None = None, embedded_model: bool = False) -> dict:
    """`call_kwargs` without the argparse namespace (`paradiff serve` builds each request's call with it)."""
    kwargs = {"num_inference_steps": steps}
    if size is not None:
        kwargs["height"], kwargs["width"] = size
    if guidance is None and embedded_model:
        from paradiff.reference import DEFAULT_GUIDANCE

        guidance = DEFAULT_GUIDANCE
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    if negative_prompt is not None:
        kwargs["negative_prompt"] = negative_prompt
    return kwargs


def generators(seed: int, n: int = 1):
    """The `generator=` argument for `n` images from `seed`: image i starts from seed + i's noise (CPU generators: a
    seed gives the same noise on any device), so image i of a batch is the image `generate --seed SEED+i` makes, up
    to the rounding of a batched computation (at most 1 level of 255 on the reference model, on the CPU)."""
    import torch

    if n == 1:
        return torch.Generator("cpu").manual_seed(seed)
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


def prepare_pipeline(args: argparse.Namespace):
    """This rank's runtime and the loaded pipeline, parallelized as the flags ask (every rank calls it)."""
    from paradiff.commands.common import load_for_command
    from paradiff.parallel import parallelize
    from paradiff.plans.common import denoiser_of

    rt, methods, pipe = load_for_command(args, args.model)
    pipe = control.controlnet_pipeline(pipe, args, denoiser_of(pipe).dtype)
    if methods:
        parallelize(pipe, *methods)
    else:
        pipe.to(rt.device)
        if getattr(args, "compile", None):
            compile_serial(pipe)
    return rt, pipe


def compile_serial(pipe) -> None:
    """`--compile` without a parallel method: the denoiser compiled in place as the single-GPU baseline of the
    benchmarks (`paradiff.bench.compile_model`: reduce-overhead, so CUDA graphs on a GPU); in place, so a pipeline
    made from this one with `from_pipe` (img2img) shares it."""
    from paradiff.plans.common import denoiser_of

    denoiser_of(pipe).compile(mode="reduce-overhead")


def run(args: argparse.Namespace) -> int:
    import os

    start = time.perf_counter()
    check_method_flags(args)
    check_model_flag(args)
    images = image_inputs(args, int(os.environ.get("WORLD_SIZE", args.nproc or 1)))  # before loading the model
    rt, pipe = prepare_pipeline(args)
    kwargs = {**call_kwargs(args), **images}
    if "num_frames" in images:
        return _run_video(args, rt, pipe, kwargs, start)
    image = pipe(args.prompt, generator=generators(args.seed), **kwargs).images[0]
    if rt.is_main:
        image.save(args.output or "out.png")
        print(f"wrote {args.output or 'out.png'} ({image.height}x{image.width}, {args.steps} steps, "
              f"{time.perf_counter() - start:.1f} s, {rt.world_size} rank(s) on {rt.device.type})")
    return 0


def _run_video(args: argparse.Namespace, rt, pipe, kwargs: dict, start: float) -> int:
    """A video model's call (SVD: no prompt, --guidance is the top of its ramp over frames) and its frames' file."""
    from paradiff.plans.common import takes_prompt

    prompt = (args.prompt,) if takes_prompt(pipe) else ()
    if not prompt and "guidance_scale" in kwargs:
        kwargs["max_guidance_scale"] = kwargs.pop("guidance_scale")
    frames = pipe(*prompt, generator=generators(args.seed), **kwargs).frames[0]
    if rt.is_main:
        write_video(frames, args.output, FPS.get(type(pipe).__name__, 8))
        print(f"wrote {args.output} ({len(frames)} frames, {frames[0].height}x{frames[0].width}, {args.steps} "
              f"steps, {time.perf_counter() - start:.1f} s, {rt.world_size} rank(s) on {rt.device.type})")
    return 0
