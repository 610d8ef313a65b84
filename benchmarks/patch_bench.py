"""Per-step latency of patch parallelism (DistriFusion) and CFG parallelism vs a compiled single GPU, on a UNet.

    torchrun --nproc-per-node 2 benchmarks/patch_bench.py --out benchmarks/results/patch-h200x2       # SDXL 1024
    torchrun --nproc-per-node 2 benchmarks/patch_bench.py --size 2048 --configs baseline,patch --out ...
    torchrun --nproc-per-node 2 benchmarks/patch_bench.py --tiny --out /tmp/patch-tiny                # CPU / gloo

Configurations (each a fresh random-weight UNet, CFG batch 2, fp16 on GPU):
  baseline      one GPU, torch.compile(mode="reduce-overhead") (every rank runs it alone; rank 0's figure is used)
  patch         PatchParallel over all ranks, stale steps compiled and replayed from a CUDA graph
  patch-graph   PatchParallel, stale steps eager but replayed from a CUDA graph (no compile time)
  patch-nocomm  the same step with every collective replaced by a local copy of the same size: the difference to
                `patch` is the communication the overlap did not hide ("exposed comm")
  patch-eager   PatchParallel without compile / CUDA graph
  cfg           CFGParallel (2 ranks), compiled, replayed from a CUDA graph
  cfg+patch     CFGParallel x PatchParallel (4 ranks: 2 x 2), compiled + CUDA graph
`--emulate-ranks N` (one process, one device): rank 0 of N over a fake process group, every collective replaced by
a local copy of its size, as in patch-nocomm. It measures one rank's compute (an upper bound on the N-GPU speedup,
with no communication at all), the compile time and the CUDA-graph capture of the parallel step on a single GPU.
Per configuration: median stale-step latency (CUDA events), the whole `--steps` loop (warm-up steps included),
and the peak memory of every rank. Writes `patch-bench.json` and `patch-bench.md` to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist

from paradiff import runtime


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="stable-diffusion-xl-base-1.0", help="UNet architecture (paradiff.archs name)")
    p.add_argument("--size", type=int, default=1024, help="image size in px (square); latent = size / 8")
    p.add_argument("--steps", type=int, default=50, help="denoising steps per loop")
    p.add_argument("--warmup-steps", type=int, default=4, help="synchronous steps of PatchParallel")
    p.add_argument("--configs", default=None,
                   help="comma list (default: baseline,patch,patch-nocomm,patch-graph,patch-eager and cfg on 2 "
                        "ranks, cfg+patch on 4)")
    p.add_argument("--repeat", type=int, default=2, help="timed loops per configuration (after one untimed)")
    p.add_argument("--tiny", action="store_true", help="tiny random UNet in fp32 (CPU/gloo smoke run)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default: inductor on GPU; none on CPU unless given)")
    p.add_argument("--emulate-ranks", type=int, default=0,
                   help="one process as rank 0 of N, collectives replaced by local copies (see above)")
    p.add_argument("--out", required=True, help="output directory for patch-bench.json / .md")
    return p.parse_args(argv)


# -- model and inputs -----------------------------------------------------------------------------------------------
def tiny_models():
    """tests/support/models.py, the one factory of the tiny random-weight models (the whole repo travels)."""
    tests = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from support import models

    return models


def build_unet(args, device, dtype):
    if args.tiny:  # the SDXL-like tiny UNet, without the tests' re-initialised zero layers
        unet = tiny_models().tiny_unet("sdxl", fill_zeros=False)
        return unet.to(device, dtype).eval().requires_grad_(False)
    from paradiff.archs import build_model

    return build_model(args.arch, "unet", dtype=dtype, device=device)


def make_inputs(unet, args, device, dtype, batch=2):
    """Call kwargs for a CFG step (batch 2): latent, text states and SDXL's added conditioning (the model facts of
    `paradiff.plans.common`; the copy below serves trees from before it, which core_regression.py measures)."""
    try:
        from paradiff.plans.common import example_inputs
    except ImportError:
        return _legacy_inputs(unet, args, device, dtype, batch)
    kwargs = example_inputs(unet, batch, args.size // 8, args.size // 8, device=device, dtype=dtype)
    kwargs.pop("timestep")  # the loop passes its own
    return kwargs


def _legacy_inputs(unet, args, device, dtype, batch):
    cfg = unet.config
    g = torch.Generator("cpu").manual_seed(0)
    latent = args.size // 8
    kwargs = dict(sample=torch.randn(batch, cfg.in_channels, latent, latent, generator=g),
                  encoder_hidden_states=torch.randn(batch, 77, cfg.cross_attention_dim, generator=g))
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_dim, generator=g),
            "time_ids": torch.tensor([[args.size, args.size, 0, 0, args.size, args.size]] * batch, dtype=torch.float32)}
    return torch.utils._pytree.tree_map(lambda t: t.to(device, dtype), kwargs)


# -- timing ---------------------------------------------------------------------------------------------------------
class Timer:
    """Per-step times: CUDA events read once at the end of the loop (no sync per step), or wall clock on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def steps_ms(self) -> list[float]:
        marks, self.marks = self.marks, []
        if self.cuda:
            marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(marks, marks[1:])]


def run_loop(step, kwargs, steps, timer, reset=None, progress=None):
    """A denoising-like loop; returns per-step milliseconds. `progress`: a label to print each step's time under
    (synchronising after every step; for the untimed first loop, where compile and capture show up)."""
    if reset is not None:
        reset()
    x = kwargs["sample"].clone()
    timesteps = torch.linspace(999.0, 0.0, steps, device=x.device)
    with torch.no_grad():
        timer.mark()
        start = time.perf_counter()
        for i in range(steps):
            out = step(**{**kwargs, "sample": x, "timestep": timesteps[i]}, return_dict=False)[0]
            x = x - 0.02 * out.to(x.dtype)
            timer.mark()
            if progress:
                if x.is_cuda:
                    torch.cuda.synchronize()
                print(f"  {progress} step {i + 1}/{steps}: {(time.perf_counter() - start) * 1e3:.0f} ms since the "
                      f"loop began ({datetime.datetime.now():%H:%M:%S})", flush=True)
    return timer.steps_ms()


# The collectives --emulate-ranks replaces, by name, and a local stand-in of the same result shape for rank 0 of N,
# for trees before the execution core (2c12c57 keeps them in the module `paradiff.comm`). Since the core, the seam
# `paradiff.comm.emulate` swaps `paradiff.comm.collectives.backend` instead.
_COMM_MODULES = ("paradiff.comm", "paradiff.comm.collectives", "paradiff.comm.stale")
_FAKES = {
    "_all_gather": lambda x, dim, group: torch.cat([x] * dist.get_world_size(group), dim=dim),
    "_start_all_gather": lambda x, group_name, world: torch.cat([x] * world),
    "_wait_started": lambda x: x,
}


def fake_collectives(on: bool) -> list[str]:
    """Replace (on) or restore every paradiff all-gather by a local tensor of the gathered size (exposed comm).

    Works on both layouts of `paradiff.comm` (benchmarks/core_regression.py runs it against the 2c12c57 tree): the
    real functions are looked up by name in the comm modules, then every binding of them in any loaded `paradiff.*`
    module is replaced, found by identity, so a `from paradiff.comm.collectives import _all_gather` elsewhere is
    replaced too. Import the methods first. Returns the `module.attribute` names replaced; raises if no all-gather
    was found (a benchmark over the fake process group would otherwise time collectives that do nothing).
    """
    import importlib

    try:  # the execution core's seam: one swappable backend for the traced collectives
        from paradiff.comm import collectives, emulate
    except ImportError:
        emulate = None
    if emulate is not None and hasattr(collectives, "backend"):
        if on and not emulate.active():
            collectives.backend = emulate.LocalCopies(dist.get_world_size())
        elif not on:
            collectives.backend = collectives.Collectives()
        return ["paradiff.comm.collectives.backend"] if on else []
    if not on:
        for module, attr, real in getattr(fake_collectives, "patched", []):
            setattr(module, attr, real)
        fake_collectives.patched = []
        return []
    if getattr(fake_collectives, "patched", None):
        return [f"{m.__name__}.{a}" for m, a, _ in fake_collectives.patched]
    real = {}  # id of a real function -> its name in _FAKES
    for name in _COMM_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for fname in _FAKES:
            fn = vars(module).get(fname)
            if callable(fn) and fn not in _FAKES.values():
                real[id(fn)] = fname
    patched = []
    for modname, module in list(sys.modules.items()):
        if module is None or not (modname == "paradiff" or modname.startswith("paradiff.")):
            continue
        for attr, value in list(vars(module).items()):
            if id(value) in real and callable(value):
                setattr(module, attr, _FAKES[real[id(value)]])
                patched.append((module, attr, value))
    if "_all_gather" not in {real[id(v)] for _, _, v in patched}:
        for module, attr, value in patched:
            setattr(module, attr, value)
        raise RuntimeError(f"no paradiff all-gather found to emulate in {', '.join(_COMM_MODULES)}")
    fake_collectives.patched = patched
    return [f"{m.__name__}.{a}" for m, a, _ in patched]


def compile_backend(args, device) -> str | None:
    return args.compile_backend or ("inductor" if device.type == "cuda" else None)


def bench_config(name, args, rt, device, dtype):
    from paradiff import CFGParallel, PatchParallel
    from paradiff.parallel import parallelize_module

    on_gpu = device.type == "cuda"
    backend = compile_backend(args, device)
    compile_opts = {"backend": backend} if backend else False
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    unet = build_unet(args, device, dtype)
    kwargs = make_inputs(unet, args, device, dtype)
    reset, hook = None, None
    stale_from = 0
    fake = name != "baseline" and (name == "patch-nocomm" or bool(args.emulate_ranks))
    progress = f"{name} (rank 0, first loop)" if rt.is_main else None
    if name == "baseline":
        if backend == "inductor":
            step = torch.compile(unet, mode="reduce-overhead")
        elif backend:
            step = torch.compile(unet, backend=backend)
        else:
            step = unet
    else:
        if fake:
            fake_collectives(True)
        dims = {"cfg": 2, "patch": rt.world_size // 2} if name.startswith("cfg") else {"patch": rt.world_size}
        if name == "cfg":
            dims = {"cfg": 2}
        mesh = make_mesh(dims, args, device)
        methods = []
        if "cfg" in dims:  # alone, CFG parallel compiles and replays its half of the call itself
            methods.append(CFGParallel(compile=compile_opts, cuda_graph=on_gpu) if len(dims) == 1 else CFGParallel())
        if "patch" in dims:
            eager = name in ("patch-eager", "patch-graph")
            methods.append(PatchParallel(warmup_steps=args.warmup_steps, compile=False if eager else compile_opts,
                                         cuda_graph=on_gpu and name != "patch-eager"))
            stale_from = args.warmup_steps
            hook = methods[-1]
        target = parallelize_module(unet, *methods, groups={d: mesh.get_group(d) for d in dims})
        reset, step = target.start, unet
    timer = Timer(device)
    run_loop(step, kwargs, args.steps, timer, reset, progress)  # compile, capture, warm caches
    loops = [run_loop(step, kwargs, args.steps, timer, reset) for _ in range(args.repeat)]
    if fake:
        fake_collectives(False)
    steady = [t for loop in loops for t in loop[max(stale_from, 1):]]
    runner = getattr(getattr(hook, "hook", None), "_runner", None)
    result = {"config": name, "step_ms": statistics.median(steady),
              "cuda_graph_replays": getattr(runner, "replays", None),
              "loop_ms": statistics.median(sum(loop) for loop in loops),
              "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None}
    del unet, step
    return result


def make_mesh(dims, args, device):
    if not args.emulate_ranks:
        return runtime.mesh(dims)
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, tuple(dims.values()), mesh_dim_names=tuple(dims.keys()))


def init_runtime(args):
    """The real runtime, or (--emulate-ranks N) rank 0 of N over a fake process group in this one process."""
    if not args.emulate_ranks:
        return runtime.init()
    from paradiff.comm import emulate

    if args.emulate_ranks < 2:
        raise SystemExit("--emulate-ranks needs N >= 2.")
    rt = emulate.start(args.emulate_ranks)
    emulate.collectives.backend = emulate.collectives.Collectives()  # real ops until a config fakes them
    return rt


def setup(args):
    """Runtime, device and dtype of a benchmark run (fp16 on GPU; fp32 and one thread on the CPU or --tiny)."""
    rt = init_runtime(args)
    device = rt.device
    if device.type == "cpu":
        torch.set_num_threads(1)
    dtype = torch.float32 if args.tiny or device.type == "cpu" else torch.float16
    if args.tiny:
        args.size = min(args.size, 256)
    torch._dynamo.config.recompile_limit = 64  # every configuration is a new UNet: new guards, new graphs
    return rt, device, dtype


def default_configs(world):
    if world == 1:
        return ["baseline"]
    if world == 2:
        return ["baseline", "patch", "patch-nocomm", "patch-graph", "patch-eager", "cfg"]
    return ["baseline", "patch", "patch-nocomm", "patch-graph", "patch-eager", "cfg+patch"]


def main(argv=None):
    args = parse_args(argv)
    if args.steps <= args.warmup_steps + 1:
        raise SystemExit(f"--steps {args.steps} leaves no stale steps to time after --warmup-steps {args.warmup_steps}.")
    rt, device, dtype = setup(args)
    configs = args.configs.split(",") if args.configs else default_configs(rt.world_size)
    rows = []
    for name in configs:
        if name.startswith("cfg") and rt.world_size not in ((2,) if name == "cfg" else (4, 8)):
            if rt.is_main:
                print(f"skip {name}: needs {'2' if name == 'cfg' else '4'} ranks", flush=True)
            continue
        result = bench_config(name, args, rt, device, dtype)
        peaks = [result["peak_mem_gib"]] * (1 if args.emulate_ranks else rt.world_size)
        if rt.distributed and not args.emulate_ranks:
            dist.all_gather_object(peaks, result["peak_mem_gib"])
        result["peak_mem_gib_per_rank"] = peaks
        rows.append(result)
        if rt.is_main:
            print(f"{name:14s} step {result['step_ms']:8.2f} ms   loop {result['loop_ms']:9.1f} ms", flush=True)
        if rt.is_main:  # after every configuration: a run cut off by a time limit keeps what it measured
            write_results(args, rt, rows, quiet=name != configs[-1])
        runtime.barrier()
    runtime.shutdown()


def write_results(args, rt, rows, quiet=False):
    base = next((r for r in rows if r["config"] == "baseline"), None)
    nocomm = next((r for r in rows if r["config"] == "patch-nocomm"), None)
    for r in rows:
        if base:
            r["step_speedup"] = base["step_ms"] / r["step_ms"]
            r["loop_speedup"] = base["loop_ms"] / r["loop_ms"]
        if r["config"] == "patch" and nocomm:
            r["exposed_comm_ms"] = r["step_ms"] - nocomm["step_ms"]
    env = {"device": torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else platform.processor() or "cpu",
           "world_size": rt.world_size, "backend": rt.backend, "torch": torch.__version__,
           "diffusers": __import__("diffusers").__version__, "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])}
    setup = {"arch": "tiny" if args.tiny else args.arch, "size_px": args.size, "latent": args.size // 8,
             "batch": 2, "dtype": "fp32" if args.tiny or rt.device.type == "cpu" else "fp16", "steps": args.steps,
             "warmup_steps": args.warmup_steps, "repeat": args.repeat,
             "compile_backend": compile_backend(args, rt.device)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "patch-bench.json"), "w") as f:
        json.dump({"env": env, "setup": setup, "results": rows}, f, indent=2)

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    lines = [f"# Patch / CFG parallel step latency: {setup['arch']} {args.size}px, batch 2 (CFG), {setup['dtype']}",
             "", f"{env['device']} x {rt.world_size} ({env['backend']}), torch {env['torch']}, diffusers "
             f"{env['diffusers']}, {env['date']}",
             f"`{env['command']}`", "",
             "| config | stale step ms | speedup | loop of %d steps ms | speedup | exposed comm ms | peak GiB per rank |"
             % args.steps, "|---|---|---|---|---|---|---|"]
    for r in rows:
        peaks = ", ".join(fmt(p, ".1f") for p in r["peak_mem_gib_per_rank"])
        lines.append(f"| {r['config']} | {r['step_ms']:.2f} | {fmt(r.get('step_speedup'), '.2f')} | "
                     f"{r['loop_ms']:.1f} | {fmt(r.get('loop_speedup'), '.2f')} | "
                     f"{fmt(r.get('exposed_comm_ms'), '.2f')} | {peaks} |")
    lines += ["", "Stale step: median over the steps after warm-up. Loop: median total of the whole loop (warm-up "
              "steps synchronous). Exposed comm: patch step minus the same step with local copies instead of "
              "collectives."]
    with open(os.path.join(args.out, "patch-bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
