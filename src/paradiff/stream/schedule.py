"""Per-step constants of a stream: the chosen timesteps and their coefficients, computed once on the device.

A stream runs a fixed, short list of timesteps (`t_index_list` picks them from the scheduler's own schedule for
`num_inference_steps`). Everything a step needs (alpha/beta of the VP noise schedule, the LCM boundary scalings
c_skip/c_out, the model's prediction type) is fixed for the life of the stream, so it is computed here once instead
of calling `scheduler.step` per frame. Working in the VP form `x_t = alpha_t * x0 + beta_t * eps` makes the same
code serve LCM, Euler (SD-Turbo), DDIM and DPM schedulers: they all share `alphas_cumprod` and only differ in how
they walk between steps, which the stream replaces by "predict x0, re-noise to the next chosen timestep".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from paradiff.errors import UserError

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class StepSchedule:
    """Per-step constants, one row per entry of `t_index_list` (shape (k,) tensors on the device)."""

    timesteps: torch.Tensor  # int64 training timesteps
    alpha: torch.Tensor  # sqrt(alphas_cumprod[t])
    beta: torch.Tensor  # sqrt(1 - alphas_cumprod[t])
    c_skip: torch.Tensor  # LCM boundary condition (0 for other schedulers)
    c_out: torch.Tensor  # LCM boundary condition (1 for other schedulers)
    prediction_type: str

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])


def build_schedule(
    scheduler: Any,
    t_index_list: Sequence[int],
    num_inference_steps: int,
    device: torch.device,
    dtype: torch.dtype,
) -> StepSchedule:
    """The stream's constants for `scheduler` (left unchanged: a copy is configured)."""
    if not isinstance(t_index_list, (list, tuple)) or not t_index_list:
        raise UserError("t_index_list must be a non-empty list of step indices, e.g. [32, 45].")
    if any(not isinstance(i, int) or isinstance(i, bool) for i in t_index_list):
        raise UserError(f"t_index_list must hold whole numbers, got {list(t_index_list)!r}.")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise UserError(f"num_inference_steps must be a whole number >= 1, got {num_inference_steps!r}.")
    if list(t_index_list) != sorted(set(t_index_list)):
        raise UserError(f"t_index_list must be strictly increasing (from noisy to clean), got {list(t_index_list)}.")
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(f"the scheduler predicts {prediction_type!r}; the stream supports {', '.join(PREDICTION_TYPES)}.")
    sched = type(scheduler).from_config(scheduler.config)
    try:
        sched.set_timesteps(num_inference_steps)
    except ValueError as err:
        raise UserError(f"num_inference_steps={num_inference_steps} does not suit {type(sched).__name__}: {err}") from None
    all_steps = [int(round(float(t))) for t in sched.timesteps]
    n = len(all_steps)
    bad = [i for i in t_index_list if not 0 <= i < n]
    if bad:
        raise UserError(
            f"t_index_list {list(t_index_list)} has {bad} outside the schedule: "
            f"{type(sched).__name__} with {num_inference_steps} steps has indices 0..{n - 1}."
        )
    ts = [all_steps[i] for i in t_index_list]
    alphas_cumprod = sched.alphas_cumprod.to(torch.float64)
    acp = alphas_cumprod[torch.tensor(ts)]
    if hasattr(sched, "get_scalings_for_boundary_condition_discrete"):
        scalings = [sched.get_scalings_for_boundary_condition_discrete(t) for t in ts]
        c_skip = [float(s[0]) for s in scalings]
        c_out = [float(s[1]) for s in scalings]
    else:
        c_skip, c_out = [0.0] * len(ts), [1.0] * len(ts)

    def put(values) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.float64).to(device=device, dtype=dtype)

    return StepSchedule(
        timesteps=torch.tensor(ts, dtype=torch.long, device=device),
        alpha=put(acp.sqrt()),
        beta=put((1 - acp).sqrt()),
        c_skip=put(c_skip),
        c_out=put(c_out),
        prediction_type=prediction_type,
    )


def to_epsilon(model_out: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, prediction_type: str):
    """The noise prediction, whatever the model predicts (v-prediction: eps = alpha * v + beta * x)."""
    if prediction_type == "v_prediction":
        return alpha * model_out + beta * x
    return model_out


def denoise(x: torch.Tensor, eps: torch.Tensor, alpha, beta, c_skip, c_out) -> torch.Tensor:
    """x0 estimate of one step: the LCM boundary-conditioned prediction (plain x0 prediction when c_skip=0, c_out=1)."""
    x0 = (x - beta * eps) / alpha
    return c_out * x0 + c_skip * x
