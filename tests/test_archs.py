"""Real architectures build from the shipped configs with the right parameter counts (meta device: no memory)."""

import pytest
import torch

from paradiff import archs
from paradiff.errors import UserError


@pytest.mark.parametrize(
    "arch, count",
    [
        ("stable-diffusion-xl-base-1.0", 2_567_463_684),
        ("stable-diffusion-2-1", 865_910_724),
        ("stable-diffusion-v1-5", 859_520_964),
        ("stable-diffusion-2-1-base", 865_910_724),
        ("sd-turbo", 865_910_724),
        ("sdxl-turbo", 2_567_463_684),
        ("x4-upscaler", 473_398_020),
        ("sdxl-inpainting", 2_567_478_084),  # SDXL + 14,400 for the 5 extra input channels
        ("sd15-inpainting", 859_535_364),  # SD 1.5 + 14,400
    ],
)
def test_unet_parameter_counts(arch, count):
    assert archs.parameter_count(arch) == count


def test_taesd_and_aliases():
    assert archs.parameter_count("taesd", "vae") == 2_445_063
    assert archs.resolve("sdxl") == archs.resolve("stable-diffusion-xl-base-1.0")
    assert archs.resolve("stabilityai/sd-turbo") == archs.resolve("sd-turbo")


@pytest.mark.parametrize("alias, name, pipeline", [
    ("sd15-inpainting", "stable-diffusion-inpainting", "StableDiffusionInpaintPipeline"),
    ("sdxl-inpainting", "stable-diffusion-xl-1.0-inpainting-0.1", "StableDiffusionXLInpaintPipeline"),
    ("x4-upscaler", "stable-diffusion-x4-upscaler", "StableDiffusionUpscalePipeline"),
])
def test_image_conditioned_pipelines_build_on_meta(alias, name, pipeline):
    """The whole pipeline of each shipped inpainting/upscaler config, on the meta device (nothing allocated), with
    its own settings (max_noise_level, low-res scheduler, v-prediction)."""
    assert archs.resolve(alias) == archs.resolve(name) == archs.resolve(f"someone/{name}")
    pipe = archs.build_pipeline(alias, device="meta")
    assert type(pipe).__name__ == pipeline
    assert pipe.unet.config.in_channels == (7 if "upscaler" in alias else 9)
    if "upscaler" in alias:
        assert pipe.config.max_noise_level == 350 and type(pipe.low_res_scheduler).__name__ == "DDPMScheduler"
        assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.unet.config.num_class_embeds == 1000


@pytest.mark.parametrize("arch", ["x4-upscaler", "sdxl-inpainting", "sd15-inpainting"])
def test_async_splits_of_the_image_conditioned_unets_are_balanced(arch):
    from paradiff.methods.split import split

    plan = split(archs.build_model(arch, device="meta"), 2)
    assert plan.balance <= 1.3, (arch, plan.balance)


def test_vae_builds_on_meta():
    vae = archs.build_model("stable-diffusion-xl-base-1.0", "vae", device="meta")
    assert type(vae).__name__ == "AutoencoderKL"


def test_random_weights_are_deterministic_and_finite(tiny_pipeline_dir):
    a = archs.build_model(str(tiny_pipeline_dir), seed=3)
    b = archs.build_model(str(tiny_pipeline_dir), seed=3)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
        assert torch.isfinite(pa).all()
    x = torch.randn(1, 4, 16, 16)
    out = a(x, 10, encoder_hidden_states=torch.randn(1, 7, 32)).sample
    assert torch.isfinite(out).all() and out.std() > 0


def test_local_folder_without_unet(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(UserError, match="missing"):
        archs.build_model(str(tmp_path), "unet", device="meta")


def test_whole_pipeline_from_a_local_folder(tiny_pipeline_dir):
    pipe = archs.build_pipeline(str(tiny_pipeline_dir), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=1, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3)
