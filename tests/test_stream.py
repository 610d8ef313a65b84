"""StreamPipeline on tiny random-weight pipes: the batched stream against a plain per-frame computation of the
same math (stream batch order and lag, RCFG self/onetime/full, v-prediction), warm start, prompts, bad input."""

import numpy as np
import pytest
import torch
import torch.utils._python_dispatch

from paradiff.errors import UserError

torch.set_num_threads(1)

T_INDEX = [30, 38, 45]  # 3 steps of a 50-step LCM schedule (late enough that the input shows through)


class NoScalarReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on any device-to-host scalar read (`aten._local_scalar_dense`: what `.item()`, `bool(t)` and indexing
    with a 0-dim tensor dispatch to). Such a read stalls the CPU on a GPU and cannot be captured in a CUDA graph."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("host sync (tensor -> Python scalar) in the stream step")
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def lcm_pipe():
    from support.models import tiny_stream_pipeline

    return tiny_stream_pipeline("lcm", "epsilon", dtype=torch.float64)  # exact comparisons


@pytest.fixture(scope="module")
def euler_v_pipe():
    from support.models import tiny_stream_pipeline

    return tiny_stream_pipeline("euler", "v_prediction", seed=1, dtype=torch.float64)


def _frames(n, f, size=64, seed=0):
    """n calls of f frames: each frame a different flat colour plus noise, so mixing frames up shows."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (n, f, 1, 1, 3))
    return [np.clip(c + rng.integers(-20, 21, (f, size, size, 3)), 0, 255).astype(np.uint8) for c in colours]


@torch.no_grad()
def _direct(pipe, frames, t_index, mode, noise, scale, delta, prompt, negative, txt=False, vae=None, control=None):
    """One frame at a time, one UNet call per step (and per negative), straight from the paper's formulas.

    SDXL pipes get their added conditioning (pooled embeddings, time ids) as diffusers' pipelines make it;
    control=(controlnet, maps, scale) runs diffusers' ControlNet before each UNet call, maps[call][frame] being
    that frame's (1, 3, H, W) control map."""
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(50)
    ts = [int(round(float(sched.timesteps[i]))) for i in t_index]
    acp = sched.alphas_cumprod.double()
    a = [float(acp[t].sqrt()) for t in ts]
    b = [float((1 - acp[t]).sqrt()) for t in ts]
    if hasattr(sched, "get_scalings_for_boundary_condition_discrete"):
        cs, co = zip(*[map(float, sched.get_scalings_for_boundary_condition_discrete(t)) for t in ts])
    else:
        cs, co = [0.0] * len(ts), [1.0] * len(ts)
    v_pred = sched.config.prediction_type == "v_prediction"
    encoded = pipe.encode_prompt(prompt=prompt, device="cpu", num_images_per_prompt=1,
                                 do_classifier_free_guidance=True, negative_prompt=negative)
    cond, uncond = encoded[:2]
    pooled = encoded[2:] if len(encoded) == 4 else None
    vae, k, f = vae or pipe.vae, len(ts), frames[0].shape[0]
    size = frames[0].shape[1:3]
    tiny = type(vae).__name__ == "AutoencoderTiny"

    def eps(x, j, emb, p=0, c=0, neg=False):
        kwargs = {}
        if pooled is not None:
            time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=x.dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled[1 if neg else 0][p % len(pooled[0])][None],
                                           "time_ids": time_ids}
        if control is not None:
            net, maps, cn_scale = control
            down, mid = net(x, ts[j], encoder_hidden_states=emb, controlnet_cond=maps[c][p], conditioning_scale=cn_scale,
                            return_dict=False, **kwargs)
            kwargs.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        out = pipe.unet(x, ts[j], encoder_hidden_states=emb, **kwargs).sample
        return a[j] * out + b[j] * x if v_pred else out

    results = []
    for c, batch in enumerate(frames):
        outs = []
        for p in range(f):
            if txt:
                x0_in = torch.zeros_like(noise[:1])
                x = noise[p:p + 1]
            else:
                img = torch.from_numpy(batch[p]).permute(2, 0, 1)[None].to(noise.dtype) / 127.5 - 1
                encoded_img = vae.encode(img)
                x0_in = (encoded_img.latents if tiny else encoded_img.latent_dist.mode()) * vae.config.scaling_factor
                x = a[0] * x0_in + b[0] * noise[p:p + 1]
            x_neg = x0_in
            c_p, u_p = cond[p % len(cond)][None], uncond[p % len(uncond)][None]
            for j in range(k):
                e_c = eps(x, j, c_p, p, c)
                if mode == "none":
                    e = e_c
                else:
                    if mode == "full":
                        e_u = eps(x, j, u_p, p, c, neg=True)
                    else:
                        if mode == "initialize" and j == 0:
                            x_neg = (x - b[0] * eps(x, 0, u_p, p, c, neg=True)) / a[0]
                        e_u = delta * (x - a[j] * x_neg) / b[j]
                    e = e_u + scale * (e_c - e_u)
                x0 = co[j] * (x - b[j] * e) / a[j] + cs[j] * x
                if j + 1 < k:
                    x = a[j + 1] * x0 + b[j + 1] * noise[(j + 1) * f + p:(j + 1) * f + p + 1]
            img = vae.decode(x0 / vae.config.scaling_factor).sample
            outs.append(((img[0] + 1) * 127.5).clamp(0, 255).round().permute(1, 2, 0).to(torch.uint8).numpy())
        results.append(np.stack(outs))
    return results


def _max_diff(x, y):
    return int(np.abs(x.astype(np.int16) - y.astype(np.int16)).max())


@pytest.mark.parametrize("mode", ["none", "self", "initialize", "full"])
def test_stream_batch_equals_per_frame_computation(lcm_pipe, mode):
    check_stream_batch(lcm_pipe, mode)


def check_stream_batch(pipe, mode):
    """A 3-step stream of 2 frames per call against `_direct`, lag included (also used by the SDXL tests)."""
    from paradiff import StreamPipeline

    f, k = 2, len(T_INDEX)
    frames = _frames(4, f)
    stream = StreamPipeline(pipe, T_INDEX, guidance=mode, delta=0.8, frame_buffer_size=f, warm_start=False)
    stream.prepare(["a red circle", "a blue square"], negative_prompt="green", guidance_scale=1.7, seed=3)
    with NoScalarReads():  # capturable in a CUDA graph: no scalar reads anywhere in the step
        stream.txt2img() if mode == "full" else stream(torch.from_numpy(frames[0]))
    stream.reset()
    outs = [stream(fr) for fr in frames]
    want = _direct(pipe, frames, T_INDEX, mode, stream._noise, 1.7, 0.8, ["a red circle", "a blue square"],
                   ["green", "green"])
    # call c gives back the frames of call c-(k-1): a lag of k-1 calls
    for c in range(k - 1, len(frames)):
        assert _max_diff(outs[c], want[c - (k - 1)]) <= 1, (mode, c)
    # the frames in flight were really different: the lag is visible
    assert _max_diff(want[0], want[1]) > 10


def test_v_prediction_euler_self_guidance_single_frame(euler_v_pipe):
    from paradiff import StreamPipeline

    frames = [fr[0] for fr in _frames(3, 1, seed=1)]
    stream = StreamPipeline(euler_v_pipe, [20, 40], guidance="self", warm_start=False)
    stream.prepare("a star", guidance_scale=1.4, seed=5)
    outs = [stream(fr) for fr in frames]
    assert outs[0].shape == (64, 64, 3) and outs[0].dtype == np.uint8
    want = _direct(euler_v_pipe, [fr[None] for fr in frames], [20, 40], "self", stream._noise, 1.4, 1.0, "a star", "")
    assert _max_diff(outs[1], want[0][0]) <= 1
    assert _max_diff(outs[2], want[1][0]) <= 1


def test_txt2img_stream_equals_direct(lcm_pipe):
    from paradiff import StreamPipeline

    stream = StreamPipeline(lcm_pipe, [0, 25], guidance="self", frame_buffer_size=2)
    stream.prepare("a yellow star", guidance_scale=1.3, seed=7)
    first = stream.txt2img().clone()
    assert first.shape == (2, 64, 64, 3) and first.dtype == torch.uint8
    want = _direct(lcm_pipe, [np.zeros((2, 64, 64, 3), np.uint8)], [0, 25], "self", stream._noise, 1.3, 1.0,
                   ["a yellow star"] * 2, [""] * 2, txt=True)
    assert _max_diff(first.numpy(), want[0]) <= 1  # warm start: the very first images are complete
    with pytest.raises(UserError, match="frame_buffer_size"):
        stream.txt2img(batch=3)


def test_warm_start_gives_a_finished_first_frame(lcm_pipe):
    from paradiff import StreamPipeline

    frames = _frames(1, 1, seed=2)
    want = _direct(lcm_pipe, frames, T_INDEX, "none", None or _noise_of(lcm_pipe), 1.0, 1.0, "a circle", "")
    cold = StreamPipeline(lcm_pipe, T_INDEX, warm_start=False)
    cold.prepare("a circle")
    warm = StreamPipeline(lcm_pipe, T_INDEX)
    warm.prepare("a circle")
    assert _max_diff(warm(frames[0][0]), want[0][0]) <= 1
    assert _max_diff(cold(frames[0][0]), want[0][0]) > 10  # an empty buffer gives a meaningless first frame


def _noise_of(pipe):
    from paradiff import StreamPipeline

    s = StreamPipeline(pipe, T_INDEX)
    s.prepare("a circle")
    return s._noise


def test_update_prompt_keeps_negative_and_matches_a_fresh_stream(lcm_pipe):
    from paradiff import StreamPipeline

    frame = _frames(1, 1, seed=4)[0][0]
    for mode in ("full", "initialize"):
        s = StreamPipeline(lcm_pipe, [20, 40], guidance=mode)
        s.prepare("a red circle", negative_prompt="blurry", guidance_scale=2.0)
        before = s(frame).copy()
        s.update_prompt("a green star")
        cond, uncond = lcm_pipe.encode_prompt("a green star", "cpu", 1, True, negative_prompt="blurry")
        rows = s._emb
        assert torch.equal(rows[-1], cond[0]) and torch.equal(rows[0], uncond[0])
        s.reset()
        after = s(frame)
        fresh = StreamPipeline(lcm_pipe, [20, 40], guidance=mode)
        fresh.prepare("a green star", negative_prompt="blurry", guidance_scale=2.0)
        assert _max_diff(after, fresh(frame)) == 0
        assert _max_diff(after, before) > 0


def test_frame_kinds_and_bad_inputs(lcm_pipe):
    from PIL import Image

    from paradiff import StreamPipeline

    s = StreamPipeline(lcm_pipe, [20, 40])
    with pytest.raises(UserError, match="prepare"):
        s(np.zeros((64, 64, 3), np.uint8))
    s.prepare("a circle")
    assert isinstance(s(Image.new("RGB", (64, 64), "red")), Image.Image)
    out = s(torch.zeros(64, 64, 3, dtype=torch.uint8))
    assert isinstance(out, torch.Tensor) and out.shape == (64, 64, 3)
    with pytest.raises(UserError, match="48x64 .* set up for 64x64"):
        s(np.zeros((48, 64, 3), np.uint8))
    with pytest.raises(UserError, match="HxWx3"):
        s(np.zeros((64, 64, 4), np.uint8))
    with pytest.raises(UserError, match="uint8"):
        s(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(UserError, match="takes 1 per call"):
        s(np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(UserError, match="empty list"):
        s.prepare([])
    with pytest.raises(UserError, match="empty list"):
        s.update_prompt([])
    with pytest.raises(UserError, match="outside the schedule"):
        StreamPipeline(lcm_pipe, [20, 50])
    with pytest.raises(UserError, match="strictly increasing"):
        StreamPipeline(lcm_pipe, [40, 20])
    with pytest.raises(UserError, match="guidance must be one of"):
        StreamPipeline(lcm_pipe, [20], guidance="cfg")
    with pytest.raises(UserError, match="similarity_filter"):
        StreamPipeline(lcm_pipe, [20], similarity_filter=1.5)
    with pytest.raises(UserError, match="one per frame"):
        StreamPipeline(lcm_pipe, [20], frame_buffer_size=2).prepare(["a", "b", "c"])


def test_engine_options_keep_the_frames(lcm_pipe):
    """channels-last, a pinned attention backend and the whole step compiled give the default step's frames."""
    import copy

    from paradiff import StreamPipeline

    frames = _frames(3, 1, seed=7)
    plain = StreamPipeline(lcm_pipe, [30, 45], guidance="self")
    plain.prepare("a circle", seed=1)
    want = [plain(fr[0]) for fr in frames]
    pipe = copy.deepcopy(lcm_pipe)  # channels-last changes the modules' memory format in place
    fast = StreamPipeline(pipe, [30, 45], guidance="self", channels_last=True, attention="math",
                          compile={"backend": "eager"}, compile_scope="step")
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    fast.prepare("a circle", seed=1)
    for fr, w in zip(frames, want):
        assert _max_diff(fast(fr[0]), w) <= 1
    # compiled kernels assert the weights' strides: channels-last modules must not reuse contiguous ones' code
    from paradiff.stream import engine

    assert engine.weight_layout([pipe.unet]) != engine.weight_layout([lcm_pipe.unet])
    per_module = [StreamPipeline(p, [30, 45], compile={"backend": "eager"}) for p in (lcm_pipe, pipe)]
    assert per_module[0]._unet_fn is not per_module[1]._unet_fn
    assert StreamPipeline(lcm_pipe, [30], compile={"backend": "eager"})._unet_fn is per_module[0]._unet_fn
    with pytest.raises(UserError, match="attention must be one of"):
        StreamPipeline(lcm_pipe, [30], attention="fast")
    with pytest.raises(UserError, match="compile_scope must be one of"):
        StreamPipeline(lcm_pipe, [30], compile_scope="all")
    with pytest.raises(UserError, match="float8=True needs"):
        StreamPipeline(pipe, [30], float8=True)


def test_fused_qkv_projections_keep_the_frames_and_refuse_unfused_loras(lcm_pipe):
    """fuse_qkv=True (diffusers' fused projections, one GEMM per attention input) gives the same frames, gets its
    own compiled code, and refuses projections that carry LoRA adapters, which fusing would silently drop."""
    import copy

    from paradiff import StreamPipeline
    from paradiff.stream import engine

    frames = _frames(3, 1, seed=3)
    plain = StreamPipeline(lcm_pipe, [30, 45], guidance="self")
    plain.prepare("a square", seed=4)
    want = [plain(fr[0]) for fr in frames]
    pipe = copy.deepcopy(lcm_pipe)
    fused = StreamPipeline(pipe, [30, 45], guidance="self", fuse_qkv=True)
    assert engine.is_fused(pipe.unet) and not engine.is_fused(lcm_pipe.unet)
    assert type(next(iter(pipe.unet.attn_processors.values()))).__name__ == "FusedAttnProcessor2_0"
    fused.prepare("a square", seed=4)
    for fr, w in zip(frames, want):
        assert _max_diff(fused(fr[0]), w) <= 1
    assert engine.weight_layout([pipe.unet]) != engine.weight_layout([lcm_pipe.unet])
    StreamPipeline(pipe, [30], fuse_qkv=True)  # already fused: left as it is
    # channels-last is on by default where it was measured to help (CUDA), off elsewhere
    assert engine.on_for(None, "cuda") and not engine.on_for(None, "cpu") and not engine.on_for(False, "cuda")
    assert lcm_pipe.unet.conv_in.weight.is_contiguous()  # default streams on the CPU left it as it was
    from peft import LoraConfig

    lora = copy.deepcopy(lcm_pipe)
    lora.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"]))
    with pytest.raises(UserError, match="fuse_qkv=True cannot fuse projections that carry LoRA"):
        StreamPipeline(lora, [30], fuse_qkv=True)
    added = copy.deepcopy(lcm_pipe)  # diffusers refuses to fuse added K/V projections: one clear error
    from diffusers.models.attention_processor import AttnAddedKVProcessor2_0

    added.unet.set_attn_processor(AttnAddedKVProcessor2_0())
    with pytest.raises(UserError, match="cannot fuse its projections"):
        StreamPipeline(added, [30], fuse_qkv=True)


def test_modules_converted_in_place_get_code_compiled_for_their_new_layout():
    """dynamo can skip parameter guards while a module's parameter dict is unchanged (torch 2.11 on the H200 did;
    2.13 here does not), and channels-last converts the weights in place: a stream built after the conversion
    must compile code of its own, not replay kernels that assert the old strides. Each layout gets its own code
    object, so no guard is relied on; a counting backend sees each compilation."""
    from paradiff.execution import Execution
    from paradiff.stream import engine
    from paradiff.stream.pipeline import _compiled

    compiled = []

    def backend(graph, example_inputs):
        compiled.append([tuple(x.stride()) for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() == 4])
        return graph.forward

    def apply(module, x):
        return module(x) + 1

    module = torch.nn.Conv2d(3, 4, 3)
    execution = Execution({"backend": backend})
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        before = _compiled(apply, execution, engine.weight_layout([module]))
        want = before(module, x)
        assert _compiled(apply, execution, engine.weight_layout([module])) is before  # the same layout: reused
        module.to(memory_format=torch.channels_last)
        after = _compiled(apply, execution, engine.weight_layout([module]))
        got = after(module, x)
    assert after is not before and len(compiled) == 2
    assert after._torchdynamo_orig_callable.__code__ is not before._torchdynamo_orig_callable.__code__
    assert compiled[0] != compiled[1]  # the second graph saw the channels-last weight
    assert torch.allclose(got, want, atol=1e-6)
