"""The shipped reference models: real diffusers folders that load offline, are small, and draw what is asked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from paradiff.reference import DEFAULT_MODEL, FAST_MODEL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src")


def _size_mb(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2**20


def test_init_is_import_light():
    code = "import sys, paradiff.reference as r; assert 'torch' not in sys.modules; print(r.DEFAULT_MODEL)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": SRC}, check=True)
    assert out.stdout.strip() == DEFAULT_MODEL and os.path.isabs(DEFAULT_MODEL)


@pytest.mark.parametrize("path", [DEFAULT_MODEL, FAST_MODEL])
def test_folder_format_and_size(path):
    assert _size_mb(path) <= 30
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["requires_safety_checker"] is False
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt"):
        assert os.path.isfile(os.path.join(path, part)), part
    with open(os.path.join(path, "unet", "config.json")) as f:
        unet = json.load(f)
    assert unet["sample_size"] == 32 and unet["norm_num_groups"] == 32
    assert "CrossAttnDownBlock2D" in unet["down_block_types"] and "DownBlock2D" in unet["down_block_types"]
    assert "CrossAttnUpBlock2D" in unet["up_block_types"] and unet["mid_block_type"] == "UNetMidBlock2DCrossAttn"
    assert all(c % 32 == 0 for c in unet["block_out_channels"])
    with open(os.path.join(path, "training.json")) as f:
        record = json.load(f)
    assert all({"command", "device", "seconds", "metrics"} <= set(s) for s in record["stages"].values())


def test_tokenizer_from_vocab_files_keeps_grammar_words_whole(tmp_path):
    from transformers import CLIPTokenizer

    from paradiff.reference.build import grammar_words

    # only the classic vocab.json + merges.txt, as older loaders use them
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes(open(os.path.join(DEFAULT_MODEL, "tokenizer", name), "rb").read())
    tok = CLIPTokenizer(vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"),
                        model_max_length=32)
    shipped = CLIPTokenizer.from_pretrained(os.path.join(DEFAULT_MODEL, "tokenizer"))
    assert shipped.model_max_length == 32
    for w in grammar_words():
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    cap = "a small red circle in the top left corner and a large blue star on the right, white gradient background"
    assert tok(cap).input_ids == shipped(cap).input_ids
    assert len(shipped(cap).input_ids) <= 32


def test_main_model_loads_offline_in_fp32_and_follows_a_prompt():
    import torch
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    from paradiff.reference.checker import check

    torch.set_num_threads(2)
    pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    pipe.set_progress_bar_config(disable=True)
    prompt = "a large orange circle at the bottom, green background"  # held-out prompt 2, seed 1002
    image = pipe(prompt, num_inference_steps=25, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(1002)).images[0]
    assert image.size == (128, 128)
    r = check(image, prompt)
    assert r.matched, r.analysis
    assert type(DiffusionPipeline.from_pretrained(DEFAULT_MODEL)).__name__ == "StableDiffusionPipeline"


def test_fast_model_draws_in_few_steps():
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    from paradiff.reference.checker import analyze

    torch.set_num_threads(2)
    pipe = DiffusionPipeline.from_pretrained(FAST_MODEL)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    pipe.set_progress_bar_config(disable=True)
    prompt = "a large orange circle at the bottom, green background"
    image = pipe(prompt, num_inference_steps=2, guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(1002)).images[0]
    a = analyze(np.asarray(image))
    assert a.background == "green"
    assert [(s.color, s.size) for s in a.shapes] == [("orange", "large")]


@pytest.mark.slow  # a training run (every stage, smoke sizes)
def test_training_smoke_run_produces_loadable_pipelines(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-m", "paradiff.reference.train", "--stage", "all", "--smoke", "--out",
                          str(tmp_path), "--seed", "1"], capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    from diffusers import StableDiffusionPipeline

    for name, sched in (("shapes-sd", "DDIMScheduler"), ("shapes-sd-fast", "LCMScheduler")):
        folder = tmp_path / name
        pipe = StableDiffusionPipeline.from_pretrained(folder)
        assert type(pipe.scheduler).__name__ == sched
        record = json.loads((folder / "training.json").read_text())
        names = [n.removeprefix("teacher_") for n in record["stages"]]
        assert names[:3] == ["vae", "vae_decoder", "unet"], names
        assert (folder / "TRAINING.md").exists()


@pytest.mark.slow  # a training run
def test_resume_starts_from_the_shipped_model_and_keeps_its_records(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-m", "paradiff.reference.train", "--stage", "unet", "--resume", "--smoke",
                          "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from the shipped model" in out.stdout
    shipped = json.loads((Path(DEFAULT_MODEL) / "training.json").read_text())["stages"]
    stages = json.loads((tmp_path / "shapes-sd" / "training.json").read_text())["stages"]
    assert set(shipped) < set(stages), "the shipped model's stage records must be kept"
    (new,) = set(stages) - set(shipped)
    assert new.startswith("unet_resume_") and stages[new]["metrics"]["steps"] == 3
    assert list(stages)[-1] == new, "records are listed in the order they ran"


@pytest.mark.slow  # a training run
def test_decoder_stage_keeps_the_latent_space(tmp_path):
    """The decoder fine-tune must leave the encoder untouched, or the shipped UNet would no longer fit the VAE."""
    import torch
    from diffusers import AutoencoderKL

    import shutil

    shutil.copytree(DEFAULT_MODEL, tmp_path / "shapes-sd")  # a pipeline already in OUT gets the new decoder too
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-m", "paradiff.reference.train", "--stage", "decoder", "--smoke",
                          "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    old = AutoencoderKL.from_pretrained(DEFAULT_MODEL, subfolder="vae", torch_dtype=torch.float32).state_dict()
    in_pipe = AutoencoderKL.from_pretrained(tmp_path / "shapes-sd" / "vae", torch_dtype=torch.float32).state_dict()
    new = AutoencoderKL.from_pretrained(tmp_path / "vae").state_dict()
    frozen = [k for k in old if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in old if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and trained
    assert all(torch.equal(old[k], new[k].to(old[k].dtype)) for k in frozen)
    assert any(not torch.equal(old[k], new[k].to(old[k].dtype)) for k in trained)
    assert all(torch.equal(in_pipe[k], new[k].half().float()) for k in trained)  # stored as fp16 in the pipeline
    assert "vae_decoder" in json.loads((tmp_path / "shapes-sd" / "training.json").read_text())["stages"]
    record = json.loads((tmp_path / "vae" / "training.json").read_text())["stages"]["vae_decoder"]["metrics"]
    assert {"recon_adherence", "recon_adherence_before", "recon_bad_pixels"} <= set(record)
