"""Map adherence of the stream pipeline with the reference ControlNet (issue 13), on the held-out control cases.

`paradiff eval --controlnet` covers serial and the parallel methods; it has no stream path, so this script runs
`paradiff.StreamPipeline(pipe, ..., controlnet=...)` on the few-step reference model (`FAST_MODEL`; its UNet has the
main model's architecture, the ControlNet was trained on the main model's UNet) with the protocol of
`paradiff eval --controlnet`: `reference.data.control_heldout_set` (position-free prompts, the scene's silhouette
as the map), scored with `checker.check` against the full caption and `checker.map_adherence` against the map, by
the same code as `paradiff eval` (`paradiff.evaluate`).

Rows (guidance "none": the fast model has CFG 3 baked in):
  diffusers-cn-txt2img  StableDiffusionControlNetPipeline on FAST_MODEL, the stream's 4 LCM timesteps, the stream's
                        noise (initial latent and each step's re-noise): the serial reference of the stream row
  stream-cn-txt2img     StreamPipeline txt2img with the ControlNet; PSNR/SSIM vs the diffusers row
  stream-txt2img-base   StreamPipeline txt2img without the ControlNet (the floor: nothing places the shapes)
  stream-cn-img2img     StreamPipeline img2img (restyle: the input frame is the next held-out scene's render, the
                        map and the prompt are this scene's; 3 steps, t_index 12,25,37)

    PYTHONPATH=src python benchmarks/controlnet_adherence.py --prompts 16 --out benchmarks/results/reference-controlnet
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _versions() -> dict:
    import diffusers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def _summary(pairs, images, captions, controls, reference=None) -> dict:
    from paradiff import evaluate

    _, _, summary = evaluate._adherence(pairs, images, captions, controls)
    out = {k: summary[k] for k in ("adherence", "map_adherence", "map_iou", "map_centroid_error_px",
                                   "map_shapes_missed", "attributes")}
    if reference is not None:
        rows = [evaluate.compare_images(r, m) for r, m in zip(reference, images)]
        out["vs_serial"] = evaluate._vs_serial(rows)
    return out


def _diffusers_reference(pipe, net, cases, stream) -> list:
    """diffusers' ControlNet pipeline with the stream's timesteps and the stream's noise, prompt by prompt."""
    import diffusers.schedulers.scheduling_lcm as lcm
    from diffusers import StableDiffusionControlNetPipeline
    from PIL import Image

    cn_pipe = StableDiffusionControlNetPipeline.from_pipe(pipe, controlnet=net)
    cn_pipe.set_progress_bar_config(disable=True)
    timesteps = [int(t) for t in stream.schedule.timesteps]
    images, original = [], lcm.randn_tensor
    try:
        for c in cases:
            stream.prepare(c.prompt, negative_prompt="", guidance_scale=1.0, seed=c.seed)
            noise = stream._noise.cpu()
            rows = iter(range(1, noise.shape[0]))
            # LCM re-noises after every step but the last with fresh noise; the stream uses its fixed rows 1..k-1
            lcm.randn_tensor = lambda shape, **kw: noise[next(rows)][None].to(kw.get("device"), kw.get("dtype"))
            out = cn_pipe(c.prompt, image=Image.fromarray(c.control), guidance_scale=1.0, timesteps=timesteps,
                          latents=noise[:1].clone(), output_type="np").images[0]
            images.append((np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8))
    finally:
        lcm.randn_tensor = original
    return images


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--txt-t-index", default="0,12,25,37", help="txt2img steps of the 50-step LCM grid")
    p.add_argument("--t-index", default="12,25,37", help="img2img steps of the 50-step LCM grid")
    p.add_argument("--scale", type=float, default=1.0, help="controlnet_scale")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="folder for stream-controlnet.json")
    args = p.parse_args(argv)

    from diffusers import StableDiffusionPipeline

    from paradiff import StreamPipeline
    from paradiff.reference import CONTROLNET_MODEL, FAST_MODEL, load_controlnet
    from paradiff.reference.data import control_heldout_set, parse_caption, render_numpy

    torch.set_num_threads(max(1, args.threads))
    pipe = StableDiffusionPipeline.from_pretrained(FAST_MODEL, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    net = load_controlnet()
    cases = control_heldout_set(args.prompts, positions=False)
    pairs = [(c.prompt, c.seed) for c in cases]
    captions = [c.caption for c in cases]
    controls = [c.control for c in cases]
    txt_index = [int(v) for v in args.txt_t_index.split(",")]
    img_index = [int(v) for v in args.t_index.split(",")]
    result = {"command": " ".join(["python"] + sys.argv), "date": datetime.datetime.now(
        datetime.timezone.utc).isoformat(timespec="seconds"), "device": "cpu", "threads": args.threads,
        "versions": _versions(), "model": "reference FAST_MODEL", "controlnet": "reference CONTROLNET_MODEL",
        "controlnet_path": CONTROLNET_MODEL, "prompts": len(cases), "control_captions": "no-positions",
        "guidance": "none", "controlnet_scale": args.scale, "txt2img_t_index_list": txt_index,
        "img2img_t_index_list": img_index, "rows": {}}

    def record(name, images, seconds, reference=None, **extra):
        row = {**extra, **_summary(pairs, images, captions, controls, reference), "seconds": round(seconds, 2)}
        result["rows"][name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "attributes"}), flush=True)

    stream = StreamPipeline(pipe, txt_index, guidance="none", controlnet=net, controlnet_scale=args.scale)
    t0 = time.perf_counter()
    stream_images = []
    for c in cases:
        stream.prepare(c.prompt, negative_prompt="", guidance_scale=1.0, seed=c.seed)
        stream_images.append(stream.txt2img(control_image=c.control)[0].cpu().numpy())
    stream_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference = _diffusers_reference(pipe, net, cases, stream)
    record("diffusers-cn-txt2img", reference, time.perf_counter() - t0, steps=len(txt_index),
           t_index=txt_index)
    record("stream-cn-txt2img", stream_images, stream_s, reference, steps=len(txt_index), t_index=txt_index)

    base = StreamPipeline(pipe, txt_index, guidance="none")
    t0 = time.perf_counter()
    images = []
    for c in cases:
        base.prepare(c.prompt, negative_prompt="", guidance_scale=1.0, seed=c.seed)
        images.append(base.txt2img()[0].cpu().numpy())
    record("stream-txt2img-base", images, time.perf_counter() - t0, steps=len(txt_index), t_index=txt_index)

    stream = StreamPipeline(pipe, img_index, guidance="none", controlnet=net, controlnet_scale=args.scale)
    frames = render_numpy([parse_caption(cases[(i + 1) % len(cases)].caption) for i in range(len(cases))])
    t0 = time.perf_counter()
    images = []
    for c, frame in zip(cases, frames):
        stream.prepare(c.prompt, negative_prompt="", guidance_scale=1.0, seed=c.seed)
        images.append(np.asarray(stream(frame, control_image=c.control)))
    record("stream-cn-img2img", images, time.perf_counter() - t0, steps=len(img_index), t_index=img_index)

    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        from paradiff.evaluate import _jsonable

        text = json.dumps(_jsonable(result), indent=2, allow_nan=False)
        (folder / "stream-controlnet.json").write_text(text + "\n")
        print(f"wrote {folder / 'stream-controlnet.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
