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
    ],
)
def test_unet_parameter_counts(arch, count):
    assert archs.parameter_count(arch) == count


def test_taesd_and_aliases():
    assert archs.parameter_count("taesd", "vae") == 2_445_063
    assert archs.resolve("sdxl") == archs.resolve("stable-diffusion-xl-base-1.0")
    assert archs.resolve("stabilityai/sd-turbo") == archs.resolve("sd-turbo")


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
