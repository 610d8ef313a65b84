"""ControlNet inside the stream step: control maps that travel with their frames, and GPU preprocessors.

Each frame in the stream batch is at its own step, so each needs its *own* control map at every step: the map is
made once, when the frame enters (from a given control image, or derived from the frame by a preprocessor on the
device), and then moves through a buffer beside the frame's latent, exactly as the latent does. The ControlNet runs
on the same rows as the UNet in the same batched call, so the step stays one CUDA graph. Conditioning scales are
device tensors (diffusers' ControlNet multiplies its residuals by whatever it is given), so `set_controlnet_scale`
writes into them in place and needs no re-capture.

Preprocessors use kornia (a maintained library) and contain no host syncs: kornia's Canny hysteresis loops until
nothing changes (a host sync every round), so "canny" here keeps strong edges and the weak edges next to one (one
fixed round of hysteresis, a kornia dilation).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch

from paradiff.errors import UserError

PREPROCESSORS = ("canny", "sobel")
NEEDS_KORNIA = "the control preprocessors need kornia: pip install 'paradiff[stream]' (or pip install kornia)."


def _kornia():
    try:
        import kornia
    except ImportError:
        raise UserError(NEEDS_KORNIA) from None
    return kornia


@functools.lru_cache(maxsize=None)  # one function per setting: streams share its compiled code
def canny(low_threshold: float = 0.4, high_threshold: float = 0.8) -> Callable[[torch.Tensor], torch.Tensor]:
    """Canny edges (white on black, 3 channels) of (B, 3, H, W) images in [0, 1]. The thresholds are in kornia's
    unnormalised-Sobel units, where OpenCV's usual 100/200 on 0..255 images is about 0.4/0.8."""
    kornia = _kornia()
    if not 0 < low_threshold <= high_threshold:
        raise UserError(f"canny thresholds must satisfy 0 < low <= high, got {low_threshold}, {high_threshold}.")

    def edges(images: torch.Tensor) -> torch.Tensor:
        _, graded = kornia.filters.canny(images.float(), low_threshold, high_threshold, hysteresis=False)
        strong = (graded == 1).to(graded.dtype)
        near_strong = kornia.morphology.dilation(strong, torch.ones(3, 3, device=images.device, dtype=graded.dtype))
        kept = torch.where(graded > 0, torch.maximum(strong, near_strong), torch.zeros_like(graded))
        return kept.expand(-1, 3, -1, -1).to(images.dtype)

    return edges


@functools.lru_cache(maxsize=None)
def sobel() -> Callable[[torch.Tensor], torch.Tensor]:
    """Soft edges: kornia's normalised Sobel magnitude of the grey image, scaled to [0, 1] per image."""
    kornia = _kornia()

    def edges(images: torch.Tensor) -> torch.Tensor:
        grey = kornia.color.rgb_to_grayscale(images.float())
        mag = kornia.filters.sobel(grey)
        peak = mag.amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
        return (mag / peak).expand(-1, 3, -1, -1).to(images.dtype)

    return edges


def make_preprocessor(spec: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """None, a name ("canny", "sobel"), or a callable (B, 3, H, W) [0, 1] -> (B, 3, H, W) [0, 1] run in the step."""
    if spec is None or callable(spec):
        return spec
    if spec == "canny":
        return canny()
    if spec == "sobel":
        return sobel()
    raise UserError(f"control_preprocessor must be one of {', '.join(PREPROCESSORS)}, a callable or None, got {spec!r}.")


class Control:
    """The ControlNet(s) of a stream: the nets, their preprocessors and their live conditioning scales."""

    def __init__(self, controlnet: Any, preprocessor: Any, scale: Any, unet: Any, device: Any, dtype: Any):
        from diffusers import MultiControlNetModel

        nets = list(controlnet.nets) if isinstance(controlnet, MultiControlNetModel) else \
            list(controlnet) if isinstance(controlnet, (list, tuple)) else [controlnet]
        if not nets:
            raise UserError("controlnet is an empty list; give a ControlNetModel or a list of them.")
        for i, net in enumerate(nets):
            if not hasattr(net, "controlnet_cond_embedding"):
                raise UserError(f"controlnet[{i}] is a {type(net).__name__}, not a diffusers ControlNetModel.")
            for key in ("cross_attention_dim", "addition_embed_type"):
                mine, theirs = net.config.get(key), unet.config.get(key)
                if mine != theirs:
                    raise UserError(f"controlnet[{i}] has {key}={mine} but the UNet has {theirs}: it was trained for "
                                    "another model family.")
            param = next(net.parameters())
            if param.device != torch.device(device) or param.dtype != dtype:
                net.to(device=device, dtype=dtype)
        self.nets = nets
        self.model = nets[0] if len(nets) == 1 else MultiControlNetModel(nets)
        specs = list(preprocessor) if isinstance(preprocessor, (list, tuple)) else [preprocessor] * len(nets)
        if len(specs) != len(nets):
            raise UserError(f"give one control_preprocessor per ControlNet ({len(nets)}), got {len(specs)}.")
        self.preprocessors = [make_preprocessor(s) for s in specs]
        self.scale = torch.ones(len(nets), device=device, dtype=dtype)
        self.set_scale(scale)

    def compile_preprocessors(self, compiled: Callable[[Callable], Callable]) -> None:
        """Run the preprocessors compiled (`compiled(fn)`): eager, Canny is a few dozen full-resolution float32
        kernels inside the step's CUDA graph; compiled, its pointwise work fuses."""
        self.preprocessors = [compiled(p) if p is not None else None for p in self.preprocessors]

    def __len__(self) -> int:
        return len(self.nets)

    def set_scale(self, scale: float | Sequence[float]) -> None:
        values = list(scale) if isinstance(scale, (list, tuple)) else [scale] * len(self.nets)
        if len(values) != len(self.nets) or not all(isinstance(v, (int, float)) for v in values):
            raise UserError(f"controlnet scale must be a number, or a list of one number per ControlNet "
                            f"({len(self.nets)}), got {scale!r}.")
        self.values = [float(v) for v in values]  # what was asked, without reading the device back
        self.scale.copy_(torch.tensor(self.values, dtype=self.scale.dtype))
