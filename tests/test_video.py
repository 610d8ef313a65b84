"""The video families and SD3 through their own diffusers pipelines: Stable Video Diffusion
(UNetSpatioTemporalConditionModel: frames folded into the batch, image conditioning, a guidance ramp over frames,
`added_time_ids`), AnimateDiff (UNetMotionModel: motion modules inside the blocks, prompt embeddings repeated per
frame) and StableDiffusion3Pipeline, under PatchParallel, CFGParallel and AsyncDenoise on 2 gloo ranks (exact modes
against serial; SD3 refuses patch parallelism in one line); the patch plan of the temporal layers; the real configs
on the meta device; `paradiff generate` writing videos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from support.distributed import run_ranks

STEPS = 3
FRAMES = 2
PROMPT = "a red circle moving right"
ATOL = 1e-4  # of the output's scale (its std, at least 1), as in test_families
METHODS = {"svd": ("patch", "cfg", "async"), "animatediff": ("patch", "cfg", "async"), "sd3": ("cfg", "async")}


def _build(family: str):
    from support import models

    pipe = {"svd": models.tiny_svd_pipeline, "animatediff": models.tiny_animatediff_pipeline,
            "sd3": models.tiny_sd3_pipeline}[family]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image():
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8))


def _call(pipe, family: str, output_type: str = "latent", **kwargs):
    common = dict(num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(0), height=32, width=32,
                  output_type=output_type)
    if family == "svd":  # the guidance ramps from 1 (first frame) to 3 (last) over the frames
        out = pipe(_image(), num_frames=FRAMES, decode_chunk_size=FRAMES, max_guidance_scale=3.0, **common,
                   **kwargs).frames
    elif family == "animatediff":
        out = pipe(PROMPT, num_frames=FRAMES, **common, **kwargs).frames
    else:
        out = pipe(PROMPT, **common, **kwargs).images
    return out.detach().float().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)


def _method(name: str, exact: bool = True):
    import paradiff

    warmup = STEPS if exact else 1
    return {"patch": lambda: paradiff.PatchParallel(warmup_steps=warmup), "cfg": paradiff.CFGParallel,
            "async": lambda: paradiff.AsyncDenoise(warmup_steps=warmup)}[name]()


def _play(cases: list) -> dict:
    """On every rank: for each (family, methods, exact), the serial and the parallel result (latents; and the
    decoded frames for the exact modes, which only rank 0 decodes)."""
    import paradiff

    out = {}
    for family, methods, exact in cases:
        serial = _call(_build(family), family)
        pipe = paradiff.parallelize(_build(family), *(_method(name, exact) for name in methods.split("+")))
        pipe.set_progress_bar_config(disable=True)
        result = {"latent": _call(pipe, family), "serial": serial}
        if exact:
            result["np"] = _call(pipe, family, "np")
            result["np_serial"] = _call(_build(family), family, "np")
        out[(family, methods, exact)] = result
    return out


def _diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float("inf") if a.shape != b.shape else float(np.abs(a - b).max())


def _tolerance(want) -> float:
    return ATOL * max(1.0, float(np.asarray(want, np.float64).std()))


EXACT_CASES = [(family, method, True) for family, methods in METHODS.items() for method in methods]
STALE_CASES = [(family, method, False) for family in ("svd", "animatediff") for method in ("patch", "async")] + [
    ("sd3", "async", False)]


def _check_exact(ranks: list, cases: list) -> list[str]:
    bad = []
    for case in cases:
        family, method, _ = case
        main, other = ranks[0][case], ranks[1][case]
        for key, want in (("latent", main["serial"]), ("np", main["np_serial"])):
            diff = _diff(main[key], want)
            print(f"{family}/{method} {key}: max |parallel - serial| = {diff:.3g}")
            if not diff <= _tolerance(want):
                bad.append(f"{family}/{method} {key}: max |parallel - serial| = {diff:.3g}")
        if _diff(other["latent"], main["serial"]) > _tolerance(main["serial"]):
            bad.append(f"{family}/{method}: rank 1's latents differ from serial")
        if float(np.abs(other["np"] - 0.5).max()) != 0.0:
            bad.append(f"{family}/{method}: rank 1 decoded frames (only rank 0 decodes)")
    return bad


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_video_and_sd3_pipelines_under_every_method_two_ranks():
    """Exact modes equal serial on rank 0 (latents within 1e-4 of their scale, decoded frames too; blank on rank 1,
    which does not decode); the stale modes (warm-up 1) run and differ from serial."""
    ranks = run_ranks(_play, 2, EXACT_CASES + STALE_CASES, timeout=360)
    bad = _check_exact(ranks, EXACT_CASES)
    for case in STALE_CASES:
        result = ranks[0][case]
        diff = _diff(result["latent"], result["serial"])
        if not (np.isfinite(result["latent"]).all() and diff > _tolerance(result["serial"])):
            bad.append(f"{case[0]}/{case[1]} stale: max diff {diff:.3g} (should differ from serial, finitely)")
    assert not bad, "; ".join(bad)
