"""Frames in and out of a stream: uint8 HxWx3 images (PIL, numpy or torch) <-> a uint8 NHWC batch on the device.

Frames stay uint8 until they are on the device (4x less to copy than float), and the float conversion happens in
the stream step itself. Mistakes (float arrays, grey or RGBA arrays, a size the stream was not prepared for) are
reported in one sentence that says what would work.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from paradiff.errors import UserError


def _one(frame: Any) -> torch.Tensor:
    """One frame as a uint8 (H, W, 3) tensor (CPU or device, as given)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(frame, Image.Image):
        return torch.from_numpy(np.asarray(frame.convert("RGB")).copy())
    if isinstance(frame, np.ndarray):
        frame = np.ascontiguousarray(frame)
        frame = torch.from_numpy(frame if frame.flags.writeable else frame.copy())
    if not isinstance(frame, torch.Tensor):
        raise UserError(f"a frame must be a PIL image, a numpy array or a torch tensor, got {type(frame).__name__}.")
    return frame


def _check(t: torch.Tensor, height: int, width: int, what: str = "frame") -> None:
    if t.dtype != torch.uint8:
        raise UserError(f"{what}s must be uint8 (0..255) HxWx3 images, got dtype {str(t.dtype).replace('torch.', '')}.")
    if t.dim() != 4 or t.shape[-1] != 3:
        shape = "x".join(str(s) for s in t.shape[1:]) if t.dim() == 4 else "x".join(str(s) for s in t.shape)
        raise UserError(f"{what}s must be HxWx3 RGB images, got shape {shape}.")
    if tuple(t.shape[1:3]) != (height, width):
        h, w = t.shape[1:3]
        raise UserError(
            f"{what} is {h}x{w} (HxW) but the stream is set up for {height}x{width}; resize the {what}s or build "
            f"the stream with height={h}, width={w} (multiples of 8)."
        )


def to_batch(frames: Any, count: int, height: int, width: int, what: str = "frame") -> tuple[torch.Tensor, str, bool]:
    """`count` frames as a uint8 (count, H, W, 3) tensor, plus the input kind ('pil'|'numpy'|'torch') and whether
    the input was a single unbatched frame (so the output can be given back the same way)."""
    kind = "pil" if type(frames).__module__.startswith("PIL") else "numpy" if isinstance(frames, np.ndarray) else "torch"
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise UserError(f"got an empty list of {what}s; give {count} {what}(s).")
        first = frames[0]
        kind = "pil" if type(first).__module__.startswith("PIL") else "numpy" if isinstance(first, np.ndarray) else "torch"
        parts = [_one(f) for f in frames]
        for p in parts:
            if p.dim() != 3:
                raise UserError(f"each {what} in a list must be HxWx3, got shape {'x'.join(map(str, p.shape))}.")
        batch, single = torch.stack(parts), False
    else:
        t = _one(frames)
        single = t.dim() == 3
        batch = t.unsqueeze(0) if single else t
    _check(batch, height, width, what)
    if batch.shape[0] != count:
        raise UserError(
            f"got {batch.shape[0]} {what}(s) but the stream takes {count} per call (frame_buffer_size={count})."
        )
    return batch, kind, single and count == 1


def from_batch(batch: torch.Tensor, kind: str, single: bool) -> Any:
    """Give a uint8 (N, H, W, 3) device batch back in the caller's input kind.

    torch stays on the device and is the stream's static output buffer (overwritten by the next call: clone it to
    keep it); numpy and PIL outputs are copies."""
    if kind == "torch":
        return batch[0] if single else batch
    arrays = batch.cpu().numpy()
    if batch.device.type == "cpu":
        arrays = arrays.copy()
    if kind == "numpy":
        return arrays[0] if single else arrays
    from PIL import Image

    images = [Image.fromarray(a) for a in arrays]
    return images[0] if single else images
