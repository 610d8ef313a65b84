"""Quality evaluation of parallel methods: the same prompts and seeds, serial vs `parallelize(pipe, *methods)`.

    result = paradiff.evaluate.evaluate(pipe, [paradiff.PatchParallel()], num_prompts=16)
    print(paradiff.evaluate.format_report(result))

The serial reference is a `copy.deepcopy` of the pipeline taken before parallelizing and computed on every rank
(redundantly), so no rank idles at a collective while rank 0 works alone. Reported: prompt adherence (the
deterministic pixel checker of `paradiff.reference.checker`, on grammar prompts) for serial and method, and the
method's fidelity to serial: PSNR and SSIM (scikit-image; mean and min over prompts) and max |difference| (0-255).
LPIPS, FID and CLIP score need downloaded weights and are skipped, with a note saying so.
With `control_images` (a ControlNet pipeline) every prompt gets its own control map, and each run's adherence also
reports how well the images follow the maps (`checker.map_adherence`: IoU and centroid distance vs the silhouette).
Only rank 0 prints or writes files.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from typing import Any, Sequence

UINT8_RANGE = 255.0


def _is_main() -> bool:
    from paradiff import runtime

    return runtime.is_main_process()


def _is_fast_scheduler(pipe) -> bool:
    return type(getattr(pipe, "scheduler", None)).__name__ in ("LCMScheduler", "TCDScheduler")


def default_steps(pipe) -> int:
    """25 for the main samplers; 4 for few-step (LCM) pipelines such as `paradiff.reference.FAST_MODEL`."""
    return 4 if _is_fast_scheduler(pipe) else 25


def default_guidance(pipe) -> float:
    """The reference model's CFG scale (`paradiff.reference.DEFAULT_GUIDANCE`); 1.0 (off) for LCM, baked in."""
    from paradiff.reference import DEFAULT_GUIDANCE

    return 1.0 if _is_fast_scheduler(pipe) else DEFAULT_GUIDANCE


def _to_uint8(images) -> list:
    import numpy as np

    out = []
    for im in images:
        a = np.asarray(im)
        if a.dtype != np.uint8:
            a = (np.clip(a.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        out.append(a)
    return out


def psnr(a, b) -> float:
    """PSNR in dB of two uint8 images (inf when identical)."""
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(UINT8_RANGE ** 2 / mse)


def ssim(a, b) -> float | None:
    """SSIM of two uint8 HxWx3 images (scikit-image), or None when scikit-image is missing."""
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        return None
    return float(structural_similarity(a, b, channel_axis=-1, data_range=UINT8_RANGE))


def compare_images(serial, method) -> dict:
    """Per-image fidelity of a method's output to the serial output."""
    import numpy as np

    a, b = _to_uint8([serial])[0], _to_uint8([method])[0]
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: serial {a.shape} vs method {b.shape}")
    return {
        "psnr": psnr(a, b),
        "ssim": ssim(a, b),
        "max_abs_diff": int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()),
    }


def _prompt_list(prompts, num_prompts) -> list[tuple[str, int]]:
    """Normalise to (prompt, seed) pairs; default: the reference model's held-out set with its fixed seeds."""
    if prompts is None:
        from paradiff.reference.data import heldout_set

        pairs = heldout_set()
    else:
        pairs = []
        for i, p in enumerate(prompts):
            pairs.append((p[0], int(p[1])) if isinstance(p, (tuple, list)) else (str(p), i))
    if num_prompts is not None:
        if num_prompts < 1:
            raise ValueError("num_prompts must be at least 1")
        pairs = pairs[:num_prompts]
    if not pairs:
        raise ValueError("no prompts to evaluate")
    return pairs


def _generate(pipe, pairs, *, seed, steps, guidance, height, width, call_kwargs, controls=None) -> tuple[list, float]:
    import torch
    from PIL import Image

    images = []
    t0 = time.perf_counter()
    for i, (prompt, s) in enumerate(pairs):
        gen = torch.Generator("cpu").manual_seed(int(s) + int(seed))
        kw = dict(num_inference_steps=steps, guidance_scale=guidance, generator=gen, output_type="np")
        if controls is not None:
            kw["image"] = Image.fromarray(_to_uint8([controls[i]])[0])
        if height is not None:
            kw["height"] = height
        if width is not None:
            kw["width"] = width
        kw.update(call_kwargs or {})
        images.append(_to_uint8(pipe(prompt, **kw).images)[0])
    return images, time.perf_counter() - t0


def _from_main_rank(images: list, device) -> list:
    """Rank 0's images on every rank: under `parallelize` only rank 0 decodes (the others hold blank images), and
    every rank scores the same images so that all return the same report."""
    import numpy as np
    import torch

    from paradiff.comm import broadcast_

    stacked = torch.from_numpy(np.stack(images)).to(device)
    broadcast_(stacked, src=0, what="rank 0's evaluated images")
    return list(stacked.cpu().numpy())


def _adherence(pairs, images, captions=None, controls=None):
    """Checker results per prompt (None for prompts outside the shapes grammar), map results per prompt (None
    without control maps) and their summary. `captions` replace the prompts as what the checker scores against."""
    from paradiff.reference.checker import attribute_accuracy, check, map_adherence

    results, summary_in = [], []
    for i, ((prompt, _), im) in enumerate(zip(pairs, images)):
        try:
            r = check(im, prompt if captions is None else captions[i])
        except ValueError:
            results.append(None)
            continue
        results.append(r)
        summary_in.append(r)
    maps = [None] * len(images) if controls is None else [map_adherence(im, c) for im, c in zip(images, controls)]
    if not summary_in and controls is None:
        return results, maps, None
    summary = {} if not summary_in else {
        "adherence": round(sum(r.matched for r in summary_in) / len(summary_in), 4),
        "checked": len(summary_in),
        "attributes": attribute_accuracy(summary_in),
    }
    if controls is not None:
        errs = [e for m in maps for e in m.centroid_errors if not math.isinf(e)]
        summary.update({"map_adherence": round(sum(m.matched for m in maps) / len(maps), 4),
                        "map_iou": round(sum(m.iou for m in maps) / len(maps), 4),
                        "map_centroid_error_px": round(sum(errs) / len(errs), 2) if errs else None,
                        "map_shapes_missed": sum(math.isinf(e) for m in maps for e in m.centroid_errors)})
    return results, maps, summary


def _failed_attrs(r) -> list[str] | None:
    if r is None:
        return None
    bad = [k for k in ("count", "background") if not r.details[k]]
    for i, row in enumerate(r.details["shapes"]):
        bad += [f"shape{i}.{a}" for a, ok in row.items() if not ok]
    return bad


def _quiet(pipe) -> None:
    """No per-step progress bars: the evaluation prints one report."""
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)


def _serial_and_method(pipe, methods, pairs, gen_kw, serial_images=None) -> tuple[list, float | None, list, float, int]:
    """Images and seconds of a serial copy (unless its images are given), then of `pipe` parallelized with
    `methods`; and the world size.

    The copy is taken before `parallelize` installs any wrapper, and runs on every rank (redundantly), so that no
    rank waits at a collective while rank 0 works alone.
    """
    from paradiff import runtime
    from paradiff.parallel import parallelize

    rt = runtime.init()
    serial_s = None
    if serial_images is None:
        serial = copy.deepcopy(pipe)
        serial.to(rt.device)
        _quiet(serial)
        serial_images, serial_s = _generate(serial, pairs, **gen_kw)
        del serial
    parallelize(pipe, *methods)
    _quiet(pipe)
    method_images, method_s = _generate(pipe, pairs, **gen_kw)
    if rt.world_size > 1:
        method_images = _from_main_rank(method_images, rt.device)
    return serial_images, serial_s, method_images, method_s, rt.world_size


def _match(check_result) -> bool | None:
    return None if check_result is None else bool(check_result.matched)


def _rows(pairs, seed, serial_images, method_images, captions=None, controls=None):
    """Per-prompt rows (adherence of each run, fidelity of the method to serial) and each run's adherence summary."""
    serial_checks, serial_maps, serial_summary = _adherence(pairs, serial_images, captions, controls)
    method_checks, method_maps, method_summary = ([None] * len(pairs), [None] * len(pairs), None)
    if method_images is not None:
        method_checks, method_maps, method_summary = _adherence(pairs, method_images, captions, controls)
    rows = []
    for i, (prompt, s) in enumerate(pairs):
        row = {"prompt": prompt, "seed": s + seed, "serial_match": _match(serial_checks[i]),
               "serial_failed": _failed_attrs(serial_checks[i])}
        if captions is not None:
            row["checked_caption"] = captions[i]
        if controls is not None:
            row["serial_map_match"], row["serial_map_iou"] = serial_maps[i].matched, serial_maps[i].iou
        if method_images is not None:
            row.update(compare_images(serial_images[i], method_images[i]))
            row["method_match"] = _match(method_checks[i])
            row["method_failed"] = _failed_attrs(method_checks[i])
            if controls is not None:
                row["method_map_match"], row["method_map_iou"] = method_maps[i].matched, method_maps[i].iou
        rows.append(row)
    return rows, serial_summary, method_summary


def _vs_serial(rows: list[dict]) -> dict:
    """Fidelity over all prompts; identical images (infinite PSNR) are counted, not averaged."""
    ps = [r["psnr"] for r in rows]
    ss = [r["ssim"] for r in rows]
    finite = [p for p in ps if not math.isinf(p)]
    have_ssim = all(v is not None for v in ss)
    return {
        "psnr_mean": (sum(finite) / len(finite)) if finite else math.inf,
        "psnr_min": min(ps),
        "identical_images": sum(math.isinf(p) for p in ps),
        "ssim_mean": (sum(ss) / len(ss)) if have_ssim else None,
        "ssim_min": min(ss) if have_ssim else None,
        "max_abs_diff": max(r["max_abs_diff"] for r in rows),
    }


def _notes(rows: list[dict], vs_serial: dict | None, serial_summary: dict | None) -> list[str]:
    """What the report leaves out and why, so a missing number is never mistaken for a measured one."""
    notes = ["LPIPS, FID and CLIP score skipped: they need downloaded network weights, which are not available "
             "offline; fidelity is PSNR/SSIM/max-abs-diff against the serial output."]
    if vs_serial is not None:
        if vs_serial["ssim_mean"] is None:
            notes.append("SSIM skipped: scikit-image is not installed (pip install scikit-image).")
        if 0 < vs_serial["identical_images"] < len(rows):
            notes.append("psnr_mean averages the non-identical images; identical ones are counted separately.")
    if not serial_summary or "adherence" not in serial_summary:
        notes.append("prompt adherence skipped: no prompt follows the shapes grammar of the reference checker.")
    return notes


def _model_name(pipe) -> str | None:
    return getattr(getattr(pipe, "config", None), "_name_or_path", None) or getattr(pipe, "name_or_path", None)


def evaluate(
    pipe,
    methods: Sequence[Any] = (),
    *,
    prompts: Sequence[str | tuple[str, int]] | None = None,
    num_prompts: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    call_kwargs: dict | None = None,
    keep_images: bool = False,
    control_images: Sequence | None = None,
    check_captions: Sequence[str] | None = None,
    serial_images: Sequence | None = None,
) -> dict:
    """Generate `prompts` (default: the held-out shapes prompts) serially and with `methods`; score both.

    `pipe` must not be parallelized yet; with `methods` it is parallelized in place (call this on every rank).
    Each prompt i uses a CPU generator seeded with its own seed + `seed`, identical for serial and method.
    `steps`/`guidance` default to 25 and `DEFAULT_GUIDANCE` (4 and 1.0 for LCM pipelines). Returns a JSON-ready dict with
    `serial` and `method` adherence, `vs_serial` (PSNR/SSIM mean and min, max abs diff), per-prompt `rows`.
    `control_images` (one per prompt, passed as `image=`; `paradiff.reference.data.control_heldout_set` gives the
    held-out maps) add map adherence; `check_captions` are what the checker scores against when the prompts withhold
    something (the position-free ControlNet protocol). `serial_images`: the serial run's images of the same prompts
    and settings (`evaluate(pipe, keep_images=True)["images"]["serial"]`), so that scoring several methods runs the
    serial pipeline once; its seconds are then reported as None.
    """
    if getattr(pipe, "_paradiff_methods", None):
        raise ValueError("evaluate() needs the pipeline before parallelize(): it keeps a serial copy to compare.")
    pairs = _prompt_list(prompts, num_prompts)
    for name, per_prompt in (("control_images", control_images), ("check_captions", check_captions)):
        if per_prompt is not None and len(per_prompt) < len(pairs):
            raise ValueError(f"{name} has {len(per_prompt)} entries for {len(pairs)} prompts")
    if serial_images is not None and len(serial_images) < len(pairs):
        raise ValueError(f"serial_images has {len(serial_images)} entries for {len(pairs)} prompts")
    controls = None if control_images is None else list(control_images)[:len(pairs)]
    captions = None if check_captions is None else list(check_captions)[:len(pairs)]
    steps = default_steps(pipe) if steps is None else int(steps)
    guidance = default_guidance(pipe) if guidance is None else float(guidance)
    methods = list(methods)
    if serial_images is not None and not methods:
        raise ValueError("serial_images are compared with a method's images: give methods too")
    gen_kw = dict(seed=seed, steps=steps, guidance=guidance, height=height, width=width, call_kwargs=call_kwargs,
                  controls=controls)
    if methods:
        given = None if serial_images is None else _to_uint8(list(serial_images)[:len(pairs)])
        serial_images, serial_s, method_images, method_s, world = _serial_and_method(pipe, methods, pairs, gen_kw,
                                                                                     given)
    else:
        _quiet(pipe)
        serial_images, serial_s = _generate(pipe, pairs, **gen_kw)
        method_images, method_s, world = None, None, 1
    rows, serial_summary, method_summary = _rows(pairs, seed, serial_images, method_images, captions, controls)
    vs_serial = None if method_images is None else _vs_serial(rows)
    result = {
        "config": {"model": _model_name(pipe), "pipeline": type(pipe).__name__, "methods": [repr(m) for m in methods],
                   "world_size": world, "prompts": len(pairs), "steps": steps, "guidance": guidance, "seed": seed,
                   "height": height, "width": width, "control_maps": controls is not None,
                   "controlnet": _model_name(getattr(pipe, "controlnet", None))},
        "serial": serial_summary,
        "method": method_summary,
        "vs_serial": vs_serial,
        "seconds": {"serial": None if serial_s is None else round(serial_s, 2),
                    "method": None if method_s is None else round(method_s, 2)},
        "rows": rows,
        "notes": _notes(rows, vs_serial, serial_summary),
    }
    if keep_images:
        result["images"] = {"serial": serial_images, "method": method_images}
    return result


def _fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.{nd}f}"
    return str(v)


def format_report(result: dict, max_rows: int = 0) -> str:
    """A markdown summary table (plus, with max_rows, the first per-prompt rows)."""
    c = result["config"]
    maps = c.get("control_maps")
    lines = [f"model: {c['model']}  methods: {', '.join(c['methods']) or 'none (serial only)'}  ranks: "
             f"{c['world_size']}  prompts: {c['prompts']}  steps: {c['steps']}  guidance: {c['guidance']}"
             + (f"  controlnet: {c['controlnet']}" if maps else ""), "",
             "| run | adherence | " + ("map adherence | map IoU | " if maps else "")
             + "PSNR mean (dB) | PSNR min (dB) | SSIM mean | SSIM min | max abs diff | seconds |", "| --- " * (10 if maps else 8) + "|"]
    s, m, v = result["serial"], result["method"], result["vs_serial"]

    def adh(r):
        keys = ("adherence", "map_adherence", "map_iou") if maps else ("adherence",)
        return " | ".join(_fmt(r and r.get(k), 3) for k in keys)

    lines.append(f"| serial | {adh(s)} | - | - | - | - | - | {_fmt(result['seconds']['serial'])} |")
    if v is not None:
        lines.append(f"| method | {adh(m)} | {_fmt(v['psnr_mean'])} | {_fmt(v['psnr_min'])} | "
                     f"{_fmt(v['ssim_mean'], 4)} | {_fmt(v['ssim_min'], 4)} | {v['max_abs_diff']} | "
                     f"{_fmt(result['seconds']['method'])} |")
    if s and "attributes" in s:
        lines += ["", "serial per-attribute accuracy: " + ", ".join(f"{k} {x:.3f}" for k, x in s["attributes"].items())]
    if m and "attributes" in m:
        lines += ["method per-attribute accuracy: " + ", ".join(f"{k} {x:.3f}" for k, x in m["attributes"].items())]
    if max_rows:
        lines += ["", "| prompt | serial ok | method ok | PSNR | SSIM | max diff |", "| --- | --- | --- | --- | --- | --- |"]
        for r in result["rows"][:max_rows]:
            lines.append(f"| {r['prompt']} | {_fmt(r['serial_match'])} | {_fmt(r.get('method_match'))} | "
                         f"{_fmt(r.get('psnr'))} | {_fmt(r.get('ssim'), 4)} | {_fmt(r.get('max_abs_diff'))} |")
    lines += [""] + [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def _jsonable(obj):
    if isinstance(obj, float) and math.isinf(obj):
        return "inf"
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items() if k != "images"}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def write_json(result: dict, path: str) -> None:
    """Write the result as strict JSON (infinite PSNR as the string "inf"); only on rank 0."""
    if not _is_main():
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_jsonable(result), f, indent=2, allow_nan=False)


def report(result: dict, json_path: str | None = None, max_rows: int = 0) -> None:
    """Print the table and optionally write JSON, on rank 0 only."""
    if not _is_main():
        return
    print(format_report(result, max_rows=max_rows))
    if json_path:
        write_json(result, json_path)
