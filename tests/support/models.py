"""The tiny random-weight models of the tests and of the benchmarks' `--tiny` runs, built in code in one place.

Every builder seeds torch's global RNG itself, so the same call gives the same weights in any process (a spawned
rank, a torchrun worker, the test process):

    tiny_unet(kind, seed)           UNet2DConditionModel: "sd", "sdxl", "sd-wide" (the SD pipeline's), "deep"
    unet_inputs(kind, ...)          call kwargs for tiny_unet(kind)
    tiny_sd3_transformer(layers)    SD3Transformer2DModel
    tiny_sd_pipeline(seed)          StableDiffusionPipeline around tiny_unet("sd-wide")
    tiny_sdxl_pipeline(seed)        StableDiffusionXLPipeline around tiny_unet("sdxl")
    tiny_stream_pipeline(...)       the stream tests' pipeline: `paradiff.stream.tiny.tiny_pipeline`, which stays in
                                    the package because `paradiff stream --tiny` uses it
    tiny_taesd(seed)                AutoencoderTiny of TAESD's layout
    tiny_vae(seed, ...)             AutoencoderKL with the mid-block attention (3 blocks: 4x up-sampling)
"""

from __future__ import annotations

import torch

# UNet2DConditionModel arguments per kind, on top of the shared ones in `tiny_unet`.
_UNETS = {
    "sd": dict(block_out_channels=(16, 32), attention_head_dim=4,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "sdxl": dict(block_out_channels=(16, 32, 32), attention_head_dim=(2, 4, 4),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=8 * 6 + 32),
    "sd-wide": dict(block_out_channels=(32, 64), attention_head_dim=8,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # a deep transformer stack, so that the best AsyncDenoise cut falls inside it (as in SDXL)
    "deep": dict(block_out_channels=(16, 32), attention_head_dim=4, transformer_layers_per_block=6,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), mid_block_type=None,
                 up_block_types=("UpBlock2D", "UpBlock2D")),
}


def tiny_unet(kind: str = "sd", seed: int = 0, *, sample_size: int = 16, cross_dim: int = 32,
              fill_zeros: bool = True, train: bool = False):
    """A tiny random UNet2DConditionModel.

    kind: "sd" (SD-1.x-like), "sdxl" (text_time added conditioning), "sd-wide" (the UNet of `tiny_sd_pipeline`,
    also the async benchmark's), "deep" (six transformer layers in one block, no mid block).
    fill_zeros: a fresh UNet has zero-initialised layers (conv_out); give them N(0, 0.05) weights so that outputs
    are informative. train: leave the module in training mode (nn.Module's default; the pipelines keep it)."""
    from diffusers import UNet2DConditionModel

    if kind not in _UNETS:
        raise ValueError(kind)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
                                norm_num_groups=8, cross_attention_dim=cross_dim, **_UNETS[kind])
    if fill_zeros:
        with torch.no_grad():
            for p in unet.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0, 0.05)
    return unet if train else unet.eval()


def unet_inputs(kind: str = "sd", batch: int = 2, size: int = 16, seed: int = 1) -> dict:
    """Call kwargs for `tiny_unet(kind)`: latent, scalar timestep, text states (+ SDXL added conditioning)."""
    g = torch.Generator().manual_seed(seed)
    kwargs = dict(sample=torch.randn(batch, 4, size, size, generator=g), timestep=torch.tensor(500.0),
                  encoder_hidden_states=torch.randn(batch, 7, 32, generator=g))
    if kind == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 32, generator=g),
                                       "time_ids": torch.tensor([[size * 8.0, size * 8.0, 0, 0, size * 8.0, size * 8.0]] * batch)}
    return kwargs


def tiny_sd3_transformer(layers: int = 4, seed: int = 0, *, joint_dim: int = 32):
    """A tiny random SD3Transformer2DModel (8x8 latent, 4 channels, patch 2), in eval mode."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=joint_dim, caption_projection_dim=16,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16).eval()


def tiny_sd_pipeline(seed: int = 0, *, sample_size: int = 16, cross_dim: int = 32):
    """A tiny random StableDiffusionPipeline (DDIM), built in code; its modules stay in training mode."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from paradiff.archs import _tokenizer

    # tiny_unet seeds with `seed`; the VAE and text encoder continue the same RNG stream
    unet = tiny_unet("sd-wide", seed, sample_size=sample_size, cross_dim=cross_dim, fill_zeros=False, train=True)
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


def tiny_sdxl_pipeline(seed: int = 0):
    """A tiny random StableDiffusionXLPipeline (two CLIP encoders, text_time conditioning), built in code."""
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


def tiny_stream_pipeline(scheduler: str = "lcm", prediction_type: str = "epsilon", size: int = 64, seed: int = 0,
                         device="cpu", dtype=None):
    """The stream tests' pipeline (LCM or Euler, 64 px): `paradiff.stream.tiny.tiny_pipeline`, which the package
    keeps for `paradiff stream --tiny`."""
    from paradiff.stream.tiny import tiny_pipeline

    return tiny_pipeline(scheduler, prediction_type, size=size, seed=seed, device=device, dtype=dtype)


def tiny_taesd(seed: int = 0):
    """AutoencoderTiny of TAESD's layout at toy widths (8x down/up-sampling, 4 latent channels)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                           num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))


def tiny_vae(seed: int = 0, *, block_out_channels=(16, 32, 32), latent_channels: int = 4):
    """A tiny random AutoencoderKL of SD's layout (decoder: mid block with self-attention, nearest x2 upsamplers,
    norm_num_groups 8), in eval mode; 2 ** (len(block_out_channels) - 1) pixels per latent row."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    blocks = len(block_out_channels)
    return AutoencoderKL(block_out_channels=tuple(block_out_channels), in_channels=3, out_channels=3,
                         latent_channels=latent_channels, layers_per_block=1, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                         sample_size=32).eval()
