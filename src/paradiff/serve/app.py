"""The HTTP side of `paradiff serve` (rank 0 only): FastAPI app, request validation, metrics, and uvicorn in a thread.

Endpoints: `POST /v1/images`, `GET /health` (200 only when ready), `GET /metrics` (Prometheus text), FastAPI's
`/docs` and `/openapi.json`. The app never runs a generation itself: it validates a request, puts it on the
dispatcher's bounded queue and waits (polling for a client that went away and for the request's deadline), so a
slow or vanished client never holds the ranks.
"""

# no `from __future__ import annotations`: FastAPI and pydantic read the annotations at runtime

import asyncio
import base64
import hmac
import io
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from paradiff.errors import UserError
from paradiff.serve.dispatch import Dispatcher, NotAccepting, Phase, QueueFull, ServerStopping
from paradiff.serve.inputs import BadImage, PipelineInputs, decode_request
from paradiff.serve.metrics import Metrics

MAX_SEED = 2**53 - 1  # exact in every JSON client (JavaScript numbers)
FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}
RENAMED_INPUTS = {"init_image": "image", "mask_image": "mask"}  # diffusers' names of this API's fields
UNSUPPORTED_INPUTS = ("ip_adapter_image", "image_embeds", "latents", "prompt_embeds")
POLL_S = 0.2  # how often a waiting request checks for a client that disconnected


def _missing(extra: str) -> UserError:
    return UserError(f"paradiff serve needs {extra}: pip install 'paradiff[serve]'.")


@dataclass
class ServeOptions:
    """What the app accepts; the limits keep one request from holding the ranks for long or using much memory."""

    sizes: list  # [(height, width), ...]; the first is the default
    steps: int = 25
    guidance: Optional[float] = None  # None: the pipeline's own default (the embedded model's for it)
    timeout_s: float = 300.0  # per-request deadline: queue wait + generation
    api_key: Optional[str] = None
    max_body_bytes: int = 64 * 1024
    max_prompt_chars: int = 2000
    max_images: int = 4
    max_steps: int = 100
    inputs: Optional[PipelineInputs] = None  # the image inputs the model takes (None: text to image only)
    info: dict = field(default_factory=dict)  # shown by /health: model, method, ranks, device

    def __post_init__(self):
        if not self.sizes:
            raise UserError("give at least one image size to serve (--sizes).")
        if self.steps > self.max_steps:
            raise UserError(f"--steps {self.steps} is more than --max-steps {self.max_steps}.")
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("the API key is empty; give a non-empty --api-key (or PARADIFF_API_KEY), or none.")

    @property
    def size_names(self) -> tuple:
        return tuple(f"{h}x{w}" for h, w in self.sizes)


def request_model(options: ServeOptions):
    """The pydantic model of a request body for these options (sizes, limits and defaults are the server's)."""
    from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

    sizes = options.size_names
    inputs = options.inputs or PipelineInputs("text-to-image", "pipeline")
    model = f"this server's model is {inputs.describe()}"
    size_type = Literal[sizes]  # noqa: F821 - a Literal of the configured sizes: shown as an enum in the docs
    output_formats = tuple(name for name in FORMATS if _can_encode(name))
    format_type = Literal[output_formats]

    class ImageRequest(BaseModel):
        """One request: a prompt, and the image inputs the served model takes. Unknown fields are refused (422)."""

        model_config = ConfigDict(extra="forbid", strict=True)

        prompt: str = Field(min_length=1, max_length=options.max_prompt_chars)
        negative_prompt: Optional[str] = Field(None, max_length=options.max_prompt_chars)
        size: size_type = Field(sizes[0], description="HxW, one of the sizes the server was started with "
                                                      "(default: the input image's size, else the first)")
        steps: int = Field(options.steps, ge=1, le=options.max_steps, description="denoising steps")
        guidance: Optional[float] = Field(None, ge=0, le=100, allow_inf_nan=False,
                                          description="classifier-free guidance scale (default: the server's)")
        seed: Optional[int] = Field(None, ge=0, le=MAX_SEED,
                                    description="image i uses seed + i; default: random (returned)")
        n: int = Field(1, ge=1, le=options.max_images, description="number of images")
        output_format: format_type = "png"
        response_format: Literal["bytes", "b64_json"] = Field(
            "bytes", description="bytes: the encoded image as the body (n = 1); b64_json: JSON with base64 images")
        quality: int = Field(90, ge=1, le=100, description="JPEG/WebP quality")
        image: Optional[str] = Field(
            None, description="base64 PNG/JPEG/WebP (or a data URL) of exactly the output size: the picture to "
                              "change (image-to-image on a text-to-image model) or to inpaint (with mask)")
        mask: Optional[str] = Field(None, description="inpainting models: base64 mask of the image's size, white "
                                                      "repainted, black kept")
        strength: Optional[float] = Field(
            None, gt=0, le=1, allow_inf_nan=False,
            description="with image: how much of it is repainted; steps x strength denoising steps run "
                        f"(default: the pipeline's, {inputs.strength})")
        control_image: Optional[str] = Field(None, description="ControlNet models: base64 conditioning image of "
                                                               "the output size")
        controlnet_conditioning_scale: Optional[float] = Field(None, ge=0, le=10, allow_inf_nan=False,
                                                               description="ControlNet models (default 1.0)")

        @model_validator(mode="before")
        @classmethod
        def _known_inputs(cls, data: Any) -> Any:
            if isinstance(data, dict):
                for key, name in RENAMED_INPUTS.items():
                    if key in data:
                        raise ValueError(f"{key}: this API calls it {name!r}")
                given = [key for key in UNSUPPORTED_INPUTS if key in data]
                if given:
                    raise ValueError(f"{', '.join(given)}: not supported by this server")
            return data

        @model_validator(mode="after")
        def _inputs_the_model_takes(self):
            if self.mask is not None and self.image is None:
                raise ValueError("mask needs image: the picture whose masked part is repainted")
            if self.mask is not None and not inputs.inpaint:
                raise ValueError(f"mask is for inpainting models; {model}")
            if inputs.inpaint and (self.image is None or self.mask is None):
                raise ValueError(f"{model}: give image and mask")
            if self.image is not None and not inputs.takes_image:
                raise ValueError(f"image: {model}, which takes no input image")
            if self.control_image is not None and not inputs.control:
                raise ValueError(f"control_image needs a ControlNet model; {model}")
            if inputs.control and self.control_image is None:
                raise ValueError(f"{model}: give control_image")
            if self.controlnet_conditioning_scale is not None and self.control_image is None:
                raise ValueError("controlnet_conditioning_scale needs control_image")
            if self.strength is not None and self.image is None:
                raise ValueError("strength applies to an input image: give image")
            strength = self.strength if self.strength is not None else inputs.strength
            if self.image is not None and strength is not None and int(self.steps * strength) < 1:
                raise ValueError(f"steps x strength ({self.steps} x {strength:g}) is less than one denoising step; "
                                 "raise steps or strength")
            return self

        @field_validator("size", mode="before")
        @classmethod
        def _size_name(cls, value: Any) -> Any:
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if isinstance(value, str):
                text = value.strip().lower().replace("*", "x")
                value = f"{text}x{text}" if text.isdigit() else text
                if value not in sizes:
                    raise ValueError(f"size {value!r} is not served here; this server serves {', '.join(sizes)}")
            return value

        @field_validator("prompt")
        @classmethod
        def _not_blank(cls, value: str) -> str:
            if not value.strip():
                raise ValueError("prompt is blank")
            return value

        @model_validator(mode="after")
        def _one_image_as_bytes(self):
            if self.response_format == "bytes" and self.n > 1:
                raise ValueError("response_format 'bytes' carries one image; use 'b64_json' for n > 1")
            return self

    return ImageRequest


def _short(value: Any) -> bool:
    return not isinstance(value, (dict, list, bytes)) and len(str(value)) <= 200


def _can_encode(name: str) -> bool:
    if name != "webp":
        return True
    from PIL import features

    return bool(features.check("webp"))


def encode(images: list, output_format: str, quality: int) -> list:
    """Encoded bytes of each image (a uint8 array (H, W[, C]) or a PIL image): PNG lossless, deflated on several
    cores; JPEG/WebP at `quality`."""
    import numpy as np
    from PIL import Image

    from paradiff.serve.png import encode_png

    pil_format, _ = FORMATS[output_format]
    out = []
    for image in images:
        if isinstance(image, Image.Image):
            pixels = np.asarray(image) if image.mode in ("RGB", "RGBA", "L") else None
        else:
            pixels = np.asarray(image, dtype=np.uint8)
            image = Image.fromarray(pixels[:, :, 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels)
        if pil_format == "PNG" and pixels is not None:
            out.append(encode_png(pixels))
            continue
        buf = io.BytesIO()
        kwargs = {} if pil_format == "PNG" else {"quality": quality}
        image.save(buf, format=pil_format, **kwargs)
        out.append(buf.getvalue())
    return out


class _Guard:
    """Pure ASGI middleware: refuse request bodies over the limit before reading them (413; 411 without a length),
    and count the responses of POST /v1/images by status."""

    def __init__(self, app, *, max_body_bytes: int, metrics: Metrics):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        counted = scope["path"] == "/v1/images"

        async def counting_send(message):
            if counted and message["type"] == "http.response.start":
                self.metrics.requests.labels(str(message["status"])).inc()
            await send(message)

        if scope["method"] in ("POST", "PUT", "PATCH"):
            headers = dict(scope.get("headers") or [])
            length = headers.get(b"content-length")
            problem = None
            if length is None:
                if headers.get(b"transfer-encoding"):
                    problem = (411, "send the body with a Content-Length header (chunked bodies are not accepted).")
            elif not length.isdigit() or int(length) > self.max_body_bytes:
                problem = (413, f"the request body is over the {self.max_body_bytes}-byte limit.")
            if problem is not None:
                self.metrics.fail("too_large")
                from starlette.responses import JSONResponse

                response = JSONResponse({"detail": problem[1]}, status_code=problem[0],
                                        headers={"Connection": "close"})
                return await response(scope, receive, counting_send)
        return await self.app(scope, receive, counting_send)


def create_app(options: ServeOptions, dispatcher: Dispatcher, metrics: Metrics):
    """The FastAPI app over a rank-0 `dispatcher` (its queue) for the given options."""
    try:
        from fastapi import Depends, FastAPI, HTTPException, Request
        from fastapi.exception_handlers import request_validation_exception_handler
        from fastapi.encoders import jsonable_encoder
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse, Response
        from starlette.concurrency import run_in_threadpool
    except ImportError:
        raise _missing("FastAPI and uvicorn") from None

    ImageRequest = request_model(options)
    app = FastAPI(title="paradiff serve", version=_version(),
                  description="Image generation on a persistent group of ranks (`paradiff serve`): text to image, and "
                              "the image inputs the model takes (image-to-image, inpainting, ControlNet). One "
                              "generation runs at a time on all ranks; requests wait in a bounded queue.")
    app.state.options, app.state.dispatcher, app.state.metrics = options, dispatcher, metrics
    key = options.api_key.encode() if options.api_key else None

    def require_key(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if given is None or not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), key):
            metrics.fail("unauthorized")
            raise HTTPException(401, "a valid API key is required (Authorization: Bearer KEY, or X-API-Key).",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        if request.url.path != "/v1/images":
            return await request_validation_exception_handler(request, err)
        metrics.fail("invalid")
        # FastAPI echoes each error's input: the whole body for a model-level error, megabytes with an image
        errors = [{k: v for k, v in e.items() if k != "input" or _short(v)} for e in err.errors()]
        return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)

    def refuse(status: int, detail: str, reason: str, retry_after: Optional[int] = None):
        metrics.fail(reason)
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    @app.post("/v1/images", dependencies=[Depends(require_key)],
              responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}},
                               "description": "the image (response_format bytes) or JSON with base64 images"},
                         401: {"description": "missing or wrong API key"},
                         413: {"description": "request body over the limit"},
                         422: {"description": "invalid request (fields, sizes, limits, unsupported inputs)"},
                         503: {"description": "queue full, warming up or shutting down; see Retry-After"},
                         504: {"description": "the request's deadline passed"}})
    async def images(body: ImageRequest, request: Request):
        """Generate `n` images for a prompt. The response body is the image (`response_format` bytes, n = 1) or
        JSON `{"images": [{"b64_json", "seed"}], ...}`; headers X-Seed, X-Queue-Seconds, X-Generation-Seconds."""
        start = time.monotonic()
        height, width = (int(v) for v in body.size.split("x"))
        images = {name: getattr(body, name) for name in ("image", "mask", "control_image")
                  if getattr(body, name) is not None}
        arrays = {}
        if images:
            given = (height, width) if "size" in body.model_fields_set else None
            try:
                (height, width), arrays = await run_in_threadpool(decode_request, images, given, options.sizes)
            except BadImage as err:
                metrics.fail("invalid")
                return JSONResponse({"detail": [{"type": "value_error", "loc": ["body", err.field],
                                                 "msg": f"{err.field} {err}"}]}, status_code=422)
        size = f"{height}x{width}"
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        params = {"prompt": body.prompt, "negative_prompt": body.negative_prompt, "height": height, "width": width,
                  "steps": body.steps, "guidance": body.guidance if body.guidance is not None else options.guidance,
                  "seed": seed, "n": body.n, "strength": body.strength,
                  "controlnet_conditioning_scale": body.controlnet_conditioning_scale, **arrays}
        try:
            job = dispatcher.submit(params)
        except NotAccepting as err:
            return refuse(503, str(err), "overloaded" if isinstance(err, QueueFull) else "not_ready",
                          err.retry_after)
        waiting = asyncio.wrap_future(job.future)
        deadline = start + options.timeout_s
        while not waiting.done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                queued = dispatcher.discard(job)
                where = "in the queue" if queued else "while generating (the result is discarded)"
                return refuse(504, f"the request's deadline of {options.timeout_s:g} s passed {where}.", "timeout")
            await asyncio.wait({waiting}, timeout=min(POLL_S, remaining))
            if not waiting.done() and await request.is_disconnected():
                dispatcher.discard(job)  # not started: it never runs; started: the result is dropped
                metrics.fail("disconnected")
                return Response(status_code=499)
        try:
            result = waiting.result()
        except ServerStopping as err:
            return refuse(503, str(err), "error", dispatcher.retry_after())
        except Exception as err:  # noqa: BLE001 - the same failure on every rank: this request only
            return refuse(500, f"the generation failed: {type(err).__name__}: {err}", "error")
        encoding = time.perf_counter()
        payloads = await run_in_threadpool(encode, list(result)[: body.n], body.output_format, body.quality)
        encode_s = time.perf_counter() - encoding
        headers = {"X-Seed": str(seed), "X-Queue-Seconds": f"{job.queue_s or 0.0:.4f}",
                   "X-Generation-Seconds": f"{job.generation_s or 0.0:.4f}", "X-Encode-Seconds": f"{encode_s:.4f}"}
        metrics.queue_wait_seconds.labels(size).observe(job.queue_s or 0.0)
        metrics.generation_seconds.labels(size).observe(job.generation_s or 0.0)
        metrics.images.labels(size).inc(len(payloads))
        metrics.request_seconds.labels(size).observe(time.monotonic() - start)
        if body.response_format == "bytes":
            return Response(payloads[0], media_type=FORMATS[body.output_format][1], headers=headers)
        return JSONResponse({
            "created": int(time.time()), "size": size, "steps": body.steps, "seed": seed,
            "output_format": body.output_format,
            "images": [{"b64_json": base64.b64encode(p).decode("ascii"), "seed": seed + i}
                       for i, p in enumerate(payloads)],
            "queue_seconds": round(job.queue_s or 0.0, 4), "generation_seconds": round(job.generation_s or 0.0, 4),
        }, headers=headers)

    @app.get("/health")
    def health():
        """200 when the server takes requests; 503 while loading, warming up, draining, or after a rank failed."""
        phase = dispatcher.phase
        content = {"status": phase.value, "queue": dispatcher.depth(), "max_queue": dispatcher.max_queue,
                   "busy": dispatcher.busy, "sizes": list(options.size_names), "steps": options.steps,
                   **options.info}
        if dispatcher.failure:
            content["failure"] = dispatcher.failure
        headers = None if phase is Phase.READY else {"Retry-After": str(dispatcher.retry_after())}
        return JSONResponse(content, status_code=200 if phase is Phase.READY else 503, headers=headers)

    @app.get("/metrics", dependencies=[Depends(require_key)])
    def prometheus():
        """Prometheus text format."""
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    app.add_middleware(_Guard, max_body_bytes=options.max_body_bytes, metrics=metrics)
    return app


def _version() -> str:
    from paradiff import __version__

    return __version__


class LateApp:
    """The ASGI app uvicorn runs: 503 for everything until `app` is set (the model loads while /health answers)."""

    def __init__(self):
        self.app = None

    async def __call__(self, scope, receive, send):
        if self.app is not None:
            return await self.app(scope, receive, send)
        if scope["type"] == "lifespan":
            return
        if scope["type"] != "http":
            return
        from starlette.responses import JSONResponse

        response = JSONResponse({"status": Phase.LOADING.value, "detail": "the server is loading the model."},
                                status_code=503, headers={"Retry-After": "10"})
        await response(scope, receive, send)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port), or one clear line saying why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise UserError(f"--host {host}: cannot resolve it ({err.strerror}).") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); choose another --port or --host.") from None
    sock.set_inheritable(True)
    return sock


class HttpServer:
    """uvicorn in a daemon thread on an already-bound socket; `stop` lets responses in flight finish."""

    def __init__(self, app: Any, sock: socket.socket, *, log_level: str = "warning", limit_concurrency: int = 256):
        try:
            import uvicorn
        except ImportError:
            raise _missing("FastAPI and uvicorn") from None
        self.sock = sock
        config = uvicorn.Config(app, log_level=log_level, access_log=log_level in ("info", "debug", "trace"),
                                lifespan="off", limit_concurrency=limit_concurrency, timeout_keep_alive=5,
                                server_header=False, timeout_graceful_shutdown=10)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="paradiff-http", daemon=True)
        self.error: Optional[BaseException] = None

    @property
    def address(self) -> tuple:
        return self.sock.getsockname()[:2]

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as err:  # noqa: BLE001 - SystemExit from uvicorn included: reported by `problem`
            self.error = err

    def start(self, timeout: float = 30.0) -> None:
        self.thread.start()
        end = time.monotonic() + timeout
        while not self.server.started and self.thread.is_alive() and time.monotonic() < end:
            time.sleep(0.02)
        problem = self.problem()
        if problem is not None or not self.server.started:
            raise UserError(f"the HTTP server did not start ({problem or 'timed out'}).")

    def problem(self) -> Optional[str]:
        """Why the HTTP server no longer serves, or None while it does."""
        if self.thread.is_alive() or not self.thread.ident:
            return None
        if self.error is not None and not (isinstance(self.error, SystemExit) and not self.error.code):
            return f"the HTTP server stopped: {type(self.error).__name__}: {self.error}"
        return "the HTTP server stopped"

    def stop(self, timeout: float = 15.0) -> None:
        if not self.thread.ident:
            return
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(2.0)


def url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


__all__ = ["HttpServer", "LateApp", "ServeOptions", "bind", "create_app", "encode", "request_model", "url"]
