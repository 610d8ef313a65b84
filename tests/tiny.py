"""Tiny SD-family pipelines built in code (random weights), for tests that need a whole pipeline in seconds."""

from __future__ import annotations

import torch


def tiny_sd_pipeline(seed: int = 0, *, sample_size: int = 16, cross_dim: int = 32):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from paradiff.archs import _tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_dim, norm_num_groups=8,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=sample_size * 2)
    tokenizer = _tokenizer("stable-diffusion-v1-5", "tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=cross_dim, intermediate_size=64, num_attention_heads=4,
                                                num_hidden_layers=2, vocab_size=tokenizer.vocab_size,
                                                max_position_embeddings=77))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
