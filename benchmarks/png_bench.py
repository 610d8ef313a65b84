"""Why does the server's PNG encode take what it takes? `paradiff.serve.png` on one machine, step by step.

    python3 benchmarks/png_bench.py --out DIR [--size 1024] [--repeats 7]

The encoder deflates bands of rows in a thread pool; on the 2-core development machine that beat one zlib pass, but
inside `paradiff serve` on a 16-core device it took as long as one pass. This measures, in one process, each stage
that the server adds, so the cause is a measurement: a bare process; after `import torch`; after CUDA and a
compiled, CUDA-graphed module ran (what a compiled server has done before its first request); and inside a worker
thread, as FastAPI runs the encoder. At each stage: the CPU affinity of the process and of new threads (a library
that pins the main thread pins every thread started from it), the encoder's time, one zlib pass, Pillow's PNG, and
each band's start/end in the pool (do they overlap?). Two images: noise (what random weights generate) and smooth
gradients. Files: png_bench.json, png_bench.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

import numpy as np  # noqa: E402

from paradiff.serve import png  # noqa: E402


def images(size: int) -> dict:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    smooth = np.stack([x, y, (x + y) / 2], -1) * 255 + rng.normal(0, 2, (size, size, 3))
    return {"noise": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "smooth": np.clip(smooth, 0, 255).astype(np.uint8)}


def affinity() -> dict:
    seen = {}

    def probe():
        seen["thread"] = len(os.sched_getaffinity(0))

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return {"process": len(os.sched_getaffinity(0)), "new_thread": seen["thread"], "cpu_count": os.cpu_count(),
            "torch_threads": sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None}


def _ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 2)


def timeline(pixels: np.ndarray) -> dict:
    """Each band's start and end (ms from the call) and its thread: whether the pool's bands overlap."""
    spans = []
    original = png._band

    def traced(*args):
        start = time.perf_counter()
        result = original(*args)
        spans.append((start, time.perf_counter(), threading.get_ident(), len(os.sched_getaffinity(0))))
        return result

    png._band = traced
    try:
        t0 = time.perf_counter()
        png.encode_png(pixels)
        total = time.perf_counter() - t0
    finally:
        png._band = original
    busy = sum(end - start for start, end, _, _ in spans)
    return {"total_ms": round(total * 1e3, 2), "bands": len(spans), "band_ms_sum": round(busy * 1e3, 2),
            "overlap": round(busy / total, 2) if total else None, "threads": len({s[2] for s in spans}),
            "band_affinity": sorted({s[3] for s in spans}),
            "spans_ms": [(round((s - t0) * 1e3, 2), round((e - t0) * 1e3, 2)) for s, e, _, _ in spans]}


def measure(stage: str, pics: dict, repeats: int) -> dict:
    from PIL import Image

    row = {"stage": stage, "affinity": affinity(), "images": {}}
    for name, pixels in pics.items():
        raw = pixels.tobytes()
        planar = np.ascontiguousarray(pixels.transpose(2, 0, 1)).transpose(1, 2, 0)  # what a permuted tensor gives

        def pil():
            import io

            Image.fromarray(pixels).save(io.BytesIO(), format="PNG", compress_level=1)

        row["images"][name] = {
            "encode_png_ms": _ms(lambda: png.encode_png(pixels), repeats),
            "encode_png_planar_input_ms": _ms(lambda: png.encode_png(planar), repeats),
            "one_zlib_pass_ms": _ms(lambda: zlib.compress(raw, 1), repeats),
            "filter_whole_ms": _ms(lambda: png._filtered(pixels, None), repeats),
            "pil_png_level1_ms": _ms(pil, repeats),
            "timeline": timeline(pixels),
        }
    print(json.dumps({k: row[k] for k in ("stage", "affinity")}),
          {n: {k: v for k, v in r.items() if k != "timeline"} for n, r in row["images"].items()},
          {n: {k: v for k, v in r["timeline"].items() if k != "spans_ms"} for n, r in row["images"].items()},
          flush=True)
    return row


def compiled_module_ran() -> str:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA: skipped"
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 64, 3, padding=1), torch.nn.SiLU(),
                                torch.nn.Conv2d(64, 4, 3, padding=1)).cuda().half()
    step = torch.compile(model, mode="reduce-overhead")
    x = torch.randn(2, 4, 128, 128, device="cuda", dtype=torch.half)
    for _ in range(4):
        step(x)
    torch.cuda.synchronize()
    return torch.cuda.get_device_name()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    pics = images(args.size)
    rows = [measure("bare process", pics, args.repeats)]
    import torch

    rows.append(measure("after import torch", pics, args.repeats))
    rows.append(dict(measure("after CUDA + a compiled CUDA-graphed module", pics, args.repeats),
                     device=compiled_module_ran()))
    # the last stage again, from a worker thread, as FastAPI's run_in_threadpool runs the encoder
    with ThreadPoolExecutor(1) as worker:
        rows.append(worker.submit(measure, "in a worker thread (after CUDA)", pics, args.repeats).result())
    report = {"command": "python3 benchmarks/png_bench.py " + " ".join(argv or sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "python": sys.version.split()[0], "numpy": np.__version__,
              "zlib": zlib.ZLIB_RUNTIME_VERSION, "torch": torch.__version__, "machine": platform.processor(),
              "cgroup_cpu_max": _read("/sys/fs/cgroup/cpu.max"), "size": args.size, "rows": rows}
    with open(os.path.join(args.out, "png_bench.json"), "w") as f:
        json.dump(report, f, indent=1)
    lines = [f"# PNG encode, {args.size} px RGB, median of {args.repeats}: {report['date']}, python "
             f"{report['python']}, numpy {report['numpy']}, zlib {report['zlib']}, cgroup cpu.max "
             f"{report['cgroup_cpu_max']}", "",
             "| stage | image | cpus (process / new thread) | encode_png ms | planar input ms | one zlib pass ms | "
             "filter ms | Pillow ms | bands / threads / overlap |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        a = row["affinity"]
        for name, r in row["images"].items():
            t = r["timeline"]
            lines.append(f"| {row['stage']} | {name} | {a['process']} / {a['new_thread']} | {r['encode_png_ms']} | "
                         f"{r['encode_png_planar_input_ms']} | {r['one_zlib_pass_ms']} | {r['filter_whole_ms']} | "
                         f"{r['pil_png_level1_ms']} | {t['bands']} / {t['threads']} / {t['overlap']} |")
    with open(os.path.join(args.out, "png_bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
