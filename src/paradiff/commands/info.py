"""`paradiff info`: versions, devices and backends; `--check` runs a collective across all ranks."""

from __future__ import annotations

import argparse
import os
import platform
import time

from paradiff.commands.common import positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="versions, devices and distributed backends",
                       description="Print versions, devices and backends. With --check, every rank takes part in "
                                   "an all-reduce, which tests a multi-GPU or multi-node setup.")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"))
    p.add_argument("--check", action="store_true", help="run an all-reduce over all ranks and report")
    p.add_argument("--nproc", type=positive_int, default=None, help="start N local ranks (not needed under torchrun)")
    # Fault injection for the launcher's own tests: one rank dies or hangs before the collective.
    p.add_argument("--fault-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--fault", choices=("die", "hang"), default=None, help=argparse.SUPPRESS)
    p.set_defaults(run=run)


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def run(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from paradiff import __version__, runtime

    rt = runtime.init(args.device)
    if rt.is_main:
        rows = [
            ("paradiff", __version__),
            ("python", platform.python_version()),
            ("torch", torch.__version__),
            ("diffusers", _version("diffusers")),
            ("transformers", _version("transformers")),
            ("cuda", f"{torch.version.cuda} ({torch.cuda.device_count()} GPU(s) visible)" if torch.cuda.is_available()
             else "not available"),
        ]
        for i in range(torch.cuda.device_count()):
            rows.append((f"  cuda:{i}", torch.cuda.get_device_name(i)))
        rows += [
            ("nccl", ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() and dist.is_nccl_available() else "not available"),
            ("gloo", "available" if dist.is_gloo_available() else "not available"),
            ("ranks", f"{rt.world_size} (backend {rt.backend or 'none: single process'}, device {rt.device})"),
            ("collective timeout", f"{runtime.timeout_seconds():.0f} s (PARADIFF_TIMEOUT)"),
        ]
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            print(f"{key:<{width}}  {value}")
    if args.check:
        if args.fault_rank == rt.rank and args.fault == "die":
            os._exit(17)
        if args.fault_rank == rt.rank and args.fault == "hang":
            time.sleep(3600)
        value = torch.ones(1, device=rt.device) * (rt.rank + 1)
        start = time.perf_counter()
        if rt.distributed:
            dist.all_reduce(value)
        expected = rt.world_size * (rt.world_size + 1) / 2
        ok = abs(value.item() - expected) < 1e-6
        if rt.is_main:
            print(f"all-reduce over {rt.world_size} rank(s): {'OK' if ok else 'WRONG SUM'} "
                  f"({(time.perf_counter() - start) * 1e3:.1f} ms, {rt.backend or 'single process'})")
        return 0 if ok else 1
    return 0
