"""Where one patch-parallel rank's step time goes: device time by kind of kernel for the whole UNet, the UNet on one
rank's rows alone, and the hooked stale step of rank 0 of N (collectives replaced by local copies), all compiled
with inductor and run without CUDA graphs so that the profiler sees every kernel.

    python3 benchmarks/patch_profile.py --out benchmarks/results/patch-h200/profile-sdxl1024     # one GPU, SDXL
    python3 benchmarks/patch_profile.py --tiny --compile-backend aot_eager --out /tmp/prof        # CPU smoke run

"rows" minus "full" / N is what a smaller UNet call loses in efficiency (e.g. matrix products with half the rows
fill fewer of the GPU's SMs); "patch" minus "rows" is what the hooks add (halo rows, whole-image keys/values,
GroupNorm statistics, the exchange's copies). Writes patch-profile.json and patch-profile.md to --out.

`--by-layer` adds the split that compiled kernels cannot give (inductor fuses across layers): "rows" and "patch"
run once more *eagerly*, each hooked kind of layer (kxk convs, GroupNorms, self-attention to_k/to_v) inside its own
profiler range, so "patch" minus "rows" per kind is what each kind of hook adds. Eager kernels are unfused, so these
are upper bounds of the compiled step's costs; they say which hook to work on, not how much a fix will save.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import patch_bench  # noqa: E402  (the benchmark's model, inputs, fake collectives and runtime)

# first match wins: cuDNN's attention kernels are named "..._sdpa_..._flash_fprop_...", so "attention" comes before
# "conv"; cuDNN convolutions are xmma kernels too, so "conv" comes before "gemm"
KINDS = [("nccl", r"nccl"), ("attention", r"flash|fmha|attention|sdpa"), ("conv", r"conv|fprop|dgrad|implicit"),
         ("gemm", r"gemm|nvjet|xmma|cutlass|cublas|aten::mm|aten::addmm|aten::bmm|aten::linear"),
         ("triton reduction", r"triton_(red|per)"), ("triton pointwise", r"triton_poi"), ("triton other", r"triton"),
         ("copy / cat", r"memcpy|memset|copy|cat|Cat")]


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if re.search(pattern, name)), "other")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="stable-diffusion-xl-base-1.0")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--ranks", type=int, default=2, help="N: the patch split to emulate")
    p.add_argument("--steps", type=int, default=5, help="profiled steps per variant (after warm-up)")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--compile-backend", default=None, help="default: inductor on GPU, no compile on CPU")
    p.add_argument("--by-layer", action="store_true", help="also the eager per-layer-kind split of rows vs patch")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


LAYER_KINDS = ("conv kxk (halo)", "groupnorm", "self-attention to_k/to_v (full K/V)")


def layer_kind(name: str, module: torch.nn.Module) -> str | None:
    """The hooked kind of layer a module is (the layers the patch plan hooks), or None."""
    if isinstance(module, torch.nn.Conv2d) and module.kernel_size[0] > 1:
        return LAYER_KINDS[0]
    if isinstance(module, torch.nn.GroupNorm):
        return LAYER_KINDS[1]
    if re.search(r"attn1\.to_[kv]$", name):
        return LAYER_KINDS[2]
    return None


def label_layers(unet: torch.nn.Module) -> None:
    """Each hooked kind of layer's calls inside a profiler range named after its kind (module hooks: they wrap the
    patch plan's hooks too, which replace `forward`)."""
    from torch.autograd.profiler import record_function

    for name, module in unet.named_modules():
        kind = layer_kind(name, module)
        if kind is None:
            continue
        ranges = []

        def enter(mod, inputs, kind=kind, ranges=ranges):
            ranges.append(record_function(f"layer: {kind}").__enter__())

        def leave(mod, inputs, output, ranges=ranges):
            ranges.pop().__exit__(None, None, None)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)


def _variant(name, args, rt, device, dtype, eager=False):
    """A callable running one step of the variant, warmed up (compiled unless `eager`, buffers filled)."""
    from paradiff.methods.patch import PatchParallel, apply_to_unet

    backend = None if eager else args.compile_backend or ("inductor" if device.type == "cuda" else None)
    unet = patch_bench.build_unet(args, device, dtype)
    if eager:
        label_layers(unet)
    kwargs = patch_bench.make_inputs(unet, args, device, dtype)
    kwargs["timestep"] = torch.tensor(500.0, device=device)
    if name == "rows":  # this rank's rows, no hooks
        rows = kwargs["sample"].shape[-2] // args.ranks
        kwargs["sample"] = kwargs["sample"][:, :, :rows].contiguous()
    if name == "patch":
        mesh = patch_bench.make_mesh({"patch": args.ranks}, args, device)
        apply_to_unet(unet, mesh.get_group("patch"), PatchParallel(
            warmup_steps=1, compile={"backend": backend} if backend else False, cuda_graph=False))
        step = unet
    else:
        step = torch.compile(unet, backend=backend, dynamic=False) if backend else unet
    with torch.no_grad():
        for _ in range(3):  # patch: a synchronous step fills the buffers, then stale steps (compiled)
            step(**kwargs)
    return lambda: step(**kwargs)


def profile_variant(name, args, rt, device, dtype, eager=False) -> dict:
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    run = _variant(name, args, rt, device, dtype, eager)
    timer = patch_bench.Timer(device)
    with torch.no_grad():
        timer.mark()
        for _ in range(max(args.steps, 5)):
            run()
            timer.mark()
        step_ms = statistics.median(timer.steps_ms())
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                run()
            if cuda:
                torch.cuda.synchronize()
    by_kind, kernels, by_layer = {}, [], {}
    for event in prof.key_averages():
        if event.key.startswith("layer: "):  # a range: the device time of the kernels launched inside it
            total = (getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)) if cuda \
                else event.cpu_time_total
            by_layer[event.key[len("layer: "):]] = total / 1e3 / args.steps
            continue
        us = (getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)) if cuda \
            else event.self_cpu_time_total
        if us <= 0 or (not cuda and not event.key.startswith("aten::")):
            continue
        ms = us / 1e3 / args.steps
        kind = kind_of(event.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + ms
        kernels.append({"name": event.key[:120], "kind": kind, "ms_per_step": ms,
                        "calls_per_step": event.count / args.steps})
    kernels.sort(key=lambda k: -k["ms_per_step"])
    return {"variant": name + (" eager" if eager else ""), "step_ms": step_ms,
            "kernel_ms_per_step": sum(by_kind.values()), "by_kind": by_kind, "by_layer": by_layer,
            "kernel_calls_per_step": sum(k["calls_per_step"] for k in kernels), "top": kernels[:15]}


def main(argv=None):
    args = parse_args(argv)
    args.emulate_ranks = args.ranks
    rt, device, dtype = patch_bench.setup(args)
    import paradiff.methods.patch  # noqa: F401  (loaded first: its bindings of the collectives are replaced too)

    patch_bench.fake_collectives(True)
    rows = [profile_variant(name, args, rt, device, dtype) for name in ("full", "rows", "patch")]
    layered = [profile_variant(name, args, rt, device, dtype, eager=True) for name in ("rows", "patch")] \
        if args.by_layer else []
    patch_bench.fake_collectives(False)
    os.makedirs(args.out, exist_ok=True)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])}
    with open(os.path.join(args.out, "patch-profile.json"), "w") as f:
        json.dump({"env": env, "arch": "tiny" if args.tiny else args.arch, "size_px": args.size, "ranks": args.ranks,
                   "variants": rows, "by_layer": layered}, f, indent=2)
    kinds = sorted({k for r in rows for k in r["by_kind"]}, key=lambda k: -rows[-1]["by_kind"].get(k, 0.0))
    lines = [f"# One rank's step, {'tiny' if args.tiny else args.arch} {args.size}px, batch 2, rank 0 of {args.ranks} "
             f"(ms per step)", "", f"{env['device']}, torch {env['torch']}; `{env['command']}`", "",
             "| | full | full / N | rows | patch |", "|---|---|---|---|---|"]
    full, part, patch = rows

    def line(label, get):
        lines.append(f"| {label} | {get(full):.2f} | {get(full) / args.ranks:.2f} | {get(part):.2f} | "
                     f"{get(patch):.2f} |")

    line("step (wall, no profiler)", lambda r: r["step_ms"])
    line("kernels, all", lambda r: r["kernel_ms_per_step"])
    for kind in kinds:
        line(kind, lambda r, kind=kind: r["by_kind"].get(kind, 0.0))
    line("kernel launches", lambda r: r["kernel_calls_per_step"])
    lines += ["", "Top kernels of the patch step:", "", "| kernel | kind | ms per step | calls per step |",
              "|---|---|---|---|"]
    lines += [f"| `{k['name']}` | {k['kind']} | {k['ms_per_step']:.3f} | {k['calls_per_step']:.0f} |"
              for k in patch["top"]]
    if layered:
        plain, hooked = layered
        lines += ["", "Eager, by hooked kind of layer (device ms per step inside each kind's calls, host ms on a "
                  "CPU; unfused kernels, so upper bounds of the compiled costs):", "",
                  "| | rows eager | patch eager | added by the hooks |", "|---|---|---|---|"]
        for kind in LAYER_KINDS:
            a, b = plain["by_layer"].get(kind, 0.0), hooked["by_layer"].get(kind, 0.0)
            lines.append(f"| {kind} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
        a, b = plain["kernel_ms_per_step"], hooked["kernel_ms_per_step"]
        lines.append(f"| whole step, all kernels | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    with open(os.path.join(args.out, "patch-profile.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    patch_bench.runtime.shutdown()


if __name__ == "__main__":
    main()
