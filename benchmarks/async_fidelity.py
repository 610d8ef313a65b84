"""AsyncDenoise fidelity on the embedded reference model (CPU/gloo): PSNR/SSIM vs serial and prompt adherence.

    torchrun --nproc-per-node 2 benchmarks/async_fidelity.py    # N=2 stride 1, N=1 stride 2, exactness check
    torchrun --nproc-per-node 3 benchmarks/async_fidelity.py    # N=3 stride 1, N=2 stride 2
    torchrun --nproc-per-node 4 benchmarks/async_fidelity.py    # N=4 stride 1, N=3 stride 2

Each run updates benchmarks/results/async-fidelity-cpu.{json,md} (one row per configuration). Serial images are
made in every rank from the unparallelized pipeline; adherence is the reference checker's match rate on the held-out
captions (same seeds for serial and parallel). With --check-exact the first configuration is also run with warm-up
covering all steps, and its max |latent - serial| is recorded (must be <= 1e-4 in fp32).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"


def images(pipe, prompts, steps, guidance, output_type="np"):
    out = []
    for caption, seed in prompts:
        g = torch.Generator("cpu").manual_seed(seed)
        out.append(pipe(caption, num_inference_steps=steps, guidance_scale=guidance, generator=g,
                        output_type=output_type).images[0])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: paradiff.reference.DEFAULT_MODEL")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the reference model's)")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: AsyncDenoise's default")
    p.add_argument("--no-exact", dest="check_exact", action="store_false", help="skip the all-warm-up exactness run")
    p.add_argument("--time-shift", action="store_true", help="also measure time_shift=True")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()

    from diffusers import StableDiffusionPipeline
    from paradiff import runtime
    from paradiff.evaluate import compare_images
    from paradiff.methods.asyncdenoise import DEFAULT_WARMUP, AsyncDenoise
    from paradiff.parallel import parallelize, parallelized
    from paradiff.reference import DEFAULT_GUIDANCE, DEFAULT_MODEL
    from paradiff.reference.checker import check
    from paradiff.reference.data import heldout_set

    torch.set_num_threads(1)
    rt = runtime.init("cpu")
    world = rt.world_size
    model = args.model or DEFAULT_MODEL
    prompts = heldout_set(args.prompts)
    warmup = args.warmup_steps or DEFAULT_WARMUP
    guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance

    def load():
        pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    serial_pipe = load()
    serial = images(serial_pipe, prompts, args.steps, guidance)
    serial_latent = images(serial_pipe, prompts[:2], args.steps, guidance, "latent")
    del serial_pipe
    adherence_serial = float(np.mean([check((im * 255).round().astype(np.uint8), c).matched
                                      for im, (c, _) in zip(serial, prompts)]))
    rows = []
    configs = [(world, 1), (world - 1, 2)]
    for index, (n, stride) in enumerate(configs):
        row = dict(components=n, stride=stride, ranks=world, warmup_steps=warmup, steps=args.steps, guidance=guidance,
                   prompts=len(prompts), adherence_serial=adherence_serial)
        if index == 0 and args.check_exact:
            pipe = parallelize(load(), AsyncDenoise(n, stride=stride, warmup_steps=args.steps))
            lat = images(pipe, prompts[:2], args.steps, guidance, "latent")
            row["exact_max_abs"] = max(float((a - b).abs().max()) for a, b in zip(lat, serial_latent))
        for shift in (False, True) if args.time_shift else (False,):
            pipe = parallelize(load(), AsyncDenoise(n, stride=stride, warmup_steps=warmup, time_shift=shift))
            out = images(pipe, prompts, args.steps, guidance)
            per_image = [compare_images(a, b) for a, b in zip(serial, out)]  # uint8 images, as `paradiff eval`
            psnr = [min(100.0, c["psnr"]) for c in per_image]
            ssim = [c["ssim"] for c in per_image]
            adherence = float(np.mean([check((im * 255).round().astype(np.uint8), c).matched
                                       for im, (c, _) in zip(out, prompts)]))
            rows.append(dict(row, time_shift=shift, psnr=float(np.mean(psnr)), ssim=float(np.mean(ssim)),
                             adherence=adherence, split=list(parallelized(pipe).methods[0].split.bounds)))
    if rt.is_main:
        write(Path(args.out), rows, model)
    runtime.shutdown()
    return 0


def _model_date(model: str) -> str | None:
    """When the model's weights were last trained (its training.json), to tell shipped model versions apart."""
    path = Path(model) / "training.json"
    if not path.exists():
        return None
    return max(st["date"] for st in json.loads(path.read_text())["stages"].values())


def write(out: Path, rows: list[dict], model: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "async-fidelity-cpu.json"
    data = json.loads(path.read_text()) if path.exists() else {"rows": []}
    keys = lambda r: (r["components"], r["stride"], r["time_shift"], r["warmup_steps"], r["steps"],  # noqa: E731
                      r.get("guidance", 7.5))
    fresh = {keys(r) for r in rows}
    # rows of another model version (an older shipped model) are dropped, not mixed with today's
    data["rows"] = [r for r in data["rows"] if keys(r) not in fresh and data.get("meta", {}).get("model_date") ==
                    _model_date(model)] + rows
    data["rows"].sort(key=keys)
    data["meta"] = dict(model=os.path.basename(model.rstrip("/")), model_date=_model_date(model),
                        torch=torch.__version__, device="cpu (gloo)",
                        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        command="torchrun --nproc-per-node {2,3,4} benchmarks/async_fidelity.py")
    path.write_text(json.dumps(data, indent=2))
    lines = ["# AsyncDenoise fidelity vs serial (reference model, fp32, CPU/gloo)", "",
             f"{data['meta']['model']}, {data['meta']['date']}, `{data['meta']['command']}`", "",
             "PSNR/SSIM of the uint8 images vs serial (as `paradiff eval`, PSNR capped at 100 dB).", "",
             "| N | stride | ranks | time shift | warm-up | steps | guidance | PSNR dB | SSIM | adherence | "
             "serial adherence | all-warm-up max abs |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        exact = f"{r['exact_max_abs']:.1e}" if "exact_max_abs" in r else "-"
        lines.append(f"| {r['components']} | {r['stride']} | {r['ranks']} | {r['time_shift']} | {r['warmup_steps']} | "
                     f"{r['steps']} | {r.get('guidance', 7.5)} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
                     f"{r['adherence']:.1%} | {r['adherence_serial']:.1%} | {exact} |")
    (out / "async-fidelity-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
