"""AsyncDenoise on one device (`paradiff.comm.emulate`, rank k of N): point-to-point transfers become local copies,
and each component reports its step time, memory and the bytes it moves per step; the figures of a rank match the
real run's (2 gloo ranks)."""

import os
import sys
from types import SimpleNamespace

import pytest
import torch

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
STEPS = 5


def _async_bench():
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    import async_bench

    return async_bench


def _one_rank(rank: int, world: int, emulated: bool) -> dict:
    """This rank's AsyncDenoise run of the tiny UNet: bytes per step, parameters kept, the output's shape."""
    import torch.distributed as dist

    from paradiff import AsyncDenoise
    from paradiff.comm import emulate, p2p
    from paradiff.parallel import parallelize_module

    bench = _async_bench()
    if emulated:
        emulate.start(world, "cpu", rank=rank)
    try:
        unet = bench.build(None, torch.float32, torch.device("cpu"))
        latent, kwargs = bench.call_inputs(unet, 128, torch.float32, torch.device("cpu"))
        sched = bench.scheduler()
        method = AsyncDenoise(warmup_steps=2)
        parallelize_module(unet, method, groups={"async": dist.group.WORLD}, scheduler=lambda: sched)
        with torch.no_grad():
            out = bench.denoise(unet, sched, latent, kwargs, STEPS)
        moved = method.state.p2p.bytes_per_step()
        counted = (p2p.transport.sent, p2p.transport.received) if emulated else None
        return {"moved": moved, "counted": counted, "params": sum(p.numel() for p in unet.parameters()),
                "shape": tuple(out.shape), "finite": bool(torch.isfinite(out).all())}
    finally:
        if emulated:
            emulate.stop()


def _real_rank(world: int) -> dict:
    import torch.distributed as dist

    return _one_rank(dist.get_rank(), world, emulated=False)


def test_each_rank_emulated_moves_what_the_exchange_says():
    """Rank k of 2 in one process: the local transport counts every step's bytes (the first, discovering step
    included), what one component sends the other receives, and each keeps only its component's weights."""
    from paradiff.comm import emulate, p2p

    ranks = [_one_rank(rank, 2, emulated=True) for rank in range(2)]
    assert not emulate.active() and type(p2p.transport) is p2p.Transport  # stop() restored the real backends
    sent, received = (sum(r["moved"][k] for r in ranks) for k in ("sent", "received"))
    assert sent == received > 0
    for r in ranks:
        assert r["counted"] == (STEPS * r["moved"]["sent"], STEPS * r["moved"]["received"])
        assert r["shape"] == (1, 4, 16, 16) and r["finite"]
    whole = sum(p.numel() for p in _async_bench().build(None, torch.float32, torch.device("cpu")).parameters())
    assert all(r["params"] < whole for r in ranks)
    with pytest.raises(ValueError, match="rank must be 0 to 1"):
        emulate.start(2, "cpu", rank=2)


def test_async_bench_emulated_report(tmp_path):
    """`async_bench.py --emulate-ranks 2 --tiny`: the whole model's step, then each component's, ratio and bytes."""
    import json

    bench = _async_bench()
    args = SimpleNamespace(emulate_ranks=2, device="cpu", compile_backend=None, no_graphs=True, tiny=True,
                           arch=[], steps=4, repeats=1, warmup_steps=2, out=str(tmp_path))
    assert bench.run_emulated(args) == 0
    report = json.loads((tmp_path / "async-emulated.json").read_text())
    whole, *components = report["results"]
    assert whole["rank"] is None and [c["rank"] for c in components] == [0, 1]
    for c in components:
        assert 0 < c["step_ratio"] < 1.5 and c["params"] < whole["params"]
        assert c["step_ratio"] == pytest.approx(c["forward_ms"] / whole["forward_ms"])
    assert components[0]["sent_mb_per_step"] == components[1]["received_mb_per_step"] > 0
    assert "component 1" in (tmp_path / "async-emulated.md").read_text()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_an_emulated_rank_moves_and_keeps_what_the_real_rank_does():
    """The same figures from 2 real gloo ranks: bytes per step and parameters kept, rank by rank."""
    from support.distributed import run_ranks

    real = run_ranks(_real_rank, 2, 2, timeout=200)
    emulated = [_one_rank(rank, 2, emulated=True) for rank in range(2)]
    for r, e in zip(real, emulated):
        assert (r["moved"], r["params"], r["shape"]) == (e["moved"], e["params"], e["shape"])
