"""Benchmark harness: per-step denoiser latency and end-to-end pipeline latency, eager vs compiled, same run.

Speed claims are ratios against the strongest single-device baseline a user has: the same model compiled with
`torch.compile(mode="reduce-overhead")` (CUDA graphs). Timings use CUDA events on a GPU (host clock on the CPU),
after warm-up; we report median/min/max over the runs and the peak memory of each variant.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from paradiff.errors import UserError

COMPILE_MODES = ("reduce-overhead", "default")


@dataclass
class Row:
    """One measured variant."""

    what: str  # "step" (one denoiser call) or "e2e" (whole pipeline call)
    variant: str  # e.g. "eager", "compiled", "patch x2"
    median_ms: float
    min_ms: float
    max_ms: float
    runs: int
    peak_memory_mb: float | None
    extra: dict = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock_mark(device: torch.device) -> Any:
    """A CUDA event recorded on the current stream (no sync) on a GPU, the host clock on the CPU."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def elapsed_ms(start: Any, end: Any) -> float:
    """Milliseconds between two `clock_mark`s (synchronize CUDA first)."""
    return start.elapsed_time(end) if isinstance(start, torch.cuda.Event) else (end - start) * 1e3


def time_calls(fn: Callable[[], Any], device: torch.device, runs: int, warmup: int) -> list[float]:
    """Milliseconds of each of `runs` calls of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes of the CPU tensors `fn` allocates and holds at once: every allocation and free torch.profiler
    records (inside ops too: workspaces, temporaries), summed in time order. A rough figure: the CPU's conv
    algorithms and their workspaces are not a GPU's."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append((event.start_time_ns, event.extra_fields.alloc_size))  # negative: a free
        stack.extend(event.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def _row(what: str, variant: str, times: list[float], device: torch.device, **extra) -> Row:
    return Row(what, variant, statistics.median(times), min(times), max(times), len(times), _peak_mb(device), extra)


def compile_model(model: torch.nn.Module, mode: str = "reduce-overhead") -> torch.nn.Module:
    """The compiled baseline; max-autotune is refused (it takes over 8 minutes on an SDXL UNet)."""
    if mode not in COMPILE_MODES:
        raise UserError(f"compile mode {mode!r} is not offered; use one of {', '.join(COMPILE_MODES)}.")
    return torch.compile(model, mode=mode)


def denoiser_inputs(model: torch.nn.Module, batch: int, height: int, width: int, *, dtype, device, seed: int = 0):
    """Random inputs of the right shapes for one denoiser call at `height` x `width` pixels, as (args, kwargs)."""
    from paradiff.plans.common import example_inputs

    scale = 8  # VAE downsampling of every SD-family pipeline
    kwargs = example_inputs(model, batch, height // scale, width // scale, device=device, dtype=dtype, seed=seed)
    first = "sample" if "sample" in kwargs else "hidden_states"
    return (kwargs.pop(first),), kwargs


class ControlledStep(torch.nn.Module):
    """One step of a ControlNet pipeline as one module: the ControlNet, then the UNet with its residuals (so the
    compiled baseline compiles both, as a user compiling both would)."""

    def __init__(self, unet: torch.nn.Module, controlnet: torch.nn.Module):
        super().__init__()
        self.unet, self.controlnet = unet, controlnet

    def forward(self, sample, *, controlnet_cond, return_dict: bool = False, **kwargs):
        down, mid = self.controlnet(sample, controlnet_cond=controlnet_cond, return_dict=False, **kwargs)
        return self.unet(sample, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                         return_dict=return_dict, **kwargs)


def bench_denoiser(model: torch.nn.Module, *, batch: int, height: int, width: int, dtype, device, variants,
                   runs: int, warmup: int, compile_mode: str = "reduce-overhead",
                   controlnet: torch.nn.Module | None = None) -> list[Row]:
    """Per-step latency of one denoiser call (with `controlnet`: the ControlNet's call and the UNet's), for each
    variant in `variants` ("eager", "compiled")."""
    args, kwargs = denoiser_inputs(model, batch, height, width, dtype=dtype, device=device)
    if controlnet is not None:
        from paradiff.methods.split import controlnet_inputs

        kwargs["controlnet_cond"] = controlnet_inputs(controlnet, {"sample": args[0]})["controlnet_cond"]
        model = ControlledStep(model, controlnet)
    rows = []
    for variant in variants:
        runner = model if variant == "eager" else compile_model(model, compile_mode)
        _reset_peak(device)
        with torch.inference_mode():
            times = time_calls(lambda: runner(*args, **kwargs, return_dict=False), device, runs,
                               warmup if variant == "eager" else max(warmup, 3))
        rows.append(_row("step", variant, times, device, batch=batch))
    return rows


class StepTimer:
    """Times every denoiser call inside a real pipeline run with forward hooks (CUDA events), i.e. per step."""

    def __init__(self, module: torch.nn.Module, device: torch.device, first: torch.nn.Module | None = None):
        """`first`: a module each step calls before `module` (a ControlNet), whose call the step's time includes."""
        self.device = device
        self.pending: list = []
        self._handles = [(first or module).register_forward_pre_hook(self._pre),
                         module.register_forward_hook(self._post)]

    def _pre(self, *_):
        self.pending.append([clock_mark(self.device), None])

    def _post(self, *_):
        self.pending[-1][1] = clock_mark(self.device)

    def take(self) -> list[float]:
        _sync(self.device)
        out = [elapsed_ms(start, end) for start, end in self.pending]
        self.pending = []
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def bench_pipeline(pipe, *, variant: str, prompt: str, steps: int, height: int, width: int, guidance: float | None,
                   device, runs: int, warmup: int, skip_steps: int = 0) -> list[Row]:
    """End-to-end latency of `pipe(prompt)` and the per-step latency of its denoiser calls inside the loop
    (`height` x `width`: the output; image-conditioned pipelines get a gray image, and a mask to inpaint).

    `skip_steps` leaves the first steps of each run out of the per-step figure (e.g. a method's synchronous
    warm-up), so the steady state is reported; the end-to-end figure always includes everything.
    """
    from paradiff.plans.common import image_inputs, takes_prompt

    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer")
    timer = StepTimer(denoiser, device, getattr(pipe, "controlnet", None))
    kwargs: dict[str, Any] = {"num_inference_steps": steps, "height": height, "width": width, "output_type": "pil"}
    kwargs.update(image_inputs(pipe, height, width))  # inpainting: image + mask; the upscaler: its input image
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    if guidance is not None:
        kwargs["guidance_scale"] = guidance

    prompted = (prompt,) if takes_prompt(pipe) else ()  # SVD animates its image: no prompt

    def call():
        return pipe(*prompted, generator=torch.Generator("cpu").manual_seed(0), **kwargs)

    _reset_peak(device)
    step_times: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            call()
        timer.take()
        e2e = []
        for _ in range(runs):
            e2e += time_calls(call, device, 1, 0)
            step_times += timer.take()[skip_steps:]
    timer.remove()
    rows = [_row("e2e", variant, e2e, device, steps=steps)]
    if step_times:
        rows.append(_row("step", variant, step_times, device, steps_counted=len(step_times)))
    return rows


def environment(device: torch.device) -> dict:
    """Device, versions, command and date: what a result in benchmarks/results/ must say about itself."""
    from importlib.metadata import PackageNotFoundError, version

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5, cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["paradiff", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("paradiff", "__main__.py")
        else " ".join(sys.argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": v("diffusers"),
        "transformers": v("transformers"),
        "paradiff": v("paradiff"),
        "git_commit": commit,
    }
    if device.type == "cuda" and torch.distributed.is_available() and torch.cuda.is_available():
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return env


def speedups(rows: list[Row], baseline: str = "compiled") -> dict[str, float]:
    """Ratio baseline/variant of the median, per (what, variant); >1 means faster than the compiled baseline."""
    base = {r.what: r.median_ms for r in rows if r.variant == baseline}
    return {f"{r.what}:{r.variant}": base[r.what] / r.median_ms for r in rows if r.what in base and r.median_ms > 0}


def table(rows: list[Row], baseline: str = "compiled") -> str:
    ratios = speedups(rows, baseline)
    lines = ["| what | variant | median ms | min ms | max ms | runs | peak MiB | vs compiled |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = ratios.get(f"{r.what}:{r.variant}")
        lines.append(f"| {r.what} | {r.variant} | {r.median_ms:.2f} | {r.min_ms:.2f} | {r.max_ms:.2f} | {r.runs} | "
                     f"{'' if r.peak_memory_mb is None else f'{r.peak_memory_mb:.0f}'} | "
                     f"{'' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines)


def write_results(path: str | Path, rows: list[Row], meta: dict) -> None:
    """JSON (rows + environment + ratios) at `path`, and the same table as markdown beside it (`.md`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**meta, "rows": [asdict(r) for r in rows], "speedup_vs_compiled": speedups(rows)}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    header = "\n".join(f"- {k}: {v}" for k, v in meta.items() if not isinstance(v, (dict, list)))
    path.with_suffix(".md").write_text(f"{header}\n\n{table(rows)}\n")
