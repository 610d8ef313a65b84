"""Patch-parallel VAE decode vs the serial decode: per-rank peak memory and decode time, rank 0 of N emulated.

    python benchmarks/vae_bench.py --out gpu-out/vae-emulated                       # one GPU: SDXL VAE, fp16
    python benchmarks/vae_bench.py --sizes 2048,4096 --ranks 2,4,8 --out ...
    python benchmarks/vae_bench.py --tiny --out /tmp/vae-tiny                        # CPU smoke run, tiny VAE

The VAE is the SDXL decoder (`--arch`, shipped config, random weights) in fp16 on a GPU (fp32 on the CPU or with
--tiny). For each image size: the serial `vae.decode` (one latent, batch 1), then, for each N of `--ranks`, this
process as rank 0 of N (`paradiff.comm.emulate`: a fake process group, every collective a local copy of its size)
with `paradiff.parallelize_vae`. Rank 0 computes its band of rows with the halo, GroupNorm-statistics and K/V
exchanges of the real run; its memory is the real run's rank 0 (its halos and statistics are copies of its own,
the same size), its time is one rank's compute without the network (a lower bound on the N-GPU decode time). A
middle rank holds two halos instead of one: a few rows more.

Per configuration: median decode ms over --repeat calls (after one untimed), peak memory above what was allocated
before the call (the activations; weights and latent excluded) and the absolute peak, in GiB (CUDA allocator; on
the CPU, torch.profiler's allocation records, a rough figure). A configuration that runs out of memory is recorded
as such. Writes vae-bench.json and vae-bench.md to --out after every configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from paradiff import bench, runtime


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="stable-diffusion-xl-base-1.0", help="architecture whose VAE is decoded")
    p.add_argument("--sizes", default="2048,4096", help="comma list of square image sizes in px")
    p.add_argument("--ranks", default="2,4", help="comma list of N: rank 0 of N is emulated for each")
    p.add_argument("--repeat", type=int, default=3, help="timed decodes per configuration (after one untimed)")
    p.add_argument("--tiny", action="store_true", help="tiny random VAE in fp32 (CPU smoke run; sizes capped at 256)")
    p.add_argument("--out", required=True, help="output directory for vae-bench.json / .md")
    return p.parse_args(argv)


def build_vae(args, device, dtype):
    if args.tiny:  # tests/support/models.py: the one factory of tiny models (the whole repo travels)
        tests = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))
        sys.path.insert(0, tests)
        from support.models import tiny_vae

        return tiny_vae().to(device).requires_grad_(False)  # fp32
    from paradiff.archs import build_model

    return build_model(args.arch, "vae", dtype=dtype, device=device)


def measure(vae, z, device, repeat):
    """Decode `z`: median ms, activation peak and absolute peak in GiB (None where not measurable)."""
    decode = lambda: vae.decode(z, return_dict=False)[0]  # noqa: E731
    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            decode()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            activation, absolute = (peak - before) / 2**30, peak / 2**30
        else:
            activation, absolute = bench.cpu_peak_bytes(decode) / 2**30, None
        times = bench.time_calls(decode, device, runs=repeat, warmup=1)
    return {"decode_ms": statistics.median(times), "activation_gib": activation, "peak_gib": absolute}


def run_one(name, vae, z, device, repeat):
    start = time.perf_counter()
    try:
        row = measure(vae, z, device, repeat)
    except torch.cuda.OutOfMemoryError as err:
        row = {"decode_ms": None, "activation_gib": None, "peak_gib": None, "error": f"out of memory: {err}"[:300]}
        torch.cuda.empty_cache()
    row.update(config=name, wall_s=time.perf_counter() - start)
    shown = "OOM" if row.get("error") else (f"{row['decode_ms']:.1f} ms, activations {row['activation_gib']:.3f} GiB")
    print(f"{name:28s} {shown}", flush=True)
    return row


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.tiny:
        sizes = sorted({min(s, 256) for s in sizes})
    ranks = [int(n) for n in args.ranks.split(",")]
    vae = build_vae(args, device, dtype)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    meta = {"env": bench.environment(device), "arch": "tiny" if args.tiny else args.arch,
            "dtype": str(dtype).removeprefix("torch."), "repeat": args.repeat, "latent_px": scale,
            "memory": "CUDA allocator" if device.type == "cuda" else "CPU, torch.profiler allocation records (rough)",
            "emulated": "rank 0 of N: fake process group, collectives are local copies (no network)"}
    rows = []
    latents = {}
    for size in sizes:
        rows_px = size // scale
        latents[size] = torch.randn(1, vae.config.latent_channels, rows_px, rows_px,
                                    generator=torch.Generator().manual_seed(0)).to(device, dtype)
        rows.append({**run_one(f"serial {size}px", vae, latents[size], device, args.repeat), "size": size, "ranks": 1})
        write(args, meta, rows, quiet=True)
    from paradiff import parallelize_vae
    from paradiff.comm import emulate

    for n in ranks:
        emulate.start(n, device)
        try:
            handle = parallelize_vae(vae)
            for size in sizes:
                row = run_one(f"rank 0 of {n}, {size}px", vae, latents[size], device, args.repeat)
                rows.append({**row, "size": size, "ranks": n})
                write(args, meta, rows, quiet=True)
            handle.remove()
        finally:
            emulate.stop()
    write(args, meta, rows)
    runtime.shutdown()


def write(args, meta, rows, quiet=False):
    serial = {r["size"]: r for r in rows if r["ranks"] == 1}
    for r in rows:
        base = serial.get(r["size"])
        ok = base and not base.get("error") and not r.get("error")
        r["activation_ratio"] = r["activation_gib"] / base["activation_gib"] if ok else None
        r["time_ratio"] = r["decode_ms"] / base["decode_ms"] if ok else None
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "vae-bench.json"), "w") as f:
        json.dump({**meta, "results": rows}, f, indent=2)

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    env = meta["env"]
    lines = [f"# Patch-parallel VAE decode: {meta['arch']} VAE, batch 1, {meta['dtype']}", "",
             f"{env['device']}, torch {env['torch']}, diffusers {env['diffusers']}, {env['date']}",
             f"`{env['command']}`", "", f"Memory: {meta['memory']}. Parallel rows: {meta['emulated']}.", "",
             "| config | decode ms | x serial | activation peak GiB | x serial | absolute peak GiB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['config']} | OOM | - | - | - | - |")
            continue
        lines.append(f"| {r['config']} | {r['decode_ms']:.1f} | {fmt(r['time_ratio'], '.2f')} | "
                     f"{r['activation_gib']:.3f} | {fmt(r['activation_ratio'], '.2f')} | {fmt(r['peak_gib'], '.2f')} |")
    lines += ["", "Activation peak: the decode's peak above what was allocated before it (weights and the latent "
              "excluded). Rank 0 of N's time is its compute alone: the real run adds the halo, statistics, K/V and "
              "output all-gathers over the network."]
    with open(os.path.join(args.out, "vae-bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
