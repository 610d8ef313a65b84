"""StreamPipeline on tiny random SDXL pipes: against diffusers' own SDXL pipelines (added conditioning, CFG, live
prompt changes, TAESD-style img2img), the stream batch against a per-frame computation in every guidance mode, the
similarity filter, the fp16 VAE upcast, and the errors for SDXL pipes that cannot make pooled embeddings."""

import numpy as np
import pytest
import torch

from paradiff.errors import UserError
from test_stream import NoScalarReads, _frames, _max_diff, check_stream_batch

torch.set_num_threads(1)


def _sdxl(dtype=torch.float64, **kwargs):
    from paradiff.stream.tiny import tiny_pipeline

    return tiny_pipeline("lcm", family="sdxl", dtype=dtype, **kwargs)


@pytest.fixture(scope="module")
def sdxl():
    return _sdxl()


@pytest.fixture(scope="module")
def sdxl32():
    return _sdxl(torch.float32, seed=1)


def _np_uint8(images):
    return (np.asarray(images) * 255).round().astype(np.uint8)


@pytest.mark.parametrize("mode", ["none", "self", "initialize", "full"])
def test_sdxl_stream_batch_equals_per_frame_computation(sdxl, mode):
    check_stream_batch(sdxl, mode)


def _recording(unet):
    """The UNet's conditioning inputs of every call: (encoder_hidden_states, text_embeds, time_ids)."""
    calls = []

    def hook(module, args, kwargs):
        added = kwargs["added_cond_kwargs"]
        calls.append((kwargs["encoder_hidden_states"].clone(), added["text_embeds"].clone(), added["time_ids"].clone()))

    return calls, unet.register_forward_pre_hook(hook, with_kwargs=True)


def test_sdxl_txt2img_equals_diffusers_with_live_prompt_changes(sdxl32):
    """One LCM step from t=999 with full CFG, as StableDiffusionXLPipeline computes it (pooled embeddings, time ids,
    SDXL's zeroed empty negative): the same UNet conditioning, the same images; a prompt changed live gives what
    diffusers gives for the new prompt."""
    from paradiff import StreamPipeline

    stream = StreamPipeline(sdxl32, [0], guidance="full", frame_buffer_size=2)
    stream.prepare("a red circle", negative_prompt="", guidance_scale=1.7, seed=3)
    buffer = stream._added["text_embeds"]

    def diffusers(prompt, negative):
        images = sdxl32([prompt] * 2, negative_prompt=[negative] * 2 if negative else None, guidance_scale=1.7,
                        num_inference_steps=1,
                        latents=stream._noise[:2].clone(), height=64, width=64, output_type="np").images
        return _np_uint8(images)

    calls, handle = _recording(sdxl32.unet)
    try:
        for prompt, negative in (("a red circle", ""), ("a blue square", "green")):
            if prompt != stream.prompt[0]:
                stream.update_prompt(prompt, negative_prompt=negative)
            ours = stream.txt2img().numpy()
            theirs = diffusers(prompt, negative)
            assert _max_diff(ours, theirs) <= 1
            for mine, want in zip(calls[-2], calls[-1]):
                torch.testing.assert_close(mine, want)
    finally:
        handle.remove()
    assert stream._added["text_embeds"] is buffer  # updated in place: a captured graph reads the new prompt
    assert not torch.equal(calls[0][1], calls[2][1])  # the pooled embeddings did change
    assert calls[0][1][:2].abs().sum() == 0  # SDXL's empty negative prompt is zeros, as in diffusers
    assert calls[0][2].tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 4


def test_sdxl_img2img_with_tiny_vae_equals_diffusers(sdxl32):
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from PIL import Image

    from paradiff import StreamPipeline
    from support.models import tiny_taesd

    taesd = tiny_taesd()
    frame = _frames(1, 1, seed=5)[0][0]
    stream = StreamPipeline(sdxl32, [35], tiny_vae=taesd)
    stream.prepare("a yellow star", seed=4)
    out = stream(frame)
    t = int(stream.schedule.timesteps[0])
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(sdxl32, vae=taesd)
    want = img2img("a yellow star", image=Image.fromarray(frame), strength=1.0, timesteps=[t], guidance_scale=0.0,
                   generator=torch.Generator().manual_seed(4), output_type="np").images[0]
    assert _max_diff(out, _np_uint8(want)) <= 1


def test_sdxl_similarity_filter_and_fp16_vae_upcast():
    from paradiff import StreamPipeline
    from support.models import tiny_taesd

    pipe = _sdxl(torch.float16, seed=2)
    assert pipe.vae.config.force_upcast and pipe.vae.dtype == torch.float16
    stream = StreamPipeline(pipe, [30, 45], guidance="self", similarity_filter=0.9, max_skip_frames=3,
                            filter_on_host=False)
    assert stream.vae_dtype == torch.float32 and pipe.vae.dtype == torch.float32  # SDXL's VAE overflows in fp16
    stream.prepare("a circle")
    frame = torch.from_numpy(_frames(1, 1, seed=6)[0][0])
    with NoScalarReads():
        outs = [stream(frame).clone() for _ in range(6)]
    assert stream.stats() == {"frames": 6, "skipped": 4}  # skip 3 in a row (the most), refresh, skip again
    assert all(torch.isfinite(o.float()).all() for o in outs) and outs[0].float().std() > 0
    tiny = StreamPipeline(pipe.to(torch.float16), [30, 45], tiny_vae=tiny_taesd().half())
    assert tiny.vae_dtype == torch.float16  # TAESDXL needs no upcast


def test_sdxl_without_pooled_embeddings_is_one_error(sdxl32):
    from diffusers import StableDiffusionPipeline

    from paradiff import StreamPipeline

    no_second = StableDiffusionPipeline(vae=sdxl32.vae, text_encoder=sdxl32.text_encoder, tokenizer=sdxl32.tokenizer,
                                        unet=sdxl32.unet, scheduler=sdxl32.scheduler, safety_checker=None,
                                        feature_extractor=None, requires_safety_checker=False)
    with pytest.raises(UserError, match="no text_encoder_2 to make the pooled embeddings"):
        StreamPipeline(no_second, [30])

    class NoPooled:  # an SDXL-like pipe whose encode_prompt gives no pooled embeddings
        def __init__(self, pipe):
            self.__dict__.update(unet=pipe.unet, vae=pipe.vae, scheduler=pipe.scheduler,
                                 text_encoder_2=pipe.text_encoder_2, _pipe=pipe)

        def encode_prompt(self, **kwargs):
            cond, uncond, _, _ = self._pipe.encode_prompt(**kwargs)
            return cond, uncond, None, None

    with pytest.raises(UserError, match="gave no pooled text embeddings"):
        StreamPipeline(NoPooled(sdxl32), [30]).prepare("a circle")
