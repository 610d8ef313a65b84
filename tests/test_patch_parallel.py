"""Patch parallelism on gloo ranks: synchronous steps equal serial, stale steps stay close, naive patches are worse.

A short denoising-like loop (x <- x - 0.2 * unet(x, t), t decreasing) on tiny random UNets, so stale activations
come from a real previous step.
"""

from __future__ import annotations

import copy

import pytest
import torch

from paradiff.plans.patch_layers import auto_gn_mode
from support.distributed import run_ranks
from support.models import tiny_unet, unet_inputs

pytestmark = pytest.mark.slow
STEPS = 5


def _loop(unet, kwargs, hook=None, steps: int = STEPS) -> torch.Tensor:
    if hook is not None:
        hook.reset()
    x = kwargs["sample"].clone()
    with torch.no_grad():
        for i in range(steps):
            step = {**kwargs, "sample": x, "timestep": torch.tensor(900.0 - 150 * i)}
            x = x - 0.2 * unet(**step).sample
    return x


def _patched(base, group, **config):
    from paradiff.methods.patch import PatchParallel, apply_to_unet

    unet = copy.deepcopy(base)
    return unet, apply_to_unet(unet, group, PatchParallel(**config))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _check_modes(kinds, size, gn_modes):
    """Per UNet kind: relative error vs serial of exact, stale (each GN mode) and naive runs."""
    from paradiff import runtime

    group = runtime.mesh({"patch": runtime.get().world_size}).get_group("patch")
    result = {}
    for kind in kinds:
        base = tiny_unet(kind)
        kwargs = unet_inputs(kind, size=size)
        serial = _loop(base, kwargs)
        errs = {}
        unet, hook = _patched(base, group, warmup_steps=STEPS)
        errs["exact"] = (_loop(unet, kwargs, hook) - serial).abs().max().item()
        errs["exact-again"] = (_loop(unet, kwargs, hook) - serial).abs().max().item()  # step count resets per run
        errs["counts"] = hook.counts
        for gn in gn_modes:
            unet, hook = _patched(base, group, warmup_steps=1, gn_mode=gn)
            errs[gn] = _rel(_loop(unet, kwargs, hook), serial)
        unet, hook = _patched(base, group, warmup_steps=1)  # gn_mode "auto"
        errs["auto"] = _rel(_loop(unet, kwargs, hook), serial)
        errs["auto_resolved"] = (hook.gn_mode, sorted({norm.mode for norm in hook.norms}))
        unet, hook = _patched(base, group, mode="naive")
        errs["naive"] = _rel(_loop(unet, kwargs, hook), serial)
        result[kind] = errs
    return result


@pytest.mark.parametrize("world", [2, 4])
def test_patch_exact_and_stale(world):
    size = 16 if world == 2 else 32  # each of 4 patches must survive the sdxl-shaped UNet's 2 downsamplings
    gn_modes = ("corrected", "sync", "stale", "separate") if world == 2 else ("corrected", "stale")
    for rank_result in run_ranks(_check_modes, world, ("sd", "sdxl"), size, gn_modes):
        for kind, errs in rank_result.items():
            assert errs["counts"]["conv"] > 0 and errs["counts"]["attention"] > 0 and errs["counts"]["groupnorm"] > 0
            assert errs["exact"] < 1e-4, f"{kind}: synchronous patch parallel differs from serial ({errs['exact']})"
            assert errs["exact-again"] < 1e-4, f"{kind}: second run not exact ({errs['exact-again']})"
            for gn in gn_modes:
                assert 1e-6 < errs[gn] < 0.2, f"{kind}/{gn}: stale relative error {errs[gn]}"
                assert errs[gn] < errs["naive"], f"{kind}/{gn}: stale ({errs[gn]}) not better than naive ({errs['naive']})"
            resolved = auto_gn_mode(size // world)
            assert errs["auto_resolved"] == (resolved, [resolved]), errs["auto_resolved"]
            assert errs["auto"] == errs[resolved], "auto must be exactly the mode it resolves to"
            if world == 2:
                assert errs["sync"] <= errs["separate"], f"{kind}: exact GroupNorm should beat per-patch statistics: {errs}"
