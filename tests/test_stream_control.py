"""ControlNet in the stream step, on tiny random ControlNets: the stream batch against diffusers' ControlNet run one
frame at a time (each frame keeps its own map through the buffer), against diffusers' ControlNet pipelines (one net,
MultiControlNet, SDXL), live scales, the on-device preprocessors, and the bad inputs."""

import numpy as np
import pytest
import torch

from paradiff.errors import UserError
from test_stream import T_INDEX, NoScalarReads, _direct, _frames, _max_diff

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sd64():
    from support.models import tiny_stream_pipeline

    return tiny_stream_pipeline("lcm", "epsilon", dtype=torch.float64)


@pytest.fixture(scope="module")
def sd32():
    from support.models import tiny_stream_pipeline

    return tiny_stream_pipeline("lcm", "epsilon", seed=1)


def _net(pipe, seed=0):
    from paradiff.stream.tiny import tiny_controlnet

    return tiny_controlnet(pipe.unet, seed)


def _maps(n, f, seed=0):
    """n calls of f control images: random blocks, so maps that got mixed up between frames show."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 2, (n, f, 8, 8, 1)) * 255
    return [np.repeat(np.repeat(np.repeat(b, 8, 1), 8, 2), 3, 3).astype(np.uint8) for b in blocks]


def _as_float(maps):
    return [[torch.from_numpy(m).permute(2, 0, 1)[None].double() / 255 for m in call] for call in maps]


@pytest.mark.parametrize("mode", ["none", "self", "initialize", "full"])
def test_controlnet_stream_batch_equals_diffusers_controlnet_per_frame(sd64, mode):
    from paradiff import StreamPipeline

    f, k = 2, len(T_INDEX)
    frames, maps = _frames(4, f), _maps(4, f)
    net = _net(sd64)
    stream = StreamPipeline(sd64, T_INDEX, guidance=mode, delta=0.8, frame_buffer_size=f, warm_start=False,
                            controlnet=net, controlnet_scale=0.8)
    stream.prepare("a red circle", negative_prompt="green", guidance_scale=1.7, seed=3)
    with NoScalarReads():
        stream(torch.from_numpy(frames[0]), control_image=torch.from_numpy(maps[0]))
    stream.reset()
    outs = [stream(fr, control_image=m) for fr, m in zip(frames, maps)]
    want = _direct(sd64, frames, T_INDEX, mode, stream._noise, 1.7, 0.8, ["a red circle"] * 2, ["green"] * 2,
                   control=(net, _as_float(maps), 0.8))
    for c in range(k - 1, len(frames)):
        assert _max_diff(outs[c], want[c - (k - 1)]) <= 1, (mode, c)
    plain = _direct(sd64, frames[:1], T_INDEX, mode, stream._noise, 1.7, 0.8, ["a red circle"] * 2, ["green"] * 2)
    assert _max_diff(plain[0], want[0]) > 2  # the ControlNet does change the frames


def _diffusers_txt2img(pipe, nets, images, scale, noise, t, prompt="a red circle", negative="green"):
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline
    from PIL import Image

    cls = StableDiffusionXLControlNetPipeline if hasattr(pipe, "text_encoder_2") else StableDiffusionControlNetPipeline
    cn_pipe = cls.from_pipe(pipe, controlnet=nets if len(nets) > 1 else nets[0])
    control = [Image.fromarray(m) for m in images] if len(nets) > 1 else Image.fromarray(images[0])
    out = cn_pipe(prompt, negative_prompt=negative, image=control,
                  controlnet_conditioning_scale=scale if len(nets) > 1 else scale[0],
                  guidance_scale=1.7, timesteps=[t], latents=noise.clone(), output_type="np").images[0]
    return (out * 255).round().astype(np.uint8)


def _unet_outputs(unet):
    """The UNet's noise predictions, call by call (the images of a toy model show only a few levels of them)."""
    outs = []
    handle = unet.register_forward_hook(lambda module, args, out: outs.append(out[0].detach().clone()))
    return outs, handle


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_controlnet_txt2img_equals_diffusers_pipelines_and_scales_live(sd32, family):
    """One LCM step with full CFG against StableDiffusion(XL)ControlNetPipeline: the same noise predictions (float
    tolerance) and images, for MultiControlNet (SD) and SDXL's added conditioning reaching the ControlNet."""
    from paradiff import StreamPipeline
    from paradiff.stream.tiny import tiny_pipeline

    pipe = sd32 if family == "sd" else tiny_pipeline("lcm", family="sdxl", seed=2)
    nets = [_net(pipe, 0), _net(pipe, 1)] if family == "sd" else [_net(pipe, 0)]
    maps = [m[0] for m in _maps(len(nets), 1, seed=1)]
    stream = StreamPipeline(pipe, [30], guidance="full", controlnet=nets, controlnet_scale=[0.7, 1.3][:len(nets)])
    stream.prepare("a red circle", negative_prompt="green", guidance_scale=1.7, seed=3)
    control = maps if len(nets) > 1 else maps[0]
    t = int(stream.schedule.timesteps[0])  # one LCM step from noise at a late t, where the control shows
    eps, handle = _unet_outputs(pipe.unet)
    try:
        for scales in ([0.7, 1.3], [0.0, 2.0]):
            scales = scales[:len(nets)]
            stream.set_controlnet_scale(scales)  # live: in place, no rebuild
            assert stream.controlnet_scale == scales
            ours = stream.txt2img(control_image=control)[0].numpy()
            assert _max_diff(ours, _diffusers_txt2img(pipe, nets, maps, scales, stream._noise[:1], t)) <= 1
            torch.testing.assert_close(eps[-2], eps[-1])
    finally:
        handle.remove()
    assert (eps[0] - eps[2]).abs().max() > 100 * (eps[0] - eps[1]).abs().max()  # the scales did change it


def test_a_controlnet_pipeline_brings_its_controlnet(sd32):
    from diffusers import StableDiffusionControlNetPipeline

    from paradiff import StreamPipeline

    net = _net(sd32)
    stream = StreamPipeline(StableDiffusionControlNetPipeline.from_pipe(sd32, controlnet=net), [30])
    assert stream.control is not None and stream.control.nets == [net]


def test_preprocessors_run_in_the_step_and_match_kornia(sd32, monkeypatch):
    import importlib

    import kornia

    from paradiff import StreamPipeline
    from paradiff.stream.control import canny

    frames = _frames(3, 1, seed=4)
    net = _net(sd32)
    derived = StreamPipeline(sd32, [30, 45], controlnet=net, control_preprocessor="canny", warm_start=False)
    given = StreamPipeline(sd32, [30, 45], controlnet=net, warm_start=False)
    for s in (derived, given):
        s.prepare("a star", seed=1)
    edges = canny()
    with monkeypatch.context() as patch:
        # kornia's blur checks its sigma on a tensor it makes on the host from Python numbers: a CPU read even on a
        # GPU stream (no sync, nothing captured), but a read NoScalarReads cannot tell from a device one on a CPU run
        patch.setattr(importlib.import_module("kornia.filters.gaussian"), "is_compiling", lambda: True)
        with NoScalarReads():
            out = [derived(torch.from_numpy(fr)).clone() for fr in frames]
    for fr, mine in zip(frames, out):
        batch = torch.from_numpy(fr).permute(0, 3, 1, 2).float() / 255
        control = (edges(batch) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)  # edges are 0 or 1: exact
        assert _max_diff(given(torch.from_numpy(fr), control_image=control).numpy(), mine.numpy()) == 0
    # one fixed round of hysteresis is kornia's full Canny where every edge touches a strong one (a square)
    square = torch.zeros(1, 3, 64, 64)
    square[:, :, 16:48, 16:48] = 1
    _, full = kornia.filters.canny(square, 0.4, 0.8)
    assert full.sum() > 0 and torch.equal(edges(square)[:, :1], full)
    sobel = StreamPipeline(sd32, [30], controlnet=[net, _net(sd32, 1)], control_preprocessor=["sobel", None])
    sobel.prepare("a star")
    with NoScalarReads():
        assert sobel(frames[0][0], control_image=[None, _maps(1, 1)[0][0]]).shape == (64, 64, 3)


def test_controlnet_bad_inputs(sd32):
    from paradiff import StreamPipeline
    from paradiff.stream.tiny import tiny_controlnet, tiny_pipeline

    net = _net(sd32)
    frame = _frames(1, 1)[0][0]
    s = StreamPipeline(sd32, [30], controlnet=net)
    s.prepare("a star")
    with pytest.raises(UserError, match="control image is 32x64 .* set up for 64x64"):
        s(frame, control_image=np.zeros((32, 64, 3), np.uint8))
    with pytest.raises(UserError, match="control images must be HxWx3"):
        s(frame, control_image=np.zeros((64, 64), np.uint8))
    with pytest.raises(UserError, match="control images must be uint8"):
        s(frame, control_image=np.zeros((64, 64, 3), np.float32))
    with pytest.raises(UserError, match=r"controlnet\[0\] needs a control image"):
        s(frame)
    with pytest.raises(UserError, match="txt2img with a ControlNet needs control_image"):
        s.txt2img()
    assert s(frame, control_image=frame).shape == (64, 64, 3)  # still fine after the rejected calls
    two = StreamPipeline(sd32, [30], controlnet=[net, net], control_preprocessor="canny")
    two.prepare("a star")
    with pytest.raises(UserError, match="list of 2 entries"):
        two(frame, control_image=frame)
    with pytest.raises(UserError, match=r"one number per ControlNet \(2\)"):
        two.set_controlnet_scale([1.0])
    plain = StreamPipeline(sd32, [30])
    plain.prepare("a star")
    with pytest.raises(UserError, match="no ControlNet"):
        plain(frame, control_image=frame)
    with pytest.raises(UserError, match="no ControlNet"):
        plain.set_controlnet_scale(1.0)
    with pytest.raises(UserError, match="needs a controlnet"):
        StreamPipeline(sd32, [30], control_preprocessor="canny")
    with pytest.raises(UserError, match="control_preprocessor must be one of"):
        StreamPipeline(sd32, [30], controlnet=net, control_preprocessor="depth")
    with pytest.raises(UserError, match="trained for another model family"):
        StreamPipeline(sd32, [30], controlnet=tiny_controlnet(tiny_pipeline(family="sdxl").unet))



def test_a_compiled_stream_runs_its_preprocessor_compiled_with_the_same_maps(sd32):
    """With compile on, the Canny preprocessor runs under torch.compile too (eager, it is a few dozen
    full-resolution float32 kernels in the step's graph), one function per setting so streams share its code;
    the frames equal the uncompiled stream's."""
    from paradiff import StreamPipeline
    from paradiff.stream import control

    assert control.canny() is control.canny() and control.canny(0.2, 0.5) is not control.canny()
    frames = _frames(2, 1, seed=4)
    net = _net(sd32)
    out = []
    for compile in (False, {"backend": "eager"}):
        stream = StreamPipeline(sd32, [30, 45], controlnet=net, control_preprocessor="canny", warm_start=False,
                                compile=compile)
        stream.prepare("a star", seed=1)
        out.append([stream(torch.from_numpy(fr)).clone() for fr in frames])
    pre = stream.control.preprocessors[0]
    assert getattr(pre, "_torchdynamo_orig_callable", None) is control.canny()
    assert all(_max_diff(a.numpy(), b.numpy()) <= 1 for a, b in zip(*out))
