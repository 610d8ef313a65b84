"""`paradiff bench`: denoiser step and end-to-end latency on real architectures with random weights.

    paradiff bench --arch stable-diffusion-xl-base-1.0 --size 1024 --batch 2          # eager vs compiled step
    paradiff bench --arch sdxl --size 1024 --what e2e --steps 50                       # whole pipeline
    paradiff bench --arch sdxl --size 1024 --what e2e --method patch --nproc 2         # parallel vs compiled
"""

from __future__ import annotations

import argparse

from paradiff.commands.common import (add_parallel_args, image_size, load_model, methods_from_args, non_negative_int,
                                      positive_int)

VARIANTS = ("eager", "compiled")


def _variants(text: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in items if v not in VARIANTS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"variants are a comma list of {', '.join(VARIANTS)}; got {text!r}")
    return items


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time denoiser steps and whole pipelines (eager, compiled, parallel)",
                       description="Benchmark a real architecture with random weights (speed does not depend on "
                                   "weight values) or a loaded model. Ratios are against the compiled baseline "
                                   "measured in the same run.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--arch", default=None,
                     help="architecture: a shipped name (stable-diffusion-xl-base-1.0, sdxl, sd21, sd-turbo, ...), "
                          "a local diffusers folder or a hub id; random weights")
    src.add_argument("--model", default=None,
                     help="a real model (hub id or folder) instead of --arch (default: the embedded reference model)")
    p.add_argument("--size", type=image_size, default=None, help="N or HxW (default: the model's native size)")
    p.add_argument("--batch", type=positive_int, default=2, help="denoiser batch for --what step (2 = CFG, default)")
    p.add_argument("--what", choices=("step", "e2e", "all"), default="step",
                   help="step: one denoiser call; e2e: the whole pipeline (and its steps in the loop)")
    p.add_argument("--variants", type=_variants, default=VARIANTS, help="comma list of eager,compiled")
    p.add_argument("--compile-mode", default="reduce-overhead", choices=("reduce-overhead", "default"),
                   help="torch.compile mode of the baseline (max-autotune is not offered: it compiles for >8 min)")
    p.add_argument("--runs", type=positive_int, default=20, help="timed runs (steps) or pipeline calls (e2e: /4)")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="untimed calls first")
    p.add_argument("--steps", type=positive_int, default=50, help="denoising steps for --what e2e")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale for e2e (default: the pipeline's)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    p.add_argument("--device", default=None, choices=("cpu", "cuda"))
    p.add_argument("--json", default=None, help="write results here (JSON, and a .md table beside it)")
    p.add_argument("--explain", action="store_true",
                   help="with --method async: print how the model is split over --nproc ranks (no ranks started)")
    add_parallel_args(p)
    p.set_defaults(run=run)


def _native_size(denoiser, pipe=None) -> tuple[int, int]:
    """The output size at the denoiser's sample size: 8 px per latent row, or the pipeline's VAE scale (4 for the
    x4 upscaler, whose 128-row latent is a 128 px input and a 512 px output)."""
    from paradiff.plans.common import vae_scale_factor

    sample = denoiser.config.sample_size
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    scale = vae_scale_factor(pipe) if pipe is not None else 8
    return sample * scale, sample * scale


def run(args: argparse.Namespace) -> int:
    import torch

    from paradiff import archs, bench, runtime
    from paradiff.parallel import parallelize
    from paradiff.pipelines import torch_dtype
    from paradiff.plans.common import controlnet_of, denoiser_name, denoiser_of

    rt = runtime.init(args.device)
    dtype = torch_dtype(args.dtype, rt.device)
    methods = methods_from_args(args)
    arch = args.arch  # None: the --model (default: the embedded reference model) with its real weights

    if args.explain:
        if args.method != "async":
            from paradiff.errors import UserError

            raise UserError("--explain shows how --method async splits the model; add --method async.")
        from paradiff.methods.split import explain_split

        stride = args.stride or 1
        components = max(1, (args.nproc or 2) - (stride - 1))  # the paper's rule: N + stride - 1 ranks
        if arch:
            model, net = archs.build_model(arch, device="meta"), archs.build_controlnet(arch, device="meta")
        else:
            pipe = load_model(args)
            model, net = denoiser_of(pipe), controlnet_of(pipe)
        print(explain_split(model, components, net))
        return 0

    rows: list = []
    what = ("step", "e2e") if args.what == "all" else (args.what,)
    if "step" in what and not methods:
        if arch:
            model = archs.build_model(arch, dtype=dtype, device=rt.device)
            net = archs.build_controlnet(arch, dtype=dtype, device=rt.device)
        else:
            pipe = load_model(args, dtype=dtype)
            model, net = denoiser_of(pipe).to(rt.device), controlnet_of(pipe)
            net = net.to(rt.device) if net is not None else None
        height, width = args.size or _native_size(model)
        rows += bench.bench_denoiser(model, batch=args.batch, height=height, width=width, dtype=dtype,
                                     device=rt.device, variants=args.variants, runs=args.runs, warmup=args.warmup,
                                     compile_mode=args.compile_mode, controlnet=net)
        del model, net
    if "e2e" in what or methods:
        pipe = archs.build_pipeline(arch, dtype=dtype, device=rt.device) if arch else \
            load_model(args, dtype=dtype).to(rt.device)
        pipe.set_progress_bar_config(disable=True)
        name = denoiser_name(pipe)  # unet, or an SD3 pipeline's transformer
        denoiser = getattr(pipe, name)
        height, width = args.size or _native_size(denoiser, pipe)
        e2e_runs = max(1, args.runs // 4)
        common = dict(prompt="an astronaut riding a horse", steps=args.steps, height=height, width=width,
                      guidance=args.guidance, device=rt.device, runs=e2e_runs, warmup=max(1, min(args.warmup, 2)))
        net = controlnet_of(pipe)
        for variant in args.variants:  # every rank measures the single-device baseline on its own device
            setattr(pipe, name, denoiser if variant == "eager" else bench.compile_model(denoiser, args.compile_mode))
            if net is not None:
                pipe.controlnet = net if variant == "eager" else bench.compile_model(net, args.compile_mode)
            rows += bench.bench_pipeline(pipe, variant=variant, **common)
        setattr(pipe, name, denoiser)
        if net is not None:
            pipe.controlnet = net
        torch._dynamo.reset()
        if methods:
            runtime.barrier()
            parallelize(pipe, *methods)
            pipe.set_progress_bar_config(disable=True)
            label = f"{args.method} x{rt.world_size}{' compiled' if args.compile else ''}"
            skip = getattr(methods[-1], "warmup_steps", 0) or 0
            rows += bench.bench_pipeline(pipe, variant=label, skip_steps=min(skip, args.steps - 1), **common)
    if rt.is_main:
        meta = bench.environment(rt.device)
        meta.update(arch=arch, model=args.model, size=f"{height}x{width}", dtype=str(dtype).replace("torch.", ""),
                    ranks=rt.world_size, method=args.method)
        print(bench.table(rows))
        if args.json:
            bench.write_results(args.json, rows, meta)
            print(f"wrote {args.json}")
    return 0
