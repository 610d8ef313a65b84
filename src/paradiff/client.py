"""A small client of `paradiff serve` (standard library only).

    from paradiff.client import Client
    client = Client("http://127.0.0.1:8000", api_key=None)        # or PARADIFF_API_KEY from the environment
    image = client.generate("a red circle on the left, blue background", seed=3)             # PIL image
    images = client.generate("a blue star", n=2, size="128x128", steps=20)                   # list of 2
    changed = client.generate("a red star", image=image, strength=0.6)                       # image-to-image
    filled = client.generate("a cat", image="photo.png", mask="mask.png")                    # inpainting models

Image inputs (`image`, `mask`, `control_image`) are PIL images, encoded image bytes, or file paths, sent as base64
PNG; they must be one of the server's sizes (the output size), since the server does not resize.

Errors are `ServerError` (a `paradiff.UserError`) with the HTTP status and the server's one-line reason; a 503
(queue full, warming up) is retried `retries` times after the server's Retry-After.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

from paradiff.errors import UserError


class ServerError(UserError):
    """The server refused or failed a request: `status` is the HTTP status, `retry_after` its hint (seconds)."""

    def __init__(self, message: str, status: int, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, *, timeout: float = 600.0,
                 retries: int = 0):
        self.url = url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("PARADIFF_API_KEY")
        self.timeout = timeout
        self.retries = retries
        self.last_headers: Any = {}
        """Response headers of the last successful request (X-Seed, X-Queue-Seconds, X-Generation-Seconds), with
        case-insensitive `get`."""

    def _request(self, method: str, path: str, body: dict | None = None) -> tuple[int, Any, bytes]:
        """(status, headers: a case-insensitive `email.message.Message`, body)."""
        headers = {"Accept": "*/*"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers, err.read()
        except urllib.error.URLError as err:
            raise ServerError(f"cannot reach the server at {self.url} ({err.reason}).", 0) from None

    def _raise(self, status: int, headers: Any, payload: bytes) -> None:
        try:
            detail = json.loads(payload).get("detail", "")
        except (ValueError, AttributeError):
            detail = payload[:200].decode(errors="replace")
        if isinstance(detail, list):  # FastAPI validation errors
            detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])[1:]))}: {d.get('msg')}" for d in detail)
        retry = headers.get("Retry-After") if headers is not None else None
        raise ServerError(f"the server answered {status}: {detail}", status, float(retry) if retry else None)

    def health(self) -> dict:
        """The server's /health JSON (status 'ready' when it takes requests)."""
        status, _, payload = self._request("GET", "/health")
        info = json.loads(payload)
        info["http_status"] = status
        return info

    def generate(self, prompt: str, *, negative_prompt: str | None = None, size: str | int | None = None,
                 steps: int | None = None, guidance: float | None = None, seed: int | None = None, n: int = 1,
                 output_format: str = "png", quality: int | None = None, image: Any = None, mask: Any = None,
                 strength: float | None = None, control_image: Any = None,
                 controlnet_conditioning_scale: float | None = None, decode: bool = True) -> Any:
        """One PIL image (n = 1) or a list of n; image i is the image for seed + i. `image` (+ `strength`):
        image-to-image, or with `mask` inpainting; `control_image`: ControlNet models. `decode=False`: the
        encoded bytes instead of PIL images (to save them as they are)."""
        from PIL import Image

        body: dict[str, Any] = {"prompt": prompt, "n": n, "output_format": output_format,
                                "response_format": "bytes" if n == 1 else "b64_json"}
        for name, value in (("negative_prompt", negative_prompt), ("size", size), ("steps", steps),
                            ("guidance", guidance), ("seed", seed), ("quality", quality), ("strength", strength),
                            ("controlnet_conditioning_scale", controlnet_conditioning_scale)):
            if value is not None:
                body[name] = f"{value}x{value}" if name == "size" and isinstance(value, int) else value
        for name, value in (("image", image), ("mask", mask), ("control_image", control_image)):
            if value is not None:
                body[name] = base64.b64encode(_image_bytes(name, value)).decode("ascii")
        for attempt in range(self.retries + 1):
            status, headers, payload = self._request("POST", "/v1/images", body)
            if status == 200:
                break
            retry = headers.get("Retry-After") if headers is not None else None
            if status == 503 and attempt < self.retries:
                time.sleep(min(float(retry or 1), 60.0))
                continue
            self._raise(status, headers, payload)
        self.last_headers = headers
        encoded = ([payload] if n == 1 else
                   [base64.b64decode(item["b64_json"]) for item in json.loads(payload)["images"]])
        if not decode:
            return encoded[0] if n == 1 else encoded
        images = []
        for data in encoded:
            image = Image.open(io.BytesIO(data))
            image.load()
            images.append(image)
        return images[0] if n == 1 else images


def _image_bytes(name: str, value: Any) -> bytes:
    """The bytes to send for an image argument: a PIL image as PNG (lossless), bytes as given, a path's file."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (str, os.PathLike)):
        try:
            with open(value, "rb") as f:
                return f.read()
        except OSError as err:
            raise UserError(f"{name}={str(value)!r}: cannot read it ({err.strerror}).") from None
    if hasattr(value, "save"):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    raise UserError(f"{name} must be a PIL image, image bytes or a file path, got {type(value).__name__}.")


__all__ = ["Client", "ServerError"]
