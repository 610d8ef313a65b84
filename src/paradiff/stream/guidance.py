"""Guidance modes of a stream: none, full CFG, and the residual CFG (RCFG) of StreamDiffusion.

RCFG replaces the unconditional noise prediction by a *virtual residual noise* computed from a "negative" latent
image x_neg without running the UNet: eps_neg = (x_t - alpha_t * x_neg) / beta_t, scaled by `delta`.
- "self" (self-negative): x_neg is the input frame's own latent, so guidance pushes away from the input.
- "initialize" (onetime-negative): x_neg is the x0 predicted from the *negative prompt* at the first step only
  (one extra UNet row per new frame, not per step), then reused for the frame's later steps.
- "full": ordinary CFG, a second UNet row per row with the negative prompt (2x the UNet work).
All give eps = eps_neg + scale * (eps_cond - eps_neg).
"""

from __future__ import annotations

import torch

from paradiff.errors import UserError

GUIDANCE_MODES = ("none", "full", "self", "initialize")


def check_mode(mode: str) -> str:
    if mode not in GUIDANCE_MODES:
        raise UserError(f"guidance must be one of {', '.join(GUIDANCE_MODES)}, got {mode!r}.")
    return mode


def virtual_residual(x: torch.Tensor, x_neg: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The noise that takes the negative image x_neg to the current latent x at this step's noise level."""
    return (x - alpha * x_neg) / beta


def combine(eps_cond: torch.Tensor, eps_neg: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return eps_neg + scale * (eps_cond - eps_neg)
