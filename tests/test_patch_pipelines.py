"""Patch and CFG parallelism through whole diffusers pipelines (SD, SDXL, img2img) on gloo ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from support.distributed import run_ranks
from support.models import tiny_sd3_transformer, tiny_sd_pipeline, tiny_sdxl_pipeline

PROMPT = "a red circle on the left"


def _build(kind):
    return tiny_sd_pipeline() if kind == "sd" else tiny_sdxl_pipeline()


def _run(pipe, steps=6, **kwargs):
    generator = torch.Generator("cpu").manual_seed(0)
    return pipe(PROMPT, num_inference_steps=steps, generator=generator, output_type="np", **kwargs).images


def _img2img(pipe):
    from diffusers import AutoPipelineForImage2Image

    return AutoPipelineForImage2Image.from_pipe(pipe)


def _check_pipelines(cases):
    """cases: (name, kind, method names + kwargs, img2img); returns max |parallel - serial| per case."""
    from paradiff import CFGParallel, PatchParallel, parallelize, runtime

    init = np.random.default_rng(0).random((1, 32, 32, 3)).astype(np.float32)
    out = {}
    for name, kind, methods, img2img in cases:
        extra = {"image": init, "strength": 0.7} if img2img else {}
        serial_pipe = _img2img(_build(kind)) if img2img else _build(kind)
        serial = _run(serial_pipe, **extra)
        pipe = _img2img(_build(kind)) if img2img else _build(kind)
        built = [CFGParallel() if m == "cfg" else PatchParallel(**kw) for m, kw in methods]
        parallelize(pipe, *built, main_rank_stages="all-ranks" not in name)
        images = _run(pipe, **extra)
        if runtime.get().rank == 0 or "all-ranks" in name:
            out[name] = float(np.abs(images - serial).max())
        else:  # only rank 0 decodes by default
            out[name + "-not-decoded"] = float(np.abs(images - 0.5).max())
        if name == "sd-patch4-exact":  # a latent height that cannot be split gives one clear error
            try:
                _run(pipe, steps=1, height=40, width=32)
                out["bad-size"] = "no error"
            except Exception as err:  # noqa: BLE001
                out["bad-size"] = f"{type(err).__name__}: {err}"
    return out


EXACT = {"warmup_steps": 100}


@pytest.mark.slow  # 2 ranks
def test_pipelines_two_ranks():
    cases = [
        ("sd-patch-exact", "sd", [("patch", EXACT)], False),
        ("sd-patch-exact-all-ranks", "sd", [("patch", EXACT)], False),
        ("sd-cfg", "sd", [("cfg", {})], False),
        ("sd-patch-default", "sd", [("patch", {})], False),
        ("sd-img2img-patch-exact", "sd", [("patch", EXACT)], True),
        ("sdxl-patch-exact", "sdxl", [("patch", EXACT)], False),
        ("sdxl-img2img-patch-exact", "sdxl", [("patch", EXACT)], True),
    ]
    for out in run_ranks(_check_pipelines, 2, cases):
        for name, err in out.items():
            if "not-decoded" in name:
                assert err == 0.0, f"{name}: a rank other than 0 decoded an image"
            elif "default" in name:
                assert 1e-6 < err < 0.2, f"{name}: stale steps should change the image a little, max diff {err}"
            else:
                assert err < 1e-4, f"{name}: max diff {err} vs serial"


@pytest.mark.slow  # 4 ranks
def test_cfg_times_patch_four_ranks():
    cases = [("sd-cfg-patch-exact", "sd", [("cfg", {}), ("patch", EXACT)], False),
             ("sdxl-cfg-patch-exact", "sdxl", [("cfg", {}), ("patch", EXACT)], False),
             ("sd-patch4-exact", "sd", [("patch", EXACT)], False)]
    for out in run_ranks(_check_pipelines, 4, cases):
        bad = out.pop("bad-size")
        assert bad.startswith("UserError") and "multiple of 8" in bad and "16 px" in bad, bad
        for name, err in out.items():
            assert err < 1e-4 or ("not-decoded" in name and err == 0.0), f"{name}: max diff {err} vs serial"


def test_bad_configuration_errors():
    from paradiff import PatchParallel, UserError, parallelize
    from paradiff.methods.patch import apply_to_unet

    with pytest.raises(UserError, match="gn_mode"):
        PatchParallel(gn_mode="fresh")
    from paradiff.commands.common import GN_MODES as CLI_GN_MODES
    from paradiff.plans.patch_layers import GN_MODES, auto_gn_mode

    assert CLI_GN_MODES == GN_MODES, "the CLI's --gn-mode choices (kept torch-free) must follow the plan's modes"
    assert PatchParallel().gn_mode == "auto"
    assert [auto_gn_mode(rows) for rows in (64, 16, 15, 8)] == ["corrected", "corrected", "stale", "stale"]
    with pytest.raises(UserError, match="mode must be"):
        PatchParallel(mode="overlap")
    with pytest.raises(UserError, match="warmup_steps"):
        PatchParallel(warmup_steps=-1)
    for bad in (-1, "16", float("nan")):
        with pytest.raises(UserError, match="bucket_mb"):
            PatchParallel(bucket_mb=bad)
    assert PatchParallel(bucket_mb=0).bucket_mb == 0 and PatchParallel().compile is False
    sd3 = tiny_sd3_transformer(layers=1, joint_dim=16)
    with pytest.raises(UserError, match="UNet2DConditionModel.*SD3Transformer2DModel"):
        apply_to_unet(sd3, None, PatchParallel())
    with pytest.raises(UserError, match="at least 2 ranks"):
        parallelize(tiny_sd_pipeline(), PatchParallel(), device="cpu")
