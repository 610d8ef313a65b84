"""Tiny random-weight SD- and SDXL-style pipelines and ControlNets for `paradiff stream --tiny` (and, through
tests/support/models.py, the stream tests and `benchmarks/stream_bench.py --tiny`): same module types, toy widths.

The stream code only sees the diffusers interfaces (UNet2DConditionModel, AutoencoderKL/AutoencoderTiny, CLIP),
so a pipeline that runs in milliseconds on a CPU exercises every code path that a real one does.
"""

from __future__ import annotations

from typing import Any


def tiny_pipeline(scheduler: str = "lcm", prediction_type: str = "epsilon", size: int = 64, seed: int = 0,
                  device: Any = "cpu", dtype: Any = None, family: str = "sd"):
    """A StableDiffusionPipeline with a ~100k-parameter UNet, VAE and CLIP text encoder (random weights).

    family="sdxl": a StableDiffusionXLPipeline instead (two text encoders, whose hidden states are concatenated,
    the second's pooled projection and six time ids as added conditioning), same toy widths."""
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, LCMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from paradiff.archs import CONFIG_DIR

    if family not in ("sd", "sdxl"):
        raise ValueError(f"unknown tiny family {family!r}")
    sdxl = family == "sdxl"
    torch.manual_seed(seed)
    bpe = CONFIG_DIR / "_clip_bpe"
    tokenizer = CLIPTokenizer(str(bpe / "vocab.json"), str(bpe / "merges.txt"), model_max_length=16)

    def clip(hidden):
        return CLIPTextConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, projection_dim=32, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    text_encoder = CLIPTextModel(clip(16 if sdxl else 32))
    text_encoder_2 = CLIPTextModelWithProjection(clip(16)) if sdxl else None
    added = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=8 * 6 + 32, use_linear_projection=True) if sdxl else {}
    unet = UNet2DConditionModel(
        sample_size=size // 8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8, **added,
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
    if sdxl:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=sched)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def random_controlnet(unet: Any, seed: int = 0, tiny: bool = True):
    """A ControlNetModel shaped after `unet` (diffusers' `from_unet`) with random weights everywhere, its zero
    convolutions included: a fresh ControlNet adds nothing, which no test could tell from no ControlNet.
    tiny: toy widths for the conditioning image encoder (else diffusers' default, as real ControlNets have)."""
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    embedding = (8, 8, 16, 16) if tiny else (16, 32, 96, 256)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding, load_weights_from_unet=False)
    with torch.no_grad():
        for param in net.parameters():
            if param.abs().sum() == 0:
                param.normal_(0, 0.2 if tiny else 0.02)  # residuals that show, not so large that GroupNorm hides the scale
    net = net.to(unet.device)
    return (net if unet.dtype == torch.float32 else net.to(unet.dtype)).eval().requires_grad_(False)


def tiny_controlnet(unet: Any, seed: int = 0):
    """`random_controlnet` at toy widths (the tests' ControlNet)."""
    return random_controlnet(unet, seed, tiny=True)
