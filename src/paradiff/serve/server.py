"""`paradiff serve` on one rank: load and parallelize once, warm up each size, then serve until stopped.

Every rank runs `serve(args)`. Rank 0 binds the port first (a port in use fails in one line before anything loads),
runs uvicorn in a thread (503 on every path until the model is loaded, /health 503 until warm-up ends), and its
main thread feeds the ranks from the queue (`serve.dispatch`). Signals: SIGTERM or SIGINT on rank 0 drains (new
requests get 503, the accepted ones finish, every rank stops, exit 0); the other ranks ignore them while serving
and stop when rank 0 says so. Before serving starts there is nothing to drain: a signal stops the rank at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from paradiff.errors import UserError


class _StopBeforeServing(Exception):
    """SIGTERM/SIGINT while loading or warming up: nothing was accepted yet, so the rank just stops."""


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def api_key(args: argparse.Namespace) -> str | None:
    key = args.api_key if args.api_key is not None else os.environ.get("PARADIFF_API_KEY")
    if key is not None and not key.strip():
        raise UserError("the API key is empty (--api-key or PARADIFF_API_KEY); give a non-empty key or none.")
    return key


def default_size(pipe) -> tuple[int, int]:
    """The size the pipeline makes when not told (what `generate` without --size makes)."""
    scale = getattr(pipe, "vae_scale_factor", 8)
    sample = getattr(pipe, "default_sample_size", None)
    if sample is None:
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        sample = getattr(getattr(denoiser, "config", None), "sample_size", None)
    if isinstance(sample, (tuple, list)):
        return int(sample[0]) * scale, int(sample[1]) * scale
    if not isinstance(sample, int):
        raise UserError("cannot tell this pipeline's default image size; give --sizes HxW.")
    return sample * scale, sample * scale


def serving_pipelines(pipe):
    """(the inputs `pipe` takes, its Img2Img pipeline or None): image-to-image for the models that have one."""
    from paradiff.serve.inputs import image_to_image, pipeline_inputs

    inputs = pipeline_inputs(pipe)
    img2img = image_to_image(pipe) if inputs.kind in ("text-to-image", "controlnet") else None
    if img2img is not None:
        inputs = pipeline_inputs(pipe, img2img)
        if hasattr(img2img, "set_progress_bar_config"):
            img2img.set_progress_bar_config(disable=True)
    return inputs, img2img


def to_pixels(images) -> list:
    """(H, W, C) uint8 arrays from a pipeline's `output_type="pt"` images ((B, C, H, W) in [0, 1], on its device).
    The same arithmetic as diffusers' PIL output (x 255, round half to even, in float32), done where the images are:
    on a GPU that saves the CPU's float pass over every pixel, and copies a quarter of the bytes. Made contiguous
    there too: the encoder reads rows of interleaved channels, and a channel-planar array costs it a transposing
    copy on the CPU."""
    import torch

    if not isinstance(images, torch.Tensor):
        return list(images)
    pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return list(pixels.cpu().numpy())


def make_runner(pipe, embedded_model: bool, img2img=None, pixels: bool = True):
    """One request's pipeline call on this rank, built the way `paradiff generate` builds its call. A request with
    an image and no mask on a model that is not an inpainting one runs `img2img` (its output is the image's size).
    `pixels`: return uint8 arrays made on the pipeline's device (`to_pixels`), else PIL images as a user's call
    does."""
    from paradiff.commands.generate import generators, pipeline_kwargs
    from paradiff.serve.inputs import picture

    def run(params: dict) -> list:
        n = params["n"]
        kwargs = pipeline_kwargs(steps=params["steps"], size=(params["height"], params["width"]),
                                 guidance=params["guidance"], negative_prompt=params["negative_prompt"],
                                 embedded_model=embedded_model)
        if n > 1:
            kwargs["num_images_per_prompt"] = n
        call = pipe
        image, mask, control = (params.get(name) for name in ("image", "mask", "control_image"))
        if image is not None:
            if mask is None:
                call = img2img
                del kwargs["height"], kwargs["width"]
            else:
                kwargs["mask_image"] = picture(mask)
            kwargs["image"] = picture(image)
        if control is not None:  # a ControlNet text-to-image pipeline calls its conditioning `image`
            kwargs["control_image" if "image" in kwargs else "image"] = picture(control)
        for name in ("strength", "controlnet_conditioning_scale"):
            if params.get(name) is not None:
                kwargs[name] = params[name]
        if pixels:
            kwargs["output_type"] = "pt"
        images = call(params["prompt"], generator=generators(params["seed"], n), **kwargs).images
        return to_pixels(images) if pixels else images

    return run


def warmup_requests(sizes, steps: int, guidance: float | None, inputs=None, img2img: bool = False) -> list[dict]:
    """One generation per size with the inputs the model needs (a gray picture, a centred square mask, a gray
    control image), and with `img2img` an image-to-image one per size too (its VAE encoder path)."""
    import numpy as np

    jobs = []
    for h, w in sizes:
        base = {"prompt": "warm-up", "negative_prompt": None, "height": h, "width": w, "steps": steps,
                "guidance": guidance, "seed": 0, "n": 1}
        gray = np.full((h, w, 3), 128, np.uint8)
        needs = {}
        if inputs is not None and inputs.inpaint:
            mask = np.zeros((h, w, 1), np.uint8)
            mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
            needs.update(image=gray, mask=mask)
        if inputs is not None and inputs.control:
            needs["control_image"] = gray
        jobs.append({**base, **needs})
        if img2img and inputs is not None and inputs.img2img:
            jobs.append({**base, **needs, "image": gray})
    return jobs


def _stop_unless_rank0_drains(dispatcher, rank: int, name: str) -> None:
    """A rank other than 0 got SIGTERM/SIGINT while serving. If rank 0 got it too (the launcher, torchrun and
    systemd signal every rank), rank 0's next message says it is draining, and this rank waits for its stop.
    Otherwise the signal was for this rank alone (e.g. the launcher stopping the survivors of a failed rank): it
    exits once it is idle and no draining message came within a grace period."""
    import threading

    if getattr(dispatcher, "_stop_watch", None) is not None:
        return
    grace = 2 * dispatcher.tick_s + 3.0
    asked = time.monotonic()

    def watch() -> None:
        while not dispatcher.draining_seen:
            idle = time.monotonic() - max(asked, dispatcher.idle_since)
            if not dispatcher.busy and idle > grace:
                _log(f"paradiff serve: rank {rank}: {name} and rank 0 is not stopping the server; exiting")
                os._exit(128 + signal.Signals[name].value)
            time.sleep(0.2)

    dispatcher._stop_watch = threading.Thread(target=watch, name="paradiff-stop-watch", daemon=True)
    dispatcher._stop_watch.start()


def serve(args: argparse.Namespace) -> int:
    from paradiff import runtime
    from paradiff.commands.generate import prepare_pipeline
    from paradiff.serve.app import HttpServer, LateApp, ServeOptions, bind, create_app, url
    from paradiff.serve.dispatch import Dispatcher, Phase, RankFailure
    from paradiff.serve.inputs import body_limit
    from paradiff.serve.metrics import Metrics

    key = api_key(args)
    rt = runtime.init(args.device)
    dispatcher = Dispatcher(None, max_queue=args.max_queue, rank=rt.rank, world_size=rt.world_size,
                            device=rt.device, log=_log)
    http = None
    serving = False

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        if not serving:
            raise _StopBeforeServing(name)
        if rt.is_main:
            dispatcher.request_stop()
        elif not dispatcher.draining_seen:
            _stop_unless_rank0_drains(dispatcher, rt.rank, name)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if rt.is_main:
            late = LateApp()
            http = HttpServer(late, bind(args.host, args.port), log_level=args.log_level,
                              limit_concurrency=max(64, 4 * args.max_queue + 16))
            http.start()
            _, port = http.address
            address = url(args.host, port)
            _log(f"paradiff serve: listening on {address} (loading; /health answers 503 until warm-up ends)")
            if args.host not in ("127.0.0.1", "localhost", "::1") and key is None:
                _log(f"paradiff serve: warning: listening on {args.host} without an API key: anyone who can reach "
                     "this port can run generations (set PARADIFF_API_KEY)")
        start = time.perf_counter()
        rt, pipe = prepare_pipeline(args)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)  # a bar per request on a server's log is noise
        sizes = list(dict.fromkeys(args.sizes or [default_size(pipe)]))
        inputs, img2img = serving_pipelines(pipe)
        dispatcher.runner = make_runner(pipe, embedded_model=args.model is None, img2img=img2img)
        warm_img2img = args.warmup_img2img if args.warmup_img2img is not None else bool(args.compile)
        if rt.is_main:
            options = ServeOptions(
                sizes=sizes, steps=args.steps, guidance=args.guidance, timeout_s=args.timeout, api_key=key,
                max_body_bytes=args.max_body_bytes or body_limit(sizes, inputs),
                max_prompt_chars=args.max_prompt_chars, max_images=args.max_images, max_steps=args.max_steps,
                inputs=inputs,
                info={"model": args.model or "embedded reference model", "method": args.method,
                      "ranks": rt.world_size, "device": rt.device.type, "pipeline": inputs.class_name,
                      "image_inputs": list(inputs.image_fields())})
            metrics = Metrics(queue_depth=dispatcher.depth, busy=lambda: float(dispatcher.busy),
                              ready=lambda: float(dispatcher.phase is Phase.READY))
            dispatcher.watch = http.problem
            late.app = create_app(options, dispatcher, metrics)
            _log(f"paradiff serve: loaded in {time.perf_counter() - start:.1f} s on {rt.world_size} rank(s) "
                 f"({rt.device.type}); warming up {', '.join(f'{h}x{w}' for h, w in sizes)}")
        jobs = warmup_requests(sizes, args.steps, args.guidance, inputs, img2img=warm_img2img)
        seconds = dispatcher.warm_up(jobs)
        serving = True
        if rt.is_main:
            timings = ", ".join(f"{j['height']}x{j['width']}{' img2img' if 'image' in j and 'mask' not in j else ''}"
                                f" {s:.1f} s" for j, s in zip(jobs, seconds))
            _log(f"paradiff serve: ready on {address} (warm-up: {timings}; method {args.method}, "
                 f"{rt.world_size} rank(s), queue {args.max_queue})")
        dispatcher.run()
    except RankFailure as err:
        _log(f"paradiff serve: rank {rt.rank}: stopping: {err}. Exiting with an error so that a supervisor "
             f"restarts the server (collective timeout {runtime.timeout_seconds():.0f} s, PARADIFF_TIMEOUT).")
        return 1
    except _StopBeforeServing as err:
        _log(f"paradiff serve: rank {rt.rank}: {err} before serving started; stopped")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if http is not None:
            http.stop(timeout=1.0 if dispatcher.phase is Phase.FAILED else 15.0)
    if rt.is_main:
        _log("paradiff serve: stopped cleanly")
    return 0
