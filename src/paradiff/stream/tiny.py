"""Tiny random-weight SD-style pipelines for `paradiff stream --tiny` (and, through tests/support/models.py, the
stream tests and `benchmarks/stream_bench.py --tiny`): same module types, toy widths.

The stream code only sees the diffusers interfaces (UNet2DConditionModel, AutoencoderKL/AutoencoderTiny, CLIP),
so a pipeline that runs in milliseconds on a CPU exercises every code path that a real one does.
"""

from __future__ import annotations

from typing import Any


def tiny_pipeline(scheduler: str = "lcm", prediction_type: str = "epsilon", size: int = 64, seed: int = 0,
                  device: Any = "cpu", dtype: Any = None):
    """A StableDiffusionPipeline with a ~100k-parameter UNet, VAE and CLIP text encoder (random weights)."""
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, LCMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from paradiff.archs import CONFIG_DIR

    torch.manual_seed(seed)
    bpe = CONFIG_DIR / "_clip_bpe"
    tokenizer = CLIPTokenizer(str(bpe / "vocab.json"), str(bpe / "merges.txt"), model_max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=size // 8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    )
    with torch.no_grad():  # small noise predictions, as from a trained denoiser: the input frame shows through
        unet.conv_out.weight.mul_(0.05)
        unet.conv_out.bias.zero_()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
        sample_size=size, scaling_factor=4.0,  # latents of about unit size, like SD's VAE after its 0.18215
    )
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type)
    if scheduler == "lcm":
        sched = LCMScheduler(steps_offset=1, **common)
    elif scheduler == "euler":
        sched = EulerDiscreteScheduler(timestep_spacing="trailing", steps_offset=1, **common)
    else:
        raise ValueError(f"unknown tiny scheduler {scheduler!r}")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)
