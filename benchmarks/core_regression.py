"""Before/after check of the execution core on one GPU: the same measurements of two source trees, side by side.

    bash benchmarks/core_regression.sh .before . stream        # the wrapper (wheels, environment, log): its header
    python3 benchmarks/core_regression.py --before .before --after . --section stream --out DIR [--smoke]

This one driver (with the helpers of patch_bench.py and stream_bench.py beside it) runs each tree in its own process,
with PYTHONPATH at that tree's src/, and reaches paradiff only through what both trees offer: StreamPipeline,
`PatchParallel(...)` / `CFGParallel(...)` applied with their public `apply(pipe, mesh)` to a pipeline that holds the
UNet and a scheduler, and keyword arguments filtered by each tree's signatures (`CFGParallel(compile=...)` is used
where it exists; before it, the step is compiled by hand and replayed from `paradiff.cudagraph.GraphRunner`, as
patch_bench.py's `cfg` configuration did). Each denoising loop is a pipeline's: `scheduler.set_timesteps`, then per
step `scale_model_input`, the UNet, `scheduler.step`, so a method that counts steps through the scheduler or resets
through diffusers' stateful hooks sees what it would see in a pipeline.

Order: the 'before' process builds, compiles and warms up every configuration of the section, then waits; then the
'after' process does the same (the GPU and CPU are otherwise idle meanwhile); then both are timed in alternating
rounds (before, after, after, before, ...), each round one untimed pass and one timed pass per configuration, so a
drift of clocks or temperature hits both alike. Both processes stay alive until the end (GPU memory: about 30 GiB
each for the SDXL sections).

Sections (one device command each, see core_regression.sh for durations):
  stream  StreamPipeline, sd-turbo UNet + TAESD (random weights), fp16, 512 px, img2img 1 step (t_index [35]),
          compiled + CUDA graph, frame_buffer_size 4 and 1, uint8 frames already on the GPU: frames per second over
          back-to-back calls (stream_bench.py's img2img-1step-b4 / -b1, engine "compile").
  patch   PatchParallel on the SDXL base UNet, 1024 px, CFG batch 2, rank 0 of 2 emulated, 4 synchronous warm-up
          steps then stale steps compiled and replayed from a CUDA graph: median stale-step time.
  cfg     the compiled single-GPU step (torch.compile(mode="reduce-overhead"), batch 2; the same code in both trees,
          so its ratio is an A/A control of the measurement) and CFGParallel's per-rank step, rank 0 of 2 emulated
          (the UNet runs one half of the CFG batch, the all-gather is a local copy), compiled.
  all     the three (for --smoke; far too long for one device command on the real models).

Emulated ranks: a fake process group (rank 0 of 2), and the collectives replaced by local copies of their result's
size: through the seam `paradiff.comm.emulate` where the tree has one (called as `emulate(2)`; a context manager is
entered and kept open), else by patch_bench.fake_collectives (every binding of paradiff's all-gather functions
replaced; it handles both layouts of paradiff.comm). The JSON records which.

Writes core-SECTION.json (both trees' setup, every round, the summary) and core-SECTION.md (the comparison table)
to --out, and prints the table. `--smoke`: tiny random models, CPU if there is no GPU, no compile, few steps.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
SECTIONS = {"stream": ["stream-b4", "stream-b1"], "patch": ["patch"], "cfg": ["baseline", "cfg"]}
SECTIONS["all"] = SECTIONS["stream"] + SECTIONS["patch"] + SECTIONS["cfg"]
THRESHOLD = 0.03  # the "no regression larger than 3%"
ROLES = ("before", "after")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--section", choices=sorted(SECTIONS), required=True)
    p.add_argument("--before", help="tree (a folder with src/paradiff) measured as 'before'")
    p.add_argument("--after", help="tree measured as 'after'")
    p.add_argument("--before-label", default=os.environ.get("BEFORE_LABEL"), help="e.g. the commit (default: path)")
    p.add_argument("--after-label", default=os.environ.get("AFTER_LABEL"))
    p.add_argument("--out", default=os.environ.get("OUT") or "core-out")
    p.add_argument("--smoke", action="store_true", default=os.environ.get("CORE_SMOKE") == "1",
                   help="tiny models, no compile (CPU is fine): tests this script")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per tree (default 6 stream, 4 others)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per loop (default 50; smoke 6)")
    p.add_argument("--warmup-steps", type=int, default=None, help="PatchParallel warm-up steps (default 4; smoke 2)")
    p.add_argument("--iters", type=int, default=None, help="stream calls per timed pass (default 100; smoke 3)")
    p.add_argument("--compile-backend", default=os.environ.get("CORE_COMPILE_BACKEND"),
                   help="default: inductor on GPU, no compile with --smoke or on the CPU")
    p.add_argument("--cache", choices=("shared", "per-tree"), default=os.environ.get("CORE_CACHE", "shared"),
                   help="TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR shared by both trees (default: identical graphs "
                        "compile once, with the same kernel choices) or one per tree (both compile cold)")
    p.add_argument("--budget-s", type=float, default=float(os.environ.get("CORE_BUDGET_S", 520)),
                   help="wall-clock budget of the whole section; a tree not set up in time is stopped")
    p.add_argument("--worker", choices=ROLES, help=argparse.SUPPRESS)
    p.add_argument("--tree", help=argparse.SUPPRESS)
    p.add_argument("--sync", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    smoke = args.smoke
    args.rounds = args.rounds or (2 if smoke else 6 if args.section == "stream" else 4)
    args.steps = args.steps or (6 if smoke else 50)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (2 if smoke else 4)
    args.iters = args.iters or (3 if smoke else 100)
    return args


# -- small helpers ----------------------------------------------------------------------------------------------
def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def tree_hash(tree: Path) -> str:
    """sha256 (12 hex digits) over the tree's src/paradiff/**/*.py, names and contents: which code ran."""
    digest = hashlib.sha256()
    for path in sorted((tree / "src" / "paradiff").rglob("*.py")):
        digest.update(str(path.relative_to(tree)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def accepted(cls, **kwargs):
    """`kwargs` split into those `cls(...)` accepts and those it does not (its signature decides)."""
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs, {}
    return ({k: v for k, v in kwargs.items() if k in params}, {k: v for k, v in kwargs.items() if k not in params})


# -- worker: one tree, one process --------------------------------------------------------------------------------
class Worker:
    def __init__(self, args):
        import torch

        self.args, self.torch = args, torch
        self.role = args.worker
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"
        if not self.cuda:
            torch.set_num_threads(1)
        self.dtype = torch.float16 if self.cuda and not args.smoke else torch.float32
        self.backend = args.compile_backend or ("inductor" if self.cuda and not args.smoke else None)
        for name in ("recompile_limit", "cache_size_limit"):  # every configuration is a new module: new graphs
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)
        self.unet_args = SimpleNamespace(tiny=args.smoke, arch="stable-diffusion-xl-base-1.0",
                                         size=128 if args.smoke else 1024)
        self.emulation = None
        self._meshes = {}
        self._stream_models = None

    def log(self, *parts) -> None:
        print(f"[{self.role} {datetime.datetime.now():%H:%M:%S}]", *parts, flush=True)

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    # emulated ranks: a fake process group, collectives replaced by local copies
    def emulate(self, world: int = 2) -> dict:
        if self.emulation is not None:
            return self.emulation
        import importlib

        import torch.distributed as dist

        import paradiff
        import paradiff.comm as comm

        for name in ("PatchParallel", "CFGParallel"):  # load the methods: their bindings of collectives count
            getattr(paradiff, name)
        info = {}
        seam = getattr(comm, "emulate", None)
        if seam is None:
            try:
                seam = importlib.import_module("paradiff.comm.emulate")
            except ImportError:
                seam = None
        if seam is not None and callable(getattr(seam, "start", None)):  # paradiff.comm.emulate.start(world, device)
            seam.start(world, self.device)
            info["via"] = f"paradiff.comm.emulate.start({world})"
        elif seam is not None:
            fn = seam if callable(seam) else next(
                (getattr(seam, n) for n in ("emulate", "enable") if callable(getattr(seam, n, None))), None)
            try:
                handle = fn(world)
                if hasattr(handle, "__enter__"):
                    handle.__enter__()
                    self._seam_handle = handle  # kept open for the life of the process
                info["via"] = f"paradiff.comm.emulate: {fn.__module__}.{fn.__qualname__}({world})"
            except Exception as err:  # noqa: BLE001 - an unknown seam: say so, and fall back
                info["seam_error"] = f"{type(err).__name__}: {err}"
        if not dist.is_initialized():
            from torch.testing._internal.distributed.fake_pg import FakeStore

            dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
        from paradiff import runtime

        if getattr(runtime, "_runtime", "absent") is None:  # code that asks paradiff.runtime sees rank 0 of N too
            try:
                runtime._runtime = runtime.Runtime(rank=0, world_size=world, local_rank=0, local_world_size=1,
                                                   device=self.device, backend="fake")
                info["runtime"] = "paradiff.runtime: rank 0 of %d (fake)" % world
            except Exception as err:  # noqa: BLE001 - another Runtime: leave it alone
                info["runtime"] = f"not registered ({type(err).__name__}: {err})"
        if "via" not in info:
            import patch_bench

            info["via"] = "monkeypatch (patch_bench.fake_collectives)"
            info["replaced"] = patch_bench.fake_collectives(True)
        info["world_size"], info["rank"] = world, 0
        self.log("emulated ranks:", json.dumps(info))
        self.emulation = info
        return info

    def mesh(self, dim: str):
        if dim not in self._meshes:
            from torch.distributed.device_mesh import init_device_mesh

            self.emulate()
            self._meshes[dim] = init_device_mesh(self.device.type, (2,), mesh_dim_names=(dim,))
        return self._meshes[dim]

    # models
    def unet(self):
        import patch_bench

        unet = patch_bench.build_unet(self.unet_args, self.device, self.dtype)
        return unet, patch_bench.make_inputs(unet, self.unet_args, self.device, self.dtype)

    def pipe(self, unet):
        """A diffusers pipeline holding the UNet and an Euler scheduler (SDXL's): what a method's apply() gets."""
        from diffusers import DiffusionPipeline, EulerDiscreteScheduler

        class UNetPipeline(DiffusionPipeline):
            def __init__(self, unet, scheduler):
                super().__init__()
                self.register_modules(unet=unet, scheduler=scheduler)

        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           timestep_spacing="leading", steps_offset=1)
        pipe = UNetPipeline(unet, scheduler)
        pipe.vae_scale_factor = 8
        return pipe

    def stream_models(self):
        if self._stream_models is None:
            import stream_bench

            self._stream_models = stream_bench._build(SimpleNamespace(tiny=self.args.smoke, arch="sd-turbo"),
                                                      self.device, self.dtype)
        return self._stream_models

    def compile_arg(self):
        """What a user passes as `compile=` to a method: True for inductor, else the backend, else False."""
        if self.backend is None:
            return False
        return True if self.backend == "inductor" else {"backend": self.backend}

    # the denoising loop of a pipeline
    def loop(self, step, pipe, inputs, progress=None) -> list[float]:
        import patch_bench

        torch = self.torch
        scheduler = pipe.scheduler
        scheduler.set_timesteps(self.args.steps, device=self.device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)  # no host sync to find the first step
        registry = getattr(pipe.unet, "_diffusers_hook", None)
        if registry is not None and hasattr(registry, "reset_stateful_hooks"):
            registry.reset_stateful_hooks()  # what a pipeline's maybe_free_model_hooks() does after each call
        timer = patch_bench.Timer(self.device)
        x = inputs["sample"].clone()
        start = time.perf_counter()
        with torch.no_grad():
            timer.mark()
            for i, t in enumerate(scheduler.timesteps):
                out = step(**{**inputs, "sample": scheduler.scale_model_input(x, t), "timestep": t},
                           return_dict=False)[0]
                x = scheduler.step(out, t, x, return_dict=False)[0]
                timer.mark()
                if progress:
                    self.sync()
                    self.log(f"{progress} step {i + 1}/{self.args.steps}: {time.perf_counter() - start:.1f} s")
        return timer.steps_ms()


class UNetConfig:
    """A UNet step in a denoising loop: setup() builds, compiles and captures; run() times one loop."""

    skip = 1  # steps left out of the median (the warm-up steps of patch parallelism)

    def __init__(self, name, w: Worker):
        self.name, self.w, self.info = name, w, {}

    def setup(self):
        start = time.perf_counter()
        self.build()
        self.w.loop(self.step, self.pipe, self.inputs, progress=f"{self.name} first loop")
        self.w.sync()
        self.info["setup_s"] = round(time.perf_counter() - start, 1)
        return self.info

    def run(self) -> dict:
        self.w.loop(self.step, self.pipe, self.inputs)  # untimed: clocks up, caches warm
        steps = self.w.loop(self.step, self.pipe, self.inputs)
        return {"step_ms": statistics.median(steps[self.skip:]), "loop_ms": sum(steps)}


class Baseline(UNetConfig):
    def build(self):
        torch = self.w.torch
        unet, self.inputs = self.w.unet()
        self.pipe = self.w.pipe(unet)
        b = self.w.backend
        self.step = (torch.compile(unet, mode="reduce-overhead") if b == "inductor"
                     else torch.compile(unet, backend=b) if b else unet)
        self.info["how"] = ("torch.compile(unet, mode='reduce-overhead')" if b == "inductor"
                            else f"torch.compile(unet, backend={b!r})" if b else "eager")


def install(method, pipe, w, dim: str) -> None:
    """The tree's own way to apply a method: `parallelize` where `apply` takes the installation (the execution
    core), `apply(pipe, mesh)` before it."""
    import paradiff

    if len(inspect.signature(method.apply).parameters) == 1:
        w.emulate()
        paradiff.parallelize(pipe, method, main_rank_stages=False)
    else:
        method.apply(pipe, w.mesh(dim))


class Patch(UNetConfig):
    def build(self):
        import paradiff

        self.skip = self.w.args.warmup_steps
        unet, self.inputs = self.w.unet()
        self.pipe = self.w.pipe(unet)
        kwargs, dropped = accepted(paradiff.PatchParallel, warmup_steps=self.w.args.warmup_steps,
                                   compile=self.w.compile_arg(), cuda_graph=self.w.cuda)
        method = paradiff.PatchParallel(**kwargs)
        install(method, self.pipe, self.w, "patch")
        self.step = self.pipe.unet
        self.method = method
        self.info.update(how=repr(method), dropped_kwargs=list(dropped), emulation=self.w.emulation)

    def run(self) -> dict:
        row = super().run()
        hook = getattr(self.method, "hook", None)
        graphs = getattr(hook, "_graphs", None)  # 2c12c57's hook: replays per phase
        runner = getattr(hook, "_runner", None)  # the execution core's GraphRunner
        if runner is not None and hasattr(runner, "replays"):
            row["cuda_graph_replays"] = runner.replays
        elif isinstance(graphs, dict):
            row["cuda_graph_replays"] = {("sync" if k else "stale"): getattr(v, "replays", None)
                                         for k, v in graphs.items()}
        return row


class CFG(UNetConfig):
    def build(self):
        import paradiff

        unet, self.inputs = self.w.unet()
        self.pipe = self.w.pipe(unet)
        if "compile" in inspect.signature(paradiff.CFGParallel).parameters:
            kwargs, dropped = accepted(paradiff.CFGParallel, compile=self.w.compile_arg(), cuda_graph=self.w.cuda)
            method = paradiff.CFGParallel(**kwargs)
            install(method, self.pipe, self.w, "cfg")
            self.step = self.pipe.unet
            self.info.update(how=repr(method), dropped_kwargs=list(dropped))
        else:  # no compile option yet: what a user could do (and patch_bench's cfg configuration measured)
            paradiff.CFGParallel().apply(self.pipe, self.w.mesh("cfg"))
            b = self.w.backend
            compiled = self.w.torch.compile(self.pipe.unet, backend=b) if b else self.pipe.unet
            self.step = compiled
            how = f"CFGParallel(); torch.compile(unet, backend={b!r})" if b else "CFGParallel(), eager"
            if self.w.cuda:
                from paradiff.cudagraph import GraphRunner

                runner, calls = None, [0]

                def step(**kw):  # two compiled calls, then the CUDA graph
                    nonlocal runner
                    calls[0] += 1
                    if calls[0] <= 2:
                        return compiled(**kw)
                    runner = runner or GraphRunner(compiled)
                    return runner(**kw)

                self.step = step
                how += " + paradiff.cudagraph.GraphRunner"
            self.info["how"] = how
        self.info["emulation"] = self.w.emulation


class Stream:
    def __init__(self, name, w: Worker):
        self.name, self.w, self.info = name, w, {}
        self.fbs = int(name.rsplit("b", 1)[1])

    def setup(self):
        import numpy as np

        import paradiff
        import stream_bench

        torch, w = self.w.torch, self.w
        size = 64 if w.args.smoke else 512
        start = time.perf_counter()
        pipe, taesd = w.stream_models()[:2]  # newer stream_bench also returns a ControlNet
        compile = w.backend == "inductor"
        self.stream = paradiff.StreamPipeline(pipe, [35], guidance="none", frame_buffer_size=self.fbs, tiny_vae=taesd,
                                              height=size, width=size, cuda_graph=w.cuda, compile=compile)
        self.stream.prepare("a watercolor painting of a cat", guidance_scale=1.2)
        host = np.random.default_rng(0).integers(0, 256, (self.fbs, size, size, 3), dtype=np.uint8)
        frames = torch.from_numpy(host).to(w.device)
        self.call = lambda: self.stream(frames)
        self.call()  # warm start, compile, capture
        stream_bench._time_calls(self.call, w.device, 5, 0)
        self.info.update(setup_s=round(time.perf_counter() - start, 1), size_px=size, t_index_list=[35],
                         how=f"StreamPipeline(img2img, frame_buffer_size={self.fbs}, cuda_graph={w.cuda}, "
                             f"compile={compile})")
        return self.info

    def run(self) -> dict:
        import stream_bench

        per_call = stream_bench._time_calls(self.call, self.w.device, self.w.args.iters, 10)
        return {"ms_per_call": per_call * 1e3, "frames_per_s": self.fbs / per_call}


CONFIGS = {"stream-b4": Stream, "stream-b1": Stream, "patch": Patch, "baseline": Baseline, "cfg": CFG}


def worker_main(args) -> int:
    sync = Path(args.sync)
    tree = Path(args.tree).resolve()
    w = Worker(args)
    import diffusers
    import torch

    import paradiff

    where = Path(paradiff.__file__).resolve()
    if tree not in where.parents:
        raise SystemExit(f"paradiff was imported from {where}, not from the tree {tree}: check PYTHONPATH.")
    ready = {"role": w.role, "tree": str(tree), "paradiff_file": str(where), "tree_hash": tree_hash(tree),
             "device": torch.cuda.get_device_name(0) if w.cuda else platform.processor() or "cpu",
             "versions": {"python": platform.python_version(), "torch": torch.__version__,
                          "cuda": torch.version.cuda, "diffusers": diffusers.__version__},
             "dtype": str(w.dtype).replace("torch.", ""), "compile_backend": w.backend,
             "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR"), "setup": {}, "errors": {}}
    cache = ready["inductor_cache"]
    ready["inductor_cache_was_empty"] = not (cache and Path(cache).is_dir() and any(Path(cache).iterdir()))
    configs = []
    for name in SECTIONS[args.section]:
        config = CONFIGS[name](name, w)
        w.log(f"setting up {name}")
        try:
            ready["setup"][name] = config.setup()
            configs.append(config)
            w.log(f"{name} ready: {json.dumps(ready['setup'][name], default=str)}")
        except Exception as err:  # noqa: BLE001 - record it, go on with the others
            traceback.print_exc()
            ready["errors"][name] = f"setup: {type(err).__name__}: {err}"[:2000]
    ready["emulation"] = w.emulation
    _write_json(sync / f"{w.role}.ready", ready)
    parent, r = os.getppid(), 0
    while True:  # timed rounds when the orchestrator says so
        go, stop = sync / f"go-{w.role}-{r}", sync / "stop"
        while not go.exists() and not stop.exists():
            if os.getppid() != parent:
                return 1
            time.sleep(0.02)
        if stop.exists() and not go.exists():
            return 0
        rows = {}
        for config in configs:
            try:
                rows[config.name] = config.run()
            except Exception as err:  # noqa: BLE001
                traceback.print_exc()
                rows[config.name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
        _write_json(sync / f"{w.role}-{r}.json", rows)
        w.log(f"round {r}: " + ", ".join(f"{k} {_primary(k, v)}" for k, v in rows.items()))
        r += 1


def _primary(name, row) -> str:
    if "error" in row:
        return "error"
    return f"{row['frames_per_s']:.1f} fps" if "frames_per_s" in row else f"{row['step_ms']:.2f} ms"


# -- orchestrator -----------------------------------------------------------------------------------------------
def orchestrate(args) -> int:
    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sync = Path(tempfile.mkdtemp(prefix="core-regression-"))
    trees = {"before": Path(args.before).resolve(), "after": Path(args.after).resolve()}
    labels = {"before": args.before_label or args.before, "after": args.after_label or args.after}
    cache_base = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or Path(tempfile.gettempdir()) / "core-inductor")
    result = {"section": args.section, "smoke": args.smoke, "labels": labels,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "cache": args.cache,
              "rounds_planned": args.rounds, "steps": args.steps, "warmup_steps": args.warmup_steps,
              "iters": args.iters, "trees": {}, "rounds": [], "notes": []}
    forward = ["--section", args.section, "--rounds", str(args.rounds), "--steps", str(args.steps),
               "--warmup-steps", str(args.warmup_steps), "--iters", str(args.iters), "--sync", str(sync)]
    if args.smoke:
        forward.append("--smoke")
    if args.compile_backend:
        forward += ["--compile-backend", args.compile_backend]
    procs = {}

    def save():
        _write_json(out / f"core-{args.section}.json", result)

    for role in ROLES:  # one after the other: a compile never shares the machine with the other tree
        tree = trees[role]
        if not (tree / "src" / "paradiff").is_dir():
            result["notes"].append(f"{role}: {tree} has no src/paradiff")
            continue
        env = dict(os.environ)
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and not (Path(p) / "paradiff").is_dir()]
        env["PYTHONPATH"] = os.pathsep.join([str(tree / "src"), str(HERE), *paths])
        cache = cache_base / ("shared" if args.cache == "shared" else role)
        env["TORCHINDUCTOR_CACHE_DIR"], env["TRITON_CACHE_DIR"] = str(cache), str(cache / "triton")
        print(f"== {role}: {tree} ({labels[role]}), inductor cache {cache}", flush=True)
        procs[role] = subprocess.Popen([sys.executable, __file__, "--worker", role, "--tree", str(tree), *forward],
                                       env=env)
        ready = sync / f"{role}.ready"
        while not ready.exists() and procs[role].poll() is None and time.monotonic() < deadline - 30:
            time.sleep(0.2)
        if ready.exists():
            result["trees"][role] = json.loads(ready.read_text())
            print(f"== {role} ready after {time.monotonic() - t0:.0f} s", flush=True)
        else:
            why = (f"exited with {procs[role].returncode}" if procs[role].poll() is not None
                   else f"not set up within the budget ({args.budget_s:.0f} s): stopped")
            result["notes"].append(f"{role}: {why}")
            print(f"== {role}: {why}", flush=True)
            if procs[role].poll() is None:
                procs[role].kill()
            procs.pop(role).wait()
        save()
    live = [role for role in ROLES if role in procs]
    round_s = []
    for r in range(args.rounds):
        if round_s and time.monotonic() + max(round_s) > deadline:
            result["notes"].append(f"rounds {r}..{args.rounds - 1} skipped: over the budget")
            break
        begun = time.monotonic()
        entry = {}
        for role in (live if r % 2 == 0 else live[::-1]):
            (sync / f"go-{role}-{r}").touch()
            done = sync / f"{role}-{r}.json"
            while not done.exists() and procs[role].poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            entry[role] = json.loads(done.read_text()) if done.exists() else {"error": "no result"}
        result["rounds"].append(entry)
        round_s.append(time.monotonic() - begun)
        save()
    (sync / "stop").touch()
    result["summary"] = summarize(result)
    result["total_s"] = round(time.monotonic() - t0, 1)
    save()  # before the workers exit: a command cut off at its limit keeps the results
    table = markdown(result)
    (out / f"core-{args.section}.md").write_text(table)
    print(table, flush=True)
    for role, proc in procs.items():
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    complete = all(role in result["trees"] and not result["trees"][role]["errors"] for role in ROLES)
    return 0 if complete and result["rounds"] else 1


def summarize(result) -> list[dict]:
    """Per configuration: each tree's median over the rounds, after/before, the verdict against THRESHOLD."""
    rows = []
    for name in SECTIONS[result["section"]]:
        per = {}
        for role in ROLES:
            values = [entry[role][name] for entry in result["rounds"]
                      if name in entry.get(role, {}) and "error" not in entry[role][name]]
            if values:
                per[role] = values
        if not per:
            continue
        stream = name.startswith("stream")
        key = "ms_per_call" if stream else "step_ms"
        row = {"config": name, "metric": "ms per call (frames on the GPU)" if stream else "ms per step"}
        for role, values in per.items():
            times = [v[key] for v in values]
            med = statistics.median(times)
            row[role] = {"ms": round(med, 3), "rounds": [round(t, 3) for t in times],
                         "spread": round((max(times) - min(times)) / med, 4)}
            if stream:
                row[role]["fps"] = round(statistics.median(v["frames_per_s"] for v in values), 1)
            else:
                row[role]["loop_ms"] = round(statistics.median(v["loop_ms"] for v in values), 1)
        if len(per) == 2:
            ratio = row["after"]["ms"] / row["before"]["ms"]
            row["after_over_before"] = round(ratio, 4)
            row["verdict"] = ("REGRESSION" if ratio > 1 + THRESHOLD else "faster" if ratio < 1 - THRESHOLD
                              else "within 3%")
        rows.append(row)
    return rows


def markdown(result) -> str:
    trees = result["trees"]
    first = next(iter(trees.values()), {})
    lines = [f"# Execution core before/after: section {result['section']}{' (smoke)' if result['smoke'] else ''}",
             "", f"- date: {result['date']}; device: {first.get('device', '?')}; versions: "
             + ", ".join(f"{k} {v}" for k, v in first.get("versions", {}).items()),
             f"- command: `{result['command']}`",
             f"- inductor cache: {result['cache']}; {result['steps']} steps per loop, {result['warmup_steps']} "
             f"warm-up steps (patch), {result['iters']} calls per stream pass, {len(result['rounds'])} rounds "
             "per tree (alternating)"]
    for role in ROLES:
        tree = trees.get(role)
        if tree:
            setups = ", ".join(f"{n} {s.get('setup_s')} s" for n, s in tree["setup"].items())
            lines.append(f"- {role}: {result['labels'][role]} (src hash {tree['tree_hash']}); setup {setups}; "
                         f"emulation: {(tree.get('emulation') or {}).get('via', '-')}")
            for name, setup in tree["setup"].items():
                lines.append(f"  - {name}: {setup.get('how')}")
            for name, err in tree["errors"].items():
                lines.append(f"  - ERROR {name}: {err.splitlines()[0][:300]}")
    lines += ["", "| config | metric | before | after | after / before | verdict | spread over rounds "
              "(before, after) |", "|---|---|---|---|---|---|---|"]

    def fig(row, role):
        if role not in row:
            return "-"
        extra = f" ({row[role]['fps']} fps)" if "fps" in row[role] else ""
        return f"{row[role]['ms']:.3f}{extra}"

    for row in result["summary"]:
        spread = ", ".join(f"{row[r]['spread'] * 100:.1f}%" if r in row else "-" for r in ROLES)
        lines.append(f"| {row['config']} | {row['metric']} | {fig(row, 'before')} | {fig(row, 'after')} | "
                     f"{row.get('after_over_before', '-')} | {row.get('verdict', '-')} | {spread} |")
    lines += ["", "after / before: time ratio (> 1.03: the after tree is more than 3% slower). Each figure is the "
              "median over the rounds of one timed pass (stream: mean of back-to-back calls; UNet steps: median of "
              "the loop's steps after its warm-up steps)."]
    lines += [f"- note: {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    if not (args.before and args.after):
        raise SystemExit("--before and --after are required")
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
