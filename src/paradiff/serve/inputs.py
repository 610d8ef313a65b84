"""Image inputs of `paradiff serve`: which ones the loaded pipeline takes, and base64 images decoded and checked.

A request's images are checked on rank 0 before they are queued (a bad one is a 422 and never reaches the ranks)
and travel to every rank as uint8 arrays inside the request's message, so every rank calls the pipeline with the
same pixels (the VAE encoder runs on every rank). An image must be exactly the output size: the server never
resizes, because a silent resize or crop changes the picture the user meant, and only the configured sizes are
warmed up.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import io
import re
from dataclasses import dataclass
from typing import Any

from paradiff.plans.common import INPAINT_PIPELINES, UPSCALE_PIPELINES

DECODABLE = ("PNG", "JPEG", "WEBP")  # what Pillow may open: no exotic decoders on untrusted bytes
_DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)
_SPACE = re.compile(r"\s+")
TEXT_BODY_BYTES = 64 * 1024  # a text-only request: prompts, numbers


class BadImage(ValueError):
    """An image field that cannot be used (HTTP 422); `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class PipelineInputs:
    """What the served pipeline takes besides a prompt; the request model and the runner both follow it.

    kind: "text-to-image", "inpainting", "controlnet" or "upscaler"; class_name: the pipeline class;
    img2img: `image` makes an image-to-image generation (through an Img2Img pipeline made with `from_pipe`);
    strength: the default strength of the call `image` makes (the pipeline's own), None when it has none.
    """

    kind: str
    class_name: str
    img2img: bool = False
    strength: float | None = None

    @property
    def inpaint(self) -> bool:
        return self.kind == "inpainting"

    @property
    def control(self) -> bool:
        return self.kind == "controlnet"

    @property
    def takes_image(self) -> bool:
        return self.inpaint or self.img2img

    def image_fields(self) -> tuple[str, ...]:
        """The image fields a request may carry (each one a base64 picture of the output size)."""
        return (("image",) if self.takes_image else ()) + (("mask",) if self.inpaint else ()) + \
            (("control_image",) if self.control else ())

    def describe(self) -> str:
        what = {"text-to-image": "text to image", "inpainting": "inpainting", "controlnet": "ControlNet",
                "upscaler": "the x4 upscaler"}[self.kind]
        return f"a {self.class_name} ({what})"


def _default_strength(pipe: Any) -> float | None:
    parameter = inspect.signature(type(pipe).__call__).parameters.get("strength")
    return None if parameter is None or parameter.default is inspect.Parameter.empty else float(parameter.default)


def image_to_image(pipe: Any) -> Any:
    """The Img2Img pipeline sharing `pipe`'s components (and so its parallel hooks), or None if diffusers has none."""
    from diffusers import AutoPipelineForImage2Image

    try:
        return AutoPipelineForImage2Image.from_pipe(pipe)
    except (ValueError, KeyError, TypeError, AttributeError):  # no Img2Img pipeline of this family
        return None


def pipeline_inputs(pipe: Any, img2img: Any = None) -> PipelineInputs:
    """The inputs `pipe` takes; `img2img` is `image_to_image(pipe)` (None: no image-to-image)."""
    names = {cls.__name__ for cls in type(pipe).__mro__}
    name = type(pipe).__name__
    if names & set(INPAINT_PIPELINES):
        return PipelineInputs("inpainting", name, strength=_default_strength(pipe))
    if names & set(UPSCALE_PIPELINES):
        return PipelineInputs("upscaler", name)
    kind = "controlnet" if getattr(pipe, "controlnet", None) is not None else "text-to-image"
    if img2img is None:
        return PipelineInputs(kind, name)
    return PipelineInputs(kind, name, img2img=True, strength=_default_strength(img2img))


def body_limit(sizes: list, inputs: PipelineInputs) -> int:
    """The default request body limit: a text request, plus each image field the model takes as an uncompressed
    PNG of the largest served size in base64 (PNG's worst case is a little above the raw pixels)."""
    pixels = max(h * w for h, w in sizes)
    channels = {"image": 3, "mask": 1, "control_image": 3}
    raw = sum(pixels * channels[name] * 1.01 + 4096 for name in inputs.image_fields())
    return TEXT_BODY_BYTES + int(raw * 4 / 3)


def decode(field: str, text: str, size: tuple[int, int] | None, mode: str, served: tuple = ()):
    """A base64 (or data URL) PNG/JPEG/WebP -> uint8 array (H, W, C) in `mode`. Its size must be `size` (H, W);
    with `size` None, one of `served` ((H, W) pairs). Raises `BadImage` with one sentence."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    text = _SPACE.sub("", _DATA_URL.sub("", text, count=1))
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadImage(field, "is not valid base64 (send the file's bytes base64-encoded, e.g. base64 -w0 FILE)")
    if not data:
        raise BadImage(field, "is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=DECODABLE)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise BadImage(field, "is not a PNG, JPEG or WebP image") from None
    shape = (image.height, image.width)
    if size is None and shape not in [tuple(s) for s in served]:
        names = ", ".join(f"{h}x{w}" for h, w in served)
        raise BadImage(field, f"is {shape[0]}x{shape[1]} (HxW), not a size this server serves ({names}); send it "
                              "at one of them (the server does not resize)")
    if size is not None and shape != tuple(size):
        raise BadImage(field, f"is {shape[0]}x{shape[1]} (HxW) but the output size is {size[0]}x{size[1]}; send "
                              "it at that size (the server does not resize)")
    try:
        image.load()
        array = np.asarray(image.convert(mode))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadImage(field, f"could not be decoded ({type(err).__name__}: truncated or corrupt?)") from None
    return array if array.ndim == 3 else array[:, :, None]


def decode_request(images: dict, size: tuple[int, int] | None, served: tuple) -> tuple[tuple[int, int], dict]:
    """(output size, {field: array}) of a request's base64 `images` ({field: text}); `size` None: the first
    image's size, which must be served. The mask is grayscale, the others RGB."""
    arrays = {}
    for field, text in images.items():
        arrays[field] = decode(field, text, size, "L" if field == "mask" else "RGB", served)
        size = arrays[field].shape[:2]
    return tuple(size), arrays


def picture(array: Any):
    """The PIL image of a decoded array (what the pipeline gets: RGB, or L for a mask)."""
    from PIL import Image

    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


__all__ = ["BadImage", "PipelineInputs", "body_limit", "decode", "decode_request", "image_to_image", "picture",
           "pipeline_inputs"]
