"""`paradiff generate PROMPT`: one image from a diffusers pipeline, serial or with a parallel method."""

from __future__ import annotations

import argparse
import time

from paradiff.commands.common import add_model_args, add_parallel_args, image_size, non_negative_int, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate an image from a prompt",
                       description="Generate an image. Under --nproc N or torchrun, all ranks work on one image.")
    p.add_argument("prompt", help="text prompt")
    p.add_argument("--negative-prompt", default=None)
    add_model_args(p)
    p.add_argument("--steps", type=positive_int, default=25, help="denoising steps (default 25)")
    p.add_argument("--size", type=image_size, default=None, help="N or HxW, multiples of 8 (default: the model's)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: 3.0 for the embedded model, else the pipeline's)")
    p.add_argument("-o", "--output", default="out.png", help="output image file (written by rank 0)")
    add_parallel_args(p)
    p.set_defaults(run=run)


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

    rt, methods, pipe = load_for_command(args, args.model)
    if methods:
        parallelize(pipe, *methods)
    else:
        pipe.to(rt.device)
    return rt, pipe


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    rt, pipe = prepare_pipeline(args)
    image = pipe(args.prompt, generator=generators(args.seed), **call_kwargs(args)).images[0]
    if rt.is_main:
        image.save(args.output)
        print(f"wrote {args.output} ({image.height}x{image.width}, {args.steps} steps, "
              f"{time.perf_counter() - start:.1f} s, {rt.world_size} rank(s) on {rt.device.type})")
    return 0
