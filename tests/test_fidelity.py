"""Fidelity thresholds of the approximate modes on the trained reference model (2 gloo ranks, 25 steps).

Measured on 16 prompts (benchmarks/results/patch-fidelity-cpu.md, async-fidelity-cpu.md): patch default 41.0 dB,
naive patch 18.1 dB, AsyncDenoise N=2 stride 1 40.5 dB. The thresholds leave a margin, so a regression fails.
"""

import pytest

from distributed import run_ranks

PROMPTS = 3


def _reference_pipe():
    from diffusers import StableDiffusionPipeline

    from paradiff.reference import DEFAULT_MODEL

    pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _scores(method):
    from paradiff import evaluate

    res = evaluate.evaluate(_reference_pipe(), [method], num_prompts=PROMPTS, steps=25)
    return {"vs_serial": res["vs_serial"], "serial": res["serial"]["adherence"],
            "method": res["method"]["adherence"]}


def _patch_modes():
    from paradiff.methods.patch import PatchParallel

    return {"exact": _scores(PatchParallel(warmup_steps=25)), "default": _scores(PatchParallel()),
            "naive": _scores(PatchParallel(mode="naive"))}


def _async_modes():
    from paradiff.methods.asyncdenoise import AsyncDenoise

    return {"exact": _scores(AsyncDenoise(warmup_steps=25)), "default": _scores(AsyncDenoise())}


@pytest.mark.slow
def test_patch_parallel_fidelity_on_the_reference_model():
    out = run_ranks(_patch_modes, 2, timeout=600)[0]
    assert out["exact"]["vs_serial"]["psnr_min"] > 45  # all steps synchronous: equal up to float reassociation
    assert out["exact"]["method"] == out["exact"]["serial"]
    default, naive = out["default"]["vs_serial"], out["naive"]["vs_serial"]
    assert default["psnr_mean"] > 33, default
    assert default["psnr_mean"] > naive["psnr_mean"] + 10, (default, naive)
    assert naive["psnr_mean"] < 25  # the seam is visible: the baseline really is worse


@pytest.mark.slow
def test_async_denoise_fidelity_on_the_reference_model():
    out = run_ranks(_async_modes, 2, timeout=600)[0]
    assert out["exact"]["vs_serial"]["psnr_min"] > 45
    assert out["exact"]["method"] == out["exact"]["serial"]
    assert out["default"]["vs_serial"]["psnr_mean"] > 33, out["default"]
