"""`paradiff stream`: a video, an image folder or a webcam through a StreamPipeline, or the browser demo (--web)."""

from __future__ import annotations

import argparse
import os

from paradiff.commands.common import (SaidWithFlag, add_model_args, float_between, image_size, load_model,
                                      non_negative_int, positive_int)


def _number_list(cast, what: str, example: str):
    """An argparse type: comma-separated numbers (`cast` each), at least one."""
    def parse(text: str) -> list:
        try:
            values = [cast(v) for v in text.replace(" ", "").split(",") if v != ""]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what} like {example}; got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"give at least one of the {what}, e.g. {example}")
        return values

    return parse


t_index_list = _number_list(int, "step indices", "32,45")
scales = _number_list(float, "scales", "0.8,1.0")
threshold = float_between(0, 1, "a number between 0 and 1", "e.g. 0.98")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "stream", help="real-time img2img on a video, image folder or webcam; --web for the browser demo",
        description="Stream frames through a few-step diffusion model (StreamDiffusion-style stream batch). Output "
                    "frame i is input frame i; a live source drops the oldest frames when the GPU falls behind.")
    src = p.add_argument_group("input/output")
    src.add_argument("--input", "-i", help="video file, folder of images, webcam[:N] or screen")
    src.add_argument("-o", "--output", help="output video file (.mp4, .gif...) or folder of PNGs")
    src.add_argument("--web", action="store_true", help="serve the browser demo (webcam in the page) instead")
    src.add_argument("--host", default="127.0.0.1", help="web demo address (default 127.0.0.1)")
    src.add_argument("--port", type=positive_int, default=7860, help="web demo port (default 7860)")
    src.add_argument("--max-frames", type=positive_int, default=None, help="stop after this many input frames")
    src.add_argument("--queue", type=positive_int, default=4, help="frames that may wait for the GPU (default 4)")
    src.add_argument("--realtime", action="store_true",
                     help="drop the oldest waiting frames when the GPU falls behind (default for webcam/screen)")
    p.add_argument("--prompt", "-p", required=False, default=None, help="text prompt")
    p.add_argument("--negative-prompt", default="")
    add_model_args(p)
    p.add_argument("--arch", default=None, help="build this architecture with RANDOM weights (speed only), e.g. sd-turbo")
    p.add_argument("--tiny", nargs="?", const="sd", default=None, choices=("sd", "sdxl"),
                   help="a tiny random-weight pipeline (smoke tests): sd (default) or sdxl")
    p.add_argument("--tiny-vae", default=None,
                   help="an AutoencoderTiny (TAESD) folder to encode/decode with; 'random' for random TAESD weights")
    p.add_argument("--t-index", type=t_index_list, default=[32, 45],
                   help="steps of the schedule to run, comma-separated (default 32,45 of --steps 50)")
    p.add_argument("--steps", type=positive_int, default=50, help="length of the schedule t-index picks from (50)")
    p.add_argument("--guidance", default="none", choices=("none", "full", "self", "initialize"),
                   help="none, full CFG, or residual CFG: self (self-negative), initialize (onetime-negative)")
    p.add_argument("--guidance-scale", type=float, default=1.2)
    p.add_argument("--delta", type=float, default=1.0, help="RCFG virtual residual noise scale (default 1.0)")
    p.add_argument("--frame-buffer", type=positive_int, default=1, help="frames per step (default 1)")
    p.add_argument("--similarity-filter", type=threshold, default=None, metavar="THRESHOLD",
                   help="skip frames whose cosine similarity to the last processed one exceeds this (e.g. 0.98)")
    p.add_argument("--max-skip-frames", type=non_negative_int, default=10)
    p.add_argument("--size", type=image_size, default=None, help="stream size N or HxW (default: the model's)")
    p.add_argument("--seed", type=non_negative_int, default=2)
    control = p.add_argument_group("ControlNet and LoRA")
    control.add_argument("--controlnet", action="append", default=None, metavar="FOLDER|random",
                         help="a diffusers ControlNet folder or hub id ('random': random weights shaped after the "
                              "UNet, speed only); repeat for several")
    control.add_argument("--control-image", action="append", default=None, metavar="FILE",
                         help="a control map used for every frame, one per --controlnet (default: derived from each "
                              "frame by --control-preprocessor)")
    control.add_argument("--control-preprocessor", action="append", default=None, choices=("canny", "sobel", "none"),
                         help="derive each frame's control map on the GPU (one per --controlnet, or one for all)")
    control.add_argument("--controlnet-scale", type=scales, default=[1.0],
                         help="ControlNet conditioning scale(s), comma-separated per ControlNet (default 1.0)")
    control.add_argument("--lora", default=None, metavar="PATH", help="a diffusers LoRA (folder, file or hub id)")
    control.add_argument("--lora-scale", type=float, default=1.0, help="LoRA scale (default 1.0)")
    control.add_argument("--fuse-lora", action="store_true", help="fuse the LoRA into the weights (no live changes)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet and VAE (GPU; slow first frame)")
    p.add_argument("--no-cuda-graph", action="store_true", help="run the step eagerly on a GPU")
    p.set_defaults(run=run)


def _load(args, device, dtype):
    from paradiff.errors import UserError

    if sum(bool(x) for x in (args.model, args.arch, args.tiny)) > 1:
        raise UserError("give only one of --model, --arch and --tiny.")
    if args.tiny:
        from paradiff.stream.tiny import tiny_pipeline

        return tiny_pipeline(device=device, dtype=dtype, family=args.tiny)
    if args.arch:
        from paradiff.archs import build_pipeline

        return build_pipeline(args.arch, dtype=dtype, device=device)
    model = args.model
    if model is None:
        from paradiff.reference import FAST_MODEL

        if not os.path.isfile(os.path.join(FAST_MODEL, "model_index.json")):
            raise UserError("the embedded few-step reference model is not in this install; pass --model (e.g. "
                            "stabilityai/sd-turbo), or --arch sd-turbo / --tiny for random weights.")
        model = FAST_MODEL
    pipe = load_model(args, model, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _tiny_vae(spec, device, dtype, sdxl=False):
    if spec is None:
        return None
    if spec == "random":
        from paradiff.archs import build_model

        return build_model("taesdxl" if sdxl else "taesd", "vae", dtype=dtype, device=device)
    from diffusers import AutoencoderTiny

    from paradiff.errors import UserError

    if not os.path.isdir(spec):
        raise UserError(f"--tiny-vae {spec}: no such folder (give an AutoencoderTiny folder, or 'random').")
    return AutoencoderTiny.from_pretrained(spec, torch_dtype=dtype).to(device)


def _controlnets(args, pipe, device, dtype) -> list:
    """The --controlnet models: loaded, or random ones shaped after the UNet."""
    from paradiff.errors import UserError
    from paradiff.stream.tiny import random_controlnet

    nets = []
    for i, spec in enumerate(args.controlnet or []):
        if spec == "random":
            nets.append(random_controlnet(pipe.unet, seed=i, tiny=bool(args.tiny)))
            continue
        from diffusers import ControlNetModel

        with SaidWithFlag(f"controlnet={spec!r}", f"--controlnet {spec}"):
            try:
                nets.append(ControlNetModel.from_pretrained(spec, torch_dtype=dtype).to(device))
            except (OSError, ValueError) as err:
                raise UserError(f"controlnet={spec!r}: not a diffusers ControlNet folder or hub id "
                                f"({type(err).__name__}).") from None
    return nets


def _control_images(args, size) -> list | None:
    """--control-image files, fitted to the stream's size like the frames."""
    if not args.control_image:
        return None
    import numpy as np
    from PIL import Image

    from paradiff.errors import UserError
    from paradiff.stream.io import _fit

    images = []
    for path in args.control_image:
        if not os.path.isfile(path):
            raise UserError(f"--control-image {path}: no such file.")
        with Image.open(path) as image:
            images.append(_fit(np.asarray(image.convert("RGB")), size))
    return images


def _check_control_flags(args) -> None:
    from paradiff.errors import UserError

    n = len(args.controlnet or [])
    for flag, values in (("--control-image", args.control_image), ("--control-preprocessor", args.control_preprocessor)):
        if values and not n:
            raise UserError(f"{flag} needs a --controlnet.")
    if args.control_image and len(args.control_image) != n:
        raise UserError(f"give one --control-image per --controlnet ({n}), got {len(args.control_image)}.")
    if args.control_preprocessor and len(args.control_preprocessor) not in (1, n):
        raise UserError(f"give one --control-preprocessor, or one per --controlnet ({n}).")
    if n and not args.control_image and not args.control_preprocessor:
        raise UserError("--controlnet needs each frame's control map: give --control-image (a fixed map) or "
                        "--control-preprocessor canny (derived from each frame).")
    if len(args.controlnet_scale) not in (1, max(n, 1)):
        raise UserError(f"give one --controlnet-scale, or one per --controlnet ({n}).")
    if args.fuse_lora and not args.lora:
        raise UserError("--fuse-lora needs a --lora.")


def build_stream(args):
    """The prepared StreamPipeline that the flags describe."""
    from paradiff import runtime
    from paradiff.pipelines import torch_dtype
    from paradiff.stream import StreamPipeline
    from paradiff.stream import lora as lora_mod

    _check_control_flags(args)
    rt = runtime.init(args.device)
    dtype = torch_dtype(args.dtype, rt.device)
    pipe = _load(args, rt.device, dtype)
    if args.lora:
        with SaidWithFlag(f"LoRA {args.lora!r}", f"--lora {args.lora}"):
            lora_mod.load(pipe, args.lora, adapter="lora")
        if args.fuse_lora:
            pipe.fuse_lora(lora_scale=args.lora_scale)
    height, width = args.size if args.size else (None, None)
    nets = _controlnets(args, pipe, rt.device, dtype)
    n = len(nets)
    preprocessors = [None if p == "none" else p for p in (args.control_preprocessor or [None])]
    stream = StreamPipeline(
        pipe, args.t_index, guidance=args.guidance, delta=args.delta, frame_buffer_size=args.frame_buffer,
        similarity_filter=args.similarity_filter, max_skip_frames=args.max_skip_frames,
        tiny_vae=_tiny_vae(args.tiny_vae, rt.device, dtype, sdxl=hasattr(pipe, "text_encoder_2")),
        num_inference_steps=args.steps, height=height, width=width,
        cuda_graph=False if args.no_cuda_graph else None, compile=args.compile,
        # fused projections were measured faster on the GPU; the CLI owns its pipe, and an unfused LoRA needs them apart
        fuse_qkv=rt.device.type == "cuda" and not args.lora,
        controlnet=nets or None, control_preprocessor=(preprocessors * n if len(preprocessors) == 1 else preprocessors)
        if n else None, controlnet_scale=(args.controlnet_scale * n if len(args.controlnet_scale) == 1 else
                                          args.controlnet_scale) if n else 1.0,
    )
    if args.lora and not args.fuse_lora:
        stream.set_lora_scale(args.lora_scale)
    images = _control_images(args, (stream.height, stream.width))
    if images is not None:
        import numpy as np

        batch = [images[i] if args.frame_buffer == 1 else np.stack([images[i]] * args.frame_buffer) for i in range(n)]
        stream.set_control_image(batch[0] if n == 1 else batch)
    stream.prepare(args.prompt, negative_prompt=args.negative_prompt, guidance_scale=args.guidance_scale,
                   seed=args.seed)
    return stream


def run(args: argparse.Namespace) -> int:
    from paradiff.errors import UserError

    if args.web:
        if args.input or args.output:
            raise UserError("--web takes frames from the browser; leave out --input and -o.")
        if args.frame_buffer != 1:
            raise UserError("--web streams one frame at a time; leave --frame-buffer at 1.")
    else:
        if not args.input or not args.output:
            raise UserError("give --input (video, folder, webcam) and -o (video file or folder), or use --web.")
    if args.prompt is None or not args.prompt.strip():
        raise UserError("give a non-empty --prompt.")
    if args.web:
        from paradiff.stream.web import serve

        stream = build_stream(args)
        serve(stream, args.host, args.port)
        return 0
    from paradiff.stream import io

    as_input = SaidWithFlag(f"source {args.input!r}", f"--input {args.input}")
    as_output = SaidWithFlag(f"sink {args.output!r}", f"-o {args.output}")
    if not (args.input.startswith("webcam") or args.input == "screen"):
        with as_input:
            io.open_source(args.input, None).frames.close()  # a bad input fails before the model loads
    stream = build_stream(args)
    with as_input:
        source = io.open_source(args.input, (stream.height, stream.width))
    with as_output:
        sink = io.open_sink(args.output, source.fps)
    stats = io.run(stream, source, sink, queue_size=args.queue, drop=True if args.realtime else None,
                   max_frames=args.max_frames)
    print(f"wrote {args.output}: {stats.frames_out} frames at {stats.fps:.1f} frames/s "
          f"({stats.dropped} dropped, {stats.skipped} skipped by the similarity filter)")
    return 0
