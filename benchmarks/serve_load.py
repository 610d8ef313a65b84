"""Load test of a running `paradiff serve`: N concurrent clients, M requests in all (bounded), then a report.

    paradiff serve --method patch --nproc 2 --sizes 1024x1024 --steps 30 --compile      # terminal 1
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --clients 8 --requests 64 # terminal 2

Reports throughput (images/s), latency p50/p90/p99, refusals (503: queue full), and the server's overhead:
request latency minus the time the request waited for the ranks and minus the bare pipeline call, both measured
in the server process on rank 0 (X-Queue-Seconds and X-Generation-Seconds response headers). The overhead is
measured twice: one client alone (`--solo` sequential requests: HTTP, validation, queueing, broadcast to the ranks,
encoding; the latency ends when the image's bytes have arrived, `--decode` adds the client's decoding) and under
the concurrent load. A refused request counts as one (`--retries N` retries it instead, after
the server's Retry-After; its latency then includes the waits). `--json FILE` writes every number and each
request's timings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from paradiff.client import Client, ServerError  # noqa: E402


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def one_request(client: Client, args: argparse.Namespace, seed: int) -> dict:
    start = time.perf_counter()
    try:
        client.generate(args.prompt, size=args.size, steps=args.steps, seed=seed, output_format=args.format,
                        decode=args.decode)
    except ServerError as err:
        return {"status": err.status, "latency_s": time.perf_counter() - start, "error": str(err)}
    latency = time.perf_counter() - start
    queue_s = float(client.last_headers.get("X-Queue-Seconds") or 0)
    generation_s = float(client.last_headers.get("X-Generation-Seconds") or 0)
    encode_s = float(client.last_headers.get("X-Encode-Seconds") or 0)
    return {"status": 200, "latency_s": latency, "queue_s": queue_s, "generation_s": generation_s,
            "encode_s": encode_s, "overhead_s": latency - queue_s - generation_s}


def summarize(rows: list[dict], seconds: float | None = None) -> dict:
    ok = [r for r in rows if r["status"] == 200]
    latency = [r["latency_s"] for r in ok]
    overhead = [r["overhead_s"] for r in ok]
    out = {
        "requests": len(rows), "ok": len(ok), "refused_503": sum(r["status"] == 503 for r in rows),
        "other_errors": sum(r["status"] not in (200, 503) for r in rows),
        "latency_p50_s": percentile(latency, 50), "latency_p90_s": percentile(latency, 90),
        "latency_p99_s": percentile(latency, 99),
        "generation_mean_s": statistics.fmean(r["generation_s"] for r in ok) if ok else None,
        "generation_p50_s": percentile([r["generation_s"] for r in ok], 50),
        "encode_p50_s": percentile([r["encode_s"] for r in ok], 50),
        "queue_mean_s": statistics.fmean(r["queue_s"] for r in ok) if ok else None,
        "overhead_p50_s": percentile(overhead, 50), "overhead_p99_s": percentile(overhead, 99),
    }
    if seconds is not None:
        out["seconds"] = seconds
        out["images_per_s"] = len(ok) / seconds if seconds > 0 else None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None, help="default: PARADIFF_API_KEY")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--requests", type=int, default=32, help="requests in all under load (default 32)")
    p.add_argument("--solo", type=int, default=5, help="sequential requests from one client first (default 5)")
    p.add_argument("--prompt", default="a red circle on the left, blue background")
    p.add_argument("--size", default=None, help="HxW from the server's sizes (default: its first)")
    p.add_argument("--steps", type=int, default=None, help="default: the server's")
    p.add_argument("--format", default="png", choices=("png", "jpeg", "webp"))
    p.add_argument("--decode", action="store_true",
                   help="decode each image in the client too (default: the latency ends with the image's bytes)")
    p.add_argument("--retries", type=int, default=0,
                   help="retry a 503 (queue full) this many times after its Retry-After (default 0: count it)")
    p.add_argument("--json", default=None, help="write the report and every request's timings here")
    args = p.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.solo < 0:
        p.error("--clients and --requests must be 1 or more, --solo 0 or more")

    probe = Client(args.url, api_key=args.api_key, timeout=30)
    try:
        health = probe.health()
    except ServerError as err:
        print(f"serve_load: {err}", file=sys.stderr)
        return 2
    if health.get("status") != "ready":
        print(f"serve_load: the server is not ready ({health.get('status')}); wait for /health to answer 200.",
              file=sys.stderr)
        return 2

    solo_client = Client(args.url, api_key=args.api_key, timeout=900)
    solo = [one_request(solo_client, args, seed) for seed in range(args.solo)]

    rows: list[dict] = []
    lock = threading.Lock()
    counter = iter(range(args.requests))

    def client_loop() -> None:
        client = Client(args.url, api_key=args.api_key, timeout=900, retries=args.retries)
        while True:
            with lock:
                seed = next(counter, None)
            if seed is None:
                return
            row = one_request(client, args, 1000 + seed)
            with lock:
                rows.append(row)

    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start

    report = {"url": args.url, "server": {k: v for k, v in health.items() if k != "http_status"},
              "clients": args.clients, "solo": summarize(solo) if solo else None,
              "load": summarize(rows, seconds), "date": time.strftime("%Y-%m-%d %H:%M:%S")}

    def ms(value):
        return "-" if value is None else f"{value * 1e3:.1f} ms"

    if solo:
        s = report["solo"]
        print(f"one client, {s['requests']} requests: latency p50 {ms(s['latency_p50_s'])}, pipeline "
              f"{ms(s['generation_mean_s'])} mean, server overhead p50 {ms(s['overhead_p50_s'])} "
              f"p99 {ms(s['overhead_p99_s'])} (of which encoding p50 {ms(s['encode_p50_s'])})")
    s = report["load"]
    print(f"{args.clients} clients, {s['requests']} requests in {s['seconds']:.1f} s: {s['images_per_s']:.2f} images/s, "
          f"{s['ok']} ok, {s['refused_503']} refused (503), {s['other_errors']} other errors")
    print(f"  latency p50 {ms(s['latency_p50_s'])}  p90 {ms(s['latency_p90_s'])}  p99 {ms(s['latency_p99_s'])}; "
          f"queue wait mean {ms(s['queue_mean_s'])}; pipeline mean {ms(s['generation_mean_s'])}")
    print(f"  server overhead (latency - queue wait - pipeline) p50 {ms(s['overhead_p50_s'])}  "
          f"p99 {ms(s['overhead_p99_s'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**report, "solo_rows": solo, "load_rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0 if s["other_errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
