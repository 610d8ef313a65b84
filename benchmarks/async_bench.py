"""Asynchronous denoising benchmark: a 50-step CFG denoising loop of a random-weight UNet, single GPU vs AsyncDenoise.

    torchrun --nproc-per-node 2 benchmarks/async_bench.py --arch sdxl --out benchmarks/results/async-h200   # GPU
    torchrun --nproc-per-node 2 benchmarks/async_bench.py --tiny --out /tmp/async-tiny                     # CPU/gloo
    python3 benchmarks/async_bench.py --emulate-ranks 2 --arch sdxl --out DIR                             # one GPU

Configurations (ranks = world size W): baseline on rank 0 (eager, and torch.compile mode="reduce-overhead"),
AsyncDenoise N=W stride 1, and N=W-1 stride 2 (N=1 on 2 GPUs: both ranks hold the model and compute two steps per
round), each with torch.compile + CUDA graphs on GPU. Every configuration runs one untimed generation (compile,
graph capture), then `--repeats` timed ones (CUDA events / perf_counter; median). Peak memory is per rank, measured
after the weights of the other components were dropped. Writes async-bench.json and async-bench.md to `--out`.

`--emulate-ranks N` (one process, one device, no torchrun): each component of AsyncDenoise N=N, stride 1, measured
alone as rank k of N over the fake process group (`paradiff.comm.emulate`: collectives and point-to-point
transfers are local copies), compiled and graph-captured as in the real run: its compiled step time (the static
forward, without communication), its peak memory (after the other components' weights were dropped) and the bytes
it sends and receives per step, against the compiled whole model's step and peak. Targets (issue 15): each
component's step <= 0.55 of the whole model's, each rank's peak <= 0.65 of the whole model's. Writes
async-emulated.json and async-emulated.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

ARCHS = {"sdxl": ("stable-diffusion-xl-base-1.0", 1024), "sd21": ("stable-diffusion-2-1", 768)}


def tiny_models():
    """tests/support/models.py, the one factory of the tiny random-weight models (the whole repo travels)."""
    tests = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from support import models

    return models


def build(arch: str | None, dtype, device):
    if arch is None:  # the tiny SD pipeline's UNet
        return tiny_models().tiny_unet("sd-wide", fill_zeros=False).requires_grad_(False).to(device, dtype)
    from paradiff.archs import build_model

    return build_model(arch, dtype=dtype, device=device)


def scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def settings(args, device) -> tuple:
    """(gpu, dtype, compile backend, CUDA graphs, [(arch, size, label)], steps) of a run on `device`; one CPU
    thread on the CPU (gloo ranks share the cores)."""
    gpu = device.type == "cuda"
    if not gpu:
        torch.set_num_threads(1)
    compile_backend = args.compile_backend or ("inductor" if gpu else None)
    archs = [(None, 128, "tiny")] if args.tiny else [(*ARCHS[a], a) for a in args.arch]
    return (gpu, torch.float16 if gpu else torch.float32, compile_backend, gpu and not args.no_graphs, archs,
            args.steps or (6 if args.tiny else 50))


def call_inputs(unet, size: int, dtype, device) -> tuple[torch.Tensor, dict]:
    """Latent (batch 1) and the CFG-doubled conditioning a pipeline would pass."""
    cfg = unet.config
    g = torch.Generator("cpu").manual_seed(0)
    side = size // 8
    cross = cfg.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    latent = torch.randn(1, cfg.in_channels, side, side, generator=g).to(device, dtype)
    kwargs = {"encoder_hidden_states": torch.randn(2, 77, cross, generator=g).to(device, dtype)}
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, text_dim, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=dtype, device=device)}
    return latent, kwargs


def denoise(unet, sched, latent, kwargs, steps: int, guidance: float = 5.0) -> torch.Tensor:
    sched.set_timesteps(steps, device=latent.device)
    x = latent * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([x, x]), t)
        eps = unet(inp, t, return_dict=False, **kwargs)[0]
        uncond, cond = eps.chunk(2)
        x = sched.step(uncond + guidance * (cond - uncond), t, x, return_dict=False)[0]
    return x


def timed(fn, repeats: int, device) -> tuple[list[float], torch.Tensor]:
    out = fn()  # untimed: compilation, graph capture
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
    return times, out


def reset_memory(device):
    gc.collect()  # compiled models and graph runners hold reference cycles: free what the last run left
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device, held: float | None = None) -> float | None:
    """Peak allocated GiB since the last reset, less `held` (what was allocated before the configuration)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30 - (held or 0.0)


def leftover_gb(device) -> float | None:
    """What is still allocated before a configuration is built (earlier ones' caches, graph pools), after freeing
    all that can be: subtracted from its peak, so one emulated rank is not charged with another's memory."""
    reset_memory(device)
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None


def gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run(args) -> int:
    from paradiff import runtime
    from paradiff import AsyncDenoise
    from paradiff.bench import clock_mark, elapsed_ms
    from paradiff.parallel import parallelize_module
    from paradiff.methods.split import explain_split

    rt = runtime.init(args.device)
    device, world = rt.device, rt.world_size
    if world < 2:
        print("run me under torchrun --nproc-per-node 2 (or more)", file=sys.stderr)
        return 2
    gpu, dtype, compile_backend, graphs, archs, steps = settings(args, device)
    rows, errors = [], []
    group = runtime.mesh({"async": world}).get_group("async")
    for arch, size, label in archs:
        explain = None
        sched = scheduler()
        # baseline on rank 0 (the others wait)
        if rt.is_main:
            unet = build(arch, dtype, device)
            full_params = sum(p.numel() for p in unet.parameters())
            latent, kwargs = call_inputs(unet, size, dtype, device)
            variants = [("serial eager", unet)]
            if compile_backend:
                mode = "reduce-overhead" if gpu else None
                variants.append((f"serial compiled ({mode or compile_backend})",
                                 torch.compile(unet, backend=compile_backend, mode=mode)))
            for name, model in variants:
                reset_memory(device)
                with torch.no_grad():
                    times, ref = timed(lambda: denoise(model, sched, latent, kwargs, steps), args.repeats, device)
                rows.append(dict(arch=label, size=size, steps=steps, config=name, ranks=1, median_s=statistics.median(times),
                                 times=times, peak_gb=[peak_gb(device)], params=[full_params]))
                print(f"[{label}] {name}: {statistics.median(times):.3f} s", flush=True)
            unet = variants = model = None  # free the baseline before the parallel runs
        dist.barrier()
        for n, stride in ((world, 1), (world - 1, 2)):
            name = f"async N={n} stride {stride}" + (" compiled" if compile_backend else "") + (" +graphs" if graphs else "")
            try:
                unet = build(arch, dtype, device)
                latent, kwargs = call_inputs(unet, size, dtype, device)
                if rt.is_main and stride == 1:
                    explain = explain_split(unet, n)
                    print(explain, flush=True)
                method = AsyncDenoise(stride=stride, warmup_steps=args.warmup_steps, cuda_graph=graphs,
                                      compile={"backend": compile_backend} if compile_backend else False)
                parallelize_module(unet, method, groups={"async": group}, scheduler=lambda: sched)
                params = sum(p.numel() for p in unet.parameters())
                reset_memory(device)
                with torch.no_grad():
                    times, out = timed(lambda: denoise(unet, sched, latent, kwargs, steps), args.repeats, device)
                    # one more generation with each rank's forward timed: real balance and communication overhead
                    marks: list = []
                    method.state.observer = lambda phase, edge: marks.append((phase, clock_mark(device)))
                    denoise(unet, sched, latent, kwargs, steps)
                    if gpu:
                        torch.cuda.synchronize()
                    compute = [elapsed_ms(a, b) for (phase, a), (_, b) in zip(marks[::2], marks[1::2])
                               if phase == "async"]
                    method.state.observer = None
                info = gather((times, peak_gb(device), params, statistics.median(compute) if compute else None))
                if rt.is_main:
                    times = info[0][0]
                    rows.append(dict(arch=label, size=size, steps=steps, config=name, ranks=world,
                                     median_s=statistics.median(times), times=times,
                                     peak_gb=[i[1] for i in info], params=[i[2] for i in info],
                                     forward_ms=[i[3] for i in info],
                                     warmup_steps=args.warmup_steps, explain=explain))
                    print(f"[{label}] {name}: {statistics.median(times):.3f} s", flush=True)
                unet = None
            except Exception:  # noqa: BLE001 - record and go on: one failing configuration must not lose the others
                errors.append(dict(arch=label, config=name, rank=rt.rank, error=traceback.format_exc()[-2000:]))
                print(f"[{label}] {name} failed on rank {rt.rank}:\n{traceback.format_exc()}", flush=True)
                break
    if rt.is_main:
        write(args, rows, errors, device)
    runtime.shutdown()
    return 1 if errors else 0


def forward_ms(run, marks: list, device) -> float:
    """Median of the forward times `marks` collects during `run()` ((phase, start mark), (phase, end mark), ...)."""
    from paradiff.bench import elapsed_ms

    marks.clear()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return statistics.median(elapsed_ms(a, b) for (phase, a), (_, b) in zip(marks[::2], marks[1::2])
                             if phase in ("async", "serial"))


def run_emulated(args) -> int:
    """Each component as rank k of N in this one process (`--emulate-ranks N`); see the module docstring."""
    from paradiff import AsyncDenoise
    from paradiff.bench import clock_mark
    from paradiff.comm import emulate
    from paradiff.methods.split import explain_split
    from paradiff.parallel import parallelize_module

    n = args.emulate_ranks
    if n < 2:
        raise SystemExit("--emulate-ranks needs N >= 2.")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu, dtype, compile_backend, graphs, archs, steps = settings(args, device)
    rows, errors = [], []
    for arch, size, label in archs:
        sched = scheduler()
        marks: list = []
        left = leftover_gb(device)  # before the build: the model's own weights count in its peak
        unet = build(arch, dtype, device)
        latent, kwargs = call_inputs(unet, size, dtype, device)
        explain = explain_split(unet, n)
        model = torch.compile(unet, backend=compile_backend, mode="reduce-overhead" if gpu else None) \
            if compile_backend else unet

        def serial(*a, **k):
            marks.append(("serial", clock_mark(device)))
            out = model(*a, **k)
            marks.append(("serial", clock_mark(device)))
            return out

        base_name = f"whole model {'compiled (reduce-overhead)' if compile_backend else 'eager'}"
        reset_memory(device)
        with torch.no_grad():
            times, _ = timed(lambda: denoise(serial, sched, latent, kwargs, steps), args.repeats, device)
            base_ms = forward_ms(lambda: denoise(serial, sched, latent, kwargs, steps), marks, device)
        base = dict(arch=label, size=size, steps=steps, config=base_name, rank=None, median_s=statistics.median(times),
                    forward_ms=base_ms, peak_gb=peak_gb(device, left),
                    leftover_gb=left, params=sum(p.numel() for p in unet.parameters()))
        rows.append(base)
        print(f"[{label}] {base_name}: step {base_ms:.2f} ms, peak {base['peak_gb']} GiB", flush=True)
        unet = model = None
        torch._dynamo.reset()
        for rank in range(n):
            name = f"async N={n} component {rank}" + (" compiled" if compile_backend else "") + \
                (" +graphs" if graphs else "")
            left = leftover_gb(device)
            emulate.start(n, device, rank=rank)
            try:
                unet = build(arch, dtype, device)
                method = AsyncDenoise(warmup_steps=args.warmup_steps, cuda_graph=graphs,
                                      compile={"backend": compile_backend} if compile_backend else False)
                parallelize_module(unet, method, groups={"async": dist.group.WORLD}, scheduler=lambda: sched)
                reset_memory(device)  # from here: this component's weights, its activations and buffers
                with torch.no_grad():
                    times, _ = timed(lambda: denoise(unet, sched, latent, kwargs, steps), args.repeats, device)
                    method.state.observer = lambda phase, edge: marks.append((phase, clock_mark(device)))
                    ms = forward_ms(lambda: denoise(unet, sched, latent, kwargs, steps), marks, device)
                    method.state.observer = None
                moved = method.state.p2p.bytes_per_step()
                peak = peak_gb(device, left)
                rows.append(dict(arch=label, size=size, steps=steps, config=name, rank=rank, leftover_gb=left,
                                 median_s=statistics.median(times), forward_ms=ms, peak_gb=peak,
                                 params=sum(p.numel() for p in unet.parameters()),
                                 sent_mb_per_step=moved["sent"] / 2**20, received_mb_per_step=moved["received"] / 2**20,
                                 step_ratio=ms / base_ms, peak_ratio=peak / base["peak_gb"] if peak else None,
                                 warmup_steps=args.warmup_steps, explain=explain))
                print(f"[{label}] {name}: step {ms:.2f} ms ({ms / base_ms:.2f} of the whole model), peak {peak} GiB, "
                      f"sends {moved['sent'] / 2**20:.1f} MiB/step", flush=True)
            except Exception:  # noqa: BLE001 - record and go on with the next component
                errors.append(dict(arch=label, config=name, rank=rank, error=traceback.format_exc()[-2000:]))
                print(f"[{label}] {name} failed:\n{traceback.format_exc()}", flush=True)
            finally:
                unet = method = None
                emulate.stop()
                torch._dynamo.reset()
                gc.collect()
    write_emulated(args, rows, errors, device, n)
    return 1 if errors else 0


def write_emulated(args, rows, errors, device, n: int) -> None:
    import diffusers

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, diffusers=diffusers.__version__, command=" ".join(sys.argv),
                emulated_ranks=n, cfg_batch=2, dtype="fp16" if device.type == "cuda" else "fp32",
                targets={"step_ratio": 0.55, "peak_ratio": 0.65})
    (out / "async-emulated.json").write_text(json.dumps(dict(meta=meta, results=rows, errors=errors), indent=2))
    lines = [f"# AsyncDenoise, one device as each rank of {n} ({meta['device']}, {meta['date']})", "",
             f"`{meta['command']}` (torch {meta['torch']}, diffusers {meta['diffusers']}, {meta['dtype']}, "
             "CFG batch 2, DDIM; transfers are local copies: no network)", "",
             "| model | size | config | step ms | of whole | peak GiB | of whole | params M | sent MiB/step | "
             "received MiB/step | held before, GiB (not counted) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r.get("step_ratio") is None else f"{r['step_ratio']:.2f}"
        peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
        peak_ratio = "-" if r.get("peak_ratio") is None else f"{r['peak_ratio']:.2f}"
        moved = [("-" if r.get(k) is None else f"{r[k]:.1f}") for k in ("sent_mb_per_step", "received_mb_per_step")]
        lines.append(f"| {r['arch']} | {r['size']} | {r['config']} | {r['forward_ms']:.2f} | {ratio} | {peak} | "
                     f"{peak_ratio} | {r['params'] / 1e6:.1f} | {moved[0]} | {moved[1]} | "
                     f"{'-' if r.get('leftover_gb') is None else format(r['leftover_gb'], '.2f')} |")
    lines.append("")
    lines.append(f"Targets: each component's step <= {meta['targets']['step_ratio']} of the whole model's, each "
                 f"rank's peak memory <= {meta['targets']['peak_ratio']} of the whole model's.")
    for e in errors:
        lines.append(f"\nFAILED {e['arch']} {e['config']}: `{e['error'].strip().splitlines()[-1]}`")
    explain = [r["explain"] for r in rows if r.get("explain")]
    if explain:
        lines += ["", f"Split (N = {n}):", "```", *dict.fromkeys(explain), "```"]
    (out / "async-emulated.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def write(args, rows, errors, device) -> None:
    import diffusers

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        base = next((r for r in rows if r["arch"] == row["arch"] and r["config"].startswith("serial compiled")),
                    next(r for r in rows if r["arch"] == row["arch"] and r["config"] == "serial eager"))
        row["speedup_vs"] = base["config"]
        row["speedup"] = base["median_s"] / row["median_s"]
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, diffusers=diffusers.__version__, command=" ".join(sys.argv),
                world_size=dist.get_world_size(), cfg_batch=2, dtype="fp16" if device.type == "cuda" else "fp32")
    (out / "async-bench.json").write_text(json.dumps(dict(meta=meta, results=rows, errors=errors), indent=2))
    lines = [f"# AsyncDenoise benchmark ({meta['device']}, {meta['date']})", "",
             f"`{meta['command']}` (torch {meta['torch']}, diffusers {meta['diffusers']}, {meta['dtype']}, "
             "CFG batch 2, DDIM)", "",
             "| model | size | steps | config | ranks | median s | ms/step | speedup | peak GiB per rank | "
             "params M per rank | async forward ms per rank |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peaks = ", ".join("-" if p is None else f"{p:.1f}" for p in r["peak_gb"])
        params = ", ".join(f"{p / 1e6:.1f}" for p in r["params"])
        fwd = ", ".join(f"{f:.1f}" for f in r["forward_ms"] if f is not None) if r.get("forward_ms") else "-"
        lines.append(f"| {r['arch']} | {r['size']} | {r['steps']} | {r['config']} | {r['ranks']} | "
                     f"{r['median_s']:.3f} | {r['median_s'] / r['steps'] * 1e3:.1f} | {r['speedup']:.2f}x | {peaks} | "
                     f"{params} | {fwd} |")
    for e in errors:
        lines.append(f"\nFAILED {e['arch']} {e['config']} (rank {e['rank']}): `{e['error'].strip().splitlines()[-1]}`")
    explain = [r["explain"] for r in rows if r.get("explain")]
    if explain:
        lines += ["", "Split (N = world size):", "```", *dict.fromkeys(explain), "```"]
    (out / "async-bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["sdxl", "sd21"], choices=sorted(ARCHS))
    p.add_argument("--tiny", action="store_true", help="tiny random UNet (CPU/gloo smoke run)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; 6 with --tiny)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--device", default=None, choices=("cpu", "cuda"))
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor on GPU, off on CPU)")
    p.add_argument("--no-graphs", action="store_true", help="no CUDA graphs for the async steps")
    p.add_argument("--emulate-ranks", type=int, default=0,
                   help="one process, one device: each of the N components as rank k of N (no torchrun)")
    p.add_argument("--out", required=True, help="output folder for async-bench.json / .md")
    args = p.parse_args()
    return run_emulated(args) if args.emulate_ranks else run(args)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PARADIFF_TIMEOUT", "1800")  # rank 0 compiles the baseline while the others wait
    sys.exit(main())
