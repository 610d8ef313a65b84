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
    kwargs = {"num_inference_steps": args.steps}
    if args.size is not None:
        kwargs["height"], kwargs["width"] = args.size
    guidance = args.guidance
    if guidance is None and args.model is None:
        from paradiff.reference import DEFAULT_GUIDANCE

        guidance = DEFAULT_GUIDANCE
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    if args.negative_prompt is not None:
        kwargs["negative_prompt"] = args.negative_prompt
    return kwargs


def run(args: argparse.Namespace) -> int:
    import torch

    from paradiff.commands.common import load_for_command
    from paradiff.parallel import parallelize

    start = time.perf_counter()
    rt, methods, pipe = load_for_command(args, args.model)
    if methods:
        parallelize(pipe, *methods)
    else:
        pipe.to(rt.device)
    kwargs = call_kwargs(args)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    image = pipe(args.prompt, generator=generator, **kwargs).images[0]
    if rt.is_main:
        image.save(args.output)
        print(f"wrote {args.output} ({image.height}x{image.width}, {args.steps} steps, "
              f"{time.perf_counter() - start:.1f} s, {rt.world_size} rank(s) on {rt.device.type})")
    return 0
