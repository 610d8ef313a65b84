"""LoRA in a stream, with small LoRAs made here (peft LoraConfig on the tiny UNet, saved with save_lora_weights,
loaded with load_lora_weights): a LoRA loaded before the stream runs (fused or not, as diffusers computes it), and
swapping it or changing its scale (or the prompt, the guidance or the ControlNet scale) while streaming neither
recompiles (a counting torch.compile backend) nor re-captures (the graph runner's seam, CUDA parts replaced)."""

import numpy as np
import pytest
import torch

from paradiff.errors import UserError
from test_stream import _max_diff

torch.set_num_threads(1)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _pipe(seed=0):
    from support.models import tiny_stream_pipeline

    return tiny_stream_pipeline("lcm", "epsilon", seed=seed)


def _make_lora(path, seed, rank=4, alpha=8, other=False):
    """A random LoRA for the tiny UNet (both matrices random: a fresh LoRA is a no-op), saved the diffusers way;
    other=True: for a UNet of other widths (a LoRA made for another model)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from paradiff.stream.tiny import tiny_pipeline
    from support.models import tiny_unet

    unet = tiny_unet("sd") if other else tiny_pipeline().unet
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False))
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(str(path), unet_lora_layers=layers, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {"a": _make_lora(root / "a", 1), "b": _make_lora(root / "b", 2), "other": _make_lora(root / "other", 3, other=True)}


def _eps_recorder(unet):
    outs = []
    handle = unet.register_forward_hook(lambda module, args, out: outs.append(out[0].detach().clone()))
    return outs, handle


def _txt(pipe, scale=None, **kwargs):
    """A plain eager stream's UNet output and image (one LCM step at a late t) for `pipe` as it is."""
    from paradiff import StreamPipeline

    stream = StreamPipeline(pipe, [30], **kwargs)
    stream.prepare("a red circle", seed=3)
    eps, handle = _eps_recorder(pipe.unet)
    try:
        image = stream.txt2img().clone()
    finally:
        handle.remove()
    return eps[-1], image


def test_lora_loaded_before_the_stream_runs_fused_or_not(loras):
    t = None
    base_eps, _ = _txt(_pipe())
    pipe = _pipe()
    pipe.load_lora_weights(loras["a"], adapter_name="a")
    eps, image = _txt(pipe)
    # what diffusers' own pipeline computes with this LoRA: one LCM step from the same noise at the same t
    from paradiff import StreamPipeline

    t = int(StreamPipeline(pipe, [30]).schedule.timesteps[0])
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    want, handle = _eps_recorder(pipe.unet)
    try:
        ref = pipe("a red circle", timesteps=[t], latents=noise, guidance_scale=0.0, output_type="np").images[0]
    finally:
        handle.remove()
    torch.testing.assert_close(eps, want[-1])
    assert _max_diff(image[0].numpy(), (ref * 255).round().astype(np.uint8)) <= 1
    assert (eps - base_eps).abs().max() > 0.01  # the LoRA does change the UNet
    pipe.fuse_lora()
    fused_eps, _ = _txt(pipe)
    torch.testing.assert_close(fused_eps, eps, rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="fused into the UNet"):
        StreamPipeline(pipe, [30]).set_lora_scale(0.5)


def _fake_graphs(monkeypatch):
    """Turn on the graph runner on the CPU with its CUDA parts replaced; count captures."""
    from paradiff.execution import Execution, GraphRunner

    captures = []

    class Graph:
        def __init__(self, fn, args, kwargs, out):
            self.fn, self.args, self.kwargs, self.out = fn, args, kwargs, out

        def replay(self):
            torch.utils._pytree.tree_map(lambda a, b: a.copy_(b) if isinstance(a, torch.Tensor) else a, self.out,
                                         self.fn(*self.args, **self.kwargs))

    def record(self, args, kwargs):
        captures.append(self.name)
        out = self.fn(*args, **kwargs)
        return Graph(self.fn, args, kwargs, out), out

    monkeypatch.setattr(Execution, "graphs_on", lambda self, device: True)
    monkeypatch.setattr(GraphRunner, "_on_gpu", staticmethod(lambda flat: True))
    monkeypatch.setattr(GraphRunner, "_eager_on_side_stream", lambda self, args, kwargs: self.fn(*args, **kwargs))
    monkeypatch.setattr(GraphRunner, "_record", record)
    return captures


def test_lora_swap_and_scale_live_without_recompile_or_recapture(loras, monkeypatch):
    from torch._dynamo.testing import CompileCounter

    from paradiff import StreamPipeline
    from paradiff.stream.tiny import tiny_controlnet

    pipe = _pipe()
    pipe.load_lora_weights(loras["a"], adapter_name="a")
    net = tiny_controlnet(pipe.unet)
    captures = _fake_graphs(monkeypatch)
    counter = CompileCounter()
    stream = StreamPipeline(pipe, [30, 45], guidance="self", controlnet=net, control_preprocessor="sobel",
                            compile={"backend": counter})
    stream.prepare("a red circle", seed=3)
    frame = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    latest = torch.zeros(2, 4, 8, 8)  # a fixed buffer, not a growing list: the hook is compiled into the step too
    handle = pipe.unet.register_forward_hook(lambda module, args, out: latest.copy_(out[0]))

    def last_eps():
        stream.reset()
        stream(frame)  # warm start (one step) + the call: the second UNet call is the frame's last step
        return latest.clone()

    try:
        stream(frame)  # the runner's two warm-up calls were the first call's (warm start + frame); this one captures
        before = last_eps()
        compiles, captured = counter.frame_count, len(captures)
        assert compiles > 0 and captured == 1 and stream._img2img.replays > 0
        stream.set_lora_scale(0.5)
        half = last_eps()
        stream.load_lora(loras["b"])  # hot-swap into adapter "a"'s tensors; keeps the scale
        swapped = last_eps()
        stream.set_lora_scale(1.0)
        stream.update_prompt("a blue square")
        stream.set_guidance_scale(1.5)
        stream.set_controlnet_scale(0.3)
        last_eps()
    finally:
        handle.remove()
    assert counter.frame_count == compiles and len(captures) == captured  # no recompile, no re-capture
    monkeypatch.undo()

    def reference(lora, scale):  # a fresh pipe, the LoRA loaded and scaled by diffusers, a plain eager stream
        ref = _pipe()
        ref.load_lora_weights(lora, adapter_name="x")
        ref.set_adapters(["x"], adapter_weights=[scale])
        s = StreamPipeline(ref, [30, 45], guidance="self", controlnet=net, control_preprocessor="sobel")
        s.prepare("a red circle", seed=3)
        out, h = _eps_recorder(ref.unet)
        s(frame)
        h.remove()
        return out[-1]

    torch.testing.assert_close(before, reference(loras["a"], 1.0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(half, reference(loras["a"], 0.5), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(swapped, reference(loras["b"], 0.5), rtol=1e-4, atol=1e-5)
    assert (half - before).abs().max() > 0.01 and (swapped - half).abs().max() > 0.01


def test_lora_bad_inputs(loras):
    from paradiff import StreamPipeline
    from paradiff.stream import lora as lora_mod

    pipe = _pipe()
    with pytest.raises(UserError, match="has no LoRA"):
        StreamPipeline(pipe, [30]).set_lora_scale(0.5)
    with pytest.raises(UserError, match="made for another model|does not match"):
        lora_mod.load(_pipe(), loras["other"])
    pipe.load_lora_weights(loras["a"], adapter_name="a")
    stream = StreamPipeline(pipe, [30])
    stream.prepare("a star")
    with pytest.raises(UserError, match="of shape .* made for another model"):
        stream.load_lora(loras["other"])
    with pytest.raises(UserError, match="no LoRA adapter 'b'"):
        stream.set_lora_scale(0.5, adapter="b")
    with pytest.raises(UserError, match="LoRA scale must be a number"):
        stream.set_lora_scale("high")
    assert stream(np.zeros((64, 64, 3), np.uint8)).shape == (64, 64, 3)  # still streaming
