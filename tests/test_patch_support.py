"""Tiny random denoisers and their inputs for the patch/CFG parallel tests (no tests here)."""

from __future__ import annotations

from distributed import run_ranks  # noqa: F401  (re-exported for the patch/CFG tests)


def tiny_unet(kind: str = "sd", seed: int = 0):
    """A tiny random UNet2DConditionModel: "sd" (SD-1.x-like) or "sdxl" (text_time added conditioning)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    common = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
                  cross_attention_dim=32)
    if kind == "sd":
        unet = UNet2DConditionModel(block_out_channels=(16, 32), attention_head_dim=4,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **common)
    elif kind == "sdxl":
        unet = UNet2DConditionModel(block_out_channels=(16, 32, 32), attention_head_dim=(2, 4, 4),
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                    transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
                                    addition_embed_type="text_time", addition_time_embed_dim=8,
                                    projection_class_embeddings_input_dim=8 * 6 + 32, **common)
    else:
        raise ValueError(kind)
    # random init of a fresh UNet zero-initialises conv_out; give it weights so outputs are informative
    with torch.no_grad():
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return unet.eval()


def unet_inputs(kind: str = "sd", batch: int = 2, size: int = 16, seed: int = 1) -> dict:
    """Call kwargs for `tiny_unet(kind)`: latent, scalar timestep, text states (+ SDXL added conditioning)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    kwargs = dict(sample=torch.randn(batch, 4, size, size, generator=g), timestep=torch.tensor(500.0),
                  encoder_hidden_states=torch.randn(batch, 7, 32, generator=g))
    if kind == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 32, generator=g),
                                       "time_ids": torch.tensor([[size * 8.0, size * 8.0, 0, 0, size * 8.0, size * 8.0]] * batch)}
    return kwargs


def tiny_sdxl_pipeline(seed: int = 0):
    """A tiny random StableDiffusionXLPipeline (two CLIP encoders, text_time conditioning), built in code."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from paradiff.archs import _tokenizer

    unet = tiny_unet("sdxl", seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=32)
    tokenizer = _tokenizer("stable-diffusion-v1-5", "tokenizer")
    text = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                vocab_size=tokenizer.vocab_size, max_position_embeddings=77)
    encoder = CLIPTextModel(CLIPTextConfig(**text))
    encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=32))
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=encoder, text_encoder_2=encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
