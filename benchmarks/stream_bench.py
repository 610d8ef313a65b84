"""Stream throughput and latency: paradiff.StreamPipeline vs diffusers' AutoPipelineForImage2Image, same run.

GPU (default): SD-Turbo's UNet + TAESD with RANDOM weights (speed does not depend on weight values), fp16, 512x512,
uint8 frames in and out. Configurations, most important first (a time budget skips what does not fit):
  img2img 1 step x batch 4, txt2img 1 step x batch 4, stream batch of 4 steps x 1 frame, img2img 1 step x 1
  (latency), each with the step as a CUDA graph, eager modules ("graph") and torch.compile'd modules ("compile").
Throughput = frames (or images) per second over back-to-back calls on frames already on the GPU; latency = one
numpy frame in -> numpy frame out, host copies included. The diffusers baseline runs the same modules eagerly
(1 step: num_inference_steps=2, strength=0.5, PIL in and out, which is how the pipeline is used).
Other models (`sdxl-*` configs: SDXL-Turbo + TAESDXL; `controlnet-*`: SD-Turbo + one random ControlNet fed by the
on-GPU Canny preprocessor), engine options (`--options default,channels_last,attention=cudnn,float8,step`: one run
per '+'-joined set, on the configs of `--option-configs`), and `--profile` (kernel time per component from
torch.profiler, step run without CUDA graphs so kernels can be attributed: encode / controlnet / unet / decode /
the rest = pre- and post-processing). `--suite issue14` is all of that in priority order within `--budget-s`.
`--tiny` runs the same code on toy pipelines (CPU is fine) so the script itself is tested.
`--fidelity` measures, on the few-step reference model, prompt adherence per guidance mode and the similarity
filter's skip rates (CPU is fine).

    python benchmarks/stream_bench.py --out benchmarks/results/stream-h100
    python benchmarks/stream_bench.py --suite issue14 --out $OUT
    python benchmarks/stream_bench.py --tiny --device cpu --out /tmp/stream-tiny
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

CONFIGS = [
    # name, kind, t_index_list, frame_buffer_size, guidance[, model: "base" (--arch) | "sdxl" | "controlnet"]
    ("img2img-1step-b4", "img2img", [35], 4, "none"),
    ("txt2img-1step-b4", "txt2img", [0], 4, "none"),
    ("stream-4step-b1", "img2img", [0, 16, 32, 45], 1, "none"),
    ("img2img-1step-b1", "img2img", [35], 1, "none"),
    ("stream-2step-self-b1", "img2img", [32, 45], 1, "self"),
    ("txt2img-1step-b8", "txt2img", [0], 8, "none"),
    ("sdxl-img2img-1step-b4", "img2img", [35], 4, "none", "sdxl"),
    ("sdxl-img2img-1step-b1", "img2img", [35], 1, "none", "sdxl"),
    ("controlnet-img2img-1step-b4", "img2img", [35], 4, "none", "controlnet"),
    ("controlnet-img2img-1step-b1", "img2img", [35], 1, "none", "controlnet"),
]
BASE_CONFIGS = [c[0] for c in CONFIGS if len(c) == 5]
# --suite issue14: what issue 14's targets need first, then the engine options, within the budget
SUITE = {
    "issue14": dict(configs="img2img-1step-b4,img2img-1step-b1,sdxl-img2img-1step-b4,sdxl-img2img-1step-b1,"
                            "controlnet-img2img-1step-b4", engines="compile",
                    options="default,contiguous,fuse_qkv,inductor=tuned,float8",
                    option_configs="img2img-1step-b4", profile=True, no_baseline=True),
}


# inductor flags diffusers' torch.compile guide sets for UNets (1x1 convolutions as matmuls, coordinate-descent
# tuning of the generated kernels' launch parameters): longer compiles, not max-autotune
TUNED_INDUCTOR = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True, "epilogue_fusion": False,
                  "coordinate_descent_check_all_directions": True}


def parse_options(text: str) -> dict:
    """'channels_last+attention=cudnn+float8+step' -> StreamPipeline keyword arguments ('default': none)."""
    kwargs: dict = {}
    for part in [p for p in text.split("+") if p and p != "default"]:
        key, _, value = part.partition("=")
        if key == "channels_last":
            kwargs["channels_last"] = True
        elif key == "contiguous":  # channels-last is the default on CUDA: this measures without it
            kwargs["channels_last"] = False
        elif key == "float8":
            kwargs["float8"] = True
        elif key == "fuse_qkv":
            kwargs["fuse_qkv"] = True
        elif key == "inductor" and value == "tuned":
            kwargs["compile"] = {"options": dict(TUNED_INDUCTOR)}
        elif key == "step":
            kwargs["compile_scope"] = "step"
        elif key == "attention" and value:
            kwargs["attention"] = value
        else:
            raise SystemExit(f"unknown engine option {part!r} (channels_last, contiguous, attention=NAME, float8, "
                             "fuse_qkv, inductor=tuned, step)")
    return kwargs


def _versions() -> dict:
    import diffusers
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tiny_models():
    """tests/support/models.py, the one factory of the tiny random-weight models (the whole repo travels)."""
    tests = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from support import models

    return models


def _build(args, device, dtype, model="base"):
    """(pipe, tiny VAE, controlnet or None) of a config's model."""
    if args.tiny:
        from paradiff.stream.tiny import tiny_controlnet, tiny_pipeline

        models = tiny_models()
        pipe = tiny_pipeline("euler", family="sdxl" if model == "sdxl" else "sd", device=device, dtype=dtype)
        net = tiny_controlnet(pipe.unet) if model == "controlnet" else None
        return pipe, models.tiny_taesd().to(device, dtype), net
    from paradiff.archs import build_model, build_pipeline
    from paradiff.stream.tiny import random_controlnet

    arch = args.sdxl_arch if model == "sdxl" else args.arch
    pipe = build_pipeline(arch, dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    taesd = build_model("taesdxl" if model == "sdxl" else "taesd", "vae", dtype=dtype, device=device)
    net = random_controlnet(pipe.unet, tiny=False) if model == "controlnet" else None
    return pipe, taesd, net


class Models:
    """Each model built once, when a config first needs it (SD-Turbo's modules are shared with its ControlNet run)."""

    def __init__(self, args, device, dtype):
        self.args, self.device, self.dtype, self.cache = args, device, dtype, {}

    def get(self, model: str):
        if model not in self.cache:
            if model == "controlnet" and "base" in self.cache:
                from paradiff.stream.tiny import random_controlnet, tiny_controlnet

                pipe, taesd, _ = self.cache["base"]
                net = tiny_controlnet(pipe.unet) if self.args.tiny else random_controlnet(pipe.unet, tiny=False)
                self.cache[model] = (pipe, taesd, net)
            else:
                self.cache[model] = _build(self.args, self.device, self.dtype, model)
        return self.cache[model]

    def restore(self, options: dict) -> None:
        """Undo what earlier option sets did in place (channels-last, fused projections) that `options` does not
        ask for, so each set measures its own options; float8 cannot be undone (those sets run last)."""
        from paradiff.stream import engine

        modules = {id(m): m for built in self.cache.values() for m in built if isinstance(m, torch.nn.Module)}
        for module in modules.values():
            if not options.get("channels_last"):
                module.to(memory_format=torch.contiguous_format)
            if not options.get("fuse_qkv") and engine.is_fused(module):
                module.unfuse_qkv_projections()


def _time_calls(fn, device, iters: int, warmup: int) -> float:
    """Seconds per call over `iters` back-to-back calls (one sync at the end)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def _time_each(fn, device, iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def make_stream(models, cfg, engine, device, size, options=None, graph=True):
    from paradiff import StreamPipeline

    name, kind, t_index, fbs, guidance = cfg[:5]
    pipe, taesd, net = models.get(cfg[5] if len(cfg) > 5 else "base")
    models.restore(options or {})
    use_graph = graph and device.type == "cuda" and engine in ("graph", "compile")
    control = dict(controlnet=net, control_preprocessor="canny") if net is not None else {}
    kwargs = {"compile": engine == "compile", **control, **(options or {})}
    if engine != "compile":
        kwargs["compile"] = False  # inductor=tuned only tunes a compiled engine
    stream = StreamPipeline(pipe, t_index, guidance=guidance, frame_buffer_size=fbs, tiny_vae=taesd,
                            height=size, width=size, cuda_graph=use_graph, **kwargs)
    stream.prepare("a watercolor painting of a cat", guidance_scale=1.2)
    return stream


def bench_stream(models, cfg, engine, args, device, size, options_name="default"):
    name, kind, t_index, fbs, guidance = cfg[:5]
    stream = make_stream(models, cfg, engine, device, size, parse_options(options_name))
    rng = np.random.default_rng(0)
    host = rng.integers(0, 256, (fbs, size, size, 3), dtype=np.uint8)
    frames = torch.from_numpy(host).to(device)
    call = (lambda: stream.txt2img()) if kind == "txt2img" else (lambda: stream(frames))
    start = time.perf_counter()
    call()  # warm start, compile and capture
    _sync(device)
    setup_s = time.perf_counter() - start
    per_call = _time_calls(call, device, args.iters, args.warmup)
    row = {"config": name, "engine": engine, "options": options_name, "kind": kind, "t_index_list": t_index,
           "frame_buffer_size": fbs,
           "guidance": guidance, "unet_batch": len(t_index) * fbs * (2 if guidance == "full" else 1),
           "ms_per_call": round(per_call * 1e3, 3), "frames_per_s": round(fbs / per_call, 1),
           "setup_s": round(setup_s, 1)}
    if kind == "img2img" and fbs == 1:  # host round trip: numpy in -> numpy out, one frame at a time
        one = host[0]
        times = _time_each(lambda: stream(one), device, args.iters)
        row["latency_ms_median"] = round(float(np.median(times)) * 1e3, 3)
        row["latency_ms_p90"] = round(float(np.percentile(times, 90)) * 1e3, 3)
    return row


def profile_stream(models, cfg, engine, args, device, size) -> dict:
    """Kernel time per component of one step (CUDA graphs off, so each kernel belongs to a range), as ms per call
    and share; 'other' is the rest of the step: uint8 pre/post-processing, scheduler arithmetic, state copies."""
    from torch.profiler import ProfilerActivity, profile, record_function

    stream = make_stream(models, cfg, engine, device, size, graph=False)
    for attr, label in (("_encode_fn", "encode"), ("_control_fn", "controlnet"), ("_unet_fn", "unet"),
                        ("_decode_fn", "decode")):
        fn = getattr(stream, attr)

        def ranged(*a, _fn=fn, _label=label, **k):
            with record_function(f"stream.{_label}"):
                return _fn(*a, **k)

        setattr(stream, attr, ranged)
    if stream.control is not None:  # the control maps' preprocessor (Canny) on its own line
        def ranged_pre(x, _fn):
            with record_function("stream.preprocess"):
                return _fn(x)

        stream.control.preprocessors = [p and (lambda x, _p=p: ranged_pre(x, _p)) for p in stream.control.preprocessors]
    fbs = cfg[3]
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (fbs, size, size, 3), dtype=np.uint8)).to(device)
    call = (lambda: stream.txt2img()) if cfg[1] == "txt2img" else (lambda: stream(frames))
    for _ in range(3):  # compile, warm up
        call()
    _sync(device)
    calls = max(2, min(args.iters, 10))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            with record_function("stream.step"):
                call()
        _sync(device)
    gpu = device.type == "cuda"
    times = {e.key[len("stream."):]: (e.device_time_total if gpu else e.cpu_time_total) / 1e3 / calls
             for e in prof.key_averages() if e.key.startswith("stream.")}
    step = times.pop("step", 0.0)
    parts = {k: round(v, 3) for k, v in times.items()}
    parts["other"] = round(max(0.0, step - sum(times.values())), 3)
    kernels = sorted((e for e in prof.key_averages() if gpu and e.self_device_time_total > 0 and
                      not e.key.startswith("stream.")), key=lambda e: -e.self_device_time_total)[:12]
    return {"config": cfg[0], "engine": f"{engine}, no CUDA graph", "time": "GPU kernel" if gpu else "CPU",
            "ms_per_call": round(step, 3), "ms_by_component": parts,
            "share": {k: round(v / step, 3) for k, v in parts.items()} if step else {},
            "top_kernels_ms_per_call": {e.key[:80]: round(e.self_device_time_total / 1e3 / calls, 3) for e in kernels}}


def check_graph(pipe, taesd, device, size, modes=(False, True)) -> dict:
    """The CUDA-graph step gives the eager step's frames (self-RCFG, 2 steps, 2 frames per call, with the
    similarity filter), and the filter skips a static input."""
    from paradiff import StreamPipeline

    rng = np.random.default_rng(0)
    clip = [torch.from_numpy(rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)).to(device) for _ in range(4)]
    clip += [clip[-1]] * 12  # static tail: the filter should skip most of it
    outs = {}
    for graph in modes:
        stream = StreamPipeline(pipe, [32, 45], guidance="self", frame_buffer_size=2, tiny_vae=taesd, height=size,
                                width=size, cuda_graph=graph, similarity_filter=0.98, max_skip_frames=5)
        stream.prepare("a watercolor painting of a cat", guidance_scale=1.3)
        outs[graph] = ([stream(frame).clone() for frame in clip], stream.stats())
    diffs = [int((a.int() - b.int()).abs().max()) for a, b in zip(outs[modes[0]][0], outs[modes[-1]][0])]
    return {"graph_vs_eager_max_abs_diff_uint8": max(diffs), "filter_eager": outs[modes[0]][1],
            "filter_graph": outs[modes[-1]][1]}


def bench_diffusers(pipe, taesd, batch, args, device, size):
    from diffusers import AutoPipelineForImage2Image
    from PIL import Image

    img2img = AutoPipelineForImage2Image.from_pipe(pipe, vae=taesd)
    img2img.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(batch)]
    prompt = ["a watercolor painting of a cat"] * batch
    steps = 2 if not args.tiny else 2

    def call():
        return img2img(prompt, image=images if batch > 1 else images[0], num_inference_steps=steps, strength=0.5,
                       guidance_scale=0.0, output_type="pil").images

    out = call()
    assert len(out) == batch and out[0].size == (size, size)
    per_call = _time_calls(call, device, max(3, args.iters // 4), 1)
    return {"config": f"diffusers-img2img-1step-b{batch}", "engine": "diffusers eager", "kind": "img2img",
            "frame_buffer_size": batch, "ms_per_call": round(per_call * 1e3, 3),
            "frames_per_s": round(batch / per_call, 1), "pipeline": type(img2img).__name__}


def run_speed(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    size = args.size or (64 if args.tiny else 512)
    t0 = time.perf_counter()
    models = Models(args, device, dtype)
    pipe, taesd, _ = models.get("base")
    result = {"command": " ".join([Path(sys.executable).name] + sys.argv), "date": datetime.datetime.now(
        datetime.timezone.utc).isoformat(timespec="seconds"), "device": str(device), "versions": _versions(),
        "model": "tiny random" if args.tiny else f"{args.arch} UNet + text encoder, TAESD (random weights); sdxl-*: "
                 f"{args.sdxl_arch} + TAESDXL; controlnet-*: {args.arch} + a ControlNet shaped after its UNet "
                 "(random weights), maps from the on-GPU Canny preprocessor",
        "size": size, "dtype": str(dtype).replace("torch.", ""), "build_s": round(time.perf_counter() - t0, 1),
        "rows": [], "errors": [], "skipped": []}
    engines = args.engines.split(",")
    configs = [c for c in CONFIGS if c[0] in (args.configs.split(",") if args.configs else BASE_CONFIGS)]

    def save():
        write_results(result, args.out)

    def attempt(label, measure, keep):
        """Run one measurement, `keep` what it returns; a failure is recorded and the run goes on (partial results
        are still results). The results file is rewritten either way."""
        try:
            entry = measure()
            keep(entry)
            print(json.dumps(entry), flush=True)
        except Exception as err:  # noqa: BLE001
            result["errors"].append(f"{label}: {type(err).__name__}: {str(err)[:300]}")
            traceback.print_exc()
        save()

    def stream_pass(engine, cfgs=configs, options_name="default"):
        for cfg in cfgs:
            label = f"{cfg[0]} / {engine} / {options_name}"
            if time.perf_counter() - t0 > args.budget_s:
                result["skipped"].append(f"{label}: over the {args.budget_s:.0f} s budget")
                continue
            attempt(label, lambda: bench_stream(models, cfg, engine, args, device, size, options_name),
                    result["rows"].append)
            gc.collect()  # a stream and its captured graph form a reference cycle
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def diffusers_pass():
        for batch in (1, 4):
            attempt(f"diffusers b{batch}", lambda: bench_diffusers(pipe, taesd, batch, args, device, size),
                    result["rows"].append)

    if device.type == "cuda" and not args.no_check:
        attempt("graph check", lambda: check_graph(pipe, taesd, device, size),
                lambda checks: result.__setitem__("checks", checks))
    # cheap engines first, then the diffusers baseline, then compilation (slow to start) within the budget
    for engine in [e for e in engines if e != "compile"]:
        stream_pass(engine)
    if not args.no_baseline:
        diffusers_pass()
    if "compile" in engines:
        stream_pass("compile")
    option_cfgs = [c for c in CONFIGS if c[0] in (args.option_configs or "img2img-1step-b4").split(",")]
    # channels_last, fuse_qkv and float8 change the shared modules in place (Models.restore undoes the first two
    # before each set; float8 is for good, so its sets run last; StreamPipeline compiles anew for a changed layout)
    for options_name in sorted([o for o in (args.options or "").split(",") if o and o != "default"],
                               key=lambda o: "float8" in o):
        stream_pass(engines[-1], option_cfgs, options_name)
    if args.profile:
        result["profile"] = []
        seen = set()
        for cfg in configs:  # one profile per model, at its largest batch
            model = cfg[5] if len(cfg) > 5 else "base"
            if model in seen or cfg[3] < max(c[3] for c in configs if (c[5] if len(c) > 5 else "base") == model):
                continue
            seen.add(model)
            if time.perf_counter() - t0 > args.budget_s + 60:
                result["skipped"].append(f"profile {cfg[0]}: over the budget")
                continue
            attempt(f"profile {cfg[0]}", lambda: profile_stream(models, cfg, engines[-1], args, device, size),
                    result["profile"].append)
    result["ratios"] = ratios(result["rows"])
    result["total_s"] = round(time.perf_counter() - t0, 1)
    save()
    return result


def ratios(rows: list[dict]) -> dict:
    """Throughput of the best paradiff engine over diffusers', for the same batch of 1-step img2img."""
    out = {}
    for batch in (1, 4):
        base = [r for r in rows if r["config"] == f"diffusers-img2img-1step-b{batch}"]
        ours = [r for r in rows if r["config"] == f"img2img-1step-b{batch}" and r.get("options") == "default"]
        if base and ours:
            best = max(ours, key=lambda r: r["frames_per_s"])
            out[f"img2img-1step-b{batch}"] = {"paradiff_engine": best["engine"],
                                               "speedup": round(best["frames_per_s"] / base[0]["frames_per_s"], 2)}
    return out


def run_fidelity(args) -> dict:
    """Prompt adherence (reference checker) per guidance mode, and the similarity filter's skip rates."""
    import os

    from diffusers import StableDiffusionPipeline

    from paradiff import StreamPipeline
    from paradiff.reference import FAST_MODEL
    from paradiff.reference.checker import check
    from paradiff.reference.data import heldout_set, parse_caption, render_numpy

    if not os.path.isfile(os.path.join(FAST_MODEL, "model_index.json")):
        raise SystemExit(f"the few-step reference model is not built yet ({FAST_MODEL}).")
    torch.set_num_threads(max(1, args.threads))
    device = torch.device(args.device or "cpu")
    pipe = StableDiffusionPipeline.from_pretrained(FAST_MODEL, safety_checker=None, requires_safety_checker=False)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    prompts = heldout_set(args.prompts)
    t_index = [int(v) for v in args.t_index.split(",")]
    txt_index = [int(v) for v in args.txt_t_index.split(",")]
    result = {"command": " ".join([Path(sys.executable).name] + sys.argv), "date": datetime.datetime.now(
        datetime.timezone.utc).isoformat(timespec="seconds"), "device": str(device), "versions": _versions(),
        "model": "reference FAST_MODEL", "t_index_list": t_index, "txt2img_t_index_list": txt_index, "prompts": len(prompts), "rows": []}
    for guidance, scale in (("none", 1.0), ("self", args.scale), ("initialize", args.scale), ("full", args.scale)):
        for task in ("txt2img", "img2img"):
            matched = 0
            stream = StreamPipeline(pipe, txt_index if task == "txt2img" else t_index, guidance=guidance)
            for caption, seed in prompts:
                stream.prepare(caption, negative_prompt="", guidance_scale=scale, seed=seed)
                if task == "txt2img":
                    image = stream.txt2img()[0].cpu().numpy()
                else:  # restyle: the input shows another scene; the output should follow the prompt
                    other = prompts[(prompts.index((caption, seed)) + 1) % len(prompts)][0]
                    frame = render_numpy([parse_caption(other)])[0]
                    image = stream(frame)
                matched += bool(check(image, caption).matched)
            row = {"task": task, "guidance": guidance, "guidance_scale": scale,
                   "adherence": round(matched / len(prompts), 3)}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    # similarity filter on a static and a moving clip of reference scenes
    base = render_numpy([parse_caption(prompts[0][0])])[0]
    rng = np.random.default_rng(0)
    static = [np.clip(base.astype(int) + rng.integers(-3, 4, base.shape), 0, 255).astype(np.uint8) for _ in range(60)]
    moving = [np.roll(base, 4 * i, axis=1) for i in range(60)]
    for name, clip in (("static", static), ("moving", moving)):
        stream = StreamPipeline(pipe, t_index, similarity_filter=args.filter_threshold)
        stream.prepare(prompts[0][0])
        for frame in clip:
            stream(frame)
        stats = stream.stats()
        row = {"filter_clip": name, "threshold": args.filter_threshold, **stats,
               "skip_rate": round(stats["skipped"] / stats["frames"], 3)}
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    write_results(result, args.out, stem="stream-fidelity")
    return result


def write_results(result: dict, out: str | None, stem: str = "stream-bench") -> None:
    if not out:
        return
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# {stem}", "", f"- command: `{result['command']}`", f"- date: {result['date']}",
             f"- device: {result['device']} {result['versions'].get('gpu', '')}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if k != "gpu"),
             f"- model: {result['model']}", ""]
    rows = result.get("rows", [])
    if rows:
        keys = []
        for row in rows:
            keys += [k for k in row if k not in keys]
        lines.append("| " + " | ".join(keys) + " |")
        lines.append("|" + "---|" * len(keys))
        for row in rows:
            lines.append("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    for entry in result.get("profile", []):
        lines += ["", f"profile {entry['config']} ({entry['engine']}, {entry['time']} time): "
                      f"{entry['ms_per_call']} ms per call", "", "| component | ms per call | share |", "|---|---|---|"]
        lines += [f"| {k} | {v} | {entry['share'].get(k, '')} |" for k, v in entry["ms_by_component"].items()]
    for key in ("ratios", "errors", "skipped"):
        if result.get(key):
            lines += ["", f"{key}: `{json.dumps(result[key])}`"]
    (folder / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for stream-bench.json/.md")
    p.add_argument("--device", default=None)
    p.add_argument("--tiny", action="store_true", help="toy pipeline (CPU ok): tests this script")
    p.add_argument("--arch", default="sd-turbo")
    p.add_argument("--sdxl-arch", default="sdxl-turbo", help="the model of the sdxl-* configs (+ TAESDXL)")
    p.add_argument("--options", default=None, help="engine option sets, comma-separated, each '+'-joined: default, "
                                                    "channels_last, contiguous (default: channels-last on CUDA), "
                                                    "attention=flash|efficient|cudnn|math, float8, "
                                                    "fuse_qkv, inductor=tuned, step")
    p.add_argument("--option-configs", default=None, help="configs the option sets run on (default img2img-1step-b4)")
    p.add_argument("--profile", action="store_true", help="kernel time per component (torch.profiler)")
    p.add_argument("--suite", choices=sorted(SUITE), default=None, help="a preset of configs, engines and options")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--engines", default=None, help="comma list of graph,compile,eager (default: graph,compile on "
                                                    "CUDA, eager on CPU)")
    p.add_argument("--configs", default=None, help="comma list of config names (default: all)")
    p.add_argument("--budget-s", type=float, default=360.0, help="skip configurations started after this")
    p.add_argument("--no-baseline", action="store_true", help="skip the diffusers baseline")
    p.add_argument("--no-check", action="store_true", help="skip the graph-vs-eager check on CUDA")
    p.add_argument("--fidelity", action="store_true", help="reference-model adherence and filter rates instead")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--t-index", default="12,25,37", help="img2img steps of the 50-step LCM grid (fidelity)")
    p.add_argument("--txt-t-index", default="0,12,25,37", help="txt2img steps (fidelity): 4 LCM steps from t=999")
    p.add_argument("--scale", type=float, default=1.2, help="guidance scale for self/initialize/full (fidelity)")
    p.add_argument("--filter-threshold", type=float, default=0.98)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="cuDNN times each convolution's algorithms once per shape (process-wide, and cuDNN keeps a "
                        "shape's plan for the process: compare against a run without it, not an option set)")
    args = p.parse_args(argv)
    for key, value in SUITE.get(args.suite, {}).items():  # a suite fills what was not given
        if getattr(args, key) in (None, False):
            setattr(args, key, value)
    if args.fidelity:
        run_fidelity(args)
        return 0
    if args.engines is None:
        args.engines = "graph,compile" if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) \
            .startswith("cuda") else "eager"
    if args.tiny:
        torch.set_num_threads(1)
    import torch._dynamo as dynamo

    dynamo.config.cache_size_limit = 64  # one graph per batch size and module, across configurations
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    result = run_speed(args)
    print(json.dumps({"ratios": result["ratios"], "errors": result["errors"], "skipped": result["skipped"]}))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
