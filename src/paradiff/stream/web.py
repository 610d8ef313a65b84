"""Browser demo: a FastAPI app that streams webcam frames from a page through a StreamPipeline and back.

Protocol on /ws (one active client at a time: the stream's frame buffer holds one video's frames in flight):
- client -> server: binary messages are encoded images (JPEG/PNG/WebP, any size: centre-cropped and resized to the
  stream's size); text messages are JSON {"prompt"?: "...", "negative_prompt"?: "...", "guidance_scale"?: 1.2,
  "controlnet_scale"?: 0.8 (or one number per ControlNet)}, at least one of prompt and the scales.
- server -> client: binary messages are JPEG outputs; text messages are JSON {"type": "ready"|"prompt"|"scale"|
  "dropped"|"error", ...}. A bad message (too large, not an image, bad JSON, empty prompt, a ControlNet scale for a
  stream without one or of the wrong length) gets an "error" reply and the connection carries on.
GPU work runs in one worker thread, so frames and prompt changes are applied in order and the event loop stays
free; at most one frame waits (the newest: older ones are dropped and reported).
"""

# no `from __future__ import annotations`: FastAPI reads the endpoint annotations (WebSocket) at runtime

import asyncio
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np

from paradiff.errors import UserError
from paradiff.stream.io import _fit

MAX_MESSAGE_BYTES = 2 * 1024 * 1024
MAX_PROMPT_CHARS = 1000
NEEDS_SERVE = "the web demo needs FastAPI and uvicorn: pip install 'paradiff[serve]'."


def _decode(data: bytes, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.width * image.height > 4096 * 4096:
            raise ValueError("image larger than 4096x4096")
        return _fit(np.asarray(image.convert("RGB")), size)


def _encode(frame: np.ndarray, quality: int = 85) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def page_html() -> str:
    """The demo page (webcam capture, prompt box, output image), shipped with the package."""
    return resources.files("paradiff.stream").joinpath("page.html").read_text(encoding="utf-8")


def _current_prompt(stream: Any) -> str:
    return stream.prompt[0] if stream.prompt else ""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_control(text: str | None) -> dict:
    """The changes a JSON control message asks for (prompt, negative_prompt, guidance_scale, controlnet_scale);
    ValueError/KeyError/TypeError if bad."""
    request = json.loads(text or "")
    if not isinstance(request, dict):
        raise ValueError("a control message is a JSON object")
    unknown = set(request) - {"prompt", "negative_prompt", "guidance_scale", "controlnet_scale"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}")
    if "prompt" not in request and "controlnet_scale" not in request and "guidance_scale" not in request:
        raise KeyError("prompt")
    prompt = request.get("prompt")
    if prompt is not None or "prompt" in request:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt longer than {MAX_PROMPT_CHARS} characters")
    if request.get("negative_prompt") is not None and not isinstance(request["negative_prompt"], str):
        raise ValueError("negative_prompt must be a string")
    if request.get("guidance_scale") is not None and not _number(request["guidance_scale"]):
        raise ValueError("guidance_scale must be a number")
    cn = request.get("controlnet_scale")
    if cn is not None and not (_number(cn) or (isinstance(cn, list) and cn and all(_number(v) for v in cn))):
        raise ValueError("controlnet_scale must be a number or a list of numbers")
    return request


@dataclass
class _Demo:
    """What every session shares: the stream, the one GPU worker thread, the one-client lock and the counters."""

    stream: Any
    max_message_bytes: int
    stats: dict
    worker: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="paradiff-stream"))
    busy: asyncio.Lock = field(default_factory=asyncio.Lock)

    def process(self, data: bytes) -> bytes:
        """One encoded frame in, one JPEG out (runs on the worker thread)."""
        return _encode(self.stream(_decode(data, (self.stream.height, self.stream.width))))

    def change(self, request: dict) -> None:
        """Apply a control message (on the worker thread, so it lands between frames); a UserError if the stream
        cannot take it (checked first, so nothing is half applied)."""
        cn = request.get("controlnet_scale")
        if cn is not None and getattr(self.stream, "control", None) is None:
            raise UserError("this stream has no ControlNet, so no controlnet_scale.")
        if cn is not None:
            self.stream.set_controlnet_scale(cn)
        if request.get("prompt") is not None:
            self.stream.update_prompt(request["prompt"], request.get("negative_prompt"))
        if request.get("guidance_scale") is not None:
            self.stream.set_guidance_scale(request["guidance_scale"])

    def health(self) -> dict:
        return {"ok": True, "prompt": _current_prompt(self.stream), **self.stats}


async def _serve_client(demo: _Demo, ws: Any) -> None:
    """One websocket client: turned away while another streams (the frame buffer holds one video), else served."""
    await ws.accept()
    if demo.busy.locked():
        await ws.send_json({"type": "error", "message": "another client is streaming; try again later."})
        await ws.close(code=1013)
        return
    async with demo.busy:
        await _Session(demo, ws).run()


class _Session:
    """One client's stream: frames wait (the newest only) for the worker, control messages change the prompt."""

    def __init__(self, demo: _Demo, ws: Any):
        self.demo, self.ws = demo, ws
        self.loop = asyncio.get_running_loop()
        self.waiting: asyncio.Queue = asyncio.Queue(maxsize=1)

    async def run(self) -> None:
        """Reset the stream (a new video), say ready, then handle messages until the client leaves."""
        from fastapi import WebSocketDisconnect

        stream = self.demo.stream
        await self.loop.run_in_executor(self.demo.worker, stream.reset)
        await self.ws.send_json({"type": "ready", "prompt": _current_prompt(stream), "width": stream.width,
                                 "height": stream.height, "max_message_bytes": self.demo.max_message_bytes,
                                 "controlnet_scale": list(getattr(stream, "controlnet_scale", []))})
        task = asyncio.create_task(self.pump())
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                await self.handle(message)
        except WebSocketDisconnect:
            pass
        finally:
            task.cancel()

    async def reject(self, message: str, frame: bool = False) -> None:
        """An error reply; the session carries on."""
        self.demo.stats["rejected"] += 1
        await self.ws.send_json({"type": "error", "message": message, "frame": frame})

    async def pump(self) -> None:
        """Send each waiting frame through the worker and its output back, in order; a bad frame is rejected."""
        while True:
            data = await self.waiting.get()
            try:
                out = await self.loop.run_in_executor(self.demo.worker, self.demo.process, data)
            except Exception as err:  # noqa: BLE001 - a bad frame must not end the session
                await self.reject(f"could not process the frame: {type(err).__name__}: {err}", frame=True)
                continue
            self.demo.stats["frames"] += 1
            await self.ws.send_bytes(out)

    async def handle(self, message: dict) -> None:
        """A binary message is a frame, a text message a control message; either is rejected when over the limit."""
        data, text = message.get("bytes"), message.get("text")
        length = len(data) if data is not None else len((text or "").encode())
        limit = self.demo.max_message_bytes
        if length > limit:
            await self.reject(f"message of {length} bytes is over the {limit}-byte limit.", data is not None)
        elif data is not None:
            await self.queue_frame(data)
        else:
            await self.control(text)

    async def queue_frame(self, data: bytes) -> None:
        """Keep only the newest waiting frame, so the output stays close to real time; say when one is dropped."""
        if self.waiting.full():
            self.waiting.get_nowait()
            self.demo.stats["dropped"] += 1
            await self.ws.send_json({"type": "dropped"})
        self.waiting.put_nowait(data)

    async def control(self, text: str | None) -> None:
        """Change the prompt (and the guidance / ControlNet scales) between frames, and confirm it."""
        try:
            request = _parse_control(text)
        except (ValueError, KeyError, TypeError) as err:
            await self.reject(f"bad control message ({err}); send JSON like {{\"prompt\": \"...\"}}.")
            return
        try:
            await self.loop.run_in_executor(self.demo.worker, self.demo.change, request)
        except UserError as err:
            await self.reject(str(err))
            return
        if request.get("prompt") is not None:
            await self.ws.send_json({"type": "prompt", "prompt": request["prompt"]})
        if request.get("controlnet_scale") is not None:
            await self.ws.send_json({"type": "scale", "controlnet_scale": self.demo.stream.controlnet_scale})


def create_app(stream: Any, *, max_message_bytes: int = MAX_MESSAGE_BYTES):
    """The FastAPI app around a prepared `stream` (img2img, frame_buffer_size 1)."""
    try:
        from fastapi import FastAPI, WebSocket
        from fastapi.responses import HTMLResponse
    except ImportError:
        raise UserError(NEEDS_SERVE) from None
    if stream.frame_buffer_size != 1:
        raise UserError("the web demo streams one frame at a time; prepare the stream with frame_buffer_size=1.")
    app = FastAPI(title="paradiff stream")
    app.state.stats = {"frames": 0, "dropped": 0, "rejected": 0}
    demo = _Demo(stream, max_message_bytes, app.state.stats)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page_html()

    @app.get("/health")
    def health() -> dict:
        return demo.health()

    @app.websocket("/ws")
    async def ws_endpoint(ws: WebSocket) -> None:
        await _serve_client(demo, ws)

    return app


def serve(stream: Any, host: str = "127.0.0.1", port: int = 7860, log_level: str = "warning") -> None:
    """Run the demo until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise UserError(NEEDS_SERVE) from None
    app = create_app(stream)
    print(f"paradiff stream: open http://{host}:{port}/ (Ctrl+C to stop)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, ws_max_size=64 * 1024 * 1024)
