"""Fidelity of patch and CFG parallelism vs the serial pipeline, on the reference model (fp32, CPU or GPU).

    torchrun --nproc-per-node 2 benchmarks/patch_fidelity.py --out benchmarks/results/patch-fidelity-cpu
    torchrun --nproc-per-node 4 benchmarks/patch_fidelity.py --out benchmarks/results/patch-fidelity-cpu

For each configuration the same prompts and seeds are generated serially and in parallel, at the reference model's
guidance (`--guidance`, default `paradiff.reference.DEFAULT_GUIDANCE`); reported: max |diff| of the float images in
[0, 1], mean PSNR and SSIM vs serial on the uint8 images (`paradiff.evaluate.compare_images`, as `paradiff eval`;
PSNR capped at 100 dB for identical images), and prompt adherence (the reference checker's exact-match
rate, in %). Exact configurations (every step synchronous, CFG split) must match serial to float precision; the
default (warm-up 4 steps, GroupNorm "auto": corrected with >= 16 latent rows per patch, else stale) should be far
closer to serial than naive patches. `--extra-gn` adds every GroupNorm mode.
Results for each rank count are merged into OUT.json / OUT.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

import numpy as np
import torch

from paradiff import runtime


def configs(world: int, extra_gn: bool):
    from paradiff import CFGParallel, PatchParallel

    exact = 10**6  # warm-up covers every step: fully synchronous
    out = [(f"patch x{world}, all steps synchronous", lambda: [PatchParallel(warmup_steps=exact)], "exact")]
    if world == 2:
        out.append(("cfg x2", lambda: [CFGParallel()], "exact"))
    if world == 4:
        out.append(("cfg x2 * patch x2, all steps synchronous",
                    lambda: [CFGParallel(), PatchParallel(warmup_steps=exact)], "exact"))
        out.append(("cfg x2 * patch x2, default", lambda: [CFGParallel(), PatchParallel()], "approx"))
    out.append((f"patch x{world}, default (warm-up 4, auto GN)", lambda: [PatchParallel()], "approx"))
    if extra_gn:
        for gn in ("corrected", "stale", "sync", "separate"):
            out.append((f"patch x{world}, warm-up 4, {gn} GN", lambda gn=gn: [PatchParallel(gn_mode=gn)], "approx"))
    out.append((f"patch x{world}, naive (no exchange)", lambda: [PatchParallel(mode="naive")], "approx"))
    return out


def generate(pipe, prompts, seeds, steps, batch, guidance):
    images = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i:i + batch]]
        out = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                   output_type="np")
        images.append(out.images)
    return np.concatenate(images)


def metrics(images, serial, prompts, adherence):
    from paradiff.evaluate import compare_images

    per_image = [compare_images(s, x) for x, s in zip(images, serial)]
    return {"max_abs_diff": float(np.abs(images - serial).max()),
            "psnr_db": float(np.mean([min(100.0, c["psnr"]) for c in per_image])),
            "ssim": float(np.mean([c["ssim"] for c in per_image])), "adherence_pct": adherence(images, prompts)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="diffusers folder (default: paradiff.reference.DEFAULT_MODEL)")
    p.add_argument("--prompts", type=int, default=16, help="number of held-out prompts")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batch", type=int, default=8, help="prompts per pipeline call")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the reference model's)")
    p.add_argument("--extra-gn", action="store_true", help="also each GroupNorm mode (corrected, stale, sync, separate)")
    p.add_argument("--out", required=True, help="output prefix: writes OUT.json and OUT.md (merged per rank count)")
    args = p.parse_args()

    rt = runtime.init()
    if rt.device.type == "cpu":
        torch.set_num_threads(1)
    from paradiff.parallel import parallelize
    from paradiff.pipelines import load_pipeline
    from paradiff.reference import DEFAULT_GUIDANCE, DEFAULT_MODEL
    from paradiff.reference.checker import check
    from paradiff.reference.data import heldout_set

    model = args.model or DEFAULT_MODEL
    args.guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    held = heldout_set(args.prompts)
    prompts, seeds = [c for c, _ in held], [s for _, s in held]

    def adherence(images, captions):
        return 100.0 * float(np.mean([check((img * 255).round().astype(np.uint8), c).matched
                                      for img, c in zip(images, captions)]))

    def fresh():
        pipe = load_pipeline(model, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    serial_pipe = fresh().to(rt.device)
    serial = generate(serial_pipe, prompts, seeds, args.steps, args.batch, args.guidance)
    del serial_pipe
    rows = [{"config": "serial", "kind": "reference", "max_abs_diff": 0.0, "psnr_db": 100.0, "ssim": 1.0,
             "adherence_pct": adherence(serial, prompts)}]
    for name, make, kind in configs(rt.world_size, args.extra_gn):
        pipe = parallelize(fresh(), *make())
        images = generate(pipe, prompts, seeds, args.steps, args.batch, args.guidance)
        rows.append({"config": name, "kind": kind, **metrics(images, serial, prompts, adherence)})
        if rt.is_main:
            r = rows[-1]
            print(f"{name:52s} max|d| {r['max_abs_diff']:.2e}  PSNR {r['psnr_db']:6.2f}  SSIM {r['ssim']:.4f}  "
                  f"adherence {r['adherence_pct']:.1f}%", flush=True)
        del pipe
        runtime.barrier()
    if rt.is_main:
        write(args, rt, model, rows)
    runtime.shutdown()


def write(args, rt, model, rows):
    path = args.out + ".json"
    data = json.load(open(path)) if os.path.exists(path) else {"runs": {}}
    data["runs"][str(rt.world_size)] = {
        "model": os.path.relpath(model) if os.path.exists(model) else model, "device": rt.device.type,
        "backend": rt.backend, "prompts": args.prompts, "steps": args.steps, "guidance": args.guidance, "dtype": "fp32",
        "torch": torch.__version__, "diffusers": __import__("diffusers").__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "results": rows}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    lines = ["# Patch / CFG parallel fidelity vs serial (fp32)", "",
             "Max abs diff of the float images in [0, 1]; PSNR/SSIM of the uint8 images vs the serial image of the "
             "same prompt and seed (as `paradiff eval`); adherence = reference checker exact-match rate. "
             "`benchmarks/patch_fidelity.py`.", ""]
    for world, run in sorted(data["runs"].items()):
        lines += [f"## {world} ranks ({run['device']}/{run['backend']}), {run['prompts']} prompts, {run['steps']} steps, "
                  f"guidance {run.get('guidance', 7.5)}, {run['model']}, {run['date']}", "",
                  "| config | max abs diff | PSNR dB | SSIM | adherence % |", "|---|---|---|---|---|"]
        for r in run["results"]:
            lines.append(f"| {r['config']} | {r['max_abs_diff']:.2e} | {r['psnr_db']:.2f} | {r['ssim']:.4f} | "
                         f"{r['adherence_pct']:.1f} |")
        lines.append("")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
