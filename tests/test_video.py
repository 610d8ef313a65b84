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
            "async": lambda: paradiff.AsyncDenoise(warmup_steps=warmup),
            # DistriFusion's corrected GroupNorm: last step's whole-video statistics (frames x rows) + this band's change
            "patch-corrected": lambda: paradiff.PatchParallel(warmup_steps=warmup, gn_mode="corrected")}[name]()


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
        if family == "svd":  # rank 0 encodes the image, the others take its embedding
            result["image_encoder_params"] = sum(p.numel() for p in pipe.image_encoder.parameters())
        if exact:
            result["np"] = _call(pipe, family, "np")
            result["np_serial"] = _call(_build(family), family, "np")
        out[(family, methods, exact)] = result
    return out


def _extras() -> dict:
    """On every rank: SD3 under PatchParallel (one UserError line); a bare SVD UNet under CFGParallel whose two
    batch rows have different `added_time_ids` (fps 6 and 20) and image embeddings: each rank's half must get its
    own row's (a wrong split would give rank 1 the uncond row's ids, or both)."""
    import paradiff
    from paradiff import runtime
    from paradiff.errors import UserError
    from paradiff.methods.cfg import apply_to_module
    from paradiff.plans.common import example_inputs
    from support.models import tiny_svd_unet

    out = {}
    try:
        paradiff.parallelize(_build("sd3"), paradiff.PatchParallel())
        out["sd3_patch"] = "no error"
    except UserError as err:
        out["sd3_patch"] = str(err)
    unet = tiny_svd_unet()
    kwargs = example_inputs(unet, 2, 8, 8, device="cpu", frames=FRAMES)
    kwargs["added_time_ids"] = torch.tensor([[6.0, 127.0, 0.02], [20.0, 127.0, 0.02]])
    with torch.no_grad():
        serial = unet(**kwargs).sample
        same = unet(**{**kwargs, "added_time_ids": kwargs["added_time_ids"][[1, 1]]}).sample
    apply_to_module(unet, runtime.mesh({"cfg": 2}).get_group("cfg"))
    seen = []
    unet.add_time_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].tolist()))
    with torch.no_grad():
        parallel = unet(**kwargs).sample
    out.update(cfg_diff=float((parallel - serial).abs().max()), seen=seen,
               ids_matter=float((serial[0] - same[0]).abs().max()))
    return out


def _play_all(cases: list) -> dict:
    return {"cases": _play(cases), "extras": _extras()}


def _diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float("inf") if a.shape != b.shape else float(np.abs(a - b).max())


def _tolerance(want) -> float:
    return ATOL * max(1.0, float(np.asarray(want, np.float64).std()))


EXACT_CASES = [(family, method, True) for family, methods in METHODS.items() for method in methods]
STALE_CASES = [(family, method, False) for family in ("svd", "animatediff") for method in ("patch", "async")] + [
    ("sd3", "async", False), ("animatediff", "patch-corrected", False)]


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
    outputs = run_ranks(_play_all, 2, EXACT_CASES + STALE_CASES, timeout=360)
    ranks = [out["cases"] for out in outputs]
    bad = _check_exact(ranks, EXACT_CASES)
    for case in STALE_CASES:
        result = ranks[0][case]
        diff = _diff(result["latent"], result["serial"])
        if not (np.isfinite(result["latent"]).all() and diff > _tolerance(result["serial"])):
            bad.append(f"{case[0]}/{case[1]} stale: max diff {diff:.3g} (should differ from serial, finitely)")
    assert not bad, "; ".join(bad)
    assert ranks[0][("svd", "cfg", True)]["image_encoder_params"] > 0
    assert ranks[1][("svd", "cfg", True)]["image_encoder_params"] == 0
    for rank, out in enumerate(outputs):
        extras = out["extras"]
        message = extras["sd3_patch"]
        assert "patch parallelism supports UNet2DConditionModel" in message and "SD3Transformer2DModel" in message \
            and "\n" not in message, message
        assert extras["ids_matter"] > 1e-4 and extras["cfg_diff"] < 1e-5, extras
        want = [[6.0, 127.0, 0.02], [20.0, 127.0, 0.02]][rank]  # this rank's row, flattened by the UNet
        assert len(extras["seen"]) == 1 and np.allclose(extras["seen"][0], want), extras["seen"]


class _Slots:
    """Stands in for the stale exchange when only the plan's choices are looked at (hooks take a slot, no more)."""

    def __init__(self):
        self.count = 0

    def slot(self, keep=None) -> int:
        self.count += 1
        return self.count


def _planned(model) -> dict[str, str]:
    """module name -> the hook class the video patch plan puts on it."""
    from paradiff.plans import unet2d, video

    hooked: dict[str, str] = {}
    unet2d.apply(model, _Slots(), "corrected", lambda m, hook, name: hooked.setdefault(name, type(hook).__name__),
                 plan=video.patch_plan(model))
    return hooked


@pytest.mark.parametrize("family", ["svd", "animatediff"])
def test_patch_plan_of_the_temporal_layers(family):
    """Temporal self-attention (over frames) gets no FullKV, temporal GroupNorms (frames x rows) get whole-image
    statistics, temporal convs (frames only) get no halo; the spatial layers keep the 2-D table's hooks."""
    from support.models import tiny_motion_unet, tiny_svd_unet

    model = tiny_svd_unet() if family == "svd" else tiny_motion_unet()
    hooked = _planned(model)
    temporal = "temporal_transformer_blocks" if family == "svd" else "motion_modules"
    names = dict(model.named_modules())
    temporal_norms = [n for n, m in names.items() if isinstance(m, torch.nn.GroupNorm)
                      and (temporal in n or "temporal_res_block" in n)]
    assert temporal_norms and all(hooked.get(n) == "PatchGroupNorm" for n in temporal_norms), temporal_norms
    assert not [n for n in hooked if temporal in n and ".attn" in n]  # frames attention: no FullKV
    spatial_kv = [n for n in hooked if n.endswith("attn1.to_k") and temporal not in n]
    assert spatial_kv and all(hooked[n] == "FullKV" for n in spatial_kv)
    convs3d = [n for n, m in names.items() if isinstance(m, torch.nn.Conv3d)]
    assert (family == "animatediff" or convs3d) and not [n for n in convs3d if n in hooked]
    assert all(hooked[n] == "HaloConv2d" for n, m in names.items()
               if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1)


def test_patch_plan_refuses_a_temporal_layer_that_reads_rows():
    """A temporal block with a conv over rows would be computed per patch without a halo: refused in one line."""
    from diffusers.models.resnet import TemporalResnetBlock

    from paradiff.errors import UserError
    from paradiff.plans import unet2d, video

    block = TemporalResnetBlock(32, 32, temb_channels=None)
    block.conv1 = torch.nn.Conv3d(32, 32, (3, 3, 3), padding=1)
    with pytest.raises(UserError, match=r"patch parallelism has no rule for 0\.conv1 \(Conv3d\)"):
        unet2d.apply(torch.nn.Sequential(block), _Slots(), "corrected", lambda *a: None, plan=video.VIDEO_PATCH_PLAN)


@pytest.mark.parametrize("arch, component, count", [
    ("stable-video-diffusion-img2vid-xt", None, 1_524_623_082),
    ("animatediff-motion-adapter-v1-5-2", "motion_adapter", 453_209_280),
    ("animatediff-motion-adapter-v1-5-2", None, 1_312_730_244),  # UNetMotionModel: SD 1.5's UNet + v1-5-2
    ("animatediff-motion-adapter-v1-5-3", "motion_adapter", 417_137_600),  # no mid block
    ("stable-diffusion-3-medium-diffusers", None, 2_028_328_000),
    ("stable-diffusion-3.5-large", None, 8_056_627_520),
])
def test_shipped_parameter_counts(arch, component, count):
    from paradiff import archs

    assert archs.parameter_count(arch, component) == count


@pytest.mark.parametrize("alias, name, pipeline", [
    ("svd-xt", "stable-video-diffusion-img2vid-xt", "StableVideoDiffusionPipeline"),
    ("animatediff", "animatediff-motion-adapter-v1-5-2", "AnimateDiffPipeline"),
    ("sd3-medium", "stable-diffusion-3-medium-diffusers", "StableDiffusion3Pipeline"),
])
def test_video_and_sd3_pipelines_build_on_meta(alias, name, pipeline):
    """Whole pipelines with random weights, nothing allocated: SVD with its image encoder, AnimateDiff without the
    separate adapter (its modules are in the UNetMotionModel), SD3 without T5 (zeros take its place)."""
    from paradiff import archs

    assert archs.resolve(alias) == archs.resolve(name) == archs.resolve(f"someone/{name}")
    pipe = archs.build_pipeline(alias, device="meta")
    assert type(pipe).__name__ == pipeline
    if alias == "svd-xt":
        assert pipe.image_encoder is not None and pipe.unet.config.num_frames == 25
    if alias == "animatediff":
        assert type(pipe.unet).__name__ == "UNetMotionModel" and pipe.motion_adapter is None
    if alias == "sd3-medium":
        assert pipe.text_encoder_3 is None and pipe.text_encoder_2 is not None


@pytest.mark.parametrize("arch", ["svd-xt", "animatediff", "sd3-medium"])
def test_async_splits_of_the_real_configs_are_balanced(arch):
    from paradiff import archs
    from paradiff.methods.split import split

    plan = split(archs.build_model(arch, device="meta"), 2)
    assert plan.balance <= 1.3, (arch, plan.balance)


def test_example_inputs_of_the_video_unets():
    """The call the async trace, `bench` and the tests make: SVD [batch, frames, 8, rows, cols] with one image
    embedding per video and 3 time ids; AnimateDiff [batch, 4, frames, rows, cols] with the prompt embeddings once
    per frame (at most the motion modules' sequence length)."""
    from paradiff.plans.common import example_inputs
    from support.models import tiny_motion_unet, tiny_svd_unet

    svd = example_inputs(tiny_svd_unet(), 2, 8, 8, device="cpu")
    assert svd["sample"].shape == (2, 2, 8, 8, 8) and svd["added_time_ids"].shape == (2, 3)
    assert svd["encoder_hidden_states"].shape == (2, 1, 32)
    motion = tiny_motion_unet()
    kwargs = example_inputs(motion, 2, 8, 8, device="cpu")
    assert kwargs["sample"].shape == (2, 4, 8, 8, 8) and kwargs["encoder_hidden_states"].shape == (16, 77, 32)
    with torch.no_grad():
        assert motion(**example_inputs(motion, 2, 8, 8, device="cpu", frames=3)).sample.shape == (2, 4, 3, 8, 8)


COMBINED_CASES = [("svd", "cfg+patch", True)]  # CFG x async: composed the same way, tested in test_async


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_combined_methods_four_ranks():
    """CFG x patch on 4 ranks ({"cfg": 2, "patch": 2}) on SVD (5-D rows and batch both split): equals serial."""
    ranks = run_ranks(_play, 4, COMBINED_CASES, timeout=360)
    bad = _check_exact(ranks, COMBINED_CASES)
    assert not bad, "; ".join(bad)


# -- the CLI: `paradiff generate` on saved SVD / AnimateDiff / SD3 folders -----------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The tiny pipelines written with save_pretrained, and a 32x32 picture to animate."""
    from support.models import tiny_animatediff_pipeline, tiny_sd3_pipeline, tiny_svd_pipeline

    root = tmp_path_factory.mktemp("video")
    tiny_svd_pipeline().save_pretrained(root / "svd")
    tiny_animatediff_pipeline().save_pretrained(root / "animatediff")
    tiny_sd3_pipeline().save_pretrained(root / "sd3")
    _image().save(root / "image.png")
    return root


def _frames(path) -> list:
    from PIL import Image, ImageSequence

    if path.is_dir():
        return [np.asarray(Image.open(p).convert("RGB"), np.int16) for p in sorted(path.glob("*.png"))]
    return [np.asarray(f.convert("RGB"), np.int16) for f in ImageSequence.Iterator(Image.open(path))]


def test_generate_writes_videos(folders, capsys):
    """The pipeline class comes from model_index.json: SVD animates --image into a gif (no prompt), AnimateDiff
    writes --num-frames PNG frames into a folder, SD3 writes one image (in this process: the CLI's serial path)."""
    from PIL import Image

    from paradiff.cli import main

    runs = [(["--model", str(folders / "svd"), "--image", str(folders / "image.png"), "--num-frames", "2"], "svd.gif"),
            (["a red circle", "--model", str(folders / "animatediff"), "--size", "32", "--num-frames", "2"], "frames"),
            (["a red circle", "--model", str(folders / "sd3"), "--size", "32"], "sd3.png")]
    for args, name in runs:
        assert main(["generate", *args, "--steps", "2", "-o", str(folders / name)]) == 0, capsys.readouterr().err
        assert "wrote" in capsys.readouterr().out
    assert [f.shape for f in _frames(folders / "svd.gif")] == [(32, 32, 3)] * 2
    assert [f.shape for f in _frames(folders / "frames")] == [(32, 32, 3)] * 2
    assert Image.open(folders / "sd3.png").size == (32, 32)


@pytest.mark.parametrize("model, args, message", [
    ("sd3", ["a cat", "--num-frames", "2"], "--num-frames is for video models (AnimateDiff, Stable Video Diffusion)"),
    ("sd3", ["a cat", "-o", "out.gif"], "makes one image (StableDiffusion3Pipeline); give an image file"),
    ("sd3", ["a cat", "--method", "patch", "--nproc", "2"], "denoiser is a SD3Transformer2DModel "
                                                             "(StableDiffusion3Pipeline); use --method cfg, async"),
    ("svd", [], "is an image-to-video model (StableVideoDiffusionPipeline): give --image"),
    ("svd", ["a cat", "--image", "image.png"], "it takes no prompt, only --image."),
    ("svd", ["--image", "image.png", "-o", "out.png"], "makes a video (StableVideoDiffusionPipeline); give .mp4"),
    ("animatediff", [], "give a prompt"),
    ("animatediff", ["a cat", "--num-frames", "9"], "--num-frames 9: "),
    ("animatediff", ["a cat", "--image", "image.png"], "--image needs an inpainting model (with --mask), the x4 "
                                                       "upscaler, an image-to-video model or a ControlNet"),
    # 4 patches of the tiny motion UNet need 8 latent rows: 16 px of image (2 px per row)
    ("animatediff", ["a cat", "--size", "40x32", "--method", "patch", "--nproc", "4"], "got 20 latent rows (40 px)"),
])
def test_generate_video_mistakes_are_one_line_before_any_rank(folders, monkeypatch, capsys, model, args, message):
    from paradiff import launch
    from paradiff.cli import main

    def no_launch(*_, **__):
        raise AssertionError("ranks were started")

    monkeypatch.setattr(launch, "launch", no_launch)
    monkeypatch.chdir(folders)
    assert main(["generate", *args, "--model", str(folders / model)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("paradiff: error: ") and message in err and "\n" not in err, err


def test_generate_mp4_needs_ffmpeg(folders, monkeypatch, capsys):
    """An .mp4 needs imageio-ffmpeg: without it, one line before anything runs (gif and folders need only pillow)."""
    import importlib.util

    from paradiff.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "imageio_ffmpeg" else real(name, *a))
    assert main(["generate", "a cat", "--model", str(folders / "animatediff"), "-o", "out.mp4"]) == 2
    assert "writing .mp4 needs imageio-ffmpeg" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_generate_video_on_two_ranks_like_one(folders):
    """`--method patch --nproc 2` (AnimateDiff) with warm-up over every step writes the serial frames (within 1
    level of 255)."""
    from cli_utils import run_cli

    for args, method in ((["a red circle", "--model", str(folders / "animatediff"), "--size", "32"], "patch"),):
        common = ["generate", *args, "--steps", "2", "--num-frames", "2"]
        outs = {}
        for label, extra in (("serial", []), (method, ["--method", method, "--nproc", "2"] +
                                               (["--warmup-steps", "2"] if method == "patch" else []))):
            outs[label] = folders / f"{method}-{label}"
            proc, _ = run_cli(*common, *extra, "-o", str(outs[label]))
            assert proc.returncode == 0, proc.stderr
        serial, parallel = _frames(outs["serial"]), _frames(outs[method])
        assert len(serial) == 2 and all(np.abs(a - b).max() <= 1 for a, b in zip(serial, parallel)), method


@pytest.mark.parametrize("family", ["svd", "animatediff", "sd3"])
def test_bench_times_the_family(family):
    """`paradiff bench`'s two measurements on each family: its denoiser call on `example_inputs` (eager; the
    compiled baseline runs the same call), and the whole pipeline (SVD: a gray image to animate, no prompt)."""
    from paradiff import bench
    from paradiff.plans.common import denoiser_of

    pipe = _build(family)
    seen = []
    denoiser_of(pipe).register_forward_pre_hook(lambda m, a, k: seen.append(tuple((a or (k.get("sample"),))[0].shape)
                                                                           if a or "sample" in k else
                                                                           tuple(k["hidden_states"].shape)),
                                              with_kwargs=True)
    rows = bench.bench_denoiser(denoiser_of(pipe), batch=2, height=64, width=64, dtype=torch.float32,
                                device=torch.device("cpu"), variants=("eager",), runs=1, warmup=0)
    rows += bench.bench_pipeline(pipe, variant="eager", prompt="x", steps=2, height=32, width=32, guidance=None,
                                 device=torch.device("cpu"), runs=1, warmup=0)
    assert [r.what for r in rows] == ["step", "e2e", "step"]
    frames = {"svd": (2, 2, 8, 8, 8), "animatediff": (2, 4, 8, 8, 8), "sd3": (2, 4, 8, 8)}[family]
    assert seen[0] == frames, seen  # example call: 64 px / 8; SVD's own frames, AnimateDiff's (<= max seq 8)
    assert seen[1][-2:] == (16, 16), seen  # the pipeline at 32 px (tiny VAEs: 2 px per latent row)
