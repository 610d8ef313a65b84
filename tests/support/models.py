"""The tiny random-weight models of the tests and of the benchmarks' `--tiny` runs, built in code in one place.

Every builder seeds torch's global RNG itself, so the same call gives the same weights in any process (a spawned
rank, a torchrun worker, the test process):

    tiny_unet(kind, seed)           UNet2DConditionModel: "sd", "sdxl", "sd-wide" (the SD pipeline's), "deep",
                                    "sd-inpaint", "sdxl-inpaint" (9 input channels), "upscaler" (the x4 upscaler's
                                    block types: 7 input channels, noise-level class embedding, cross-only attention)
    unet_inputs(kind, ...)          call kwargs for tiny_unet(kind)
    tiny_sd3_transformer(layers)    SD3Transformer2DModel
    tiny_sd_pipeline(seed)          StableDiffusionPipeline around tiny_unet("sd-wide")
    tiny_sdxl_pipeline(seed)        StableDiffusionXLPipeline around tiny_unet("sdxl")
    tiny_sd_inpaint_pipeline(seed)  StableDiffusionInpaintPipeline around tiny_unet("sd-inpaint")
    tiny_sdxl_inpaint_pipeline(seed)  StableDiffusionXLInpaintPipeline around tiny_unet("sdxl-inpaint")
    tiny_upscale_pipeline(seed)     StableDiffusionUpscalePipeline around tiny_unet("upscaler") (v-prediction DDIM,
                                    DDPM low-res scheduler, x4 VAE)
    tiny_controlnet(unet_kind, seed)  ControlNetModel.from_unet(tiny_unet(unet_kind)), a 2x conditioning embedding
    tiny_controlnet_pipeline(kind, seed)  the ControlNet pipelines around them: "sd", "sd-img2img", "sd-multi" (two
                                    ControlNets), "sdxl", "sdxl-img2img"
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
# Inpainting UNets take [latent, mask, masked-image latent] (4 + 1 + 4 channels), as SD1.5- and SDXL-inpainting.
_UNETS["sd-inpaint"] = dict(_UNETS["sd-wide"], in_channels=9)
_UNETS["sdxl-inpaint"] = dict(_UNETS["sdxl"], in_channels=9)
# The x4 upscaler's layout at toy widths: [latent, low-res image] (4 + 3 channels), the noise level as class label
# (num_class_embeds), a plain first down block, cross-attention-only transformers except at the lowest resolution.
_UNETS["upscaler"] = dict(block_out_channels=(16, 32, 32), attention_head_dim=4, in_channels=7, num_class_embeds=1000,
                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                          only_cross_attention=(True, True, False), use_linear_projection=True)


def tiny_unet(kind: str = "sd", seed: int = 0, *, sample_size: int = 16, cross_dim: int = 32,
              fill_zeros: bool = True, train: bool = False):
    """A tiny random UNet2DConditionModel.

    kind: "sd" (SD-1.x-like), "sdxl" (text_time added conditioning), "sd-wide" (the UNet of `tiny_sd_pipeline`,
    also the async benchmark's), "deep" (six transformer layers in one block, no mid block), "sd-inpaint" and
    "sdxl-inpaint" (sd-wide and sdxl with 9 input channels), "upscaler" (the x4 upscaler's block types).
    fill_zeros: a fresh UNet has zero-initialised layers (conv_out); give them N(0, 0.05) weights so that outputs
    are informative. train: leave the module in training mode (nn.Module's default; the pipelines keep it)."""
    from diffusers import UNet2DConditionModel

    if kind not in _UNETS:
        raise ValueError(kind)
    torch.manual_seed(seed)
    config = {"in_channels": 4, **_UNETS[kind]}
    unet = UNet2DConditionModel(sample_size=sample_size, out_channels=4, layers_per_block=1, norm_num_groups=8,
                                cross_attention_dim=cross_dim, **config)
    if fill_zeros:
        with torch.no_grad():
            for p in unet.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0, 0.05)
    return unet if train else unet.eval()


def unet_inputs(kind: str = "sd", batch: int = 2, size: int = 16, seed: int = 1) -> dict:
    """Call kwargs for `tiny_unet(kind)`: latent, scalar timestep, text states (+ SDXL added conditioning, + the
    upscaler's noise level as `class_labels`)."""
    g = torch.Generator().manual_seed(seed)
    channels = _UNETS[kind].get("in_channels", 4)
    kwargs = dict(sample=torch.randn(batch, channels, size, size, generator=g), timestep=torch.tensor(500.0),
                  encoder_hidden_states=torch.randn(batch, 7, 32, generator=g))
    if kind == "upscaler":
        kwargs["class_labels"] = torch.full((batch,), 20, dtype=torch.long)
    if "addition_embed_type" in _UNETS[kind]:
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


def _tiny_vae(blocks: int = 2, sample_size: int = 32, **config):
    """AutoencoderKL at toy widths: `blocks` levels (2**(blocks-1) pixels per latent row), 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(16, 32, 32)[:blocks], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, norm_num_groups=8, sample_size=sample_size,
                         **config)


def _tiny_clip(hidden: int, tokenizer, **config):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=2, num_hidden_layers=2,
                          vocab_size=tokenizer.vocab_size, max_position_embeddings=77, **config)


def tiny_sd_inpaint_pipeline(seed: int = 0):
    """A tiny random StableDiffusionInpaintPipeline (DDIM; 9-channel UNet: latent, mask, masked-image latent)."""
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline
    from transformers import CLIPTextModel

    from paradiff.archs import _tokenizer

    unet = tiny_unet("sd-inpaint", seed)
    torch.manual_seed(seed)
    tokenizer = _tokenizer("stable-diffusion-v1-5", "tokenizer")
    text_encoder = CLIPTextModel(_tiny_clip(32, tokenizer)).eval()
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionInpaintPipeline(vae=_tiny_vae().eval(), text_encoder=text_encoder, tokenizer=tokenizer,
                                          unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)


def tiny_sdxl_inpaint_pipeline(seed: int = 0):
    """A tiny random StableDiffusionXLInpaintPipeline (Euler; two CLIP encoders, text_time, 9-channel UNet)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from paradiff.archs import _tokenizer

    unet = tiny_unet("sdxl-inpaint", seed)
    torch.manual_seed(seed)
    tokenizer = _tokenizer("stable-diffusion-v1-5", "tokenizer")
    encoder = CLIPTextModel(_tiny_clip(16, tokenizer)).eval()
    encoder_2 = CLIPTextModelWithProjection(_tiny_clip(16, tokenizer, projection_dim=32)).eval()
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLInpaintPipeline(vae=_tiny_vae().eval(), text_encoder=encoder, text_encoder_2=encoder_2,
                                            tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                            requires_aesthetics_score=False)


def tiny_upscale_pipeline(seed: int = 0):
    """A tiny random StableDiffusionUpscalePipeline as the x4 upscaler's: v-prediction DDIM, a DDPM low-res scheduler
    that noises the input image to `noise_level` (the UNet's class label), a 3-level VAE (x4 pixels per latent row),
    a 7-channel UNet (latent + low-res image)."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline
    from transformers import CLIPTextModel

    from paradiff.archs import _tokenizer

    unet = tiny_unet("upscaler", seed)
    torch.manual_seed(seed)
    tokenizer = _tokenizer("stable-diffusion-v1-5", "tokenizer")
    text_encoder = CLIPTextModel(_tiny_clip(32, tokenizer)).eval()
    vae = _tiny_vae(3, sample_size=64, scaling_factor=0.08333).eval()
    low_res = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000,
                            variance_type="fixed_small")
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    return StableDiffusionUpscalePipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          low_res_scheduler=low_res, scheduler=scheduler, max_noise_level=350)


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


def tiny_controlnet(unet_kind: str = "sd-wide", seed: int = 0):
    """ControlNetModel.from_unet(tiny_unet(unet_kind)), eval mode. Its conditioning embedding downsamples 2x, as the
    tiny pipelines' 2-level VAE does (the real ones: 8x and 8x); its zero-initialised layers (the residual
    projections, the embedding's last conv) get N(0, 0.05) weights, so the residuals reach the UNet."""
    from diffusers import ControlNetModel

    unet = tiny_unet(unet_kind, seed)
    torch.manual_seed(seed + 100)
    return _fill(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)), seed)


CONTROLNET_KINDS = ("sd", "sd-img2img", "sd-multi", "sdxl", "sdxl-img2img")


def tiny_controlnet_pipeline(kind: str = "sd", seed: int = 0):
    """A tiny random ControlNet pipeline: "sd" (StableDiffusionControlNetPipeline, DDIM, the SD UNet of
    `tiny_sd_inpaint_pipeline` with 4 channels), "sd-img2img", "sd-multi" (two ControlNets: MultiControlNetModel),
    "sdxl" (StableDiffusionXLControlNetPipeline, Euler, text_time ControlNet), "sdxl-img2img"."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from paradiff.archs import _tokenizer

    if kind not in CONTROLNET_KINDS:
        raise ValueError(kind)
    xl = kind.startswith("sdxl")
    unet = tiny_unet("sdxl" if xl else "sd-wide", seed)
    nets = [tiny_controlnet("sdxl" if xl else "sd-wide", seed + i) for i in range(2 if kind == "sd-multi" else 1)]
    controlnet = nets[0] if len(nets) == 1 else diffusers.MultiControlNetModel(nets)
    torch.manual_seed(seed)
    tokenizer = _tokenizer("stable-diffusion-v1-5", "tokenizer")
    common = dict(vae=_tiny_vae().eval(), tokenizer=tokenizer, unet=unet, controlnet=controlnet)
    img2img = kind.endswith("img2img")
    if xl:
        cls = diffusers.StableDiffusionXLControlNetImg2ImgPipeline if img2img else \
            diffusers.StableDiffusionXLControlNetPipeline
        scheduler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                     steps_offset=1, timestep_spacing="leading")
        extra = {"requires_aesthetics_score": False} if img2img else {}
        return cls(text_encoder=CLIPTextModel(_tiny_clip(16, tokenizer)).eval(),
                   text_encoder_2=CLIPTextModelWithProjection(_tiny_clip(16, tokenizer, projection_dim=32)).eval(),
                   tokenizer_2=tokenizer, scheduler=scheduler, **common, **extra)
    cls = diffusers.StableDiffusionControlNetImg2ImgPipeline if img2img else diffusers.StableDiffusionControlNetPipeline
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return cls(text_encoder=CLIPTextModel(_tiny_clip(32, tokenizer)).eval(), scheduler=scheduler, safety_checker=None,
               feature_extractor=None, requires_safety_checker=False, **common)


# -- video and SD3 families: Stable Video Diffusion, AnimateDiff, StableDiffusion3Pipeline -------------------------
def _fill(model, seed: int):
    """N(0, 0.05) in the zero-initialised layers (conv_out, the motion modules' proj_out), so outputs are informative."""
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model.eval()


def tiny_svd_unet(seed: int = 0, *, frames: int = 2):
    """A tiny random UNetSpatioTemporalConditionModel of SVD's block types: spatio-temporal resnets (a 2-D resnet,
    then a temporal resnet whose GroupNorms see frames x rows), spatial + temporal transformers, 8 input channels
    (noisy latent + image latent), 3 added time ids. Widths are multiples of 32: its temporal GroupNorms have 32
    groups whatever the config says."""
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(seed)
    unet = UNetSpatioTemporalConditionModel(
        sample_size=16, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), num_attention_heads=(2, 4),
        cross_attention_dim=32, addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
        num_frames=frames)
    return _fill(unet, seed)


def tiny_svd_pipeline(seed: int = 0):
    """A tiny random StableVideoDiffusionPipeline: `tiny_svd_unet`, a CLIP vision encoder (224 px, 7x7 patches), a
    2-level temporal-decoder VAE (2 px per latent row), SVD-xt's Euler scheduler (v-prediction, Karras sigmas)."""
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = tiny_svd_unet(seed)
    torch.manual_seed(seed)
    vae = AutoencoderKLTemporalDecoder(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                       latent_channels=4, layers_per_block=1, sample_size=32).eval()
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=224, patch_size=32)).eval()
    features = CLIPImageProcessor(crop_size={"height": 224, "width": 224}, size={"shortest_edge": 224})
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
                                       steps_offset=1, timestep_spacing="leading", timestep_type="continuous",
                                       use_karras_sigmas=True, interpolation_type="linear")
    return StableVideoDiffusionPipeline(vae=vae, image_encoder=encoder, unet=unet, scheduler=scheduler,
                                        feature_extractor=features)


def tiny_motion_adapter(seed: int = 0, *, mid_block: bool = True):
    """A tiny random MotionAdapter for `tiny_unet("sd")`'s widths (16, 32): one motion module per resnet."""
    from diffusers import MotionAdapter

    torch.manual_seed(seed)
    return MotionAdapter(block_out_channels=(16, 32), motion_layers_per_block=1, motion_num_attention_heads=2,
                         motion_norm_num_groups=8, motion_max_seq_length=8, use_motion_mid_block=mid_block)


def tiny_motion_unet(seed: int = 0, *, mid_block: bool = True):
    """A tiny random UNetMotionModel: `tiny_unet("sd")` with `tiny_motion_adapter`'s motion modules (temporal
    transformers whose GroupNorm sees frames x rows, self-attention over frames) inside every block."""
    from diffusers import UNetMotionModel

    return _fill(UNetMotionModel.from_unet2d(tiny_unet("sd", seed), tiny_motion_adapter(seed, mid_block=mid_block)),
                 seed)


def tiny_animatediff_pipeline(seed: int = 0):
    """A tiny random AnimateDiffPipeline around `tiny_motion_unet` (DDIM, linear betas as AnimateDiff's)."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler
    from transformers import CLIPTextModel

    from paradiff.archs import _tokenizer

    unet = tiny_motion_unet(seed)
    torch.manual_seed(seed)
    tokenizer = _tokenizer("stable-diffusion-v1-5", "tokenizer")
    text_encoder = CLIPTextModel(_tiny_clip(32, tokenizer)).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
                              steps_offset=1, timestep_spacing="linspace")
    return AnimateDiffPipeline(vae=_tiny_vae().eval(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                               motion_adapter=None, scheduler=scheduler)


def tiny_sd3_pipeline(seed: int = 0, *, layers: int = 4):
    """A tiny random StableDiffusion3Pipeline: `tiny_sd3_transformer`, two CLIP text encoders with projections (16
    + 16 wide, projections 8 + 8: 32 joint, 16 pooled), no T5 (the pipeline gives zeros in its place), a 4-channel
    2-level VAE, flow-matching Euler (shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from paradiff.archs import _tokenizer

    transformer = tiny_sd3_transformer(layers, seed, joint_dim=32)
    torch.manual_seed(seed)
    tokenizer = _tokenizer("stable-diffusion-v1-5", "tokenizer")
    encoders = [CLIPTextModelWithProjection(_tiny_clip(16, tokenizer, projection_dim=8)).eval() for _ in range(2)]
    vae = _tiny_vae(scaling_factor=1.5, shift_factor=0.06).eval()
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1],
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
