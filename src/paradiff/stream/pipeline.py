"""`StreamPipeline`: real-time img2img / txt2img on one GPU with StreamDiffusion's stream batch and residual CFG.

Stream batch: with k = len(t_index_list) steps, one batched UNet call advances k frames at once, each at a
different step: the frame that just arrived is noised to the first timestep, the frames of the last k-1 calls sit
in a buffer at the later timesteps, and the oldest leaves fully denoised. So the output of call i is the input of
call i-(k-1): a lag of k-1 frames (times `frame_buffer_size` frames per call). Without a warm start the buffer
starts empty and the first k-1 outputs are meaningless (brown/blank); with `warm_start=True` (default) the first
call runs k-1 extra steps on its own frame, so every output is a fully denoised frame from the first one on.

Everything a step needs (prompt embeddings, per-row timesteps, alpha/beta, LCM c_skip/c_out, the fixed noise) is
put on the device in `prepare()`, and the step reads and updates only static buffers, so on a GPU the whole step
(uint8 frame in -> encode -> UNet -> decode -> uint8 frame out) is one CUDA-graph replay (`paradiff.execution`:
the runner and the compile policy every method shares).
The diffusers pipeline and its modules are used as they are; their code is not changed. What is changed in place,
said where it happens: on a CUDA GPU the modules' memory format becomes channels-last (the `channels_last`
default there; values unchanged); the opt-in engine options (`fuse_qkv`, `float8`) convert them; and a full SDXL
VAE in float16 is upcast to float32, as diffusers' own pipelines do, because it overflows in float16 (TAESDXL as
`tiny_vae` avoids it and is faster).

SDXL's added conditioning (`stream/conditioning.py`), ControlNets (`stream/control.py`) and LoRAs (`stream/lora.py`)
are prepared outside the step like everything else, so they add no host work and no re-capture when they change.
"""

from __future__ import annotations

import types
from typing import Any, Sequence

import torch

from paradiff.errors import UserError
from paradiff.execution import Execution
from paradiff.stream import conditioning
from paradiff.stream import engine
from paradiff.stream import frames as frames_mod
from paradiff.stream import lora as lora_mod
from paradiff.stream.control import Control
from paradiff.stream.guidance import check_mode, combine, virtual_residual
from paradiff.stream.schedule import build_schedule, denoise, to_epsilon
from paradiff.stream.similarity import SimilarityFilter


def _unet_eps(unet, x, t, emb, added=None, down=None, mid=None):
    return unet(x, t, encoder_hidden_states=emb, added_cond_kwargs=added, down_block_additional_residuals=down,
                mid_block_additional_residual=mid, return_dict=False)[0]


def _controlnet_residuals(model, x, t, emb, maps, scales, added=None):
    """diffusers' ControlNetModel / MultiControlNetModel call: (down-block residuals, mid-block residual)."""
    down, mid = model(x, t, encoder_hidden_states=emb, controlnet_cond=maps, conditioning_scale=scales,
                      added_cond_kwargs=added, return_dict=False)
    return list(down), mid


def _encode_latents(vae, images, tiny: bool):
    if tiny:
        return vae.encode(images).latents * vae.config.scaling_factor
    return vae.encode(images).latent_dist.mode() * vae.config.scaling_factor


def _decode_latents(vae, latents):
    return vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]


_COMPILED: dict = {}


def _compiled(fn, execution: Execution, assumed: tuple = ()):
    """One torch.compile'd wrapper per function, compile setting and `assumed` facts for the whole process, so
    streams built on the same modules (a prompt/size change, a benchmark's configurations) reuse compiled graphs;
    shapes are static (one graph per batch size) because the step is replayed from a CUDA graph anyway. The
    weight layout (`engine.weight_layout`) and the attention backend are in the key, and each key compiles its own
    copy of `fn`'s code: dynamo keeps compiled code per code object and skips the parameters' guards while a
    module's parameter dict is unchanged, which channels-last and float8 conversions (in place) leave it, so a
    second wrapper around the same code would run kernels that assert the old strides. A stream built before such
    a conversion cannot run after it."""
    key = (fn, repr(execution.compile), assumed)
    if key not in _COMPILED:
        first = not any(k[0] is fn for k in _COMPILED)
        _COMPILED[key] = execution.compiled(fn if first else _own_code(fn, len(_COMPILED)))
    return _COMPILED[key]


def _own_code(fn, tag: int):
    """`fn` with a code object of its own (same body, globals and closure), so dynamo compiles it afresh."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{tag}")
    copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__, copy.__qualname__ = fn.__kwdefaults__, f"{fn.__qualname__}_{tag}"
    return copy


def _vae_scale(vae, pipe) -> int:
    """Pixels per latent row of the VAE that is used (a tiny VAE's own, not the pipeline's)."""
    if type(vae).__name__ == "AutoencoderTiny":
        return int(vae.config.upsampling_scaling_factor) ** (len(vae.config.decoder_block_out_channels) - 1)
    return int(getattr(pipe, "vae_scale_factor", 8))


def _rows(values: torch.Tensor, per: int) -> torch.Tensor:
    """Per-step values -> per-batch-row values shaped (rows, 1, 1, 1) (row = step * per + frame)."""
    return values.repeat_interleave(per).view(-1, 1, 1, 1)


class StreamPipeline:
    """Wraps a StableDiffusion- or StableDiffusionXL-family `pipe` (SD 1.x/2.x, SD-Turbo, SDXL, SDXL-Turbo, LCM; a
    ControlNet pipeline brings its ControlNet) for frame-by-frame generation.

    stream = StreamPipeline(pipe, t_index_list=[32, 45], guidance="self")
    stream.prepare("a watercolor portrait", guidance_scale=1.2)
    out = stream(frame)            # uint8 HxWx3 in (PIL, numpy or torch), same kind out

    controlnet: a ControlNetModel or a list of them (or None: the pipe's own, if it has one); each frame's control map
    is `control_image=` given with the frame, or derived from it on the device by `control_preprocessor` ("canny",
    "sobel" or a callable; one per ControlNet, or one for all).
    """

    def __init__(
        self,
        pipe: Any,
        t_index_list: Sequence[int] = (32, 45),
        guidance: str = "none",
        delta: float = 1.0,
        frame_buffer_size: int = 1,
        similarity_filter: float | None = None,
        max_skip_frames: int = 10,
        tiny_vae: Any = None,
        *,
        num_inference_steps: int = 50,
        height: int | None = None,
        width: int | None = None,
        warm_start: bool = True,
        filter_on_host: bool | None = None,
        cuda_graph: bool | None = None,
        compile: bool | dict = False,
        controlnet: Any = None,
        control_preprocessor: Any = None,
        controlnet_scale: float | Sequence[float] = 1.0,
        channels_last: bool | None = None,
        attention: str | None = None,
        float8: bool = False,
        fuse_qkv: bool = False,
        compile_scope: str = "modules",
    ):
        for part in ("unet", "vae", "scheduler", "encode_prompt"):
            if getattr(pipe, part, None) is None:
                raise UserError(f"StreamPipeline needs a StableDiffusionPipeline-like pipe; this one has no {part}.")
        unet = pipe.unet
        self.family = conditioning.family_of(pipe)
        if not isinstance(frame_buffer_size, int) or frame_buffer_size < 1:
            raise UserError(f"frame_buffer_size must be a whole number >= 1, got {frame_buffer_size!r}.")
        self.pipe = pipe
        self.guidance = check_mode(guidance)
        self.delta = float(delta)
        self.frame_buffer_size = f = frame_buffer_size
        self.device = unet.device
        self.dtype = unet.dtype
        self.vae = tiny_vae if tiny_vae is not None else pipe.vae
        self.tiny = tiny_vae is not None or type(self.vae).__name__ == "AutoencoderTiny"
        if tiny_vae is not None:
            tiny_vae.to(self.device)
        if self.vae.config.latent_channels != unet.config.in_channels:
            raise UserError(
                f"the VAE makes {self.vae.config.latent_channels}-channel latents but the UNet takes "
                f"{unet.config.in_channels}; use a VAE of the same family (TAESD for SD 1.x/2.x, TAESDXL for SDXL)."
            )
        if (not self.tiny and self.vae.config.get("force_upcast", False)
                and next(self.vae.parameters()).dtype == torch.float16):
            self.vae.to(torch.float32)  # SDXL's VAE overflows in float16 (diffusers upcasts it the same way)
        self.vae_dtype = next(self.vae.parameters()).dtype
        scale = _vae_scale(self.vae, pipe)
        self.height = height or unet.config.sample_size * scale
        self.width = width or unet.config.sample_size * scale
        for name, side in (("height", self.height), ("width", self.width)):
            if side % 8 or side <= 0:
                raise UserError(f"{name} must be a positive multiple of 8, got {side}.")
        self.latent_shape = (unet.config.in_channels, self.height // scale, self.width // scale)
        self.t_index_list = list(t_index_list)
        self.schedule = build_schedule(pipe.scheduler, self.t_index_list, num_inference_steps, self.device, self.dtype)
        self.steps = k = self.schedule.steps
        self.batch = k * f
        self.warm_start = warm_start
        self.filter = self.host_filter = None
        if similarity_filter is not None:
            self.filter = SimilarityFilter(similarity_filter, max_skip_frames, (f, 3, self.height, self.width),
                                           self.device)
            # Frames that arrive in host memory (webcam, files, the web demo) are judged on the host, on every 4th
            # pixel: no GPU sync either, and a skipped frame then costs no GPU work at all.
            on_host = self.device.type != "cpu" if filter_on_host is None else filter_on_host
            if on_host:
                self.host_filter = SimilarityFilter(similarity_filter, max_skip_frames,
                                                    (f, 3, -(-self.height // 4), -(-self.width // 4)), "cpu")
        if controlnet is None:
            controlnet = getattr(pipe, "controlnet", None)
        self.control = None
        if controlnet is not None:
            self.control = Control(controlnet, control_preprocessor, controlnet_scale, unet, self.device, self.dtype)
        elif control_preprocessor is not None:
            raise UserError("control_preprocessor needs a controlnet (StreamPipeline(..., controlnet=...)).")
        self._fixed_control: list = [None] * (len(self.control) if self.control is not None else 0)
        self._lora_layers = lora_mod.lora_layers(unet)
        if self._lora_layers and not lora_mod.is_fused(self._lora_layers):
            lora_mod.scalings_to_tensors(self._lora_layers)  # live scales: no recompile, no re-capture
        engine.check(attention, compile_scope)  # speed options: stream/engine.py
        weighted = [unet, self.vae] + (self.control.nets if self.control is not None else [])
        if fuse_qkv:  # before float8: fusing concatenates plain weights
            engine.fuse_projections(weighted, self._lora_layers)
        if float8:
            engine.float8_linears(unet)
        if engine.on_for(channels_last, self.device):
            engine.to_channels_last(weighted)
        self._attention = engine.attention_context(attention)
        execution = Execution(compile, cuda_graph, graph_warmup=2)
        per_module = bool(compile) and compile_scope == "modules"
        # each attention backend gets its own compiled code too: a backend context around an already traced graph
        # is not something to rely on
        assumed = (engine.weight_layout(weighted), attention)
        self._unet_fn = _compiled(_unet_eps, execution, assumed) if per_module else _unet_eps
        self._control_fn = _compiled(_controlnet_residuals, execution, assumed) if per_module else _controlnet_residuals
        self._encode_fn = _compiled(_encode_latents, execution, assumed) if per_module else _encode_latents
        self._decode_fn = _compiled(_decode_latents, execution, assumed) if per_module else _decode_latents
        if per_module and self.control is not None:
            self.control.compile_preprocessors(lambda fn: _compiled(fn, execution, assumed))
        s = self.schedule
        self._a, self._b = _rows(s.alpha, f), _rows(s.beta, f)
        self._cskip, self._cout = _rows(s.c_skip, f), _rows(s.c_out, f)
        t = s.timesteps.repeat_interleave(f)
        self._t_unet = {"none": t, "self": t, "full": torch.cat([t, t]), "initialize": torch.cat([t[:f], t])}[guidance]
        steps = (self._img2img_step, self._txt2img_step)
        if compile and compile_scope == "step":  # one compiled graph per stream: pre/post-processing fuses too
            steps = tuple(execution.compiled(step) for step in steps)
        self._img2img = execution.runner(steps[0], self.device, name="StreamPipeline")
        self._txt2img = execution.runner(steps[1], self.device, name="StreamPipeline")
        self._prepared = False
        self._lora_scale: dict[str, float] = {}
        self.prompt: list[str] = []
        self.negative_prompt: list[str] = []

    # ----------------------------------------------------------------------------------------------- set up
    @torch.no_grad()
    def prepare(self, prompt: str | list[str], negative_prompt: str | list[str] = "", guidance_scale: float = 1.2,
                seed: int = 2) -> None:
        """Encode the prompt(s), draw the fixed noise, and empty the stream (the next call warm-starts).

        A list of prompts gives one prompt per frame of the buffer (length 1 or `frame_buffer_size`)."""
        f, k, (c, h, w) = self.frame_buffer_size, self.steps, self.latent_shape
        gen = torch.Generator("cpu").manual_seed(int(seed))
        self._noise = torch.randn((self.batch, c, h, w), generator=gen).to(self.device, self.dtype)
        self._lat = torch.zeros(((k - 1) * f, c, h, w), device=self.device, dtype=self.dtype)
        self._neg = torch.zeros_like(self._lat)
        self._in = torch.zeros((f, self.height, self.width, 3), device=self.device, dtype=torch.uint8)
        self._out = torch.zeros_like(self._in)
        n_control = len(self.control) if self.control is not None else 0
        self._ctrl_in = [torch.zeros_like(self._in) for _ in range(n_control)]  # given control images (uint8)
        self._ctrl = [torch.zeros(((k - 1) * f, 3, self.height, self.width), device=self.device, dtype=self.dtype)
                      for _ in range(n_control)]  # the control maps of the frames in flight
        self._scale = torch.tensor(float(guidance_scale), device=self.device, dtype=self.dtype)
        self._filter_on = torch.ones((), dtype=torch.bool, device=self.device)
        self._device_filter_state = True
        self._host_on = torch.ones((), dtype=torch.bool)
        self._emb = self._added = None
        self.prompt, self.negative_prompt = [], []
        self.update_prompt(prompt, negative_prompt)
        self._img2img.reset()
        self._txt2img.reset()
        self._prepared = True
        self.reset()

    def _prompt_list(self, prompt: Any, what: str) -> list[str]:
        f = self.frame_buffer_size
        items = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
        if items is None or any(not isinstance(p, str) for p in items):
            raise UserError(f"{what} must be a string or a list of strings, got {type(prompt).__name__}.")
        if not items:
            raise UserError(f"{what} is an empty list; give one string, or one per frame ({f}).")
        if len(items) not in (1, f):
            raise UserError(f"{what} has {len(items)} entries; give 1, or one per frame of the buffer ({f}).")
        return items

    @torch.no_grad()
    def update_prompt(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None) -> None:
        """Change the prompt (and optionally the negative prompt) of a running stream, in place.

        The negative embeddings are kept unless a new negative prompt is given, so full/onetime CFG keeps
        guiding against the same negative; the stream's frames in flight continue with the new prompt."""
        prompts = self._prompt_list(prompt, "prompt")
        negatives = self.negative_prompt or [""]
        if negative_prompt is not None:
            negatives = self._prompt_list(negative_prompt, "negative_prompt")
        f, k = self.frame_buffer_size, self.steps
        needs_negative = self.guidance in ("full", "initialize")
        cond, uncond, pooled, pooled_uncond = conditioning.encode(
            self.pipe, self.family, prompts,
            (negatives * len(prompts) if len(negatives) == 1 else negatives) if needs_negative else None, self.device)

        def rows(c: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
            """(1 or f, ...) per-frame values -> one per UNet row, in the guidance mode's row order."""
            def per_frame(e):
                return e.expand(f, *e.shape[1:]) if e.shape[0] == 1 else e

            tail = [1] * (c.dim() - 1)
            cond_rows = per_frame(c).repeat(k, *tail)
            if self.guidance == "full":
                return torch.cat([per_frame(u).repeat(k, *tail), cond_rows]).to(self.dtype)
            if self.guidance == "initialize":
                return torch.cat([per_frame(u), cond_rows]).to(self.dtype)
            return cond_rows.to(self.dtype)

        emb = rows(cond, uncond)
        added = None
        if self.family.sdxl:
            text = rows(pooled, pooled_uncond)
            added = {"text_embeds": text,
                     "time_ids": conditioning.time_ids(self.height, self.width, text.shape[0], self.device, self.dtype)}
        if self._emb is None or self._emb.shape != emb.shape:
            self._emb = emb.contiguous()
            self._added = None if added is None else {key: v.contiguous() for key, v in added.items()}
            self._img2img.reset()
            self._txt2img.reset()
        else:  # in place: captured graphs read the new prompt
            self._emb.copy_(emb)
            if added is not None:
                for key, value in added.items():
                    self._added[key].copy_(value)
        self.prompt, self.negative_prompt = prompts, negatives

    def set_guidance_scale(self, scale: float) -> None:
        self._check_prepared()
        self._scale.fill_(float(scale))

    def set_controlnet_scale(self, scale: float | Sequence[float]) -> None:
        """The ControlNet conditioning scale(s), live: written in place into the tensors the step reads."""
        if self.control is None:
            raise UserError("this stream has no ControlNet; build it with StreamPipeline(..., controlnet=...).")
        self.control.set_scale(scale)

    def set_control_image(self, control_image: Any) -> None:
        """A control map used for every frame that comes without one (a pose or an edge map held still); None
        clears it. Same forms as `control_image` of a call."""
        if self.control is None:
            raise UserError("this stream has no ControlNet; build it with StreamPipeline(..., controlnet=...).")
        self._fixed_control = [None] * len(self.control)
        if control_image is not None:
            self._take_control(control_image, from_frame=True)
            self._fixed_control = list(self._control_batches)

    @property
    def controlnet_scale(self) -> list[float]:
        return [] if self.control is None else list(self.control.values)

    # ------------------------------------------------------------------------------------------------- LoRA
    def _lora_adapter(self, adapter: str | None) -> str:
        names = lora_mod.adapters(self.pipe.unet)
        if not self._lora_layers:
            raise UserError("the UNet has no LoRA; load one on the pipe (pipe.load_lora_weights) before building the "
                            "stream, then swap or rescale it live.")
        if lora_mod.is_fused(self._lora_layers):
            raise UserError("the LoRA is fused into the UNet's weights; load it unfused (no pipe.fuse_lora()) to "
                            "change it while streaming.")
        if adapter is None:
            if len(names) != 1:
                raise UserError(f"the UNet has LoRA adapters {names}; say which one (adapter=...).")
            return names[0]
        if adapter not in names:
            raise UserError(f"the UNet has no LoRA adapter {adapter!r}; it has {names}.")
        return adapter

    def set_lora_scale(self, scale: float, adapter: str | None = None) -> None:
        """A LoRA's scale, live (in place: no recompile, no re-capture)."""
        if not isinstance(scale, (int, float)):
            raise UserError(f"LoRA scale must be a number, got {scale!r}.")
        name = self._lora_adapter(adapter)
        lora_mod.set_scale(self._lora_layers, name, float(scale))
        self._lora_scale[name] = float(scale)

    @torch.no_grad()
    def load_lora(self, source: Any, adapter: str | None = None) -> None:
        """Swap another LoRA (folder, file or state dict) into a loaded adapter's weights, live (diffusers' hot-swap:
        copies into the existing tensors, so the compiled, captured step runs it as it is)."""
        name = self._lora_adapter(adapter)
        lora_mod.hotswap(self.pipe, source, name)
        lora_mod.scalings_to_tensors(self._lora_layers)
        lora_mod.set_scale(self._lora_layers, name, self._lora_scale.get(name, 1.0))

    def reset(self) -> None:
        """Empty the stream (next call warm-starts again) and the similarity filter's memory."""
        self._check_prepared()
        self._lat.zero_()
        self._neg.zero_()
        for buffer in self._ctrl:
            buffer.zero_()
        for filt in (self.filter, self.host_filter):
            if filt is not None:
                for t in filt.state().values():
                    t.zero_()
        self._primed = False

    # ------------------------------------------------------------------------------------------------- run
    @torch.no_grad()
    def __call__(self, frames: Any, control_image: Any = None) -> Any:
        """img2img: `frame_buffer_size` uint8 HxWx3 frames in, as many out (the frames of k-1 calls ago).

        control_image: the frames' control maps (same kinds and size as the frames; a list with one entry per
        ControlNet when there are several, None where a preprocessor derives it from the frame)."""
        self._check_prepared()
        batch, kind, single = frames_mod.to_batch(frames, self.frame_buffer_size, self.height, self.width)
        given = self._take_control(control_image, from_frame=True)
        on_host = self.host_filter is not None and batch.device.type == "cpu"
        if on_host:  # never skips a first frame: the filter has no reference yet
            sample = batch[:, ::4, ::4].permute(0, 3, 1, 2).float() / 127.5 - 1
            if bool(self.host_filter.decide(sample, self._host_on)):  # a CPU tensor: no GPU sync
                return frames_mod.from_batch(self._out, kind, single)
        self._in.copy_(batch, non_blocking=True)
        for i, flag in enumerate(given):
            if flag:
                self._ctrl_in[i].copy_(self._control_batches[i], non_blocking=True)
        out = self._run(self._img2img, given, device_filter=not on_host)
        return frames_mod.from_batch(out, kind, single)

    @torch.no_grad()
    def txt2img(self, batch: int | None = None, control_image: Any = None) -> torch.Tensor:
        """txt2img from the stream's fixed noise: a uint8 (batch, H, W, 3) device tensor per call.

        The batch is static (`frame_buffer_size`), so the step can be a CUDA graph; change the prompt with
        `update_prompt` to change the images. With a ControlNet, `control_image` is required (there is no frame to
        derive a map from; a preprocessor, if set, is applied to it)."""
        self._check_prepared()
        if batch is not None and batch != self.frame_buffer_size:
            raise UserError(f"txt2img batch {batch} differs from frame_buffer_size={self.frame_buffer_size}; "
                            f"build the stream with frame_buffer_size={batch}.")
        given = self._take_control(control_image, from_frame=False)
        for i in range(len(given)):
            self._ctrl_in[i].copy_(self._control_batches[i], non_blocking=True)
        return self._run(self._txt2img, given, device_filter=False)

    def _take_control(self, control_image: Any, from_frame: bool) -> tuple[bool, ...]:
        """Check the control images of a call (kept in `_control_batches`); which ControlNets were given one."""
        self._control_batches = []
        if self.control is None:
            if control_image is not None:
                raise UserError("control_image was given but this stream has no ControlNet; build it with "
                                "StreamPipeline(..., controlnet=...).")
            return ()
        n = len(self.control)
        entries = [control_image] if n == 1 or control_image is not None else [None] * n
        if n > 1 and control_image is not None:
            if not isinstance(control_image, (list, tuple)) or len(control_image) != n:
                raise UserError(f"the stream has {n} ControlNets: give control_image as a list of {n} entries (one "
                                "per ControlNet; None where a preprocessor derives it from the frame).")
            entries = list(control_image)
        given = []
        for i, entry in enumerate(entries):
            if entry is None and self._fixed_control[i] is not None:
                self._control_batches.append(self._fixed_control[i])
                given.append(True)
                continue
            if entry is None:
                if not from_frame:
                    raise UserError(f"txt2img with a ControlNet needs control_image (controlnet[{i}]): there is no "
                                    "frame to derive a map from.")
                if self.control.preprocessors[i] is None:
                    raise UserError(f"controlnet[{i}] needs a control image with every frame: give control_image=... "
                                    "(or set_control_image), or build the stream with control_preprocessor='canny' to "
                                    "derive it from the frame.")
                self._control_batches.append(None)
                given.append(False)
                continue
            batch, _, _ = frames_mod.to_batch(entry, self.frame_buffer_size, self.height, self.width,
                                              what="control image")
            self._control_batches.append(batch)
            given.append(True)
        return tuple(given)

    def _run(self, step: Any, given: tuple = (), device_filter: bool = True) -> torch.Tensor:
        if not self._primed:
            if self.warm_start and self.steps > 1:
                self._set_device_filter(False)
                for _ in range(self.steps - 1):
                    step(given)
            self._primed = True
        self._set_device_filter(device_filter)
        return step(given)

    def _set_device_filter(self, on: bool) -> None:
        if self._device_filter_state is not on:  # a tiny fill kernel, only when the mode changes
            self._filter_on.fill_(on)
            self._device_filter_state = on

    def stats(self) -> dict[str, int]:
        """Similarity-filter counters (frames seen/skipped, host and device decisions together); one host sync."""
        total = {"frames": 0, "skipped": 0}
        for filt in (self.filter, self.host_filter):
            if filt is not None:
                for key, value in filt.stats().items():
                    total[key] += value
        return total

    def _check_prepared(self) -> None:
        if not self._prepared:
            raise UserError("call stream.prepare(prompt) before generating frames.")

    # --------------------------------------------------------------------------------------- the step itself
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._encode_fn(self.vae, images, self.tiny)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._decode_fn(self.vae, latents)

    def _unet(self, x: torch.Tensor, t: torch.Tensor, maps: list[torch.Tensor]) -> torch.Tensor:
        with self._attention():
            return self._denoise(x, t, maps)

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, maps: list[torch.Tensor]) -> torch.Tensor:
        down = mid = None
        if self.control is not None:
            scales = [self.control.scale[i] for i in range(len(self.control))]  # 0-dim views: no host read
            if len(maps) == 1:  # a lone ControlNetModel takes one map and one scale, MultiControlNetModel lists
                maps, scales = maps[0], scales[0]
            down, mid = self._control_fn(self.control.model, x, t, self._emb, maps, scales, self._added)
        return self._unet_fn(self.pipe.unet, x, t, self._emb, self._added, down, mid)

    def _control_maps(self, given: tuple, frames01: torch.Tensor | None) -> list[torch.Tensor]:
        """The new frames' control maps, (f, 3, H, W) in [0, 1]: each net's given image or the frame, through the
        net's preprocessor when it has one."""
        maps = []
        for i, flag in enumerate(given):
            source = self._ctrl_in[i].permute(0, 3, 1, 2).to(self.dtype) / 255 if flag else frames01
            pre = self.control.preprocessors[i]
            maps.append((pre(source) if pre is not None else source).to(self.dtype))
        return maps

    def _img2img_step(self, given: tuple = ()) -> torch.Tensor:
        f = self.frame_buffer_size
        images = self._in.permute(0, 3, 1, 2).to(self.vae_dtype) / 127.5 - 1
        skip = None
        if self.filter is not None:
            skip = self.filter.decide(images, self._filter_on)
        maps = self._control_maps(given, self._in.permute(0, 3, 1, 2).to(self.dtype) / 255 if given else None)
        x0_in = self._encode(images).to(self.dtype)
        x_new = self._a[:f] * x0_in + self._b[:f] * self._noise[:f]
        return self._advance(x_new, x0_in, skip, maps)

    def _txt2img_step(self, given: tuple = ()) -> torch.Tensor:
        f = self.frame_buffer_size
        x_new = self._noise[:f]
        return self._advance(x_new, torch.zeros_like(x_new), None, self._control_maps(given, None))

    def _predict(self, x: torch.Tensor, x_new: torch.Tensor, x0_in: torch.Tensor, x_neg_old: torch.Tensor,
                 maps: list[torch.Tensor]):
        """Guided noise prediction for the whole stream batch, and the negative latents of the rows (RCFG)."""
        f, a, b, kind = self.frame_buffer_size, self._a, self._b, self.schedule.prediction_type
        mode = self.guidance
        if mode == "full":
            out = self._unet(torch.cat([x, x]), self._t_unet, [torch.cat([m, m]) for m in maps])
            eps_u, eps_c = to_epsilon(out[: self.batch], x, a, b, kind), to_epsilon(out[self.batch:], x, a, b, kind)
            return combine(eps_c, eps_u, self._scale), None
        if mode == "initialize":
            out = self._unet(torch.cat([x[:f], x]), self._t_unet, [torch.cat([m[:f], m]) for m in maps])
            eps_u0 = to_epsilon(out[:f], x_new, a[:f], b[:f], kind)
            eps_c = to_epsilon(out[f:], x, a, b, kind)
            neg_new = (x_new - b[:f] * eps_u0) / a[:f]  # x0 predicted from the negative prompt at the first step
        else:
            out = self._unet(x, self._t_unet, maps)
            eps_c = to_epsilon(out, x, a, b, kind)
            if mode == "none":
                return eps_c, None
            neg_new = x0_in  # self-negative: the input frame itself
        x_neg = torch.cat([neg_new, x_neg_old])
        eps_u = self.delta * virtual_residual(x, x_neg, a, b)
        return combine(eps_c, eps_u, self._scale), x_neg

    def _advance(self, x_new: torch.Tensor, x0_in: torch.Tensor, skip: torch.Tensor | None,
                 new_maps: list[torch.Tensor]) -> torch.Tensor:
        f = self.frame_buffer_size
        x = torch.cat([x_new, self._lat])
        maps = [torch.cat([m, old]) for m, old in zip(new_maps, self._ctrl)]  # each frame's map, in row order
        eps, x_neg = self._predict(x, x_new, x0_in, self._neg, maps)
        x0 = denoise(x, eps, self._a, self._b, self._cskip, self._cout)
        new_lat = self._a[f:] * x0[:-f] + self._b[f:] * self._noise[f:]  # re-noise each frame to its next step
        images = self._decode(x0[-f:].to(self.vae_dtype))
        pixels = ((images.float() + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        keep = (lambda old, new: new) if skip is None else (lambda old, new: torch.where(skip, old, new))
        self._lat.copy_(keep(self._lat, new_lat))
        if x_neg is not None:
            self._neg.copy_(keep(self._neg, x_neg[:-f]))
        for old, rows in zip(self._ctrl, maps):
            old.copy_(keep(old, rows[:-f]))
        self._out.copy_(keep(self._out, pixels))
        return self._out
