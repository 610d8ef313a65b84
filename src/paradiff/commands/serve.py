"""`paradiff serve`: a persistent HTTP image server; every rank loads, parallelizes and warms up the pipeline once."""

from __future__ import annotations

import argparse

from paradiff.commands.common import (add_model_args, add_parallel_args, check_before_launch, float_between,
                                      image_size, non_negative_int, positive_int)


def size_list(text: str) -> list[tuple[int, int]]:
    sizes = [image_size(part) for part in text.replace(" ", "").split(",") if part]
    if not sizes:
        raise argparse.ArgumentTypeError("give at least one size, e.g. 1024x1024,768x1344")
    return sizes


def port_number(text: str) -> int:
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, got {value}")
    return value


seconds = float_between(0, None, "a number of seconds", "e.g. 300")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="HTTP image server; compiled pipelines kept warm across requests",
        description="Serve image generation over HTTP (POST /v1/images, GET /health, GET /metrics, /docs). Every rank "
                    "loads and parallelizes the pipeline once and warms up each --sizes entry; rank 0 answers HTTP "
                    "and broadcasts each request to all ranks, one generation at a time. SIGTERM drains the queue "
                    "and exits 0; a rank that dies or hangs ends the server with a non-zero exit.")
    add_model_args(p)
    p.add_argument("--sizes", type=size_list, default=None,
                   help="sizes served, HxW comma-separated, e.g. 1024x1024,768x1344 (default: the model's); each is "
                        "warmed up at start, the first is the default")
    p.add_argument("--steps", type=positive_int, default=25, help="default denoising steps (and warm-up's; 25)")
    p.add_argument("--guidance", type=float, default=None,
                   help="default CFG scale (default: 3.0 for the embedded model, else the pipeline's)")
    p.add_argument("--warmup-img2img", action=argparse.BooleanOptionalAction, default=None,
                   help="also warm up an image-to-image generation per size (its VAE encoder path), on models "
                        "that have one (default: with --compile)")
    http = p.add_argument_group("http")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    http.add_argument("--port", type=port_number, default=8000, help="port (default 8000; 0: any free port)")
    http.add_argument("--api-key", default=None,
                      help="require this key (Authorization: Bearer KEY or X-API-Key); prefer the PARADIFF_API_KEY "
                           "environment variable, which the process list does not show")
    http.add_argument("--max-queue", type=positive_int, default=16,
                      help="requests that may wait for the ranks; more get 503 with Retry-After (default 16)")
    http.add_argument("--timeout", type=seconds, default=300.0,
                      help="per-request deadline in seconds, queue wait included (default 300); then 504")
    http.add_argument("--max-images", type=positive_int, default=4, help="images per request at most (default 4)")
    http.add_argument("--max-steps", type=positive_int, default=None,
                      help="steps per request at most (default: max(100, --steps))")
    http.add_argument("--max-prompt-chars", type=positive_int, default=2000, help="prompt length limit (2000)")
    http.add_argument("--max-body-bytes", type=positive_int, default=None,
                      help="request body limit in bytes; larger bodies get 413 (default: 64 KiB, plus room for each "
                           "image input the model takes as an uncompressed PNG of the largest size in base64: "
                           "about 4.3 MB more per RGB image at 1024x1024)")
    http.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                      help="uvicorn's log level; info and debug also log each request (default warning)")
    add_parallel_args(p)
    p.set_defaults(run=run, check_before_launch=check_serve_before_launch, forward_stop_signals=True)


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    if args.max_steps is None:
        args.max_steps = max(100, args.steps)
    return args


def check_serve_before_launch(args: argparse.Namespace) -> None:
    """In the launching process: the common checks, the limits, and that the port can be listened on."""
    from paradiff.serve.app import bind
    from paradiff.serve.server import api_key

    check_before_launch(args)
    _check_limits(_resolve(args))
    api_key(args)
    bind(args.host, args.port).close()


def _check_limits(args: argparse.Namespace) -> None:
    from paradiff.errors import UserError

    if args.steps > args.max_steps:
        raise UserError(f"--steps {args.steps} is more than --max-steps {args.max_steps}.")


def run(args: argparse.Namespace) -> int:
    from paradiff.serve.server import serve

    _check_limits(_resolve(args))
    return serve(args)
