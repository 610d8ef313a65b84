"""Browser demo: a FastAPI app that streams webcam frames from a page through a StreamPipeline and back.

Protocol on /ws (one active client at a time: the stream's frame buffer holds one video's frames in flight):
- client -> server: binary messages are encoded images (JPEG/PNG/WebP, any size: centre-cropped and resized to the
  stream's size); text messages are JSON {"prompt": "...", "negative_prompt"?: "...", "guidance_scale"?: 1.2}.
- server -> client: binary messages are JPEG outputs; text messages are JSON {"type": "ready"|"prompt"|"dropped"|
  "error", ...}. A bad message (too large, not an image, bad JSON, empty prompt) gets an "error" reply and the
  connection carries on.
GPU work runs in one worker thread, so frames and prompt changes are applied in order and the event loop stays
free; at most one frame waits (the newest: older ones are dropped and reported).
"""

# no `from __future__ import annotations`: FastAPI reads the endpoint annotations (WebSocket) at runtime

import asyncio
import io
import json
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

import numpy as np

from paradiff.errors import UserError
from paradiff.stream.io import _fit

MAX_MESSAGE_BYTES = 2 * 1024 * 1024
MAX_PROMPT_CHARS = 1000


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
    return resources.files("paradiff.stream").joinpath("page.html").read_text(encoding="utf-8")


def create_app(stream: Any, *, max_message_bytes: int = MAX_MESSAGE_BYTES):
    """The FastAPI app around a prepared `stream` (img2img, frame_buffer_size 1)."""
    try:
        from fastapi import FastAPI, WebSocket, WebSocketDisconnect
        from fastapi.responses import HTMLResponse
    except ImportError:
        raise UserError("the web demo needs FastAPI and uvicorn: pip install 'paradiff[serve]'.") from None
    if stream.frame_buffer_size != 1:
        raise UserError("the web demo streams one frame at a time; use frame_buffer_size=1 (--frame-buffer 1).")

    app = FastAPI(title="paradiff stream")
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="paradiff-stream")
    busy = asyncio.Lock()
    size = (stream.height, stream.width)
    app.state.stats = {"frames": 0, "dropped": 0, "rejected": 0}

    def process(data: bytes) -> bytes:
        frame = _decode(data, size)
        return _encode(stream(frame))

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page_html()

    @app.get("/health")
    def health() -> dict:
        return {"ok": True, "prompt": stream.prompt[0] if stream.prompt else "", **app.state.stats}

    @app.websocket("/ws")
    async def ws_endpoint(ws: WebSocket) -> None:
        await ws.accept()
        if busy.locked():
            await ws.send_json({"type": "error", "message": "another client is streaming; try again later."})
            await ws.close(code=1013)
            return
        async with busy:
            loop = asyncio.get_running_loop()
            waiting: asyncio.Queue = asyncio.Queue(maxsize=1)

            async def reject(message: str, frame: bool = False) -> None:
                app.state.stats["rejected"] += 1
                await ws.send_json({"type": "error", "message": message, "frame": frame})

            async def pump() -> None:
                while True:
                    data = await waiting.get()
                    try:
                        out = await loop.run_in_executor(worker, process, data)
                    except Exception as err:  # noqa: BLE001 - a bad frame must not end the session
                        await reject(f"could not process the frame: {type(err).__name__}: {err}", frame=True)
                        continue
                    app.state.stats["frames"] += 1
                    await ws.send_bytes(out)

            await loop.run_in_executor(worker, stream.reset)
            await ws.send_json({"type": "ready", "prompt": stream.prompt[0] if stream.prompt else "",
                                "width": stream.width, "height": stream.height,
                                "max_message_bytes": max_message_bytes})
            task = asyncio.create_task(pump())
            try:
                while True:
                    message = await ws.receive()
                    if message["type"] == "websocket.disconnect":
                        break
                    data, text = message.get("bytes"), message.get("text")
                    length = len(data) if data is not None else len((text or "").encode())
                    if length > max_message_bytes:
                        await reject(f"message of {length} bytes is over the {max_message_bytes}-byte limit.", data is not None)
                        continue
                    if data is not None:
                        if waiting.full():
                            waiting.get_nowait()  # keep only the newest frame
                            app.state.stats["dropped"] += 1
                            await ws.send_json({"type": "dropped"})
                        waiting.put_nowait(data)
                        continue
                    try:
                        request = json.loads(text or "")
                        prompt = request["prompt"]
                        negative = request.get("negative_prompt")
                        scale = request.get("guidance_scale")
                        if not isinstance(prompt, str) or not prompt.strip():
                            raise ValueError("prompt must be a non-empty string")
                        if len(prompt) > MAX_PROMPT_CHARS:
                            raise ValueError(f"prompt longer than {MAX_PROMPT_CHARS} characters")
                        if negative is not None and not isinstance(negative, str):
                            raise ValueError("negative_prompt must be a string")
                        if scale is not None and not isinstance(scale, (int, float)):
                            raise ValueError("guidance_scale must be a number")
                    except (ValueError, KeyError, TypeError) as err:
                        await reject(f"bad control message ({err}); send JSON like {{\"prompt\": \"...\"}}.")
                        continue

                    def change(prompt=prompt, negative=negative, scale=scale):
                        stream.update_prompt(prompt, negative)
                        if scale is not None:
                            stream.set_guidance_scale(scale)

                    await loop.run_in_executor(worker, change)
                    await ws.send_json({"type": "prompt", "prompt": prompt})
            except WebSocketDisconnect:
                pass
            finally:
                task.cancel()

    return app


def serve(stream: Any, host: str = "127.0.0.1", port: int = 7860, log_level: str = "warning") -> None:
    """Run the demo until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise UserError("the web demo needs FastAPI and uvicorn: pip install 'paradiff[serve]'.") from None
    app = create_app(stream)
    print(f"paradiff stream: open http://{host}:{port}/ (Ctrl+C to stop)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, ws_max_size=64 * 1024 * 1024)
