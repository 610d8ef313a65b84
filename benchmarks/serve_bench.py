"""The serving overhead of `paradiff serve` on one rank, against the bare pipeline call, in one command.

    python3 benchmarks/serve_bench.py --out DIR                 # GPU: random-weight SDXL fp16, 1024 px, compiled
    python3 benchmarks/serve_bench.py --tiny --out DIR          # CPU smoke: a tiny random SDXL pipeline, no compile

Stages, each in its own process so the GPU is free for the next, all within `--budget` seconds:
1. build: `paradiff.archs.build_pipeline(--arch)` with random weights (fp16 on a GPU), saved with `save_pretrained`
   to `--model-dir` (what a user serves is a folder);
2. serve: `paradiff serve --model DIR --sizes SxS --steps N --compile` (one rank, method none: the UNet under
   torch.compile(mode="reduce-overhead"), CUDA graphs included, the strongest single-GPU baseline), waited for
   until /health answers 200 (compile and warm-up), then `serve_load.py`: `--solo` sequential requests from one
   client, then `--clients` concurrent clients sending `--requests` in all; then SIGTERM (a drain, exit 0);
3. bare: the same pipeline call in a fresh process (loaded and compiled the same way, the inductor cache now warm,
   `make_runner`'s call with the requests' arguments), `--bare-runs` timed calls of each kind, interleaved: PIL
   images (a user's call) and uint8 arrays made on the device (the server's call); skipped when too little of the
   budget is left.
Files in `--out`: serve_bench.json (everything, each request's timings too), serve_bench.md, server.log,
stages.log (build and bare). The report gives throughput, latency p50/p90/p99, the overhead
(latency minus queue wait minus the server's own timing of the pipeline call) and the overhead against the bare
call of stage 3, with the command, device, versions and date. Target (issue 18): overhead <= 3 % of the call, p50.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "src"))
TARGET = 0.03
PROMPT = "a red circle on the left, blue background"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random SDXL pipeline on the CPU, no compile (smoke)")
    p.add_argument("--arch", default="sdxl", help="shipped architecture to build (default sdxl)")
    p.add_argument("--size", type=int, default=None, help="square image size (default 1024; --tiny 64)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 30; --tiny 4)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="serve with --compile (default: on a GPU, not with --tiny)")
    p.add_argument("--solo", type=int, default=10, help="sequential requests of one client (default 10)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--requests", type=int, default=16, help="requests of the concurrent clients in all (16)")
    p.add_argument("--bare-runs", type=int, default=5, help="timed bare pipeline calls (default 5)")
    p.add_argument("--bare-seconds", type=float, default=None,
                   help="budget left that the bare stage needs to start (default 100 compiled, 30 otherwise)")
    p.add_argument("--budget", type=float, default=500, help="seconds for everything (default 500)")
    p.add_argument("--model-dir", default=None, help="where the pipeline folder is written (default under /tmp)")
    p.add_argument("--out", required=True, help="folder for the report and the logs")
    p.add_argument("--stage", choices=("all", "build", "bare"), default="all", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.size = args.size or (64 if args.tiny else 1024)
    args.steps = args.steps or (4 if args.tiny else 30)
    if args.compile is None:
        args.compile = not args.tiny and _cuda()
    args.model_dir = args.model_dir or f"/tmp/paradiff-serve-{'tiny' if args.tiny else args.arch}"
    if args.bare_seconds is None:
        args.bare_seconds = 100.0 if args.compile else 30.0
    return args


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# -- stage 1: build and save -----------------------------------------------------------------------------------

def build(args: argparse.Namespace) -> None:
    import torch

    from paradiff.archs import build_pipeline

    arch = args.arch
    if args.tiny:  # the architecture: a folder of the tiny SDXL pipeline's configs (build_pipeline reads folders)
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from support.models import tiny_sdxl_pipeline

        arch = args.model_dir.rstrip("/") + "-arch"
        tiny_sdxl_pipeline().save_pretrained(arch)
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = build_pipeline(arch, dtype=dtype, device=device).to("cpu")
    built = time.perf_counter() - start
    pipe.save_pretrained(args.model_dir)
    print(json.dumps({"build_s": round(built, 1), "save_s": round(time.perf_counter() - start - built, 1),
                      "class": type(pipe).__name__}))


# -- stage 3: the bare pipeline call ---------------------------------------------------------------------------

def serve_argv(args: argparse.Namespace) -> list[str]:
    argv = ["serve", "--model", args.model_dir, "--sizes", f"{args.size}x{args.size}", "--steps", str(args.steps)]
    return argv + (["--compile"] if args.compile else [])


def bare(args: argparse.Namespace) -> None:
    """The call a request makes, without the server: loaded, compiled and warmed up as `serve` does."""
    import torch

    from paradiff.cli import build_parser
    from paradiff.commands.generate import prepare_pipeline
    from paradiff.serve.server import make_runner, serving_pipelines, warmup_requests

    serve_args = build_parser().parse_args(serve_argv(args))
    start = time.perf_counter()
    rt, pipe = prepare_pipeline(serve_args)
    pipe.set_progress_bar_config(disable=True)
    inputs, img2img = serving_pipelines(pipe)
    user = make_runner(pipe, embedded_model=False, img2img=img2img, pixels=False)  # PIL images, as a user calls it
    served = make_runner(pipe, embedded_model=False, img2img=img2img)  # uint8 arrays made on the device, as served
    warm = warmup_requests([(args.size, args.size)], args.steps, None, inputs)[0]
    for runner in (user, served, user):
        runner(warm)
    ready = time.perf_counter() - start
    seconds, pixels_seconds = [], []
    for seed in range(args.bare_runs):  # what serve_load's solo client asks for; the two calls interleaved
        params = {**warm, "prompt": PROMPT, "seed": seed}
        for runner, times in ((user, seconds), (served, pixels_seconds)):
            if rt.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            runner(params)  # returns host images: the GPU work is done
            times.append(time.perf_counter() - t)
    print(json.dumps({"ready_s": round(ready, 1), "seconds": seconds, "pixels_seconds": pixels_seconds}))


# -- the whole run ---------------------------------------------------------------------------------------------

def _stage(args: argparse.Namespace, stage: str, timeout: float, log: str) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--stage", stage, "--out", args.out,
            "--model-dir", args.model_dir, "--size", str(args.size), "--steps", str(args.steps),
            "--bare-runs", str(args.bare_runs), "--arch", args.arch,
            "--compile" if args.compile else "--no-compile"] + (["--tiny"] if args.tiny else [])
    with open(log, "a") as f:
        f.write(f"== {stage}: {' '.join(argv)}\n")
        f.flush()
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=f, text=True, timeout=max(1.0, timeout))
    if proc.returncode != 0:
        raise SystemExit(f"serve_bench: the {stage} stage failed (exit {proc.returncode}); see {log}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _health(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


def serve_and_load(args: argparse.Namespace, deadline: float) -> dict:
    import serve_load

    log_path = os.path.join(args.out, "server.log")
    log = open(log_path, "w")
    command = [sys.executable, "-m", "paradiff", *serve_argv(args), "--port", "0", "--max-queue", "64",
               "--timeout", "900"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    def stop(signum, frame):  # `timeout` or the device tool: the server must not outlive this run
        raise SystemExit(f"serve_bench: stopped by {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, stop)

    def output() -> str:
        with open(log_path) as f:
            return f.read()

    try:
        url = None
        while time.monotonic() < deadline and server.poll() is None:
            match = re.search(r"listening on (http://\S+)", output())
            if match:
                url = match.group(1)
                if _health(url) == 200:
                    break
            time.sleep(0.5)
        if url is None or _health(url) != 200:
            raise SystemExit(f"serve_bench: the server was not ready in time (exit {server.poll()}); see {log_path}")
        ready_s = time.monotonic() - start
        load_json = args.model_dir.rstrip("/") + "-load.json"  # its contents go into the report
        code = serve_load.main(["--url", url, "--solo", str(args.solo), "--clients", str(args.clients),
                                "--requests", str(args.requests), "--prompt", PROMPT, "--json", load_json])
        with open(load_json) as f:
            load = json.load(f)
        server.send_signal(signal.SIGTERM)
        rc = server.wait(60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
        log.close()
    text = output()
    warm = re.search(r"\(warm-up: ([^;]*);", text)
    return {"command": " ".join(["paradiff", *command[3:]]), "ready_s": round(ready_s, 1), "load_exit": code,
            "server_exit": rc, "warm_up": warm.group(1) if warm else None, "load": load,
            "stopped_cleanly": "stopped cleanly" in text}


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "fastapi", "starlette", "uvicorn", "pydantic", "pillow", "isal"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    try:
        out["paradiff_commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    except OSError:
        out["paradiff_commit"] = None
    return out


def device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (1 GPU), {os.cpu_count()} CPU cores"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _ms(value) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


def _p50(values: list) -> float | None:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else None


def markdown(report: dict) -> str:
    solo, load = report["serve"]["load"]["solo"], report["serve"]["load"]["load"]
    s, o = report["setup"], report["overhead"]
    lines = [f"# paradiff serve, one rank: {s['model']} {s['size']}x{s['size']}, {s['steps']} steps, "
             f"{'compiled' if s['compile'] else 'eager'}", "",
             f"{report['date']}; {report['device']}; " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
             "", f"Command: `{report['command']}`", "", f"Server: `{report['serve']['command']}` (ready after "
             f"{report['serve']['ready_s']} s; warm-up {report['serve']['warm_up']}; exit "
             f"{report['serve']['server_exit']} after SIGTERM)", "",
             "| run | requests | images/s | latency p50 ms | p90 ms | p99 ms | pipeline p50 ms | overhead p50 ms | "
             "overhead p99 ms | PNG encode p50 ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in (("1 client, sequential", solo), (f"{report['serve']['load']['clients']} clients", load)):
        rate = f"{row['images_per_s']:.3f}" if row.get("images_per_s") else "-"
        lines.append(f"| {name} | {row['ok']}/{row['requests']} | {rate} | {_ms(row['latency_p50_s'])} | "
                     f"{_ms(row['latency_p90_s'])} | {_ms(row['latency_p99_s'])} | {_ms(row['generation_p50_s'])} | "
                     f"{_ms(row['overhead_p50_s'])} | {_ms(row['overhead_p99_s'])} | {_ms(row['encode_p50_s'])} |")
    lines += ["", f"Overhead at p50, one client: {o['server_ratio'] * 100:.2f} % of the server's pipeline call "
                  f"(latency - queue - call, over the call)."]
    if o.get("bare_ratio") is not None:
        lines.append(f"Against the bare call in its own process (p50 {_ms(o['bare_p50_s'])} ms of "
                     f"{len(report['bare']['seconds'])} runs): latency p50 - bare p50 = {o['bare_ratio'] * 100:.2f} "
                     "% of the bare call.")
        if o.get("bare_pixels_p50_s") is not None:
            lines.append(f"The server's call (uint8 made on the device) in the same bare process: p50 "
                         f"{_ms(o['bare_pixels_p50_s'])} ms.")
    else:
        lines.append(f"Bare call not measured: {report['bare'].get('skipped')}.")
    lines.append(f"Target <= {TARGET * 100:g} % at p50: {'met' if o['met'] else 'NOT met'}.")
    return "\n".join(lines) + "\n"


def run_all(args: argparse.Namespace, argv: list[str]) -> int:
    start = time.monotonic()
    deadline = start + args.budget
    os.makedirs(args.out, exist_ok=True)
    built = _stage(args, "build", deadline - time.monotonic(), os.path.join(args.out, "stages.log"))
    print(f"serve_bench: built and saved {built['class']} to {args.model_dir} ({built})", flush=True)
    served = serve_and_load(args, deadline - 30)
    left = deadline - time.monotonic()
    if left > args.bare_seconds:
        try:
            bare_result = _stage(args, "bare", left - 5, os.path.join(args.out, "stages.log"))
        except subprocess.TimeoutExpired:
            bare_result = {"skipped": f"the bare stage ran past the budget ({left - 5:.0f} s)", "seconds": []}
        except SystemExit as err:  # it failed: the report still gives the served figures
            bare_result = {"skipped": str(err), "seconds": []}
    else:
        bare_result = {"skipped": f"{left:.0f} s of the budget left, {args.bare_seconds:.0f} s needed", "seconds": []}
    solo = served["load"]["solo"]
    bare_p50 = _p50(bare_result["seconds"])
    overhead = {"server_ratio": solo["overhead_p50_s"] / solo["generation_p50_s"], "bare_p50_s": bare_p50,
                "bare_pixels_p50_s": _p50(bare_result.get("pixels_seconds", [])),
                "bare_ratio": (solo["latency_p50_s"] - bare_p50) / bare_p50 if bare_p50 else None}
    overhead["met"] = all(r <= TARGET for r in (overhead["server_ratio"], overhead["bare_ratio"]) if r is not None)
    report = {"command": "python3 benchmarks/serve_bench.py " + " ".join(argv), "date": time.strftime("%Y-%m-%d %H:%M"),
              "device": device(), "versions": versions(),
              "setup": {"model": "tiny random SDXL" if args.tiny else f"random-weight {args.arch} fp16",
                        "size": args.size, "steps": args.steps, "compile": args.compile, "ranks": 1,
                        "method": "none", "solo": args.solo, "clients": args.clients, "requests": args.requests},
              "build": built, "serve": served, "bare": bare_result, "overhead": overhead,
              "seconds": round(time.monotonic() - start, 1)}
    with open(os.path.join(args.out, "serve_bench.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(report)
    with open(os.path.join(args.out, "serve_bench.md"), "w") as f:
        f.write(text)
    print(text)
    ok = served["server_exit"] == 0 and served["load_exit"] == 0 and solo["ok"] == solo["requests"]
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.stage == "build":
        build(args)
        return 0
    if args.stage == "bare":
        bare(args)
        return 0
    sys.path.insert(0, HERE)
    return run_all(args, argv)


if __name__ == "__main__":
    sys.exit(main())
