"""The seeds' model families beyond text-to-image: SD 1.5 and SDXL inpainting (9-channel UNets) and the SD x4
upscaler (7-channel UNet, the noise level as `class_labels`, a low-res scheduler, v-prediction), under
PatchParallel, CFGParallel and AsyncDenoise on 2 gloo ranks, exact modes against serial; their real configs on the
meta device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from support.distributed import run_ranks

STEPS = 3
PROMPT = "a red circle on the left"
ATOL = 1e-4  # of the output's scale (its std, at least 1), as in test_conformance
FAMILIES = ("sd-inpaint", "sdxl-inpaint", "upscaler")
METHODS = ("patch", "cfg", "async")


def _build(family: str):
    from support import models

    build = {"sd-inpaint": models.tiny_sd_inpaint_pipeline, "sdxl-inpaint": models.tiny_sdxl_inpaint_pipeline,
             "upscaler": models.tiny_upscale_pipeline}[family]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs(family: str) -> dict:
    """The family's image inputs: a 32x32 image and a square mask (inpainting), a 32x32 low-res image (upscaler:
    32 latent rows, 128x128 output)."""
    rng = np.random.default_rng(0)
    image = rng.random((1, 32, 32, 3)).astype(np.float32)
    if family == "upscaler":
        return {"image": image, "noise_level": 40}
    mask = np.zeros((1, 32, 32, 1), np.float32)
    mask[:, 8:24, 4:20] = 1.0
    return {"image": image, "mask_image": mask, "height": 32, "width": 32}


def _call(pipe, family: str, output_type: str = "latent", **kwargs):
    images = pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(0),
                  output_type=output_type, **{**_inputs(family), **kwargs}).images
    return images.detach().float().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)


def _method(name: str, exact: bool = True):
    import paradiff

    warmup = STEPS if exact else 1
    return {"patch": lambda: paradiff.PatchParallel(warmup_steps=warmup), "cfg": paradiff.CFGParallel,
            "async": lambda: paradiff.AsyncDenoise(warmup_steps=warmup)}[name]()


def _play(cases: list) -> dict:
    """On every rank: for each (family, method, exact), the serial and the parallel result (latents; and the
    decoded image for the exact modes, which only rank 0 decodes)."""
    import paradiff

    out = {}
    for family, method, exact in cases:
        serial = _call(_build(family), family)
        pipe = paradiff.parallelize(_build(family), _method(method, exact))
        pipe.set_progress_bar_config(disable=True)
        seen = []
        if family == "upscaler":  # the noise level as it reaches the class embedding on this rank
            pipe.unet.class_embedding.register_forward_pre_hook(lambda m, a: seen.append(a[0].tolist()))
        result = {"latent": _call(pipe, family), "serial": serial, "labels": seen}
        if exact:
            result["np"] = _call(pipe, family, "np")
            result["np_serial"] = _call(_build(family), family, "np")
        if (family, method, exact) == ("upscaler", "patch", True):  # 20 rows: 2 patches of a 4x-downsampling UNet
            try:
                _call(pipe, family, image=np.zeros((1, 20, 20, 3), np.float32))
                result["bad_size"] = "no error"
            except Exception as err:  # noqa: BLE001
                result["bad_size"] = f"{type(err).__name__}: {err}"
        out[(family, method, exact)] = result
    return out


def _cfg_class_labels() -> dict:
    """CFGParallel on a bare upscaler UNet whose two batch rows have different noise levels: each rank's half gets
    its own row's label (a wrong split would give rank 1 the uncond row's label, or both)."""
    from paradiff import runtime
    from paradiff.methods.cfg import apply_to_module
    from support.models import tiny_unet, unet_inputs

    unet = tiny_unet("upscaler")
    kwargs = unet_inputs("upscaler")
    kwargs["class_labels"] = torch.tensor([20, 300])
    with torch.no_grad():
        serial = unet(**kwargs).sample
        same = unet(**{**kwargs, "class_labels": torch.tensor([300, 300])}).sample
    group = runtime.mesh({"cfg": 2}).get_group("cfg")
    apply_to_module(unet, group)
    seen = []
    unet.class_embedding.register_forward_pre_hook(lambda m, a: seen.append(a[0].tolist()))
    with torch.no_grad():
        parallel = unet(**kwargs).sample
    return {"diff": float((parallel - serial).abs().max()), "seen": seen,
            "labels_matter": float((serial[0] - same[0]).abs().max())}


def _diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float("inf") if a.shape != b.shape else float(np.abs(a - b).max())


def _tolerance(want) -> float:
    return ATOL * max(1.0, float(np.asarray(want, np.float64).std()))


EXACT_CASES = [(family, method, True) for family in FAMILIES for method in METHODS]
STALE_CASES = [(family, method, False) for family in FAMILIES for method in ("patch", "async")]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_families_under_every_method_two_ranks():
    """Exact modes equal serial on rank 0 (latents within 1e-4 of their scale; decoded images too, and blank on
    rank 1, which does not decode); the stale modes (warm-up 1) run and differ from serial; the upscaler's noise
    level reaches the class embedding with the batch split by CFG (one label per rank) and whole otherwise; an
    upscaler input that patches cannot split is one UserError about the input image."""
    ranks = run_ranks(_play, 2, EXACT_CASES + STALE_CASES, timeout=360)
    bad = []
    for case in EXACT_CASES:
        family, method, _ = case
        main, other = ranks[0][case], ranks[1][case]
        for key, want in (("latent", main["serial"]), ("np", main["np_serial"])):
            diff = _diff(main[key], want)
            if not diff <= _tolerance(want):
                bad.append(f"{family}/{method} {key}: max |parallel - serial| = {diff:.3g}")
        if _diff(other["latent"], main["serial"]) > _tolerance(main["serial"]):
            bad.append(f"{family}/{method}: rank 1's latents differ from serial")
        if family == "upscaler":
            per_call = 1 if method == "cfg" else 2  # CFG: this rank's half of [uncond, cond]
            for rank in ranks:
                if any(labels != [40] * per_call for labels in rank[case]["labels"][:STEPS]):
                    bad.append(f"upscaler/{method}: class labels seen {rank[case]['labels'][:STEPS]}")
    for case in STALE_CASES:
        family, method, _ = case
        result = ranks[0][case]
        diff = _diff(result["latent"], result["serial"])
        if not (np.isfinite(result["latent"]).all() and diff > _tolerance(result["serial"])):
            bad.append(f"{family}/{method} stale: max diff {diff:.3g} (should differ from serial, finitely)")
    assert not bad, "; ".join(bad)
    for case in EXACT_CASES:  # rank 1 does not decode: blank images
        assert float(np.abs(ranks[1][case]["np"] - 0.5).max()) == 0.0, case
    for rank in ranks:  # the upscaler's rows are its input image's: the error speaks of that image
        message = rank[("upscaler", "patch", True)]["bad_size"]
        assert message.startswith("UserError") and "input image height a multiple of 8 px" in message, message


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_cfg_splits_the_noise_level_with_the_batch():
    for rank, out in enumerate(run_ranks(_cfg_class_labels, 2)):
        assert out["labels_matter"] > 1e-3, out  # the label changes the output, so the check can see a wrong split
        assert out["diff"] < 1e-5, out
        assert out["seen"] == [[[20], [300]][rank]], out


def test_example_inputs_give_class_labels():
    """UNets with a class embedding get `class_labels` in their example call (the async trace, bench, tests): the
    x4 upscaler's noise level as integer labels; other class embedding kinds as their vectors or timesteps."""
    from diffusers import UNet2DConditionModel

    from paradiff.plans.common import example_inputs
    from support.models import tiny_unet

    unet = tiny_unet("upscaler")
    kwargs = example_inputs(unet, 2, 16, 16, device="cpu")
    assert kwargs["sample"].shape == (2, 7, 16, 16) and kwargs["class_labels"].dtype == torch.long
    assert torch.isfinite(unet(**kwargs).sample).all()
    assert "class_labels" not in example_inputs(tiny_unet("sd-inpaint"), 2)
    assert example_inputs(tiny_unet("sd-inpaint"), 2)["sample"].shape[1] == 9
    base = dict(block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8, layers_per_block=1,
                cross_attention_dim=8, sample_size=8)
    for extra in ({"class_embed_type": "timestep"}, {"class_embed_type": "identity"},
                  {"class_embed_type": "projection", "projection_class_embeddings_input_dim": 5},
                  {"class_embed_type": "simple_projection", "projection_class_embeddings_input_dim": 5}):
        model = UNet2DConditionModel(**base, **extra).eval()
        with torch.no_grad():
            assert model(**example_inputs(model, 2, device="cpu")).sample.shape == (2, 4, 8, 8), extra


def test_async_split_of_the_tiny_upscaler_is_automatic():
    from paradiff.methods.split import split
    from support.models import tiny_unet

    plan = split(tiny_unet("upscaler"), 2)
    assert plan.n == 2 and plan.balance < 1.5 and plan.graph.example.endswith("(7, 16, 16)")


@pytest.mark.parametrize("family", FAMILIES)
def test_bench_pipeline_gives_the_image_inputs(family):
    """`paradiff bench --what e2e` on an image-conditioned pipeline: an image (and a mask) of the asked output size;
    the upscaler an input image 4x smaller (2 steps: SDXL inpainting's default strength 0.9999 leaves 0 of 1)."""
    from paradiff import bench

    pipe = _build(family)
    seen = []
    pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    rows = bench.bench_pipeline(pipe, variant="eager", prompt="x", steps=2, height=32, width=64, guidance=None,
                                device=torch.device("cpu"), runs=1, warmup=0)
    assert [r.what for r in rows] == ["e2e", "step"]
    # CFG batch 2; the latent rows: 32/2 x 64/2 (inpainting VAE x2), 32/4 x 64/4 (the upscaler's input image)
    assert seen[0] == ((2, 7, 8, 16) if family == "upscaler" else (2, 9, 16, 32)), seen


# -- the CLI: `paradiff generate` on saved inpainting / upscaler folders -------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny inpainting and upscaler pipelines written with save_pretrained, a 32x32 picture, a mask, a 20x20 one."""
    from PIL import Image

    from support.models import tiny_sd_inpaint_pipeline, tiny_upscale_pipeline

    root = tmp_path_factory.mktemp("families")
    tiny_sd_inpaint_pipeline().save_pretrained(root / "inpaint")
    tiny_upscale_pipeline().save_pretrained(root / "upscaler")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(root / "image.png")
    Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(root / "image20.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(root / "mask.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_generate_inpaints_and_upscales(folders):
    """The pipeline class comes from model_index.json: the inpainting folder inpaints --image under --mask at the
    image's size, the upscaler folder makes a 4x larger image."""
    from PIL import Image

    from cli_utils import run_cli

    for model, extra, size in (("inpaint", ["--mask", str(folders / "mask.png")], (32, 32)),
                               ("upscaler", [], (128, 128))):
        out = folders / f"{model}.png"
        proc, _ = run_cli("generate", "a red circle", "--model", str(folders / model), "--image",
                          str(folders / "image.png"), *extra, "--steps", "2", "-o", str(out))
        assert proc.returncode == 0, proc.stderr
        assert Image.open(out).size == size and "wrote" in proc.stdout


@pytest.mark.parametrize("model, args, message", [
    ("inpaint", ["--mask", "mask.png"], "--mask needs --image"),
    ("upscaler", ["--image", "image.png", "--mask", "mask.png"], "--mask is for inpainting models; "),
    (None, ["--image", "image.png", "--mask", "mask.png"], "--mask is for inpainting models; the embedded model is "
                                                           "a StableDiffusionPipeline."),
    (None, ["--image", "image.png"], "--image needs an inpainting model"),
    ("inpaint", ["--image", "image.png"], "is an inpainting model (StableDiffusionInpaintPipeline): give --image "
                                          "and --mask."),
    ("upscaler", [], "is an upscaler (StableDiffusionUpscalePipeline): give --image"),
    ("upscaler", ["--image", "image.png", "--size", "64"], "--size does not apply to an upscaler: its output is 4x"),
    ("inpaint", ["--image", "nope.png", "--mask", "mask.png"], "nope.png: no such file."),
    ("inpaint", ["--image", "notes.txt", "--mask", "mask.png"], "notes.txt: not an image file"),
    # sizes the patch split cannot take (tiny UNets: 2 patches need 8 latent rows (upscaler), 4 patches of the
    # inpainting UNet 8 rows, 16 px)
    ("upscaler", ["--image", "image20.png", "--method", "patch", "--nproc", "2"],
     "multiple of 8 (input image height a multiple of 8 px), got 20 latent rows"),
    ("inpaint", ["--image", "image.png", "--mask", "mask.png", "--size", "40x32", "--method", "patch", "--nproc", "4"],
     "(image height a multiple of 16 px), got 20 latent rows (40 px)"),
])
def test_generate_image_mistakes_are_one_line_before_any_rank(folders, monkeypatch, capsys, model, args, message):
    from paradiff import launch
    from paradiff.cli import main

    def no_launch(*_, **__):
        raise AssertionError("ranks were started")

    monkeypatch.setattr(launch, "launch", no_launch)
    monkeypatch.chdir(folders)
    argv = ["generate", "x", *(["--model", str(folders / model)] if model else []), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("paradiff: error: ") and message in err and "\n" not in err, err


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_generate_inpaints_on_two_ranks_like_one(folders):
    """`--method patch --nproc 2` with warm-up over every step writes the serial image (within 1 level of 255)."""
    from PIL import Image

    from cli_utils import run_cli

    common = ["generate", "a red circle", "--model", str(folders / "inpaint"), "--image", str(folders / "image.png"),
              "--mask", str(folders / "mask.png"), "--steps", "2"]
    proc, _ = run_cli(*common, "-o", str(folders / "serial.png"))
    assert proc.returncode == 0, proc.stderr
    proc, _ = run_cli(*common, "--method", "patch", "--nproc", "2", "--warmup-steps", "2", "-o",
                      str(folders / "patch.png"))
    assert proc.returncode == 0, proc.stderr
    serial, patch = (np.asarray(Image.open(folders / f"{n}.png"), np.int16) for n in ("serial", "patch"))
    assert serial.shape == (32, 32, 3) and np.abs(serial - patch).max() <= 1


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_async_upscaler_unet_stale_steps_match_the_simulation():
    """The upscaler UNet (class labels) under AsyncDenoise on 2 ranks, through test_async's references: exact with
    warm-up over every step, and with warm-up 2 equal to the single-process simulation of the stale dataflow."""
    from test_async import T, _async_vs_references, _check

    _check(run_ranks(_async_vs_references, 2, "upscaler", [(T, False, 1, False), (2, False, 1, False)]))
